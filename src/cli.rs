//! The `weftlog` command line. Every command prints JSON on stdout (one
//! object, or one object per line for lists); errors go to stderr as one
//! sentence with a non-zero exit code, and nothing is written.

use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use weftlog_proto::event::{Compensation, Policy};
use weftlog_proto::fork_proof::{ForkProof, ForkProofJson};
use weftlog_proto::peers::PeersConfig;
use weftlog_proto::state::Draft;
use weftlog_proto::text::{self, Hex, Splice, TextEdit};
use weftlog_proto::{EventId, Hlc, Meta, Op, State};

use crate::json;
use crate::node::{self, Node};
use crate::remote::{self, Remote};
use crate::storage::sync_dir;
use crate::tls::Members;

/// weftlog: a leaderless, CRDT-based replicated event log for systems that
/// must keep working while disconnected.
///
/// Each node keeps a durable, signed, append-only log in its data directory.
/// Commands become events; each stream's state is a deterministic fold of its
/// events into registers (concurrent writes kept as conflicts), counters and
/// escrow counters. Nodes sync over QUIC (`weftlog run`), or exchange what
/// the other lacks with export/import files; `weftlog simulate` shows how a
/// cluster behaves under partitions, crashes and loss.
#[derive(Parser, Debug)]
#[command(
    name = "weftlog",
    version,
    propagate_version = true,
    after_help = "Examples:\n  \
    weftlog init\n  \
    weftlog append --stream customer/20 --kind Registered --set name='\"Ada\"' --set email='\"ada@example.org\"'\n  \
    weftlog append --stream event/keynote --kind SeatsOpened --escrow-init seats=100\n  \
    weftlog append --stream customer/20 --kind NotesEdited --splice notes=0:0:'vegan, no nuts'\n  \
    weftlog get --stream customer/20\n  \
    weftlog --data other status > other.status\n  \
    weftlog export --since other.status --out to-other.weft\n  \
    weftlog --data other import to-other.weft\n  \
    weftlog run --listen 0.0.0.0:4270 --http 127.0.0.1:4280 --peer 10.0.0.2:4270 --members members.txt\n  \
    weftlog simulate --scenario venue --seeds 1..100 --report venue.html\n\n\
    Output is JSON on stdout; errors are one sentence on stderr with a non-zero exit code."
)]
pub struct Cli {
    /// Data directory of the node.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "weftlog-data"
    )]
    pub data: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Create a node: a new ed25519 key and an empty log. Refuses to
    /// overwrite an existing node.
    Init,
    /// Append one event (acknowledged once it is on disk), or, with
    /// `--batch FILE`, one event per line of FILE.
    Append(AppendArgs),
    /// Show a stream's state: fields (with conflicts), counters, escrow.
    Get {
        /// Stream name, e.g. customer/20.
        #[arg(long)]
        stream: String,
        /// Show the state as of this hybrid logical clock value (as printed
        /// in the `hlc` of `append` and `log`): only events with hlc <= it.
        #[arg(long, value_name = "HLC")]
        as_of: Option<u64>,
    },
    /// Print events, one JSON object per line, in canonical order
    /// (ascending hlc, author, seq); with --from or --follow, in this
    /// node's log order with each event's position.
    ///
    /// Positions count from 1 in this node's log; `pos` is one, and `token`
    /// (EPOCH-POS-CHECK) names it in this log's history, to resume from.
    /// A token from another history (the log was restored, or it is
    /// another node's) starts again from the beginning, saying so on
    /// stderr.
    Log {
        /// Only this stream's events.
        #[arg(long)]
        stream: Option<String>,
        /// Print the events after this position, in log order: a number
        /// (0: from the beginning) or a token as `token` prints it.
        #[arg(long, value_name = "POS")]
        from: Option<String>,
        /// Keep printing events as they become durable, until the node
        /// stops or Ctrl-C (needs the node running: `weftlog run`).
        /// Without --from, from now on.
        #[arg(long)]
        follow: bool,
        /// Mark events whose author this member list does not name
        /// ("non_member": true). While the node runs, its own `run
        /// --members` list applies instead.
        #[arg(long, value_name = "FILE")]
        members: Option<PathBuf>,
    },
    /// List fields with concurrent values, one JSON object per line.
    Conflicts,
    /// Node id, event count, frontier (per author: highest seq and its id),
    /// the state hash (equal on nodes holding the same events) and the
    /// equivocations (forks) seen by sync. While the node runs: also its
    /// peers and the partition blocks. With a member list (`--members`, or
    /// the running node's): `non_members`, the authors it does not name.
    Status {
        /// Count the authors this member list does not name. While the
        /// node runs, its own `run --members` list applies instead.
        #[arg(long, value_name = "FILE")]
        members: Option<PathBuf>,
    },
    /// List the forks the log holds, one JSON object per line: authors that
    /// signed two events with one seq (a desk restored from a backup, a
    /// cloned VM), the seq where their branches diverge, the events there
    /// and each branch's head.
    ///
    /// With --proof, each line carries "proof": a record of both events
    /// that anyone can check with `weftlog verify-fork`, with no data
    /// directory and no trust in this node (each branch's encoded events
    /// from the fork seq up to one its author signed, and that signature).
    /// "proof" is null, with "proof_error", while a branch is not yet held
    /// here up to a signed event.
    #[command(after_help = "Example:\n  \
    weftlog forks --proof > forks.jsonl\n  \
    weftlog verify-fork forks.jsonl")]
    Forks {
        /// Add each fork's proof.
        #[arg(long)]
        proof: bool,
    },
    /// List oversold sales, one JSON object per line: the sales the seat
    /// policies' read model marks as beyond capacity (overdraft units of a
    /// risk window, or spends of a forked desk's later branch), with their
    /// compensation ("state": "pending" while none stands, "compensated"
    /// with its action and who decided), then the compensations whose sale
    /// a late event un-marked ("state": "void"). The same on every node
    /// holding the same events.
    Oversold,
    /// List what others did while this node was offline, newest first,
    /// one JSON object per line: per disconnected period that ended (a
    /// peer's connection dropped or was blocked, then a round with it
    /// ended in sync), the events received that are concurrent with this
    /// node's own events of the period, grouped by stream and field, with
    /// the conflicts they left. Reads `reconnects.jsonl` in the data
    /// directory, whether or not the node runs.
    Reconnects {
        /// Print at most this many.
        #[arg(long, value_name = "N", default_value_t = crate::reconnects::LIMIT_DEFAULT)]
        limit: usize,
    },
    /// Decide an oversold sale as staff: write its compensation (cancel,
    /// waitlist, honour or notify), superseding the automatic one that the
    /// policy's on_oversell wrote. Refused for a sale that is not marked
    /// oversold here, and after the policy's override_s (3600 s by
    /// default) since the automatic compensation.
    #[command(after_help = "Example:\n  \
    weftlog oversold\n  \
    weftlog compensate --sale 3f…e1 --action honour --user front-desk")]
    Compensate {
        /// The sale's event id (as `oversold` prints it).
        #[arg(long, value_name = "EVENT_ID")]
        sale: String,
        /// cancel (release the seat), waitlist (release it and put the
        /// registrant on the waitlist), honour (keep it, raise the
        /// capacity) or notify (staff are told; the seat stays taken).
        #[arg(long, value_name = "ACTION")]
        action: String,
        /// Who decided, recorded in the event.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Check fork proofs from the record alone: no data directory is read
    /// (--data is ignored) and no node is asked.
    ///
    /// FILE (or - for stdin) holds the output of `forks --proof` or
    /// `GET /v1/forks?proof=true`, lines of `equivocations.jsonl` that
    /// carry "fork_proof", a proof in JSON form, or a proof in binary form
    /// (PROTOCOL.md §9.6.1). Each proof must show two different events by
    /// one author at one seq, each branch decoding strictly, linked by
    /// prev, and ending at an event with a valid signature by the author.
    ///
    /// Prints one line per proof, {"valid": true, "author", "seq",
    /// "events", "heads"}; if any proof is refused, prints nothing and
    /// exits 1 with the reason.
    #[command(after_help = "Example:\n  \
    weftlog --data desk-a forks --proof | weftlog verify-fork -")]
    VerifyFork {
        /// The file with the proofs, or - for stdin.
        file: PathBuf,
    },
    /// Write the events another node lacks (or all of them) to a file.
    ///
    /// The other node's `status` output names its branch heads: per author
    /// in `frontier`, its `seq` and `head`, or each of its `branches` if the
    /// author forked. For each branch head of this node, the file holds the
    /// chain ending there above the highest seq it shares with the other's
    /// heads of that author, each chain up to its last signed event: what
    /// the other lacks, on every branch. A head this node does not hold is
    /// taken to be ahead on the same chain if the author is not known to
    /// fork; of an author that forked, this node cannot tell where that
    /// head's chain leaves its own, so it sends that author's branches from
    /// seq 1 (the import counts what it held as duplicates). A head naming
    /// an event this node holds at another seq is refused.
    Export {
        /// The other node's `weftlog status` output; without it, export all.
        #[arg(long, value_name = "FRONTIER_FILE")]
        since: Option<PathBuf>,
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Verify and store the events of an export file: all of them, or none.
    ///
    /// With a member list (`--members`, or the running node's), a file
    /// holding events by authors the list does not name is refused, naming
    /// them, unless --allow-non-members is given. Membership gates
    /// connections only: such events are valid, and sync stores them.
    Import {
        /// The export file.
        file: PathBuf,
        /// Refuse events by authors this member list does not name. While
        /// the node runs, its own `run --members` list applies instead.
        #[arg(long, value_name = "FILE")]
        members: Option<PathBuf>,
        /// Store events by non-members too.
        #[arg(long)]
        allow_non_members: bool,
    },
    /// Run the node: sync with peers over QUIC (mutual TLS, members only)
    /// and serve the HTTP API (open on loopback; with --tokens, to holders
    /// of a token), until SIGTERM or Ctrl-C.
    ///
    /// Prints one JSON line when ready: {"node", "quic", "http", "data"}
    /// with the addresses actually bound (port 0 picks a free one). While it
    /// runs, the other commands given the same --data go through its HTTP
    /// API (the data directory is locked). Logs go to stderr; set RUST_LOG
    /// (e.g. RUST_LOG=weftlog=debug) for more or less.
    #[command(after_help = HTTP_HELP)]
    Run(RunArgs),
    /// Run deterministic partition simulations: many nodes in one process,
    /// each running the real protocol core over a simulated network and
    /// storage on virtual time, under partitions, loss, duplication,
    /// reordering, crashes with torn writes and clock skew; then check the
    /// oracles (convergence, durability, causal order, escrow, conflicts).
    ///
    /// Prints a summary (text, or JSON with --json); a failing seed prints
    /// the command that replays it, and the exit code is 1.
    #[command(after_help = SIM_HELP)]
    Simulate(SimArgs),
    /// Mirror the read model of a stopped node into SQL (SQLite or
    /// PostgreSQL), up to the end of its durable log, resuming where the
    /// last run stopped: one transaction per batch of events moves the
    /// rows and the checkpoint together, so a run killed at any point
    /// resumes exactly once. A checkpoint that does not match the log
    /// (another node, another epoch, another event at its position)
    /// rebuilds from scratch, saying why. A running node mirrors live with
    /// `weftlog run --sql`.
    ///
    /// Prints the checkpoint reached; progress goes to stderr.
    #[command(after_help = SQL_HELP)]
    Sql {
        /// Where: sqlite:PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB
        /// (libpq key=value strings are not accepted).
        #[arg(long, value_name = "URL")]
        url: String,
        /// Empty the tables and mirror the whole log again.
        #[arg(long)]
        rebuild: bool,
    },
    /// Three registration desks run real nodes on loopback (QUIC): the
    /// network between them is cut, both sides edit, the network heals, and
    /// they converge. Runs in a temporary directory. With --serve, the
    /// desks keep running with their web pages for a person to try.
    Demo {
        /// Serve the three desks' pages (http://127.0.0.1:PORT/, PORT+1,
        /// PORT+2) with a small conference set up, until Ctrl-C; each page
        /// can cut and heal its desk's network.
        #[arg(long)]
        serve: bool,
        /// The first desk's HTTP port with --serve; 0 lets the system pick
        /// free ports.
        #[arg(long, value_name = "PORT", default_value_t = crate::demo::serve::DEFAULT_PORT, requires = "serve")]
        port: u16,
    },
}

const HTTP_HELP: &str = "HTTP API (JSON; errors are {\"error\": \"...\"}):\n  \
POST /v1/streams/{stream}/events  append; body: {\"kind\", \"set\": {field: json}, \"add\": {counter: int},\n  \
                                  \"escrow_init\": {counter: n}, \"escrow_transfer\": [{\"counter\", \"to\", \"amount\"}],\n  \
                                  \"escrow_consume\": {counter: n}, \"escrow_policy\": {counter: {\"mode\", ...}},\n  \
                                  \"text\": {field: [[pos, delete, \"insert\"], ...]},\n  \
                                  \"base\": {field: [head hex, ...]}, \"payload\", \"expected_version\", \"command_id\", \"user\"}\n  \
                                  (text positions count UTF-16 code units)\n  \
                                  201 created, 200 if the command id exists, 409 version mismatch or unknown base,\n  \
                                  422 refused (e.g. an oversell), 400 malformed\n  \
                                  a JSON array of such bodies appends them in order, one group commit:\n  \
                                  200 and [{\"status\", \"body\"}] per event as a single append answers;\n  \
                                  at most 10000 events and 64 MiB (413), a malformed element 400 (nothing applied)\n  \
GET  /v1/streams/{stream}[?as_of=HLC]   the stream, as `get` prints it\n  \
GET  /v1/log[?stream=S][&from=POS]  events, one JSON object per line (with from: log order, pos, token)\n  \
GET  /v1/conflicts                fields with concurrent values\n  \
GET  /v1/status                   status plus peers (node, addr, connected, behind), blocked, equivocations\n  \
GET  /v1/forks[?proof=true]       forks the log holds, as `forks` prints them (with --proof: their proofs)\n  \
GET  /v1/oversold                 oversold sales and their compensation, as `oversold` prints them\n  \
POST /v1/oversold/{sale}          a staff decision: {\"action\": \"cancel|waitlist|honour|notify\", \"user\"}\n  \
GET  /v1/events[?from=POS]        server-sent events: the log after POS (0: the beginning; a token;\n  \
                                  absent: from now), then every event as it becomes durable, each once;\n  \
                                  id: is each event's token, Last-Event-ID resumes; filters: stream,\n  \
                                  stream_prefix, kind\n  \
GET  /v1/notifications            server-sent notices that are not events: fork, oversold, epoch, reconciled\n  \
GET  /v1/reconnects[?limit=N]     what others did while this node was offline, newest first\n  \
GET  /                            the desk page for registration staff (README: The desk)\n  \
GET  /v1/desk                     this desk's id and name (run --name), every desk's name, its clock\n  \
POST /v1/venue/commands           a conference command: {\"type\", \"command_id\", \"user\", ...}\n  \
                                  (README: Conference commands lists every type)\n  \
GET  /v1/venue/sessions           sessions: seats sold, available, oversold, policy, this desk's rule\n  \
GET  /v1/venue/attendees[?q=TEXT] attendees matching TEXT; /v1/venue/attendees/{id}: one, with conflicts\n  \
POST /v1/export                   an export file; body: optional status JSON of the receiver\n  \
POST /v1/import                   import an export file (body: its bytes)\n  \
POST /v1/admin/partition          {\"block\": [node ids]} cuts those peers off; {\"block\": []} heals\n  \
GET  /v1/whoami                   {\"role\", \"name\", \"auth\"}: who is asking (auth false without --tokens)\n  \
GET  /login, POST /login          the sign-in form; form fields token and name: a session cookie, 303 to /\n  \
POST /logout                      signs out (clears the cookie)\n  \
GET  /metrics                     Prometheus metrics (OpenMetrics if asked, else text 0.0.4), all weftlog_*:\n  \
                                  events_appended_total, events_received_total{via}, duplicates_received_total{via},\n  \
                                  append_latency_seconds, fsync_duration_seconds (histograms),\n  \
                                  log_durable_position, log_size_bytes, conflicts_open, equivocations,\n  \
                                  peer_connected{peer}, peer_events_behind{peer}, peer_{received,sent}_bytes_total{peer},\n  \
                                  projection_lag_events{projection}, sql_lag_events (with a mirror)\n\n\
Security: on loopback without --tokens every request is allowed (as before). Any other HTTP\n\
address needs --tokens FILE (weftlog refuses to start without it). With tokens, each request\n\
sends `Authorization: Bearer TOKEN` or the session cookie from POST /login (weftlog_session:\n\
HttpOnly, SameSite=Strict, 12 h, MACed with the key in <data dir>/http.secret, so it survives a\n\
restart and dies with its token). Roles: read = every GET; desk = read + POST under /v1/streams,\n\
/v1/venue, /v1/oversold; admin = everything. 401 without a valid token (a browser's GET of a\n\
page goes to /login), 403 for a role too weak. Each run writes a fresh admin token to\n\
<data dir>/http.token (mode 0600, removed at stop): the other weftlog commands given the same\n\
--data send it, so they keep working through the running node.\n\n\
Example:\n  \
weftlog --data desk-a run --listen 0.0.0.0:4270 --http 127.0.0.1:4280 --peer 10.0.0.2:4270 --members members.txt\n  \
weftlog --data desk-a run --http 0.0.0.0:4280 --tokens tokens.txt --notify-url http://127.0.0.1:9000/oversold";

const SQL_HELP: &str = "URLs:\n  \
    sqlite:PATH                              an embedded database file\n  \
    postgres://USER[:PASSWORD]@HOST[:PORT]/DB  PostgreSQL (?host=/run/postgresql for a socket)\n\n\
Tables (rows of the log prefix the checkpoint names; JSON is JSONB in PostgreSQL;\n\
128-bit numbers NUMERIC in PostgreSQL, in SQLite an integer or, past 64 bits, text):\n  \
    events(position, id, author, seq, hlc, stream, kind, user_name, command_id, payload JSON)\n  \
    streams(stream, version)\n  \
    fields(stream, field, value JSON, conflict, standing JSON: every standing write, shown first)\n  \
    counters(stream, counter, value)\n  \
    escrow(stream, counter, capacity, consumed)\n  \
    escrow_rights(stream, counter, node, rights)\n  \
    weftlog_checkpoint(node, epoch, position, event_id, state_hash, hash_position, schema_version)\n\n\
Values and payloads are JSON as written; bytes that are not JSON are {\"hex\": ...}.\n\n\
Example view (SQLite; in PostgreSQL write value->>'name'):\n  \
    CREATE VIEW attendees AS\n    \
      SELECT s.stream, json_extract(n.value, '$') AS name, s.version\n    \
      FROM streams s JOIN fields n ON n.stream = s.stream AND n.field = 'name'\n    \
      WHERE s.stream LIKE 'attendee/%';";

const SIM_HELP: &str =
    "Built-in scenarios (simulations/scenarios/*.toml): random, venue, multi-site,\n\
crash-oneway, rolling, adversary, venue-restore. Without --scenario, all of them\n\
with their own seeds.\n\n\
Examples:\n  \
weftlog simulate                                  every scenario, its CI seeds\n  \
weftlog simulate --scenario venue --seeds 1..200 --report venue.html\n  \
weftlog simulate --scenario venue --seed 42      replay one seed\n  \
weftlog simulate --long                           each scenario's long seed range";

/// Arguments of `simulate`.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// A built-in scenario name or a scenario TOML file; all built-ins when
    /// omitted.
    #[arg(long, value_name = "NAME|FILE")]
    pub scenario: Option<String>,
    /// Number of nodes (replaces the scenario's).
    #[arg(long, value_name = "N")]
    pub nodes: Option<usize>,
    /// One seed.
    #[arg(long, value_name = "S", conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// A range of seeds, A..B (B excluded) or A..=B.
    #[arg(long, value_name = "A..B")]
    pub seeds: Option<String>,
    /// Virtual duration of each run (replaces the scenario's): seconds, or
    /// with a unit: 90s, 10m, 1h.
    #[arg(long, value_name = "T")]
    pub duration: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write an HTML report with plots (divergence over time, convergence
    /// after each heal, traffic) to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Use each scenario's long seed range (many more seeds).
    #[arg(long)]
    pub long: bool,
    /// Seeds run in parallel; 0 for one per core.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub jobs: usize,
    /// Run every seed twice and compare trace hashes.
    #[arg(long)]
    pub check_determinism: bool,
    /// Also print one line per seed.
    #[arg(long)]
    pub verbose: bool,
    /// The venue's seat policy, as `append --escrow-policy` spells it
    /// (`escrow`, `risk-window,max_overdraft=3`, `strict`), replacing the
    /// scenario's.
    #[arg(long, value_name = "MODE[,KEY=VALUE...]")]
    pub policy: Option<String>,
    /// Run the same seeds under escrow, risk-window and strict, and print
    /// per policy: seats sold, sales refused (and those a connected desk's
    /// spare rights could have covered), seats oversold and compensated.
    /// The venue scenario unless --scenario names another venue workload.
    #[arg(long, conflicts_with_all = ["policy", "json", "verbose"])]
    pub compare_policies: bool,
}

fn parse_duration(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| {
        anyhow!("--duration {s:?}: not a number of seconds (e.g. 300, 90s, 10m, 1h)")
    })?;
    let mult = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => bail!("--duration {s:?}: unknown unit {u:?} (use ms, s, m or h)"),
    };
    if !(n.is_finite() && n > 0.0) {
        bail!("--duration {s:?}: must be positive");
    }
    Ok(n * mult)
}

/// Runs `weftlog simulate`: a progress bar on stderr, the summary on `out`.
fn simulate(args: SimArgs, out: &mut impl Write) -> Result<()> {
    if args.compare_policies {
        return compare_policies(args, out);
    }
    let outcome = run_simulation(&args, args.policy.clone())?;
    if args.verbose && !args.json {
        out.write_all(outcome.per_seed().as_bytes())?;
    }
    out.write_all(outcome.render(args.json).as_bytes())?;
    out.flush()?;
    if outcome.failed() {
        let n = outcome.runs.iter().filter(|r| !r.passed()).count();
        bail!(
            "{n} of {} seeds failed an oracle; each replays with the command printed above",
            outcome.runs.len()
        );
    }
    Ok(())
}

/// The policies `--compare-policies` runs, in the order it prints them.
const COMPARED_POLICIES: [&str; 3] = ["escrow", "risk-window", "strict"];

/// `simulate --compare-policies`: the same seeds under each seat policy,
/// one line per policy.
fn compare_policies(mut args: SimArgs, out: &mut impl Write) -> Result<()> {
    args.scenario.get_or_insert_with(|| "venue".into());
    writeln!(
        out,
        "{:<12} {:>6} {:>8} {:>10} {:>9} {:>9} {:>11} {:>6}",
        "policy", "seeds", "sold", "refused", "avoidable", "oversold", "compensated", "failed"
    )?;
    let mut failed = 0;
    for policy in COMPARED_POLICIES {
        let o = run_simulation(&args, Some(policy.into()))?;
        let sum = |f: &dyn Fn(&weftlog_sim::report::RunReport) -> u64| -> u64 {
            o.runs.iter().map(f).sum()
        };
        let bad = o.runs.iter().filter(|r| !r.passed()).count();
        failed += bad;
        writeln!(
            out,
            "{:<12} {:>6} {:>8} {:>10} {:>9} {:>9} {:>11} {:>6}",
            policy,
            o.runs.len(),
            sum(&|r| r.escrow_consumed),
            sum(&|r| r.oversell_refused),
            sum(&|r| r.rebalance.avoidable),
            sum(&|r| r.oversold.seats),
            sum(&|r| r.oversold.compensated),
            bad
        )?;
    }
    writeln!(
        out,
        "sold: seats sold; refused: sales refused; avoidable: of those, refusals a connected desk's spare\n\
         rights covered throughout the round trip before; oversold: seats the read model marks beyond capacity;\n\
         compensated: of those, seats with a compensation standing (policy defaults: escrow; risk-window\n\
         with a 3600 s window, 10 % left at the last sync, 5 seats of overdraft; strict with 30 s)"
    )?;
    out.flush()?;
    if failed > 0 {
        bail!("{failed} runs failed an oracle; rerun one policy with --policy to see them");
    }
    Ok(())
}

/// Runs the seeds `args` names, with `policy` for the venue's seats, with a
/// progress bar on stderr.
fn run_simulation(args: &SimArgs, policy: Option<String>) -> Result<weftlog_sim::cli::Outcome> {
    use weftlog_sim::cli as sim;
    let seeds = match (&args.seed, &args.seeds) {
        (Some(s), _) => Some(weftlog_sim::scenario::SeedRange::one(*s)),
        (None, Some(r)) => Some(r.parse().map_err(|e: String| anyhow!("--seeds: {e}"))?),
        (None, None) => None,
    };
    let duration_s = args.duration.as_deref().map(parse_duration).transpose()?;
    let sargs = sim::SimulateArgs {
        scenario: args.scenario.clone(),
        nodes: args.nodes,
        seeds,
        duration_s,
        json: args.json,
        report: args.report.clone(),
        long: args.long,
        jobs: args.jobs,
        check_determinism: args.check_determinism,
        verbose: args.verbose,
        policy,
    };
    // The wall clock paces the progress display only; nothing of it reaches
    // a simulation.
    let tty = io::IsTerminal::is_terminal(&io::stderr());
    let started = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    let mut last_done = u64::MAX;
    let outcome = sim::simulate(&sargs, &mut |u: &sim::Update| {
        if u.run.is_some() || u.seeds_done == last_done {
            return;
        }
        last_done = u.seeds_done;
        let total = u.seeds_total.max(1);
        if tty {
            let width = 30u64;
            let filled = (u.seeds_done.min(total) * width / total) as usize;
            eprint!(
                "\r[{}{}] {}/{} seeds, {} failed, {} ({:.0} s)  ",
                "#".repeat(filled),
                ".".repeat(width as usize - filled),
                u.seeds_done,
                u.seeds_total,
                u.failures,
                u.scenario,
                started.elapsed().as_secs_f64()
            );
        } else if last_line.elapsed().as_secs() >= 5 || u.seeds_done == u.seeds_total {
            last_line = std::time::Instant::now();
            eprintln!(
                "simulate: {}/{} seeds, {} failed ({}, {:.0} s)",
                u.seeds_done,
                u.seeds_total,
                u.failures,
                u.scenario,
                started.elapsed().as_secs_f64()
            );
        }
        let _ = io::stderr().flush();
    });
    if tty {
        eprintln!();
    }
    Ok(outcome?)
}

/// Arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// UDP address to serve QUIC (sync with peers) on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:4270")]
    pub listen: SocketAddr,
    /// A peer to dial, HOST:PORT; repeatable. Reconnects with backoff.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Member list: one node id per line (# comments allowed). Only these
    /// nodes may connect, either way. Without it any node that proves its
    /// id may sync (an open cluster, for trials).
    #[arg(long, value_name = "FILE")]
    pub members: Option<PathBuf>,
    /// Announce this node on the LAN with mDNS and dial the members found.
    #[arg(long)]
    pub mdns: bool,
    /// TCP address of the HTTP API. Without --tokens it is not
    /// authenticated, and must be on loopback (127.0.0.1, ::1); any other
    /// address needs --tokens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4280")]
    pub http: SocketAddr,
    /// Require a token on every HTTP request: FILE holds one `ROLE TOKEN`
    /// per line (# comments), roles read (every GET), desk (also appends,
    /// venue commands, oversold decisions) and admin (everything: export,
    /// import, /v1/admin/*); a token has at least 16 characters. Browsers
    /// sign in at /login and get a session cookie. The file is read again
    /// when it changes: removing a line revokes that token and its
    /// sessions.
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// POST each oversell compensation this node writes to URL (http://),
    /// as JSON with the header Idempotency-Key: <sale id>, retried with
    /// backoff (1 s doubling to 60 s) until a 2xx answers; delivered sales
    /// are listed in <data dir>/notified.jsonl and not sent again.
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// Cluster name; nodes of different clusters refuse each other.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub cluster: String,
    /// Milliseconds between anti-entropy rounds with a random peer.
    #[arg(long, value_name = "MS", default_value_t = PeersConfig::default().anti_entropy_ms, value_parser = clap::value_parser!(u64).range(10..))]
    pub anti_entropy_ms: u64,
    /// Milliseconds of silence after which a peer connection is dropped
    /// (and redialled).
    #[arg(long, value_name = "MS", default_value_t = PeersConfig::default().idle_timeout_ms, value_parser = clap::value_parser!(u64).range(300..))]
    pub idle_timeout_ms: u64,
    /// Congestion controller of peer connections: bbr paces at the
    /// bandwidth it measures, and random loss (a venue's Wi-Fi) does not
    /// slow it; cubic halves its rate at each loss.
    #[arg(long, value_name = "bbr|cubic", default_value_t = crate::transport::Congestion::default())]
    pub congestion: crate::transport::Congestion,
    /// Milliseconds appends wait at start, when the node has peers, for a
    /// peer to confirm how much of this node's own log it holds (a node
    /// restored from a backup takes its later events back first, rather
    /// than fork). 0 does not wait. Offline, appends go ahead after it.
    #[arg(long, value_name = "MS", default_value_t = crate::daemon::CONFIRM_WAIT.as_millis() as u64)]
    pub confirm_wait_ms: u64,
    /// Mirror the read model into SQL while running, following the durable
    /// log (see `weftlog sql --help` for the tables): sqlite:PATH or
    /// postgres://…; without a value sqlite:<data dir>/read.db.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub sql: Option<String>,
    /// This desk's name, shown on every desk's page ("Desk A"): recorded
    /// in the log (stream desk/<node id>) when it differs from the last.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Arguments of `append`.
#[derive(Args, Debug, Default)]
pub struct AppendArgs {
    /// Stream (aggregate) name, e.g. customer/20.
    #[arg(long)]
    pub stream: String,
    /// Event kind: what the user meant, e.g. EmailChanged.
    #[arg(long, required_unless_present = "batch")]
    pub kind: Option<String>,
    /// Append one event per line of FILE (`-`: standard input) to
    /// --stream. Each line is a JSON append request, the body of
    /// `POST /v1/streams/{stream}/events`, e.g.
    /// {"kind":"Registered","set":{"name":"Ada"},"command_id":"reg-20"};
    /// blank lines are skipped. Lines go in batches of --chunk, each one
    /// group commit: every event of a batch is acknowledged together once
    /// durable, a refused event does not stop the others. Prints one JSON
    /// line per event, in order, with its `line` number: the event, or the
    /// `error` that refused it. A malformed line stops the run naming it:
    /// a FILE is checked whole first (nothing is applied); from standard
    /// input, the batches before its own were applied (the error says
    /// which lines). Progress and a summary go to stderr; the exit code is
    /// 1 if any event was refused. With command ids, a file may be sent
    /// again safely: lines already applied give their existing events.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "kind", "set", "add", "escrow_init", "escrow_transfer", "escrow_consume",
            "escrow_policy", "splice", "text_base", "payload", "expect_version",
            "command_id", "user",
        ]
    )]
    pub batch: Option<PathBuf>,
    /// With --batch: lines per batch (one group commit each), at most
    /// 10000.
    #[arg(long, value_name = "N", default_value_t = crate::batch::DEFAULT_CHUNK, requires = "batch")]
    pub chunk: usize,
    /// With --batch: print only the refused events (and the summary).
    #[arg(long, requires = "batch")]
    pub quiet: bool,
    /// Set a field to a JSON value, superseding the values of that field
    /// this node currently sees (this resolves a conflict). Repeatable.
    #[arg(long = "set", value_name = "FIELD=JSON")]
    pub set: Vec<String>,
    /// Add an integer (negative to subtract) to a counter. Repeatable.
    #[arg(long = "add", value_name = "COUNTER=INT", allow_hyphen_values = true)]
    pub add: Vec<String>,
    /// Add capacity to an escrow counter; this node holds the rights.
    #[arg(long, value_name = "COUNTER=N")]
    pub escrow_init: Vec<String>,
    /// Move escrow rights from this node to another node.
    #[arg(long, value_name = "COUNTER=NODE:N")]
    pub escrow_transfer: Vec<String>,
    /// Use escrow rights this node holds (e.g. sell seats).
    #[arg(long, value_name = "COUNTER=N")]
    pub escrow_consume: Vec<String>,
    /// Set the seat policy of an escrow counter: MODE is `escrow` (sell
    /// only rights held), `risk-window` (beyond them, sell offline up to
    /// max_overdraft seats while the last sync is recent) or `strict`
    /// (escrow, and no sale while no peer was reached within window_s).
    /// Settings: window_s (3600; 30 under strict), min_remaining_pct (10),
    /// max_overdraft (5 under risk-window), on_oversell (waitlist; or
    /// notify, cancel, honour), override_s (3600). Example:
    /// `--escrow-policy seats=risk-window,max_overdraft=3`. Repeatable.
    #[arg(long, value_name = "COUNTER=MODE[,KEY=VALUE...]")]
    pub escrow_policy: Vec<String>,
    /// Edit a text field: at POS delete DEL, then insert TEXT (may be
    /// empty). POS and DEL count UTF-16 code units (as a browser counts:
    /// an emoji is two). Repeatable; a field's splices apply in order,
    /// each to the text the previous left. Concurrent edits of one text
    /// field merge character by character.
    #[arg(long = "splice", value_name = "FIELD=POS:DEL:TEXT")]
    pub splice: Vec<String>,
    /// The heads of a text field the splices were made against (as `get`
    /// shows them under "text_heads"), comma separated: automerge rebases
    /// the splices over what came since. Refused if this node does not
    /// hold them.
    #[arg(long = "text-base", value_name = "FIELD=HEAD[,HEAD...]")]
    pub text_base: Vec<String>,
    /// Application payload, JSON.
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// Fail unless the stream is at this version (number of events).
    #[arg(long, value_name = "N")]
    pub expect_version: Option<u64>,
    /// Idempotency key, per stream and across the cluster: if this stream
    /// holds an event with this command id, nothing is appended and the
    /// event that took effect is returned. Two nodes out of touch that both
    /// carry it out agree, once they exchange, that the first in canonical
    /// order took effect; the other is kept with no effect.
    #[arg(long, value_name = "ID")]
    pub command_id: Option<String>,
    /// The acting user, recorded in the event.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
}

fn split<'a>(flag: &str, s: &'a str, sep: char, shape: &str) -> Result<(&'a str, &'a str)> {
    s.split_once(sep)
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| anyhow!("{flag} {s:?} is not of the form {shape}"))
}

fn parse_json(flag: &str, s: &str) -> Result<Vec<u8>> {
    let v: Value = serde_json::from_str(s)
        .map_err(|e| anyhow!("{flag}{s} is not JSON ({e}); quote strings, e.g. '\"text\"'"))?;
    // Re-encoding gives canonical text: sorted keys, no spaces.
    Ok(serde_json::to_vec(&v)?)
}

fn parse_num<T: std::str::FromStr>(flag: &str, s: &str, what: &str) -> Result<T> {
    s.trim()
        .parse()
        .map_err(|_| anyhow!("{flag}: {s:?} is not {what}"))
}

impl AppendArgs {
    /// The draft these arguments describe.
    pub fn draft(&self) -> Result<Draft> {
        let mut ops = Vec::new();
        for s in &self.set {
            let (field, v) = split("--set", s, '=', "FIELD=JSON")?;
            ops.push(Op::Set {
                field: field.into(),
                value: parse_json(&format!("--set {field}="), v)?,
                supersedes: vec![],
            });
        }
        for s in &self.add {
            let (counter, n) = split("--add", s, '=', "COUNTER=INT")?;
            ops.push(Op::Add {
                counter: counter.into(),
                delta: parse_num("--add", n, "an integer")?,
            });
        }
        for s in &self.escrow_init {
            let (counter, n) = split("--escrow-init", s, '=', "COUNTER=N")?;
            ops.push(Op::EscrowInit {
                counter: counter.into(),
                capacity: parse_num("--escrow-init", n, "a positive integer")?,
            });
        }
        for s in &self.escrow_transfer {
            let (counter, rest) = split("--escrow-transfer", s, '=', "COUNTER=NODE:N")?;
            let (node, n) = split("--escrow-transfer", rest, ':', "COUNTER=NODE:N")?;
            ops.push(Op::EscrowTransfer {
                counter: counter.into(),
                to: node
                    .parse()
                    .map_err(|e| anyhow!("--escrow-transfer: {e}"))?,
                amount: parse_num("--escrow-transfer", n, "a positive integer")?,
            });
        }
        for s in &self.escrow_consume {
            let (counter, n) = split("--escrow-consume", s, '=', "COUNTER=N")?;
            ops.push(Op::EscrowConsume {
                counter: counter.into(),
                amount: parse_num("--escrow-consume", n, "a positive integer")?,
            });
        }
        for s in &self.escrow_policy {
            let (counter, spec) = split("--escrow-policy", s, '=', "COUNTER=MODE[,KEY=VALUE...]")?;
            ops.push(Op::EscrowPolicy {
                counter: counter.into(),
                policy: Policy::parse_spec(spec)
                    .map_err(|e| anyhow!("--escrow-policy {counter}: {e}"))?,
                supersedes: vec![],
            });
        }
        let mut texts: Vec<TextEdit> = Vec::new();
        for s in &self.splice {
            let (field, rest) = split("--splice", s, '=', "FIELD=POS:DEL:TEXT")?;
            let mut parts = rest.splitn(3, ':');
            let (Some(pos), Some(del), Some(insert)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("--splice {s:?} is not of the form FIELD=POS:DEL:TEXT");
            };
            let splice = Splice {
                pos: parse_num("--splice", pos, "a position in UTF-16 units")?,
                delete: parse_num("--splice", del, "a count of UTF-16 units")?,
                insert: insert.to_string(),
            };
            match texts.iter_mut().find(|t| t.field == field) {
                Some(t) => t.splices.push(splice),
                None => texts.push(TextEdit {
                    field: field.into(),
                    splices: vec![splice],
                    base: None,
                }),
            }
        }
        for s in &self.text_base {
            let (field, heads) = split("--text-base", s, '=', "FIELD=HEAD[,HEAD...]")?;
            let heads = heads
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    text::parse_head(h)
                        .ok_or_else(|| anyhow!("--text-base {field}: {h:?} is not 64 hex digits"))
                })
                .collect::<Result<Vec<_>>>()?;
            let Some(t) = texts.iter_mut().find(|t| t.field == field) else {
                bail!("--text-base {field}: no --splice for that field");
            };
            t.base = Some(heads);
        }
        Ok(Draft {
            stream: self.stream.clone(),
            kind: self
                .kind
                .clone()
                .ok_or_else(|| anyhow!("--kind is required"))?,
            ops,
            texts,
            payload: match &self.payload {
                Some(p) => parse_json("--payload", p)?,
                None => Vec::new(),
            },
            meta: Meta {
                command_id: self.command_id.clone(),
                user: self.user.clone(),
            },
            expected_version: self.expect_version,
        })
    }
}

/// Opens the node, reporting any recovery on stderr.
pub fn open(dir: &Path) -> Result<Node> {
    let (node, recovery) = Node::open(dir)?;
    report_recovery(dir, &recovery);
    Ok(node)
}

fn report_recovery(dir: &Path, recovery: &weftlog_proto::log::Recovery) {
    if let Some(t) = &recovery.torn {
        eprintln!(
            "weftlog: recovered {}: cut a torn tail of {} bytes at byte {} of segment {} ({})",
            dir.display(),
            t.dropped_bytes,
            t.offset,
            t.segment,
            t.reason
        );
    }
}

fn print(out: &mut impl Write, v: &Value) -> Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// The branch heads in a file holding another node's `status` output
/// ([`json::heads_of`]).
fn read_frontier(path: &Path) -> Result<Vec<weftlog_proto::sync::Head>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not JSON ({e}); pass another node's `weftlog status` output",
            path.display()
        )
    })?;
    json::heads_of(&v).with_context(|| path.display().to_string())
}

/// The lines `log` prints: events in canonical order, one JSON object per
/// line, only `stream`'s if given. An event whose command took effect
/// through another event (a retry carried out on two nodes) names that
/// event in `"duplicate_of"`: it is kept, with no effect. An event whose
/// author `members` does not name is marked `"non_member": true`
/// ([`json::mark_non_member`]).
/// `log --from POS [--follow]`: log order with positions.
fn log_from(
    dir: &Path,
    stream: Option<String>,
    members: Option<&Path>,
    from: Option<&str>,
    follow: bool,
    out: &mut impl Write,
) -> Result<()> {
    let start: crate::sse::From = from.unwrap_or("").parse().map_err(|e: String| anyhow!(e))?;
    match target(dir)? {
        Target::Local(node) => {
            if follow {
                bail!(
                    "--follow needs the node running (`weftlog run`): a stopped node makes no \
                     new events; use --from alone to print what its log holds"
                );
            }
            let filter = crate::sse::Filter {
                stream,
                ..Default::default()
            };
            let (text, restart) =
                crate::sse::lines_after(&node, &start, &filter, &read_members(members)?)?;
            if let Some(why) = restart {
                eprintln!("{why}");
            }
            out.write_all(text.as_bytes())?;
        }
        Target::Remote(r) => {
            running_list(members)?;
            let mut query = format!("from={}", remote::encode(from.unwrap_or(""), false));
            if let Some(s) = &stream {
                query.push_str(&format!("&stream={}", remote::encode(s, false)));
            }
            if !follow {
                out.write_all(&r.get(&format!("/v1/log?{query}"))?)?;
                return Ok(());
            }
            let path = format!("/v1/events?{query}");
            let mut last: Option<String> = None;
            loop {
                let mut reset = false;
                let resume = last.clone();
                r.follow(&path, resume.as_deref(), |m| {
                    match m.event.as_str() {
                        "event" => {
                            let mut v: Value = serde_json::from_str(&m.data)?;
                            if let Some(id) = &m.id {
                                v["token"] = id.clone().into();
                                last = Some(id.clone());
                            }
                            print(out, &v)?;
                            out.flush()?;
                        }
                        "restart" | "reset" | "error" => {
                            let v: Value = serde_json::from_str(&m.data).unwrap_or_default();
                            eprintln!("{}", v["reason"].as_str().unwrap_or(&m.data));
                            reset = m.event == "reset";
                        }
                        _ => {}
                    }
                    Ok(true)
                })?;
                if !reset {
                    eprintln!(
                        "the node stopped; the last position printed is {}",
                        last.as_deref().unwrap_or("none")
                    );
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

pub fn log_lines(node: &Node, stream: Option<&str>, members: &Members) -> Result<String> {
    let mut rows = Vec::new();
    // Events with a command id: (row, stream, command id).
    let mut commands = Vec::new();
    node.scan(|e, id| {
        if stream.is_none_or(|s| s == e.stream) {
            if let Some(cmd) = &e.meta.command_id {
                commands.push((rows.len(), e.stream.clone(), cmd.clone()));
            }
            let mut v = json::event(e, &id);
            json::mark_non_member(&mut v, &e.author, members);
            rows.push(((e.hlc, e.author, e.seq, id), v));
        }
    })?;
    // After the scan: the state is not read under the log's lock.
    node.with_state(|s| {
        for (row, stream, cmd) in commands {
            let (key, v) = &mut rows[row];
            if let Some(first) = s.command(&stream, &cmd).filter(|r| r.id != key.3) {
                v["duplicate_of"] = first.id.to_string().into();
            }
        }
    });
    rows.sort_unstable_by_key(|r| r.0);
    let mut out = String::new();
    for (_, v) in rows {
        out.push_str(&v.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// The lines `forks` prints: every fork the log holds ([`json::fork`]),
/// with its proof if `proof` ([`json::fork_with_proof`]).
pub fn fork_lines(node: &Node, proof: bool) -> Vec<Value> {
    if proof {
        node.fork_proofs()
            .iter()
            .map(|(f, p)| json::fork_with_proof(f, p))
            .collect()
    } else {
        node.with_state(|s| s.forks().iter().map(json::fork).collect())
    }
}

/// `verify-fork`: reads the proofs in `file` (`-` for stdin) and verifies
/// each from its content alone; the line to print for each, or the first
/// refusal.
fn verify_fork(file: &Path) -> Result<Vec<Value>> {
    use weftlog_proto::fork_proof::MAX_FORK_PROOF_JSON_BYTES;
    let name = || match file.to_str() {
        Some("-") => "stdin".to_string(),
        _ => file.display().to_string(),
    };
    let mut data = Vec::new();
    let limit = MAX_FORK_PROOF_JSON_BYTES as u64 + 1;
    let read = if file.as_os_str() == "-" {
        io::Read::read_to_end(&mut io::Read::take(io::stdin().lock(), limit), &mut data)
    } else {
        fs::File::open(file)
            .and_then(|f| io::Read::read_to_end(&mut io::Read::take(f, limit), &mut data))
    };
    read.with_context(|| format!("cannot read {}", name()))?;
    if data.len() as u64 >= limit {
        bail!(
            "{} is larger than the {MAX_FORK_PROOF_JSON_BYTES} bytes a fork proof may take",
            name()
        );
    }
    let proofs = read_fork_proofs(&data).with_context(name)?;
    let mut rows = Vec::new();
    for (i, p) in proofs.iter().enumerate() {
        let v = p
            .verify()
            .with_context(|| format!("{}: fork proof {} is refused", name(), i + 1))?;
        rows.push(json!({
            "valid": true,
            "author": v.author.to_string(),
            "seq": v.seq,
            "events": v.events.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "heads": v.heads.iter().map(|(s, id)| json!({ "seq": s, "head": id.to_string() })).collect::<Vec<_>>(),
        }));
    }
    Ok(rows)
}

/// The fork proofs in `data`, not yet verified: JSON (one value, or one
/// per line; each a proof, an array of them, or a record carrying one in
/// `"proof"` or `"fork_proof"`), or else the binary form.
fn read_fork_proofs(data: &[u8]) -> Result<Vec<ForkProof>> {
    let text_start = data.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(text_start, Some(b'{') | Some(b'[')) {
        if data.is_empty() {
            bail!("no fork proof: the input is empty");
        }
        return Ok(vec![ForkProof::decode(data)?]);
    }
    let text = std::str::from_utf8(data).map_err(|e| anyhow!("not UTF-8 text: {e}"))?;
    let values: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                serde_json::from_str(l).map_err(|e| anyhow!("line {} is not JSON: {e}", n + 1))
            })
            .collect::<Result<_>>()?,
    };
    let mut out = Vec::new();
    let mut stack: Vec<Value> = values.into_iter().rev().collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.into_iter().rev()),
            Value::Object(mut m) => {
                let inner = m.remove("proof").or_else(|| m.remove("fork_proof"));
                let proof = match inner {
                    None if m.contains_key("branches") => Value::Object(m),
                    Some(p @ Value::Object(_)) => p,
                    _ => {
                        let why = m
                            .get("proof_error")
                            .and_then(Value::as_str)
                            .unwrap_or("the record carries no fork proof");
                        bail!(
                            "the fork record of author {} seq {} has no proof: {why}",
                            m.get("author").and_then(Value::as_str).unwrap_or("?"),
                            m.get("seq").map_or("?".into(), Value::to_string)
                        );
                    }
                };
                let j: ForkProofJson = serde_json::from_value(proof)
                    .map_err(|e| anyhow!("not a fork proof in JSON form: {e}"))?;
                out.push(ForkProof::from_json(&j)?);
            }
            v => bail!("{v} is not a fork proof"),
        }
    }
    if out.is_empty() {
        bail!("no fork proof in the input");
    }
    Ok(out)
}

/// Writes `data` to `path` atomically and durably.
pub fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(&dir)?;
    Ok(())
}

/// Where a command runs: on the node's data directory, or through the HTTP
/// API of the `weftlog run` that holds it.
enum Target {
    Local(Node),
    Remote(Remote),
}

/// Opens the node, or finds the running daemon that holds it.
fn target(dir: &Path) -> Result<Target> {
    match Node::open(dir) {
        Ok((node, recovery)) => {
            report_recovery(dir, &recovery);
            Ok(Target::Local(node))
        }
        Err(node::NodeOpenError::Locked(_)) => Ok(Target::Remote(Remote::of(dir)?)),
        Err(e) => Err(e.into()),
    }
}

impl AppendArgs {
    /// The body of `POST /v1/streams/{stream}/events` for these arguments.
    pub fn body(&self) -> Result<Value> {
        let draft = self.draft()?; // the same checks and messages as locally
        let mut set = serde_json::Map::new();
        let mut add = serde_json::Map::new();
        let (mut init, mut consume) = (serde_json::Map::new(), serde_json::Map::new());
        let (mut text, mut base) = (serde_json::Map::new(), serde_json::Map::new());
        for t in &draft.texts {
            let splices: Vec<Value> = t
                .splices
                .iter()
                .map(|s| json!([s.pos, s.delete, s.insert]))
                .collect();
            text.insert(t.field.clone(), Value::Array(splices));
            if let Some(heads) = &t.base {
                let heads: Vec<String> = heads.iter().map(|h| Hex(h).to_string()).collect();
                base.insert(t.field.clone(), json!(heads));
            }
        }
        let mut transfer = Vec::new();
        let mut policies = serde_json::Map::new();
        for op in &draft.ops {
            match op {
                Op::Set { field, value, .. } => {
                    set.insert(field.clone(), serde_json::from_slice(value)?);
                }
                Op::Add { counter, delta } => {
                    add.insert(counter.clone(), json!(delta));
                }
                Op::EscrowInit { counter, capacity } => {
                    init.insert(counter.clone(), json!(capacity));
                }
                Op::EscrowTransfer {
                    counter,
                    to,
                    amount,
                } => transfer
                    .push(json!({ "counter": counter, "to": to.to_string(), "amount": amount })),
                Op::EscrowConsume { counter, amount } => {
                    consume.insert(counter.clone(), json!(amount));
                }
                Op::EscrowPolicy {
                    counter, policy, ..
                } => {
                    policies.insert(counter.clone(), crate::json::policy(policy));
                }
                // The node's admission writes these, never a client.
                // `draft` makes text edits, never `Op::Text`.
                Op::EscrowOverdraw { .. } | Op::Text { .. } => {
                    bail!("{} ops are made by the node, not sent to it", op.name())
                }
            }
        }
        let payload: Option<Value> = match draft.payload.is_empty() {
            true => None,
            false => Some(serde_json::from_slice(&draft.payload)?),
        };
        Ok(json!({
            "kind": draft.kind,
            "set": set,
            "add": add,
            "escrow_init": init,
            "escrow_transfer": transfer,
            "escrow_consume": consume,
            "escrow_policy": policies,
            "text": text,
            "base": base,
            "payload": payload,
            "expected_version": draft.expected_version,
            "command_id": draft.meta.command_id,
            "user": draft.meta.user,
        }))
    }
}

/// Runs one command, printing its JSON to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<()> {
    let dir = &cli.data;
    match cli.command {
        Command::Init => {
            let id = node::init(dir)?;
            print(
                out,
                &json!({ "node": id.to_string(), "data": dir.display().to_string() }),
            )?;
        }
        Command::Append(args) if args.batch.is_some() => {
            let sink = match target(dir)? {
                Target::Local(node) => crate::batch::Sink::Local(node),
                Target::Remote(r) => crate::batch::Sink::Remote(r),
            };
            let job = crate::batch::Job {
                stream: &args.stream,
                source: args.batch.as_deref().unwrap_or(Path::new("-")),
                chunk: args.chunk,
                quiet: args.quiet,
            };
            crate::batch::run(&sink, &job, out)?;
        }
        Command::Append(args) => match target(dir)? {
            Target::Local(node) => {
                let a = node.append(args.draft()?)?;
                print(out, &json::appended(&a))?;
            }
            Target::Remote(r) => {
                let path = format!("/v1/streams/{}/events", remote::encode(&args.stream, true));
                print(out, &r.post_json(&path, &args.body()?)?)?;
            }
        },
        Command::Get { stream, as_of } => match target(dir)? {
            Target::Local(node) => {
                let v = match as_of {
                    None => node.with_state(|s| json::stream(&stream, s.stream(&stream))),
                    Some(x) => {
                        let past = state_as_of(&node, Hlc(x))?;
                        json::stream(&stream, past.stream(&stream))
                    }
                };
                print(out, &v)?;
            }
            Target::Remote(r) => {
                let mut path = format!("/v1/streams/{}", remote::encode(&stream, true));
                if let Some(x) = as_of {
                    path.push_str(&format!("?as_of={x}"));
                }
                print(out, &r.get_json(&path)?)?;
            }
        },
        Command::Log {
            stream,
            members,
            from,
            follow,
        } => {
            if from.is_some() || follow {
                return log_from(
                    dir,
                    stream,
                    members.as_deref(),
                    from.as_deref(),
                    follow,
                    out,
                );
            }
            let text = match target(dir)? {
                Target::Local(node) => {
                    log_lines(&node, stream.as_deref(), &read_members(members.as_deref())?)?
                }
                Target::Remote(r) => {
                    running_list(members.as_deref())?;
                    let path = match &stream {
                        Some(s) => format!("/v1/log?stream={}", remote::encode(s, false)),
                        None => "/v1/log".into(),
                    };
                    String::from_utf8(r.get(&path)?)?
                }
            };
            out.write_all(text.as_bytes())?;
        }
        Command::Conflicts => {
            let rows = match target(dir)? {
                Target::Local(node) => node.with_state(json::conflicts),
                Target::Remote(r) => match r.get_json("/v1/conflicts")? {
                    Value::Array(rows) => rows,
                    v => bail!("the running node answered {v} for its conflicts"),
                },
            };
            for v in rows {
                print(out, &v)?;
            }
        }
        Command::Status { members } => {
            let v = match target(dir)? {
                Target::Local(node) => {
                    let members = read_members(members.as_deref())?;
                    let mut v = node.with_state(|s| json::status(&node.id(), s));
                    let non_members = node.with_state(|s| json::non_members(s, &members));
                    let forks = crate::daemon::read_equivocations(dir);
                    if let Value::Object(m) = &mut v {
                        m.insert("equivocations".into(), Value::Array(forks));
                        m.insert("non_members".into(), non_members);
                    }
                    v
                }
                Target::Remote(r) => {
                    running_list(members.as_deref())?;
                    r.get_json("/v1/status")?
                }
            };
            print(out, &v)?;
        }
        Command::Forks { proof } => {
            let rows = match target(dir)? {
                Target::Local(node) => fork_lines(&node, proof),
                Target::Remote(r) => {
                    let path = if proof {
                        "/v1/forks?proof=true"
                    } else {
                        "/v1/forks"
                    };
                    match r.get_json(path)? {
                        Value::Array(rows) => rows,
                        v => bail!("the running node answered {v} for its forks"),
                    }
                }
            };
            for v in rows {
                print(out, &v)?;
            }
        }
        Command::Oversold => {
            let rows = match target(dir)? {
                Target::Local(node) => node.with_state(json::oversold_rows),
                Target::Remote(r) => match r.get_json("/v1/oversold")? {
                    Value::Array(rows) => rows,
                    v => bail!("the running node answered {v} for its oversold sales"),
                },
            };
            for v in rows {
                print(out, &v)?;
            }
        }
        Command::Reconnects { limit } => {
            let (reports, _, warnings) = crate::reconnects::read_reports(dir);
            for w in warnings {
                eprintln!("warning: {w}");
            }
            for v in reports.iter().rev().take(limit) {
                print(out, v)?;
            }
        }
        Command::Compensate { sale, action, user } => {
            let id: EventId = sale.parse().map_err(|e| anyhow!("--sale {sale:?}: {e}"))?;
            let action: Compensation = action.parse().map_err(|e| anyhow!("--action: {e}"))?;
            match target(dir)? {
                Target::Local(node) => {
                    let a = node.decide(&id, action, user)?;
                    print(out, &json::appended(&a))?;
                }
                Target::Remote(r) => {
                    let body = json!({ "action": action.name(), "user": user });
                    print(out, &r.post_json(&format!("/v1/oversold/{id}"), &body)?)?;
                }
            }
        }
        Command::VerifyFork { file } => {
            for v in verify_fork(&file)? {
                print(out, &v)?;
            }
        }
        Command::Export { since, out: path } => {
            let (data, n) = match target(dir)? {
                Target::Local(node) => {
                    let since = match &since {
                        Some(p) => read_frontier(p)?,
                        None => Vec::new(),
                    };
                    node.export(&since)?
                }
                Target::Remote(r) => {
                    let body = match &since {
                        Some(p) => {
                            read_frontier(p)?; // the same checks as locally
                            fs::read(p)?
                        }
                        None => Vec::new(),
                    };
                    let (data, n) = r.post("/v1/export", &body, true)?;
                    let n = n.and_then(|n| n.parse().ok()).unwrap_or(0);
                    (data, n)
                }
            };
            write_file(&path, &data)?;
            print(
                out,
                &json!({ "exported": n, "out": path.display().to_string(), "bytes": data.len() }),
            )?;
        }
        Command::Import {
            file,
            members,
            allow_non_members,
        } => {
            let len = fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            if len > weftlog_proto::exchange::MAX_EXPORT_BYTES {
                bail!("{} is {len} bytes, above the import limit", file.display());
            }
            let data =
                fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let v = match target(dir)? {
                Target::Local(node) => {
                    let members = read_members(members.as_deref())?;
                    let r = node
                        .import_admitting(&data, |a| allow_non_members || members.admits(a))
                        .with_context(|| {
                            format!("import of {} refused, nothing stored", file.display())
                        })?;
                    json!({ "imported": r.imported, "duplicates": r.duplicates })
                }
                Target::Remote(r) => {
                    running_list(members.as_deref())?;
                    let path = match allow_non_members {
                        true => "/v1/import?allow_non_members=true",
                        false => "/v1/import",
                    };
                    let (b, _) = r
                        .post(path, &data, false)
                        .with_context(|| format!("import of {}", file.display()))?;
                    serde_json::from_slice(&b)?
                }
            };
            print(out, &v)?;
        }
        Command::Run(args) => crate::run::run(dir, args, out)?,
        Command::Simulate(args) => simulate(args, out)?,
        Command::Demo { serve: false, .. } => crate::demo::run(out)?,
        Command::Demo { serve: true, port } => crate::demo::serve::serve(port, out)?,
        Command::Sql { url, rebuild } => {
            let url = crate::sql::Url::parse(&url)?;
            let node = open(dir).map_err(|e| match e.downcast_ref::<node::NodeOpenError>() {
                Some(node::NodeOpenError::Locked(_)) => e.context(
                    "a running node mirrors live with `weftlog run --sql URL`; stop it to use `weftlog sql`",
                ),
                _ => e,
            })?;
            let started = std::time::Instant::now();
            let (at, start) = crate::sql::mirror_once(&node, &url, rebuild)?;
            let (from, reason) = match start {
                crate::sql::Start::Resumed(p) => (p, None),
                crate::sql::Start::Rebuilt(why) => (0, Some(why)),
            };
            print(
                out,
                &json!({
                    "url": url.to_string(),
                    "node": at.node,
                    "epoch": at.epoch,
                    "position": at.position,
                    "event_id": at.event_id,
                    "state_hash": at.state_hash,
                    "mirrored": at.position - from,
                    "rebuilt": reason,
                    "elapsed_ms": started.elapsed().as_millis() as u64,
                }),
            )?;
        }
    }
    Ok(())
}

/// Reads a member file (`--members`): one node id per line, `#` comments
/// allowed ([`Members::parse`]). Without one, [`Members::Anyone`].
pub fn read_members(path: Option<&Path>) -> Result<Members> {
    let Some(path) = path else {
        return Ok(Members::Anyone);
    };
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the member list {}", path.display()))?;
    Members::parse(&text).map_err(|e| anyhow!("member list {}: {e}", path.display()))
}

/// A command given `--members` while the node runs: the running node's own
/// list applies, so a second one would mislead.
fn running_list(members: Option<&Path>) -> Result<()> {
    match members {
        Some(p) => bail!(
            "the node is running: it applies its own `run --members` list, so --members {} is not used; drop it",
            p.display()
        ),
        None => Ok(()),
    }
}

/// The state folded from the events with hlc <= `at`. The log is in causal
/// order and that set is causally closed, so every insert succeeds.
pub fn state_as_of(node: &Node, at: Hlc) -> Result<State> {
    let mut state = State::new();
    let mut err = None;
    node.scan(|e, id| {
        if e.hlc <= at && err.is_none() {
            if let Err(x) = state.insert(e, id) {
                err = Some(x);
            }
        }
    })?;
    match err {
        Some(e) => Err(anyhow!("log does not fold: {e}")),
        None => Ok(state),
    }
}

/// Entry point used by `main`; exit code 0 on success, 1 on error.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // Logs go to stderr; `run` says what it does at info level,
    // the other commands only warn. RUST_LOG overrides.
    let default = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(cli, &mut out) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
