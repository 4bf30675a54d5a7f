//! What a run reports, and the summary of many runs as text and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// A broken oracle: what was wrong, where and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which oracle: `convergence`, `acknowledged`, `causal-order`,
    /// `escrow`, `escrow-marks`, `conflicts`, `commands`, `durability`,
    /// `session`, `equivocation`, `forks`, `restore-fork`, `clock`,
    /// `recovery`, `determinism`.
    pub oracle: String,
    /// Virtual time, ms.
    pub at_ms: u64,
    /// What was found.
    pub detail: String,
}

/// What happened to the commands the workload issued.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Appends {
    /// Commands issued.
    pub attempted: u64,
    /// Appends acknowledged (durable on their node).
    pub acked: u64,
    /// Refused: the stream was not at the expected version.
    pub refused_version: u64,
    /// Refused: an escrow op needed more rights than the node holds.
    pub refused_rights: u64,
    /// Refused for another reason (none in honest runs).
    pub refused_other: u64,
    /// Not issued: the node was down.
    pub node_down: u64,
    /// Made but never acknowledged: the node crashed first.
    pub lost_unacked: u64,
}

/// Commands held after restarts: a node restarted with peers holds the
/// commands it gets until a peer confirms its own log or
/// `[node] confirm_wait_ms` passes, as the node's HTTP API holds append
/// requests (they wait; none is refused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Held {
    /// Restarts after which the node held commands (one with peers).
    pub restarts: u64,
    /// Of those, the holds a peer's confirmation ended.
    pub confirmed: u64,
    /// Of those, the holds that ended when the wait passed unconfirmed.
    pub timed_out: u64,
    /// Commands held (counted in [`Appends::attempted`] too).
    pub commands: u64,
    /// Held commands lost when their node crashed before it let them go
    /// (the client's request fails).
    pub lost: u64,
    /// Virtual ms the held commands waited, summed.
    pub total_ms: u64,
    /// The longest any command waited, virtual ms.
    pub max_ms: u64,
}

impl std::ops::AddAssign for Held {
    fn add_assign(&mut self, o: Held) {
        self.restarts += o.restarts;
        self.confirmed += o.confirmed;
        self.timed_out += o.timed_out;
        self.commands += o.commands;
        self.lost += o.lost;
        self.total_ms += o.total_ms;
        self.max_ms = self.max_ms.max(o.max_ms);
    }
}

/// Restores and whether the restored author forked: signed again a seq
/// that another node held when it restarted from its copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Restores {
    /// Restores after which the node restarted with its peers reachable.
    pub with_peers: u64,
    /// Of those, the restores whose author forked (the `restore-fork`
    /// oracle allows it only once the wait passed unconfirmed, or after a
    /// peer that lacked some of the newer own events confirmed).
    pub with_peers_forked: u64,
    /// Of the forked ones, those whose hold ended unconfirmed (the wait
    /// passed); the others were confirmed by a peer that lacked some of the
    /// newer own events (one peer's confirmation lets appends go).
    pub with_peers_forked_unconfirmed: u64,
    /// Restores after which the node restarted cut off from every peer.
    pub isolated: u64,
    /// Of those, the restores whose author forked.
    pub isolated_forked: u64,
}

impl std::ops::AddAssign for Restores {
    fn add_assign(&mut self, o: Restores) {
        self.with_peers += o.with_peers;
        self.with_peers_forked += o.with_peers_forked;
        self.with_peers_forked_unconfirmed += o.with_peers_forked_unconfirmed;
        self.isolated += o.isolated;
        self.isolated_forked += o.isolated_forked;
    }
}

/// Samples over virtual time, for plots.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Time between samples, ms.
    pub sample_ms: u64,
    /// Per sample: (node, event) pairs where the node lacks an event some
    /// node holds.
    pub divergence: Vec<u64>,
    /// Per sample: bytes sent in the period.
    pub bytes: Vec<u64>,
    /// Per sample: messages sent in the period.
    pub messages: Vec<u64>,
    /// Per sample: appends acknowledged in the period.
    pub appends: Vec<u64>,
    /// Per sample: connections up.
    pub connections: Vec<u64>,
    /// Heals after which no link was cut: (heal time, convergence time if
    /// reached), ms.
    pub heals: Vec<(u64, Option<u64>)>,
    /// Partitions: (start, end, shape), ms.
    pub partitions: Vec<(u64, u64, String)>,
    /// Crashes: (time, node, down until), ms.
    pub crashes: Vec<(u64, usize, u64)>,
    /// The final heal, ms.
    pub final_heal_ms: u64,
    /// The seats of the escrow counters at each sample, and once more at
    /// the end of the run (empty without escrow counters).
    pub seats: Vec<Seats>,
}

/// The seats of every escrow counter at one moment, as the union of the
/// events durable on any node shows them: the read model every replica
/// reaches once all have met. Simulated time only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Seats {
    /// Virtual time, ms.
    pub at_ms: u64,
    /// Units consumed by the sales in effect (a released seat stays sold).
    pub sold: u64,
    /// Effective capacity: the inits plus the seats `honour` kept.
    pub capacity: u64,
    /// Units marked oversold.
    pub oversold: u64,
    /// Of those, units whose mark has a compensation standing.
    pub compensated: u64,
}

/// Client retries: commands whose request timed out at one node and that
/// the client sent again, with the same command id, to another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Retries {
    /// Commands sent again to another node.
    pub sent: u64,
    /// Of those, answered with the event already in effect (the node knew
    /// the command).
    pub answered_existing: u64,
    /// (stream, command id) pairs carried by more than one event at the end
    /// (the command ran on two nodes out of touch).
    pub carried_twice: u64,
    /// Events that took no effect at the end (duplicates); the command
    /// oracle checks every command took effect once.
    pub duplicates: u64,
}

impl std::ops::AddAssign for Retries {
    fn add_assign(&mut self, o: Retries) {
        self.sent += o.sent;
        self.answered_existing += o.answered_existing;
        self.carried_twice += o.carried_twice;
        self.duplicates += o.duplicates;
    }
}

/// Seats sold beyond capacity under a risk window (or on a fork's later
/// branch), as the read model marks them, and their compensation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Oversold {
    /// Seats marked oversold.
    pub seats: u64,
    /// Of those, seats with a compensation standing.
    pub compensated: u64,
    /// Seats released by `cancel` and `waitlist`.
    pub released: u64,
    /// Seats kept by `honour` (capacity raised).
    pub honoured: u64,
}

impl Oversold {
    fn add(&mut self, o: &Oversold) {
        self.seats += o.seats;
        self.compensated += o.compensated;
        self.released += o.released;
        self.honoured += o.honoured;
    }
}

/// Rebalancing of escrow rights while connected
/// ([`weftlog_proto::rebalance`]), and the refusals it could have avoided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rebalance {
    /// Asks for rights sent (one per peer asked).
    pub asks: u64,
    /// Transfers made to answer them.
    pub transfers: u64,
    /// Rights those transfers moved.
    pub rights_moved: u64,
    /// Sales refused for want of rights (as `oversell_refused`).
    pub refusals: u64,
    /// Of those, refusals that rebalancing could have avoided: throughout
    /// the last round trip of the link before the refusal, a node
    /// connected to the refuser (the link up both ways and not
    /// backlogged) held spare rights (beyond its reserve,
    /// [`weftlog_proto::rebalance::spare`]) covering the sale and any
    /// debt of the refuser. Target 0.
    pub avoidable: u64,
    /// Refusals where, one round trip before, a node connected to the
    /// refuser held rights covering the sale at all (its reserve
    /// included): what a rule without reserves could have moved.
    pub covered: u64,
    /// Sales refused for want of rights that waited for a connected peer's
    /// transfer instead ([`weftlog_proto::rebalance::RIGHTS_WAIT_MS`]).
    pub waited: u64,
    /// Of those, the sales the rights that arrived let through.
    pub waited_sold: u64,
    /// Milliseconds those waits took, summed.
    pub wait_ms: u64,
    /// The longest wait that ended in a sale, ms.
    pub sold_wait_max_ms: u64,
    /// Waiting sales lost in a crash (their clients saw an error).
    pub wait_lost: u64,
}

impl std::ops::AddAssign for Rebalance {
    fn add_assign(&mut self, o: Rebalance) {
        self.asks += o.asks;
        self.transfers += o.transfers;
        self.rights_moved += o.rights_moved;
        self.refusals += o.refusals;
        self.avoidable += o.avoidable;
        self.covered += o.covered;
        self.waited += o.waited;
        self.waited_sold += o.waited_sold;
        self.wait_ms += o.wait_ms;
        self.sold_wait_max_ms = self.sold_wait_max_ms.max(o.sold_wait_max_ms);
        self.wait_lost += o.wait_lost;
    }
}

/// Gossip counters of a run (every node, every incarnation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gossip {
    /// Heads announced on lazy links.
    pub announcements: u64,
    /// Tree repairs: grafts for announced events that did not arrive in
    /// time.
    pub grafts: u64,
    /// Links pruned (counted at both ends).
    pub prunes: u64,
}

/// The outcome of one seed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Virtual ms of workload and faults (to the final heal).
    pub duration_ms: u64,
    /// Virtual ms simulated in all (quiescence included).
    pub virtual_ms: u64,
    /// Events appended and acknowledged.
    pub events: u64,
    /// Commands and their fate.
    pub appends: Appends,
    /// Client retries at another node.
    pub retries: Retries,
    /// Commands held after restarts until a peer confirmed the node's own
    /// log.
    pub held: Held,
    /// Restores, with and without peers at restart, and which forked.
    pub restores: Restores,
    /// Sync messages sent.
    pub messages: u64,
    /// Their bytes (length prefixes included).
    pub bytes: u64,
    /// Events carried in sync messages.
    pub event_frames: u64,
    /// Received events a node already held (duplicate deliveries across
    /// peers and reconnects).
    pub duplicate_deliveries: u64,
    /// Received events stored (each node counts each event it got from a
    /// peer once).
    pub delivered: u64,
    /// Gossip: heads announced on lazy links, tree repairs (grafts for
    /// announced events that did not arrive in time), links pruned.
    pub gossip: Gossip,
    /// Sync rounds completed.
    pub rounds: u64,
    /// Group commits.
    pub commits: u64,
    /// Faults injected, by type.
    pub faults: BTreeMap<String, u64>,
    /// Fields in conflict at the end (same on every node).
    pub conflicts: u64,
    /// Forked `(author, seq)` pairs in the cluster at the end (two events
    /// for one seq, over every node's log): made by restores.
    pub forks: u64,
    /// Pairs of concurrent writes to one field in the final event set.
    pub concurrent_writes: u64,
    /// Convergence time after each full heal, virtual ms.
    pub convergence_ms: Vec<u64>,
    /// Convergence time after the final heal, virtual ms.
    pub final_convergence_ms: Option<u64>,
    /// Full heals followed by a new partition before convergence (not
    /// measured).
    pub convergence_interrupted: u64,
    /// Sales and escrow uses refused because the node held too few rights.
    pub oversell_refused: u64,
    /// Rebalancing while connected, and the refusals it could have avoided.
    pub rebalance: Rebalance,
    /// Seats (escrow rights) consumed at the end (node 0's state: events
    /// that took effect).
    pub escrow_consumed: u64,
    /// Total escrow capacity.
    pub escrow_capacity: u64,
    /// Seats marked oversold at the end (node 0's state), and of those the
    /// seats compensated, released (cancel, waitlist) and honoured.
    pub oversold: Oversold,
    /// blake3 of the canonical trace: equal for equal seeds.
    pub trace_hash: String,
    /// The state hash every node ends with (node 0's).
    pub state_hash: String,
    /// Broken oracles; empty for a passing run.
    pub violations: Vec<Violation>,
    /// The command that replays this run.
    pub replay: String,
    /// Wall-clock ms the run took (outside the simulation; not traced).
    pub wall_ms: u64,
    /// Samples for plots.
    #[serde(skip)]
    pub timeline: Timeline,
}

impl RunReport {
    /// Whether every oracle held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// p50, p99 and max of a sample (nearest rank); zeros when empty.
pub fn percentiles(xs: &[u64]) -> (u64, u64, u64) {
    if xs.is_empty() {
        return (0, 0, 0);
    }
    let mut v = xs.to_vec();
    v.sort_unstable();
    let rank = |p: f64| {
        let r = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[r - 1]
    };
    (rank(0.50), rank(0.99), v[v.len() - 1])
}

/// Convergence percentiles, virtual ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Heals measured.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Maximum.
    pub max_ms: u64,
}

impl Latency {
    fn of(xs: &[u64]) -> Latency {
        let (p50, p99, max) = percentiles(xs);
        Latency {
            count: xs.len() as u64,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
        }
    }
}

/// A failing seed and how to replay it.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The command that replays it.
    pub replay: String,
    /// What broke.
    pub violations: Vec<Violation>,
}

/// The summary of the seeds of one scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Nodes.
    pub nodes: usize,
    /// Seeds run.
    pub seeds: u64,
    /// Seeds whose oracles all held.
    pub passed: u64,
    /// Events appended and acknowledged.
    pub events: u64,
    /// Commands and their fate.
    pub appends: Appends,
    /// Client retries at another node, summed.
    pub retries: Retries,
    /// Commands held after restarts, summed.
    pub held: Held,
    /// Restores and which forked, summed.
    pub restores: Restores,
    /// Sync messages.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Duplicate event deliveries.
    pub duplicate_deliveries: u64,
    /// Received events stored.
    pub delivered: u64,
    /// Gossip counters, summed.
    pub gossip: Gossip,
    /// Faults injected, by type.
    pub faults: BTreeMap<String, u64>,
    /// Fields in conflict at the end, summed over seeds.
    pub conflicts: u64,
    /// Forked `(author, seq)` pairs at the end, summed over seeds.
    pub forks: u64,
    /// Pairs of concurrent same-field writes, summed over seeds.
    pub concurrent_writes: u64,
    /// Convergence after each full heal (final heals included).
    pub convergence: Latency,
    /// Convergence after the final heal.
    pub final_convergence: Latency,
    /// Full heals followed by a new partition before convergence.
    pub convergence_interrupted: u64,
    /// Escrow uses refused for want of rights.
    pub oversell_refused: u64,
    /// Rebalancing and avoidable refusals, summed over seeds.
    pub rebalance: Rebalance,
    /// Escrow rights consumed, and the capacity, summed over seeds.
    pub escrow_consumed: u64,
    /// Escrow capacity summed over seeds.
    pub escrow_capacity: u64,
    /// Oversold and compensated seats, summed over seeds.
    pub oversold: Oversold,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Acknowledged events per wall-clock second.
    pub events_per_wall_s: f64,
    /// Trace hash of each seed, `seed:hash`, for comparing builds.
    pub trace_hashes: Vec<String>,
    /// Failing seeds.
    pub failures: Vec<Failure>,
}

impl Summary {
    /// The commands held after restarts, in one line (the `held` line of
    /// the text summary): how many restarts held commands, how many holds a
    /// peer's confirmation ended and how many the wait, how many commands
    /// waited, for how long (mean and max) and how many a crash lost;
    /// `None` when no restart held any.
    pub fn held(&self) -> Option<String> {
        let h = &self.held;
        (h.restarts > 0).then(|| {
            format!(
                "{} commands held for confirmation after {} restarts ({} confirmed by a peer, {} let go when the wait passed); waited mean {} ms, max {} ms; {} lost in crashes",
                h.commands,
                h.restarts,
                h.confirmed,
                h.timed_out,
                h.total_ms / h.commands.max(1),
                h.max_ms,
                h.lost
            )
        })
    }

    /// The restores, in one line (the `restores` line of the text
    /// summary): with peers reachable at restart, how many forked (and of
    /// those, how many after the wait passed unconfirmed); cut off, how
    /// many forked; `None` when there were none.
    pub fn restores(&self) -> Option<String> {
        let r = &self.restores;
        (r.with_peers + r.isolated > 0).then(|| {
            format!(
                "{} with peers at restart: {} forked ({} after the wait passed unconfirmed, the others confirmed by a peer lacking some newer own events), {} did not; {} cut off at restart: {} forked, {} did not",
                r.with_peers,
                r.with_peers_forked,
                r.with_peers_forked_unconfirmed,
                r.with_peers - r.with_peers_forked,
                r.isolated,
                r.isolated_forked,
                r.isolated - r.isolated_forked
            )
        })
    }

    /// The clock jumps, restores and Byzantine rewrites, with counts, in
    /// one line; `None` when there were none.
    pub fn adversary(&self) -> Option<String> {
        let f = |k: &str| self.faults.get(k).copied().unwrap_or(0);
        let mut parts = Vec::new();
        if f("clock_jumps") > 0 {
            parts.push(format!(
                "{} clock jumps ahead ({} back)",
                f("clock_jumps"),
                f("clock_jumps_back")
            ));
        }
        if f("backups") > 0 || f("restores") > 0 {
            parts.push(format!(
                "{} restores from {} copies ({} cut off at restart); {} forked seqs at the end, {} fork reports",
                f("restores"),
                f("backups"),
                f("restores_isolated"),
                self.forks,
                f("forks_reported")
            ));
        }
        let byz = [
            "byzantine_frames_duplicated",
            "byzantine_frames_replayed",
            "byzantine_messages_reordered",
            "byzantine_messages_swapped",
        ];
        if byz.iter().any(|k| f(k) > 0) {
            parts.push(format!(
                "Byzantine: {} frames sent twice, {} old frames replayed, {} messages reordered, {} swapped; {} of its sessions refused (a run nothing ends)",
                f(byz[0]),
                f(byz[1]),
                f(byz[2]),
                f(byz[3]),
                f("byzantine_sessions_refused")
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Sums the runs of one scenario; `wall_s` is the elapsed wall time of
    /// all of them (they may have run in parallel).
    pub fn of(runs: &[RunReport], wall_s: f64) -> Summary {
        let mut s = Summary {
            scenario: runs.first().map(|r| r.scenario.clone()).unwrap_or_default(),
            nodes: runs.first().map_or(0, |r| r.nodes),
            seeds: runs.len() as u64,
            wall_s,
            ..Summary::default()
        };
        let mut conv = Vec::new();
        let mut fin = Vec::new();
        let mut virtual_ms = 0u64;
        for r in runs {
            s.passed += r.passed() as u64;
            s.events += r.events;
            let a = &mut s.appends;
            a.attempted += r.appends.attempted;
            a.acked += r.appends.acked;
            a.refused_version += r.appends.refused_version;
            a.refused_rights += r.appends.refused_rights;
            a.refused_other += r.appends.refused_other;
            a.node_down += r.appends.node_down;
            a.lost_unacked += r.appends.lost_unacked;
            s.retries += r.retries;
            s.held += r.held;
            s.restores += r.restores;
            s.messages += r.messages;
            s.bytes += r.bytes;
            s.duplicate_deliveries += r.duplicate_deliveries;
            s.delivered += r.delivered;
            s.gossip.announcements += r.gossip.announcements;
            s.gossip.grafts += r.gossip.grafts;
            s.gossip.prunes += r.gossip.prunes;
            for (k, v) in &r.faults {
                *s.faults.entry(k.clone()).or_default() += v;
            }
            s.conflicts += r.conflicts;
            s.forks += r.forks;
            s.concurrent_writes += r.concurrent_writes;
            conv.extend_from_slice(&r.convergence_ms);
            fin.extend(r.final_convergence_ms);
            s.convergence_interrupted += r.convergence_interrupted;
            s.oversell_refused += r.oversell_refused;
            s.rebalance += r.rebalance;
            s.escrow_consumed += r.escrow_consumed;
            s.escrow_capacity += r.escrow_capacity;
            s.oversold.add(&r.oversold);
            virtual_ms += r.virtual_ms;
            s.trace_hashes.push(format!("{}:{}", r.seed, r.trace_hash));
            if !r.passed() {
                s.failures.push(Failure {
                    seed: r.seed,
                    replay: r.replay.clone(),
                    violations: r.violations.clone(),
                });
            }
        }
        s.convergence = Latency::of(&conv);
        s.final_convergence = Latency::of(&fin);
        s.virtual_s = virtual_ms as f64 / 1000.0;
        s.events_per_wall_s = if wall_s > 0.0 {
            s.events as f64 / wall_s
        } else {
            0.0
        };
        s
    }

    /// The summary as JSON.
    pub fn to_json(&self) -> String {
        // Plain data: serialising cannot fail.
        serde_json::to_string_pretty(self).expect("summary serialises")
    }

    /// The summary as text for people.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let verdict = if self.failures.is_empty() {
            "all oracles held".to_string()
        } else {
            format!("{} FAILED", self.failures.len())
        };
        let _ = writeln!(
            o,
            "scenario {}: {} nodes, {} seeds, {} passed ({verdict})",
            self.scenario, self.nodes, self.seeds, self.passed
        );
        let _ = writeln!(
            o,
            "  events        {} acknowledged of {} commands ({} refused: {} expected-version, {} escrow rights; {} at a down node; {} lost unacknowledged in crashes)",
            self.events,
            self.appends.attempted,
            self.appends.refused_version + self.appends.refused_rights + self.appends.refused_other,
            self.appends.refused_version,
            self.appends.refused_rights,
            self.appends.node_down,
            self.appends.lost_unacked,
        );
        if self.retries.sent > 0 {
            let r = &self.retries;
            let _ = writeln!(
                o,
                "  retries       {} commands retried at another node ({} answered with the event in effect); {} ran on two nodes, {} duplicate events took no effect",
                r.sent, r.answered_existing, r.carried_twice, r.duplicates
            );
        }
        let _ = writeln!(
            o,
            "  traffic       {} messages, {} ({} events delivered, {} duplicate deliveries: {:.2} per delivered event)",
            self.messages,
            human_bytes(self.bytes),
            self.delivered,
            self.duplicate_deliveries,
            self.duplicate_deliveries as f64 / self.delivered.max(1) as f64
        );
        let _ = writeln!(
            o,
            "  gossip        {} heads announced on lazy links, {} tree repairs (grafts), {} prunes",
            self.gossip.announcements, self.gossip.grafts, self.gossip.prunes
        );
        let faults: Vec<String> = self
            .faults
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            o,
            "  faults        {}",
            if faults.is_empty() {
                "none".to_string()
            } else {
                faults.join(", ")
            }
        );
        if let Some(h) = self.held() {
            let _ = writeln!(o, "  held          {h}");
        }
        if let Some(a) = self.adversary() {
            let _ = writeln!(o, "  adversary     {a}");
        }
        if let Some(r) = self.restores() {
            let _ = writeln!(o, "  restores      {r}");
        }
        let _ = writeln!(
            o,
            "  conflicts     {} fields in conflict at the end ({} pairs of concurrent same-field writes)",
            self.conflicts, self.concurrent_writes
        );
        let c = &self.convergence;
        let _ = writeln!(
            o,
            "  convergence   after {} heals: p50 {} ms, p99 {} ms, max {} ms (final heal: p50 {} ms, max {} ms; {} heals cut short by a new partition)",
            c.count,
            c.p50_ms,
            c.p99_ms,
            c.max_ms,
            self.final_convergence.p50_ms,
            self.final_convergence.max_ms,
            self.convergence_interrupted
        );
        let _ = writeln!(
            o,
            "  escrow        {} oversell attempts refused; {} of {} rights consumed",
            self.oversell_refused, self.escrow_consumed, self.escrow_capacity
        );
        let ov = &self.oversold;
        if ov.seats > 0 {
            let _ = writeln!(
                o,
                "  oversold      {} seats marked oversold, {} compensated ({} released by cancel or waitlist, {} honoured)",
                ov.seats, ov.compensated, ov.released, ov.honoured
            );
        }
        let r = &self.rebalance;
        let _ = writeln!(
            o,
            "  rebalance     {} refusals, {} avoidable (a connected node held spare rights beyond its reserve covering the sale throughout the round trip before; {} counting reserves too); {} asks, {} transfers moved {} rights",
            r.refusals, r.avoidable, r.covered, r.asks, r.transfers, r.rights_moved
        );
        if r.waited > 0 {
            let _ = writeln!(
                o,
                "  rights wait   {} sales waited for a connected peer's rights, {} sold (the longest after {} ms), mean wait {} ms; {} lost in crashes",
                r.waited,
                r.waited_sold,
                r.sold_wait_max_ms,
                r.wait_ms / (r.waited - r.wait_lost).max(1),
                r.wait_lost
            );
        }
        let _ = writeln!(
            o,
            "  time          {:.1} virtual s in {:.2} wall s ({:.0} events per wall s)",
            self.virtual_s, self.wall_s, self.events_per_wall_s
        );
        for f in &self.failures {
            let _ = writeln!(o, "FAILED seed {}: replay with: {}", f.seed, f.replay);
            for v in &f.violations {
                let _ = writeln!(o, "  [{}] at {} ms: {}", v.oracle, v.at_ms, v.detail);
            }
        }
        o
    }
}

/// `1.2 MB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentiles(&[]), (0, 0, 0));
        assert_eq!(percentiles(&[5]), (5, 5, 5));
        let xs: Vec<u64> = (1..=100).collect();
        assert_eq!(percentiles(&xs), (50, 99, 100));
    }
}
