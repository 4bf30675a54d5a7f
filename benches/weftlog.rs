//! weftlog against its baselines, each measured in the same run.
//!
//! ```text
//! cargo bench --bench weftlog                         # every group, full sizes
//! cargo bench --bench weftlog -- append fold open     # pick groups
//! WEFTLOG_BENCH_QUICK=1 cargo bench --bench weftlog   # small sizes (CI smoke check)
//! ```
//!
//! Groups:
//! - `append`: durable appends of 256-byte payloads through `Node::append`
//!   from 1, 16 and 256 threads on one node, against SQLite (WAL,
//!   `synchronous=FULL`, blake3 primary key) committing transactions of as
//!   many rows as we have appenders ("equal batching"), and against the
//!   disk's own limit: raw writes of the same bytes (the run's average
//!   record size, zero-filled ahead as the log does) with one `fdatasync`
//!   per batch of the run's average group commit. Each run counts the
//!   appends acknowledged inside a fixed window, in a fresh directory.
//!   Batch appends (`Node::append_many`) have their own bench,
//!   `benches/batch.rs`.
//! - `fold`: `State::insert` of pre-built, pre-sealed events into a fresh
//!   state, against automerge 0.12 applying the same puts and counter
//!   increments, as one batch and one change at a time.
//! - `open`: `Node::open` over a log built by `Node::append` (page cache
//!   warm), against reading every row of the same events from SQLite.
//! - `sync`: bytes, flights and time of one sync round against automerge's
//!   sync protocol, for n shared events and k new ones on each side (a
//!   table of its own).
//! - `replicate`: two nodes, each with a `Daemon`, over QUIC on loopback
//!   (both in this process, on a two-worker runtime). Node A holds n events
//!   of the mixed workload (256-byte payloads, written before the daemons
//!   start), B is empty; B dials A. Timed from the start of A's daemon until
//!   B holds all n in its state ("applied", polled every 0.5 ms) and until B's
//!   feed reports the batch holding A's last event, i.e. after B's
//!   `fdatasync` of it ("durable"; batches are durable in order, and B's log
//!   is reopened afterwards to check it holds n records). Baselines:
//!   automerge's sync protocol bringing an empty in-memory document up to
//!   one with the same n changes (the fold group's changes, each also
//!   putting the 256-byte payload), and weftlog's own sync session between
//!   two in-memory `MemStore`s (no QUIC, no TLS, no disk; its sender's and
//!   receiver's µs per event are shown apart). Each run also prints the CPU
//!   the process spent per replicated event, by thread kind (the runtime:
//!   sessions and QUIC; the committers and syncers: B's log).
//! - `propagate`: a full mesh of 5 nodes with daemons on loopback
//!   (anti-entropy every hour, so only live push counts). After the mesh is
//!   up and warmed, m appends from rotating origins, each 5–10 ms after the
//!   last one settled: the time from the `Node::append` call until every
//!   other node holds the event in its state ("applied", polled every
//!   ~0.1 ms by `(author, seq)`) and until every other node's feed reports
//!   it durable ("durable"). p50, p99 and max per run; `pooled` is the
//!   quantile over all runs' events, `origin_ack` the origin's own append
//!   latency in the mesh, `sends_per_delivery` the events all sessions sent
//!   per (event, other node). Baseline: the same spaced appends on a lone
//!   node without daemons (one local durable append, mostly one
//!   `fdatasync`), with the same probe watching its own state. Ratio =
//!   baseline / weftlog. On a VM an `fdatasync` after an idle gap can be
//!   slower than in a busy mesh, so read it next to `origin_ack`.
//! - `subscribe`: a log of n events (built like the open group's) replayed
//!   from position 0 to a subscriber: over HTTP as server-sent events
//!   (`GET /v1/events?from=0` read by a local client on a plain socket,
//!   counting `id:` lines until all n arrived) and in process
//!   (`Node::subscribe_from(0)`); the baseline is the log's own scan (read
//!   and decode every record), the ceiling of any replay.
//!
//! Every figure is the median of `WEFTLOG_BENCH_RUNS` runs (at least 3);
//! weftlog and baseline runs alternate so drift in a noisy machine hits both.
//! Output: a table at the end, and one JSON line per figure as it completes
//! (lines starting with `{`). A ratio above 1 means weftlog is faster.
//!
//! Environment (all optional): `WEFTLOG_BENCH_QUICK=1`; `WEFTLOG_BENCH_RUNS`;
//! `WEFTLOG_BENCH_SECS` (append window per run); `WEFTLOG_BENCH_THREADS`
//! (comma-separated appender counts); `WEFTLOG_BENCH_FOLD_N`,
//! `WEFTLOG_BENCH_AM_BATCH_N`, `WEFTLOG_BENCH_AM_ONE_N`,
//! `WEFTLOG_BENCH_FOLD_AUTHORS`, `WEFTLOG_BENCH_FOLD_TEXT_N` (events of
//! the fold group's text case), `WEFTLOG_BENCH_OPEN_N`;
//! `WEFTLOG_BENCH_SUBSCRIBE_N` (events replayed by the subscribe group);
//! `WEFTLOG_BENCH_REPLICATE_N`, `WEFTLOG_BENCH_PROPAGATE_M`,
//! `WEFTLOG_BENCH_PROPAGATE_NODES`, `WEFTLOG_BENCH_PROPAGATE_PROBE=0` (no
//! "applied" probe: durable figures only); `WEFTLOG_BENCH_DIR`
//! (scratch directory; default `target/bench-tmp`, which should be on a real
//! disk, not tmpfs).

#[path = "common/mod.rs"]
mod common;

use common::{env_or, median, payload, splitmix, PAYLOAD_BYTES};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Automerge, ObjType, ScalarValue, ROOT};
use rusqlite::{params, Connection};
use serde_json::json;
use tokio::sync::broadcast;
use weftlog::daemon::{self, Daemon};
use weftlog::node::{self, Node};
use weftlog_proto::event::{Event, Keypair, Meta, Op};
use weftlog_proto::log::{decode_frame, HEADER_BYTES};
use weftlog_proto::state::{Draft, Prepared, State};
use weftlog_proto::sync::{MemStore, Session, SessionConfig};
use weftlog_proto::text::{Splice, TextEdit};
use weftlog_proto::{EventId, HlcClock, NodeId};

/// Streams the fold and open workloads spread over.
const STREAMS: u64 = 1_000;
/// Register fields written by `Op::Set`.
const FIELDS: [&str; 5] = ["name", "email", "status", "tier", "region"];
/// Counters bumped by `Op::Add`.
const COUNTERS: [&str; 2] = ["visits", "total"];
/// Runs counted before the measured window of an append run starts.
const APPEND_WARMUP: Duration = Duration::from_millis(200);
/// Appenders used to build the log for the open group.
const BUILD_THREADS: usize = 256;
/// Rows per transaction when building the SQLite replay table.
const SQLITE_BUILD_TX: u64 = 10_000;
/// Wall clock base for in-memory events (ms since the epoch).
const BASE_MS: u64 = 1_700_000_000_000;

const GROUPS: [&str; 7] = [
    "append",
    "fold",
    "open",
    "sync",
    "replicate",
    "propagate",
    "subscribe",
];

struct Config {
    quick: bool,
    runs: usize,
    append_secs: f64,
    threads: Vec<usize>,
    fold_n: u64,
    fold_authors: u64,
    fold_text_n: u64,
    am_batch_n: u64,
    am_one_n: u64,
    open_n: u64,
    subscribe_n: u64,
    replicate_n: u64,
    propagate_m: u64,
    propagate_nodes: usize,
    propagate_probe: bool,
    dir: PathBuf,
    groups: Vec<String>,
}

impl Config {
    fn from_env() -> Result<Config> {
        let quick = std::env::var("WEFTLOG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let threads = match std::env::var("WEFTLOG_BENCH_THREADS") {
            Ok(v) => v
                .split(',')
                .map(|t| t.trim().parse::<usize>().context("WEFTLOG_BENCH_THREADS"))
                .collect::<Result<Vec<_>>>()?,
            Err(_) => vec![1, 16, 256],
        };
        if threads.contains(&0) {
            bail!("WEFTLOG_BENCH_THREADS: an appender count is 0");
        }
        let default_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench-tmp");
        // `cargo bench` passes `--bench`; anything else not starting with `-`
        // names a group.
        let mut groups = Vec::new();
        for a in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
            if !GROUPS.contains(&a.as_str()) {
                bail!("unknown group {a:?}; the groups are {GROUPS:?}");
            }
            groups.push(a);
        }
        if groups.is_empty() {
            groups = GROUPS.iter().map(|g| g.to_string()).collect();
        }
        let cfg = Config {
            quick,
            runs: env_or("WEFTLOG_BENCH_RUNS", 3usize)?.max(3),
            append_secs: env_or("WEFTLOG_BENCH_SECS", if quick { 1.0 } else { 3.0 })?,
            threads,
            fold_n: env_or(
                "WEFTLOG_BENCH_FOLD_N",
                if quick { 20_000 } else { 1_000_000 },
            )?,
            fold_authors: env_or("WEFTLOG_BENCH_FOLD_AUTHORS", 1u64)?.max(1),
            fold_text_n: env_or(
                "WEFTLOG_BENCH_FOLD_TEXT_N",
                if quick { 5_000 } else { 100_000 },
            )?,
            am_batch_n: env_or(
                "WEFTLOG_BENCH_AM_BATCH_N",
                if quick { 5_000 } else { 100_000 },
            )?,
            am_one_n: env_or("WEFTLOG_BENCH_AM_ONE_N", if quick { 1_000 } else { 10_000 })?,
            open_n: env_or(
                "WEFTLOG_BENCH_OPEN_N",
                if quick { 10_000 } else { 1_000_000 },
            )?,
            subscribe_n: env_or(
                "WEFTLOG_BENCH_SUBSCRIBE_N",
                if quick { 10_000 } else { 1_000_000 },
            )?
            .max(1),
            replicate_n: env_or(
                "WEFTLOG_BENCH_REPLICATE_N",
                if quick { 5_000 } else { 200_000 },
            )?
            .max(1),
            propagate_m: env_or("WEFTLOG_BENCH_PROPAGATE_M", if quick { 30 } else { 300 })?.max(1),
            propagate_nodes: env_or("WEFTLOG_BENCH_PROPAGATE_NODES", 5usize)?.max(2),
            propagate_probe: env_or("WEFTLOG_BENCH_PROPAGATE_PROBE", 1u8)? != 0,
            dir: std::env::var_os("WEFTLOG_BENCH_DIR").map_or(default_dir, PathBuf::from),
            groups,
        };
        Ok(cfg)
    }

    fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.dir)
            .with_context(|| format!("temp dir in {}", self.dir.display()))
    }
}

// ---------------------------------------------------------------------------
// Figures and reporting

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    EventsPerSec,
    Secs,
    /// A latency in milliseconds.
    Ms,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::EventsPerSec => "events/s",
            Unit::Secs => "s",
            Unit::Ms => "ms",
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Unit::EventsPerSec => rate(v),
            Unit::Secs => format!("{v:.3} s"),
            Unit::Ms => format!("{v:.2} ms"),
        }
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

#[derive(Clone)]
struct Baseline {
    name: String,
    unit: Unit,
    runs: Vec<f64>,
    n: u64,
    note: String,
}

enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// At least this ratio against the first baseline.
    RatioAtLeast(f64),
}

struct Figure {
    group: &'static str,
    name: String,
    unit: Unit,
    runs: Vec<f64>,
    n: u64,
    baselines: Vec<Baseline>,
    target: Option<Target>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Figure {
    fn median(&self) -> f64 {
        median(&self.runs)
    }

    /// How many times faster weftlog is than `b` (above 1: weftlog faster).
    fn ratio(&self, b: &Baseline) -> f64 {
        let (v, bv) = (self.median(), median(&b.runs));
        match (self.unit, b.unit) {
            (Unit::EventsPerSec, Unit::EventsPerSec) => v / bv,
            (Unit::Secs, Unit::Secs) => (bv / b.n as f64) / (v / self.n as f64),
            (Unit::Secs, Unit::EventsPerSec) => (self.n as f64 / v) / bv,
            (Unit::EventsPerSec, Unit::Secs) => v / (b.n as f64 / bv),
            (Unit::Ms, Unit::Ms) => bv / v,
            // Latencies compare only with latencies.
            (Unit::Ms, _) | (_, Unit::Ms) => f64::NAN,
        }
    }

    fn met(&self) -> Option<bool> {
        Some(match self.target.as_ref()? {
            Target::AtLeast(t) => self.median() >= *t,
            Target::AtMost(t) => self.median() <= *t,
            Target::RatioAtLeast(r) => self.ratio(self.baselines.first()?) >= *r,
        })
    }

    fn target_text(&self) -> String {
        match &self.target {
            None => "—".into(),
            Some(Target::AtLeast(t)) => format!("≥ {}", self.unit.show(*t)),
            Some(Target::AtMost(t)) => format!("≤ {}", self.unit.show(*t)),
            Some(Target::RatioAtLeast(r)) => format!("ratio ≥ {r}"),
        }
    }

    fn json(&self, cfg: &Config) -> serde_json::Value {
        let baselines: Vec<_> = self
            .baselines
            .iter()
            .map(|b| {
                json!({
                    "name": b.name,
                    "unit": b.unit.name(),
                    "median": median(&b.runs),
                    "runs": b.runs,
                    "n": b.n,
                    "note": b.note,
                    "ratio": self.ratio(b),
                })
            })
            .collect();
        let target = match &self.target {
            None => serde_json::Value::Null,
            Some(Target::AtLeast(t)) => json!({"op": ">=", "value": t, "unit": self.unit.name()}),
            Some(Target::AtMost(t)) => json!({"op": "<=", "value": t, "unit": self.unit.name()}),
            Some(Target::RatioAtLeast(r)) => json!({"op": "ratio>=", "value": r}),
        };
        json!({
            "bench": "weftlog",
            "group": self.group,
            "figure": self.name,
            "unit": self.unit.name(),
            "median": self.median(),
            "runs": self.runs,
            "n": self.n,
            "quick": cfg.quick,
            "baselines": baselines,
            "target": target,
            "met": self.met(),
            "extra": self.extra,
        })
    }
}

struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, cfg: &Config, f: Figure) {
        println!("{}", f.json(cfg));
        self.figures.push(f);
    }

    fn print_table(&self) {
        println!();
        println!(
            "| figure | n (events; append: appenders) | weftlog (median) | baseline | n (events; append: rows per tx) | baseline (median) | ratio (>1: weftlog faster) | target | met |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for f in &self.figures {
            let met = match f.met() {
                None => "—",
                Some(true) => "yes",
                Some(false) => "NO",
            };
            let mut extra: Vec<String> = f
                .extra
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                .collect();
            extra.sort();
            let name = if extra.is_empty() {
                f.name.clone()
            } else {
                format!("{} ({})", f.name, extra.join(", "))
            };
            if f.baselines.is_empty() {
                println!(
                    "| {name} | {} | {} | — | — | — | — | {} | {met} |",
                    f.n,
                    f.unit.show(f.median()),
                    f.target_text()
                );
            }
            for (i, b) in f.baselines.iter().enumerate() {
                let note = if b.note.is_empty() {
                    b.name.clone()
                } else {
                    format!("{} ({})", b.name, b.note)
                };
                println!(
                    "| {} | {} | {} | {note} | {} | {} | {:.2}× | {} | {} |",
                    if i == 0 { name.as_str() } else { "″" },
                    f.n,
                    f.unit.show(f.median()),
                    b.n,
                    b.unit.show(median(&b.runs)),
                    f.ratio(b),
                    if i == 0 {
                        f.target_text()
                    } else {
                        String::new()
                    },
                    if i == 0 { met } else { "" },
                );
            }
        }
        println!();
        println!("Each figure is the median of its runs; every run is in the JSON lines above.");
    }
}

// ---------------------------------------------------------------------------
// Workloads

/// What event `i` of the mixed workload does; the same for weftlog,
/// automerge and SQLite.
struct Spec {
    stream: u64,
    sets: Vec<(&'static str, String)>,
    adds: Vec<(&'static str, i64)>,
}

fn spec(i: u64) -> Spec {
    let r = splitmix(i);
    let stream = r % STREAMS;
    let f1 = ((r >> 16) % FIELDS.len() as u64) as usize;
    let f2 = (f1 + 1 + ((r >> 20) % (FIELDS.len() as u64 - 1)) as usize) % FIELDS.len();
    let counter = COUNTERS[((r >> 24) % COUNTERS.len() as u64) as usize];
    let delta = ((r >> 28) % 10) as i64 + 1;
    let value = |f: usize| format!("\"{}-{}\"", FIELDS[f], r >> 40);
    let (sets, adds) = match (r >> 32) % 4 {
        0 => (vec![(FIELDS[f1], value(f1))], vec![]),
        1 => (vec![], vec![(counter, delta)]),
        2 => (vec![(FIELDS[f1], value(f1))], vec![(counter, delta)]),
        _ => (
            vec![(FIELDS[f1], value(f1)), (FIELDS[f2], value(f2))],
            vec![(counter, delta)],
        ),
    };
    Spec { stream, sets, adds }
}

fn stream_name(s: u64) -> String {
    format!("customer/{s}")
}

fn mixed_draft(i: u64, payload: Vec<u8>) -> Draft {
    let s = spec(i);
    let mut ops: Vec<Op> = s
        .sets
        .into_iter()
        .map(|(f, v)| Op::Set {
            field: f.into(),
            value: v.into_bytes(),
            supersedes: vec![],
        })
        .collect();
    ops.extend(s.adds.into_iter().map(|(c, d)| Op::Add {
        counter: c.into(),
        delta: d,
    }));
    Draft {
        stream: stream_name(s.stream),
        kind: "CustomerUpdated".into(),
        ops,
        payload,
        meta: Meta::default(),
        expected_version: None,
        texts: Vec::new(),
    }
}

fn append_draft(thread: usize, i: u64, payload: &[u8]) -> Draft {
    Draft {
        stream: format!("appender/{thread}"),
        kind: "Appended".into(),
        ops: vec![Op::Add {
            counter: "n".into(),
            delta: 1,
        }],
        payload: payload.to_vec(),
        meta: Meta {
            command_id: None,
            user: Some(format!("bench-{i}")),
        },
        expected_version: None,
        texts: Vec::new(),
    }
}

fn new_node(cfg: &Config, prefix: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = cfg.tempdir(prefix)?;
    let dir = tmp.path().join("node");
    node::init(&dir).context("node init")?;
    Ok((tmp, dir))
}

/// Records, signed records (one per group commit of local appends) and
/// frame bytes in a node's log.
fn log_batches(node_dir: &Path) -> Result<(u64, u64, u64)> {
    let mut segs: Vec<PathBuf> = fs::read_dir(node_dir.join(node::LOG_DIR))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let (mut records, mut signed, mut bytes) = (0, 0, 0);
    for seg in segs {
        let data = fs::read(&seg)?;
        let mut off = HEADER_BYTES;
        // Segments are zero-filled past their records.
        while off < data.len() && data[off..].iter().any(|&b| b != 0) {
            let (frame, used) = decode_frame(&data[off..])
                .map_err(|e| anyhow::anyhow!("{}: {e}", seg.display()))?;
            records += 1;
            signed += frame.sig.is_some() as u64;
            bytes += used as u64;
            off += used;
        }
    }
    Ok((records, signed, bytes))
}

fn log_bytes(node_dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(node_dir.join(node::LOG_DIR))? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

// ---------------------------------------------------------------------------
// append

/// One run: `threads` appenders on one node; events acknowledged per second
/// inside the window, the average group-commit batch over the whole run,
/// and the average frame bytes per record.
/// Appenders are async tasks on a two-worker tokio runtime (as the node's
/// network and HTTP front ends run them), each awaiting its append before
/// making the next.
fn weft_append_run(cfg: &Config, threads: usize) -> Result<(f64, f64, f64)> {
    let (_tmp, dir) = new_node(cfg, "append-")?;
    let (node, _) = Node::open(&dir).context("open node")?;
    let node = Arc::new(node);
    let window = Duration::from_secs_f64(cfg.append_secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let total = rt.block_on(async {
        let t0 = Instant::now();
        let (from, to) = (t0 + APPEND_WARMUP, t0 + APPEND_WARMUP + window);
        let tasks: Vec<_> = (0..threads)
            .map(|t| {
                let node = node.clone();
                tokio::spawn(async move {
                    let p = payload(t as u64);
                    let mut counted = 0u64;
                    for i in 0.. {
                        node.append_async(append_draft(t, i, &p)).await?;
                        let now = Instant::now();
                        if now > to {
                            break;
                        }
                        if now >= from {
                            counted += 1;
                        }
                    }
                    anyhow::Ok(counted)
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("appender panicked")?;
        }
        anyhow::Ok(total)
    })?;
    drop(rt);
    drop(node);
    let (records, signed, bytes) = log_batches(&dir)?;
    Ok((
        total as f64 / window.as_secs_f64(),
        records as f64 / signed.max(1) as f64,
        bytes as f64 / records.max(1) as f64,
    ))
}

/// One run of the disk's own limit for an append run: batches of `batch`
/// records of `record_bytes` each (the weftlog run's average group commit
/// and record size), written as the log writes its segments (zero-filled
/// ahead in its 4 MiB steps), one `fdatasync` per batch; records per
/// second inside the window. No CPU work but the copy.
fn disk_append_run(cfg: &Config, batch: f64, record_bytes: f64) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let tmp = cfg.tempdir("disk-append-")?;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp.path().join("raw.seg"))?;
    let records = batch.round().max(1.0) as u64;
    let data = vec![0xA5u8; (record_bytes * records as f64).round().max(1.0) as usize];
    let zeros = vec![0u8; 1 << 20];
    let window = Duration::from_secs_f64(cfg.append_secs);
    let t0 = Instant::now();
    let (from, to) = (t0 + APPEND_WARMUP, t0 + APPEND_WARMUP + window);
    let (mut end, mut alloc, mut counted) = (HEADER_BYTES as u64, 0u64, 0u64);
    loop {
        f.write_all_at(&data, end)?;
        end += data.len() as u64;
        if end > alloc {
            let target = end.max(alloc + weftlog_proto::log::SEGMENT_ALLOC_BYTES);
            let mut at = end;
            while at < target {
                let n = (target - at).min(zeros.len() as u64);
                f.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            alloc = target;
        }
        f.sync_data()?;
        let now = Instant::now();
        if now > to {
            break;
        }
        if now >= from {
            counted += records;
        }
    }
    Ok(counted as f64 / window.as_secs_f64())
}

fn sqlite_open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("SQLite refused WAL mode (got {mode})");
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE IF NOT EXISTS events(
             id BLOB PRIMARY KEY, author BLOB, seq INTEGER,
             stream TEXT, kind TEXT, payload BLOB);",
    )?;
    Ok(conn)
}

const SQLITE_INSERT: &str =
    "INSERT INTO events(id, author, seq, stream, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Inserts one row as the append baseline does: blake3 id over the row.
fn sqlite_insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    author: &[u8; 32],
    seq: u64,
    stream: &str,
    kind: &str,
    payload: &[u8],
) -> Result<()> {
    let mut h = blake3::Hasher::new();
    h.update(author);
    h.update(&seq.to_le_bytes());
    h.update(stream.as_bytes());
    h.update(kind.as_bytes());
    h.update(payload);
    let id = *h.finalize().as_bytes();
    stmt.execute(params![
        &id[..],
        &author[..],
        seq as i64,
        stream,
        kind,
        payload
    ])?;
    Ok(())
}

/// One run: transactions of `tx` rows; rows committed per second in the window.
fn sqlite_append_run(cfg: &Config, tx: usize) -> Result<f64> {
    let tmp = cfg.tempdir("sqlite-append-")?;
    let conn = sqlite_open(&tmp.path().join("events.db"))?;
    let mut stmt = conn.prepare_cached(SQLITE_INSERT)?;
    let author = [7u8; 32];
    let p = payload(0);
    let window = Duration::from_secs_f64(cfg.append_secs);
    let t0 = Instant::now();
    let (from, to) = (t0 + APPEND_WARMUP, t0 + APPEND_WARMUP + window);
    let (mut seq, mut counted) = (0u64, 0u64);
    loop {
        conn.execute_batch("BEGIN")?;
        for _ in 0..tx {
            seq += 1;
            sqlite_insert(&mut stmt, &author, seq, "appender/0", "Appended", &p)?;
        }
        conn.execute_batch("COMMIT")?;
        let now = Instant::now();
        if now > to {
            break;
        }
        if now >= from {
            counted += tx as u64;
        }
    }
    Ok(counted as f64 / window.as_secs_f64())
}

fn bench_append(cfg: &Config, report: &mut Report) -> Result<()> {
    for &threads in &cfg.threads {
        println!(
            "# append: {threads} appender(s) vs SQLite tx={threads}, {} runs of {:.1} s",
            cfg.runs, cfg.append_secs
        );
        let (mut ours, mut batches, mut theirs, mut disk) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..cfg.runs {
            let (r, b, bytes) = weft_append_run(cfg, threads)?;
            let d = disk_append_run(cfg, b, bytes)?;
            let s = sqlite_append_run(cfg, threads)?;
            println!(
                "  run {run}: weftlog {} (avg batch {b:.1}, {bytes:.0} bytes per record), disk {}, sqlite {}",
                rate(r),
                rate(d),
                rate(s)
            );
            ours.push(r);
            batches.push(b);
            theirs.push(s);
            disk.push(d);
        }
        let mut extra = serde_json::Map::new();
        extra.insert(
            "avg_batch".into(),
            json!((median(&batches) * 10.0).round() / 10.0),
        );
        extra.insert("payload_bytes".into(), json!(PAYLOAD_BYTES));
        report.add(
            cfg,
            Figure {
                group: "append",
                name: format!("append_{threads}_threads"),
                unit: Unit::EventsPerSec,
                runs: ours,
                n: threads as u64,
                baselines: vec![
                    Baseline {
                        name: format!("sqlite_wal_full_tx{threads}"),
                        unit: Unit::EventsPerSec,
                        runs: theirs,
                        n: threads as u64,
                        note: String::new(),
                    },
                    // The disk's own limit (the issue: at least 0.8× it).
                    Baseline {
                        name: "disk_fdatasync_per_batch".into(),
                        unit: Unit::EventsPerSec,
                        runs: disk,
                        n: median(&batches).round() as u64,
                        note: "raw writes of the same bytes, one fdatasync per batch of the run's average group commit".into(),
                    },
                ],
                // The issue's targets: 300k events/s with 256 appenders, and
                // 20x SQLite at equal batching.
                target: Some(if threads >= 256 {
                    Target::AtLeast(300_000.0)
                } else {
                    Target::RatioAtLeast(20.0)
                }),
                extra,
            },
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// fold

struct Built {
    events: Vec<(Event, EventId)>,
    encoded: Vec<Vec<u8>>,
    state_hash: [u8; 32],
}

/// Events `0..n` of the mixed workload, made by `State::prepare` and sealed,
/// round-robin over `authors` in runs of 64 (one node's batch).
fn build_events(n: u64, authors: u64) -> Built {
    let keys: Vec<NodeId> = (0..authors)
        .map(|a| Keypair::from_secret([a as u8 + 1; 32]).node_id())
        .collect();
    let mut clocks = vec![HlcClock::default(); authors as usize];
    let mut state = State::new();
    let mut events = Vec::with_capacity(n as usize);
    let mut encoded = Vec::with_capacity(n as usize);
    for i in 0..n {
        let a = ((i / 64) % authors) as usize;
        let draft = mixed_draft(i, Vec::new());
        let event = match state.prepare(keys[a], &mut clocks[a], BASE_MS + i / 100, draft) {
            Ok(Prepared::New(e)) => e,
            other => panic!("event {i}: prepare gave {other:?}"),
        };
        let (bytes, id) = event.seal();
        state.insert(&event, id).expect("a prepared event inserts");
        events.push((event, id));
        encoded.push(bytes);
    }
    Built {
        events,
        encoded,
        state_hash: state.state_hash(),
    }
}

/// The same `n` first events as automerge changes: one change per event, a
/// map per stream, puts for sets and counter increments for adds; with
/// `payloads`, each change also puts the event's 256-byte payload (as bytes,
/// in the stream's `payload` field).
fn build_automerge(n: u64, payloads: bool) -> Result<Vec<automerge::Change>> {
    let mut doc = AutoCommit::new().with_actor(ActorId::from(vec![1u8; 16]));
    let mut objs: BTreeMap<u64, automerge::ObjId> = BTreeMap::new();
    let mut counters: BTreeSet<(u64, &str)> = BTreeSet::new();
    for i in 0..n {
        let s = spec(i);
        let obj = match objs.get(&s.stream) {
            Some(o) => o.clone(),
            None => {
                let o = doc.put_object(ROOT, stream_name(s.stream), ObjType::Map)?;
                objs.insert(s.stream, o.clone());
                o
            }
        };
        for (f, v) in &s.sets {
            doc.put(&obj, *f, v.as_str())?;
        }
        for (c, d) in &s.adds {
            if counters.insert((s.stream, c)) {
                doc.put(&obj, *c, ScalarValue::counter(0))?;
            }
            doc.increment(&obj, *c, *d)?;
        }
        if payloads {
            doc.put(&obj, "payload", ScalarValue::Bytes(payload(i)))?;
        }
        doc.commit();
    }
    let changes = doc.get_changes(&[]);
    if changes.len() as u64 != n {
        bail!("automerge made {} changes for {n} events", changes.len());
    }
    Ok(changes)
}

/// Longest note of the text case: past it, each edit also deletes.
const TEXT_NOTE_UNITS: u64 = 400;

/// Events `0..n` of the text case, made by `State::prepare` and sealed: each
/// one text op on a stream's `notes` (the fold group's streams), typing 8
/// characters at a random place, and deleting 8 once the note is long.
fn build_text_events(n: u64) -> Vec<(Event, EventId)> {
    let key = Keypair::from_secret([1; 32]).node_id();
    let mut clock = HlcClock::default();
    let mut state = State::new();
    let mut lens: BTreeMap<u64, u64> = BTreeMap::new();
    let mut events = Vec::with_capacity(n as usize);
    for i in 0..n {
        let r = splitmix(i ^ 0x7e47);
        let stream = r % STREAMS;
        let len = lens.entry(stream).or_default();
        let pos = (r >> 16) % (*len + 1);
        let delete = if *len >= TEXT_NOTE_UNITS {
            8.min(*len - pos)
        } else {
            0
        };
        *len = *len - delete + 8;
        let draft = Draft {
            stream: stream_name(stream),
            kind: "NotesEdited".into(),
            texts: vec![TextEdit {
                field: "notes".into(),
                splices: vec![Splice {
                    pos,
                    delete,
                    insert: format!("{:08x}", (r >> 32) as u32),
                }],
                base: None,
            }],
            ..Draft::default()
        };
        let event = match state.prepare(key, &mut clock, BASE_MS + i / 100, draft) {
            Ok(Prepared::New(e)) => e,
            other => panic!("text event {i}: prepare gave {other:?}"),
        };
        let id = event.seal().1;
        state.insert(&event, id).expect("a prepared event inserts");
        events.push((event, id));
    }
    events
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn bench_fold(cfg: &Config, report: &mut Report) -> Result<()> {
    let n = cfg.fold_n;
    println!(
        "# fold: building {n} events ({} author(s), {STREAMS} streams)…",
        cfg.fold_authors
    );
    let (secs, built) = time(|| build_events(n, cfg.fold_authors));
    println!("  built in {secs:.1} s");
    let am_n = cfg.am_batch_n.min(n);
    let am_one_n = cfg.am_one_n.min(am_n);
    println!("# fold: building {am_n} automerge changes…");
    let (secs, changes) = time(|| build_automerge(am_n, false));
    let changes = changes?;
    println!("  built in {secs:.1} s");

    let (mut fold, mut fold_decode, mut am_batch, mut am_one) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..cfg.runs {
        // Insert pre-decoded events.
        let mut state = State::new();
        let (secs, ()) = time(|| {
            for (e, id) in &built.events {
                state.insert(e, *id).expect("fold: event inserts");
            }
        });
        assert_eq!(state.len(), n);
        if run == 0 {
            assert_eq!(
                state.state_hash(),
                built.state_hash,
                "fold differs from build"
            );
        }
        drop(state);
        fold.push(n as f64 / secs);

        // Decode the canonical bytes, then insert (open does this too).
        let mut state = State::new();
        let (secs, ()) = time(|| {
            for (bytes, (_, id)) in built.encoded.iter().zip(&built.events) {
                let e = Event::decode_trusted(bytes).expect("fold: event decodes");
                state.insert(&e, *id).expect("fold: event inserts");
            }
        });
        assert_eq!(state.len(), n);
        drop(state);
        fold_decode.push(n as f64 / secs);

        // automerge: all changes in one call on a fresh document.
        let batch = changes.clone();
        let mut doc = Automerge::new();
        let (secs, r) = time(|| doc.apply_changes(batch));
        r?;
        assert_eq!(doc.get_changes(&[]).len() as u64, am_n);
        drop(doc);
        am_batch.push(am_n as f64 / secs);

        // automerge: one change at a time, as a remote peer's arrive.
        let ones: Vec<Vec<automerge::Change>> = changes[..am_one_n as usize]
            .iter()
            .map(|c| vec![c.clone()])
            .collect();
        let mut doc = Automerge::new();
        let (secs, r) = time(|| -> Result<()> {
            for one in ones {
                doc.apply_changes(one)?;
            }
            Ok(())
        });
        r?;
        drop(doc);
        am_one.push(am_one_n as f64 / secs);
        println!(
            "  run {run}: fold {}, decode+fold {}, automerge batch {}, automerge one-at-a-time {}",
            rate(fold[run]),
            rate(fold_decode[run]),
            rate(am_batch[run]),
            rate(am_one[run])
        );
    }
    let am_baselines = |am_batch: Vec<f64>, am_one: Vec<f64>| {
        vec![
            Baseline {
                name: "automerge_apply_batch".into(),
                unit: Unit::EventsPerSec,
                runs: am_batch,
                n: am_n,
                note: format!("n={am_n}"),
            },
            Baseline {
                name: "automerge_apply_one_at_a_time".into(),
                unit: Unit::EventsPerSec,
                runs: am_one,
                n: am_one_n,
                note: format!("n={am_one_n}"),
            },
        ]
    };
    // Register and counter ops per event of the mixed workload: the text
    // case compares cost per op.
    let ops_per_event =
        built.events.iter().map(|(e, _)| e.ops.len()).sum::<usize>() as f64 / n.max(1) as f64;
    let register_ops: Vec<f64> = fold.iter().map(|r| r * ops_per_event).collect();
    let text_n = cfg.fold_text_n;
    println!("# fold: building {text_n} text events (one text op each)…");
    let (secs, text_events) = time(|| build_text_events(text_n));
    println!("  built in {secs:.1} s");
    let mut text_fold = Vec::new();
    for run in 0..cfg.runs {
        let mut state = State::new();
        let (secs, ()) = time(|| {
            for (e, id) in &text_events {
                state.insert(e, *id).expect("fold: text event inserts");
            }
        });
        assert_eq!(state.len(), text_n);
        drop(state);
        text_fold.push(text_n as f64 / secs);
        println!(
            "  run {run}: text ops {}, register and counter ops {} ({ops_per_event:.2} per event)",
            rate(text_fold[run]),
            rate(register_ops[run])
        );
    }
    report.add(
        cfg,
        Figure {
            group: "fold",
            name: "fold_text_ops".into(),
            unit: Unit::EventsPerSec,
            runs: text_fold,
            n: text_n,
            baselines: vec![Baseline {
                name: "fold_register_ops".into(),
                unit: Unit::EventsPerSec,
                runs: register_ops,
                n,
                note: format!(
                    "register and counter ops/s of fold_insert, {ops_per_event:.2} per event"
                ),
            }],
            target: None,
            extra: serde_json::Map::new(),
        },
    );
    let mut extra = serde_json::Map::new();
    extra.insert("authors".into(), json!(cfg.fold_authors));
    report.add(
        cfg,
        Figure {
            group: "fold",
            name: "fold_insert".into(),
            unit: Unit::EventsPerSec,
            runs: fold,
            n,
            baselines: am_baselines(am_batch.clone(), am_one.clone()),
            target: Some(Target::AtLeast(1e6)),
            extra: extra.clone(),
        },
    );
    report.add(
        cfg,
        Figure {
            group: "fold",
            name: "fold_decode_insert".into(),
            unit: Unit::EventsPerSec,
            runs: fold_decode,
            n,
            baselines: am_baselines(am_batch, am_one),
            target: None,
            extra,
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// open

/// Appends events `0..n` of the mixed workload (256-byte payloads) to the
/// node in `dir` from `BUILD_THREADS` threads.
fn build_log(dir: &Path, n: u64) -> Result<()> {
    let (node, _) = Node::open(dir).context("open node")?;
    let node = Arc::new(node);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..BUILD_THREADS)
        .map(|_| {
            let (node, next, done) = (node.clone(), next.clone(), done.clone());
            thread::spawn(move || -> Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok(());
                    }
                    node.append(mixed_draft(i, payload(i)))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut last = Instant::now();
    while done.load(Ordering::Relaxed) < n && !handles.iter().all(|h| h.is_finished()) {
        thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= Duration::from_secs(5) {
            let d = done.load(Ordering::Relaxed);
            println!(
                "  {d}/{n} events ({:.0}%), {}",
                100.0 * d as f64 / n as f64,
                rate(d as f64 / t0.elapsed().as_secs_f64())
            );
            last = Instant::now();
        }
    }
    for h in handles {
        h.join().expect("builder panicked")?;
    }
    Ok(())
}

/// A SQLite table of the same `n` events (256-byte payloads).
fn build_sqlite(path: &Path, n: u64) -> Result<()> {
    let conn = sqlite_open(path)?;
    let mut stmt = conn.prepare_cached(SQLITE_INSERT)?;
    let author = [7u8; 32];
    let mut i = 0;
    while i < n {
        conn.execute_batch("BEGIN")?;
        let end = (i + SQLITE_BUILD_TX).min(n);
        for j in i..end {
            let s = spec(j);
            sqlite_insert(
                &mut stmt,
                &author,
                j + 1,
                &stream_name(s.stream),
                "CustomerUpdated",
                &payload(j),
            )?;
        }
        conn.execute_batch("COMMIT")?;
        i = end;
    }
    drop(stmt);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

/// Reads every row into owned values, as a replay would.
fn sqlite_replay(path: &Path) -> Result<u64> {
    let conn = Connection::open(path)?;
    let mut stmt = conn.prepare("SELECT id, author, seq, stream, kind, payload FROM events")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(row) = rows.next()? {
        let id: Vec<u8> = row.get(0)?;
        let author: Vec<u8> = row.get(1)?;
        let seq: i64 = row.get(2)?;
        let stream: String = row.get(3)?;
        let kind: String = row.get(4)?;
        let payload: Vec<u8> = row.get(5)?;
        bytes += (id.len() + author.len() + stream.len() + kind.len() + payload.len()) as u64
            + seq as u64 % 2;
        count += 1;
    }
    std::hint::black_box(bytes);
    Ok(count)
}

fn bench_open(cfg: &Config, report: &mut Report) -> Result<()> {
    let n = cfg.open_n;
    let (_tmp, dir) = new_node(cfg, "open-")?;
    println!("# open: building a {n}-event log with {BUILD_THREADS} appenders…");
    let (secs, r) = time(|| build_log(&dir, n));
    r?;
    let bytes = log_bytes(&dir)?;
    println!(
        "  built in {secs:.1} s ({}), log {:.1} MiB",
        rate(n as f64 / secs),
        bytes as f64 / (1 << 20) as f64
    );
    let sql_tmp = cfg.tempdir("sqlite-open-")?;
    let db = sql_tmp.path().join("events.db");
    println!("# open: building a {n}-row SQLite table…");
    let (secs, r) = time(|| build_sqlite(&db, n));
    r?;
    println!("  built in {secs:.1} s");

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..cfg.runs {
        let (secs, r) = time(|| Node::open(&dir));
        let (node, recovery) = r.context("reopen node")?;
        if recovery.records != n || recovery.torn.is_some() {
            bail!("open recovered {recovery:?}, expected {n} records and no torn tail");
        }
        drop(node);
        ours.push(secs);
        let (ssecs, rows) = time(|| sqlite_replay(&db));
        if rows? != n {
            bail!("SQLite replay did not read {n} rows");
        }
        theirs.push(ssecs);
        println!(
            "  run {run}: open {secs:.3} s ({}), sqlite replay {ssecs:.3} s ({})",
            rate(n as f64 / secs),
            rate(n as f64 / ssecs)
        );
    }
    let mut extra = serde_json::Map::new();
    extra.insert("log_bytes".into(), json!(bytes));
    extra.insert(
        "events_per_s".into(),
        json!((n as f64 / median(&ours)).round()),
    );
    extra.insert("page_cache".into(), json!("warm"));
    report.add(
        cfg,
        Figure {
            group: "open",
            name: "open".into(),
            unit: Unit::Secs,
            runs: ours,
            n,
            baselines: vec![Baseline {
                name: "sqlite_select_all".into(),
                unit: Unit::Secs,
                runs: theirs,
                n,
                note: "every row into owned values".into(),
            }],
            target: Some(Target::AtMost(if n >= 1_000_000 {
                3.0
            } else {
                3.0 * n as f64 / 1e6
            })),
            extra,
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// subscribe

/// Reads `GET /v1/events?from=0` from the node's HTTP API at `addr` over a
/// plain socket until `n` events have arrived; the seconds it took.
async fn sse_replay(addr: SocketAddr, n: u64) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(b"GET /v1/events?from=0 HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 1 << 20];
    // Bytes of a possible "\nid: " split across reads.
    let mut carry: Vec<u8> = Vec::new();
    let mut seen = 0u64;
    while seen < n {
        let k = sock.read(&mut buf).await?;
        ensure!(k > 0, "the stream ended after {seen} of {n} events");
        carry.extend_from_slice(&buf[..k]);
        seen += carry.windows(5).filter(|w| w == b"\nid: ").count() as u64;
        let keep = carry.len().saturating_sub(4);
        carry.drain(..keep);
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Replay of a whole log to a subscriber: in process
/// ([`Node::subscribe_from`]) and over HTTP as server-sent events to a
/// local client; the baseline is the log's own scan (read and decode).
fn bench_subscribe(cfg: &Config, report: &mut Report) -> Result<()> {
    let n = cfg.subscribe_n;
    let (_tmp, dir) = new_node(cfg, "subscribe-")?;
    println!("# subscribe: building a {n}-event log with {BUILD_THREADS} appenders…");
    let (secs, r) = time(|| build_log(&dir, n));
    r?;
    println!("  built in {secs:.1} s");
    let rt = runtime()?;
    let (node, _) = Node::open(&dir).context("reopen node")?;
    let node = Arc::new(node);
    let (mut sse, mut rust, mut scan) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        let d = Arc::new(Daemon::start(node.clone(), daemon_config(Vec::new())).await?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = weftlog::http::router(d.clone());
        tokio::spawn(async move { axum::serve(weftlog::http::nodelay(listener), app).await });
        for run in 0..cfg.runs {
            let (secs, r) = time(|| {
                let mut k = 0u64;
                node.scan(|_, _| k += 1).map(|()| k)
            });
            ensure!(r? == n, "the scan did not read {n} events");
            scan.push(secs);
            let t0 = Instant::now();
            let mut sub = node.subscribe_from(0);
            let mut k = 0u64;
            while k < n {
                match sub.next_batch().await {
                    Some(Ok(b)) => k += b.len() as u64,
                    other => bail!("the subscription stopped after {k} events: {other:?}"),
                }
            }
            rust.push(t0.elapsed().as_secs_f64());
            let secs = sse_replay(addr, n).await?;
            sse.push(secs);
            println!(
                "  run {run}: SSE {} · in process {} · log scan {}",
                rate(n as f64 / secs),
                rate(n as f64 / rust[run]),
                rate(n as f64 / scan[run])
            );
        }
        d.shutdown().await;
        anyhow::Ok(())
    })?;
    let to_rate = |v: &[f64]| v.iter().map(|s| n as f64 / s).collect::<Vec<_>>();
    let scan_base = Baseline {
        name: "log_scan".into(),
        unit: Unit::EventsPerSec,
        runs: to_rate(&scan),
        n,
        note: "Node::scan: read and decode every record".into(),
    };
    report.add(
        cfg,
        Figure {
            group: "subscribe",
            name: "sse_replay".into(),
            unit: Unit::EventsPerSec,
            runs: to_rate(&sse),
            n,
            baselines: vec![scan_base.clone()],
            target: Some(Target::AtLeast(200_000.0)),
            extra: serde_json::Map::new(),
        },
    );
    report.add(
        cfg,
        Figure {
            group: "subscribe",
            name: "subscribe_from".into(),
            unit: Unit::EventsPerSec,
            runs: to_rate(&rust),
            n,
            baselines: vec![scan_base],
            target: None,
            extra: serde_json::Map::new(),
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------

/// The filesystem type `path` lives on, from /proc/mounts (longest prefix).
fn fs_type(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown".into();
    };
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (dev, mnt, ty) = (it.next()?, it.next()?, it.next()?);
            path.starts_with(mnt)
                .then(|| (mnt.len(), format!("{ty} ({dev} on {mnt})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, t)| t)
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg: other work on
/// the machine skews every figure here.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    fs::create_dir_all(&cfg.dir).with_context(|| format!("create {}", cfg.dir.display()))?;
    let fs = fs_type(&cfg.dir);
    println!(
        "weftlog bench: groups {:?}, {} runs each{}, {} cores (load average {}), scratch {} on {fs}",
        cfg.groups,
        cfg.runs,
        if cfg.quick { ", QUICK sizes" } else { "" },
        thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        cfg.dir.display(),
    );
    if fs.starts_with("tmpfs") || fs.starts_with("ramfs") {
        println!("WARNING: the scratch dir is in memory; fdatasync figures mean nothing. Set WEFTLOG_BENCH_DIR.");
    }
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run `cargo bench` for release figures.");
    }
    let mut report = Report {
        figures: Vec::new(),
    };
    let t0 = Instant::now();
    if cfg.wants("append") {
        bench_append(&cfg, &mut report)?;
    }
    if cfg.wants("fold") {
        bench_fold(&cfg, &mut report)?;
    }
    if cfg.wants("open") {
        bench_open(&cfg, &mut report)?;
    }
    if cfg.wants("sync") {
        bench_sync(&cfg)?;
    }
    if cfg.wants("replicate") {
        bench_replicate(&cfg, &mut report)?;
    }
    if cfg.wants("propagate") {
        bench_propagate(&cfg, &mut report)?;
    }
    if cfg.wants("subscribe") {
        bench_subscribe(&cfg, &mut report)?;
    }
    report.print_table();
    println!(
        "total {:.1} s (load average {})",
        t0.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// sync

/// Shuttles a weftlog sync round between two in-memory replicas: every
/// message either side has goes out in one flight, both ways at once, until
/// neither has anything to say. Returns (bytes, flights).
fn weft_round(a: &mut MemStore, b: &mut MemStore) -> Result<(u64, u64)> {
    let (bytes, flights, _) = weft_round_timed(a, b)?;
    Ok((bytes, flights))
}

/// [`weft_round`], also returning the seconds each side's session spent
/// (its `poll_transmit` and `handle_message` calls).
fn weft_round_timed(a: &mut MemStore, b: &mut MemStore) -> Result<(u64, u64, [f64; 2])> {
    let ka = Keypair::from_secret([31; 32]).node_id();
    let kb = Keypair::from_secret([32; 32]).node_id();
    let mut sa = Session::new(SessionConfig::new([1; 32], ka), &*a);
    let mut sb = Session::new(SessionConfig::new([1; 32], kb), &*b);
    let (mut bytes, mut flights) = (0u64, 0u64);
    let (mut ta, mut tb) = (Duration::ZERO, Duration::ZERO);
    loop {
        let t = Instant::now();
        let ma: Vec<Vec<u8>> = std::iter::from_fn(|| sa.poll_transmit(&*a)).collect();
        let t2 = Instant::now();
        let mb: Vec<Vec<u8>> = std::iter::from_fn(|| sb.poll_transmit(&*b)).collect();
        ta += t2 - t;
        tb += t2.elapsed();
        if ma.is_empty() && mb.is_empty() {
            return Ok((bytes, flights, [ta.as_secs_f64(), tb.as_secs_f64()]));
        }
        flights += 1;
        let t = Instant::now();
        for m in &ma {
            bytes += m.len() as u64;
            sb.handle_message(m, b)?;
        }
        let t2 = Instant::now();
        for m in &mb {
            bytes += m.len() as u64;
            sa.handle_message(m, a)?;
        }
        tb += t2 - t;
        ta += t2.elapsed();
    }
}

/// The same for automerge's sync protocol, with the given sync states.
fn am_round(
    a: &mut AutoCommit,
    b: &mut AutoCommit,
    sa: &mut automerge::sync::State,
    sb: &mut automerge::sync::State,
) -> Result<(u64, u64)> {
    use automerge::sync::SyncDoc;
    let (mut bytes, mut flights) = (0u64, 0u64);
    loop {
        let ma = a.sync().generate_sync_message(sa);
        let mb = b.sync().generate_sync_message(sb);
        if ma.is_none() && mb.is_none() {
            return Ok((bytes, flights));
        }
        flights += 1;
        if let Some(m) = ma {
            let enc = m.encode();
            bytes += enc.len() as u64;
            let m = automerge::sync::Message::decode(&enc)?;
            b.sync().receive_sync_message(sb, m)?;
        }
        if let Some(m) = mb {
            let enc = m.encode();
            bytes += enc.len() as u64;
            let m = automerge::sync::Message::decode(&enc)?;
            a.sync().receive_sync_message(sa, m)?;
        }
    }
}

fn sync_draft(i: u64) -> Draft {
    Draft {
        stream: format!("customer/{}", i % 1000),
        kind: "Edited".into(),
        ops: vec![Op::Set {
            field: "email".into(),
            value: format!("\"c{i}@example.org\"").into_bytes(),
            supersedes: vec![],
        }],
        ..Draft::default()
    }
}

/// Sync cost against automerge's sync protocol on the same divergence: two
/// replicas share n events, then each makes k concurrent new ones.
fn bench_sync(cfg: &Config) -> Result<()> {
    let (ns, ks): (&[u64], &[u64]) = if cfg.quick {
        (&[1_000], &[1, 10])
    } else {
        (&[10_000, 100_000], &[1, 100, 1000])
    };
    println!("# sync: n shared events, k new on each side; flights = one-way message rounds");
    println!(
        "| n | k | weftlog bytes | flights | time | missing events' bytes | bytes / missing | automerge fresh bytes | flights | time | automerge resumed bytes | flights | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (ka, kb) = (
        Keypair::from_secret([31; 32]),
        Keypair::from_secret([32; 32]),
    );
    for &n in ns {
        // The shared history, in commits of 100 events.
        let mut shared = MemStore::new();
        let mut clock = HlcClock::default();
        let mut i = 0;
        while i < n {
            let m = (n - i).min(100);
            shared.commit(&ka, &mut clock, 1_000 + i, (i..i + m).map(sync_draft))?;
            i += m;
        }
        let mut am = AutoCommit::new().with_actor(ActorId::from(vec![1u8; 16]));
        for i in 0..n {
            am.put(
                ROOT,
                format!("customer/{}", i % 1000),
                format!("c{i}@example.org"),
            )?;
            am.commit();
        }
        for &k in ks {
            let (mut ours, mut fresh, mut resumed) = (Vec::new(), Vec::new(), Vec::new());
            // Bytes and flights are the same in every run; times vary.
            let mut sizes = (0, 0, 0, 0, 0, 0, 0);
            for _ in 0..cfg.runs {
                // weftlog: each side commits k new events.
                let (mut a, mut b) = (shared.clone(), shared.clone());
                let (mut ca, mut cb) = (clock.clone(), clock.clone());
                let base = 10_000_000;
                a.commit(&ka, &mut ca, base, (0..k).map(|j| sync_draft(n + j)))?;
                b.commit(&kb, &mut cb, base, (0..k).map(|j| sync_draft(n + 7 + j)))?;
                let missing: u64 = [(&a, &ka), (&b, &kb)]
                    .iter()
                    .map(|(s, key)| {
                        let author = key.node_id();
                        let from = if author == ka.node_id() { n + 1 } else { 1 };
                        (from..from + k)
                            .map(|seq| s.get(&author, seq).map_or(0, |e| e.bytes.len() as u64))
                            .sum::<u64>()
                    })
                    .sum();
                let t = Instant::now();
                let (wb, wf) = weft_round(&mut a, &mut b)?;
                ours.push(t.elapsed().as_secs_f64());
                ensure!(
                    a.frontier_digest() == b.frontier_digest(),
                    "weftlog replicas diverged"
                );
                // automerge, fresh sync states.
                let mut x = am.fork().with_actor(ActorId::from(vec![2u8; 16]));
                let mut y = am.fork().with_actor(ActorId::from(vec![3u8; 16]));
                let (mut sx, mut sy) =
                    (automerge::sync::State::new(), automerge::sync::State::new());
                // Resumed: states that already synced the shared history.
                let mut rx = x.clone();
                let mut ry = y.clone();
                let (mut rsx, mut rsy) =
                    (automerge::sync::State::new(), automerge::sync::State::new());
                am_round(&mut rx, &mut ry, &mut rsx, &mut rsy)?;
                for (d, tag) in [(&mut x, 0u64), (&mut y, 1), (&mut rx, 0), (&mut ry, 1)] {
                    for j in 0..k {
                        d.put(
                            ROOT,
                            format!("customer/{}", (n + j) % 1000),
                            format!("{tag}-{j}"),
                        )?;
                        d.commit();
                    }
                }
                let t = Instant::now();
                let (fb, ff) = am_round(&mut x, &mut y, &mut sx, &mut sy)?;
                fresh.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let (rb, rf) = am_round(&mut rx, &mut ry, &mut rsx, &mut rsy)?;
                resumed.push(t.elapsed().as_secs_f64());
                ensure!(
                    x.get_heads() == y.get_heads(),
                    "automerge replicas diverged"
                );
                sizes = (wb, wf, missing, fb, ff, rb, rf);
            }
            let (wb, wf, missing, fb, ff, rb, rf) = sizes;
            let ms = |v: &[f64]| format!("{:.1} ms", 1e3 * median(v));
            println!(
                "| {n} | {k} | {wb} | {wf} | {} | {missing} | {:.2} | {fb} | {ff} | {} | {rb} | {rf} | {} |",
                ms(&ours),
                wb as f64 / missing.max(1) as f64,
                ms(&fresh),
                ms(&resumed),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Daemons on loopback: shared by replicate and propagate

/// Concurrent `append_async` tasks that fill a node before replication.
const FILL_TASKS: usize = 256;
/// Anti-entropy period of the daemons here: an hour, so that only the first
/// round (replicate) or live push (propagate) is measured.
const NO_ANTI_ENTROPY_MS: u64 = 3_600_000;
/// Longest wait for the mesh, or for one replication, before giving up.
const NET_DEADLINE: Duration = Duration::from_secs(300);

/// The runtime the daemons run on: two workers, as the append group's.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A daemon on an ephemeral loopback port dialling `peers`, with
/// anti-entropy effectively off.
fn daemon_config(peers: Vec<String>) -> daemon::Config {
    let mut c = daemon::Config::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    c.peers = peers;
    c.policy.anti_entropy_ms = NO_ANTI_ENTROPY_MS;
    c
}

/// Appends events `0..n` of the mixed workload (256-byte payloads) from
/// `FILL_TASKS` concurrent tasks, so group commit makes large batches.
async fn fill(node: Arc<Node>, n: u64) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..FILL_TASKS)
        .map(|_| {
            let (node, next) = (node.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    node.append_async(mixed_draft(i, payload(i))).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("appender panicked")?;
    }
    Ok(())
}

/// The `p` quantile (0 < p <= 1) of `v` by nearest rank.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// replicate

/// Poll period of B's state while it catches up.
const REPLICATE_POLL: Duration = Duration::from_micros(500);

/// CPU seconds used so far by this process's live threads, summed by
/// thread name (/proc/self/task/*/stat; clock-tick resolution).
fn thread_cpu() -> BTreeMap<String, f64> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = BTreeMap::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: the comm may hold spaces, the rest not.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].trim().to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; 12 and 13 here.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            *out.entry(name).or_insert(0.0) += (u + s) / tick;
        }
    }
    out
}

/// One run of the replicate group, seconds from the start of A's daemon.
struct ReplicateRun {
    fill_secs: f64,
    connected_secs: Option<f64>,
    first_secs: f64,
    applied_secs: f64,
    durable_secs: f64,
    /// Batches B's feed delivered (B's group commits: one `fdatasync` each).
    b_batches: u64,
    /// Bytes B received from A (sync messages, length prefixes included).
    bytes: u64,
    shutdown_secs: f64,
    /// CPU seconds by thread name from the daemons' start until durable
    /// (both nodes are in this process).
    cpu: BTreeMap<String, f64>,
}

fn weft_replicate_run(cfg: &Config, n: u64) -> Result<ReplicateRun> {
    let (_ta, dir_a) = new_node(cfg, "replicate-a-")?;
    let (_tb, dir_b) = new_node(cfg, "replicate-b-")?;
    let a = Arc::new(Node::open(&dir_a).context("open node A")?.0);
    let b = Arc::new(Node::open(&dir_b).context("open node B")?.0);
    let a_id = a.id();
    let rt = runtime()?;
    let (fill_secs, r) = time(|| rt.block_on(fill(a.clone(), n)));
    r?;
    let (a_len, a_hash) = a.with_state(|s| (s.len(), s.state_hash()));
    ensure!(a_len == n, "A holds {a_len} events, expected {n}");

    // A's events are its seqs 1..=n; B's batches are durable in order, so
    // the batch whose heads reach (A, n) completes the replication.
    let mut feed = b.subscribe();
    let (done_tx, done_rx) = std_mpsc::channel();
    let watcher = thread::spawn(move || {
        let mut batches = 0u64;
        loop {
            match feed.blocking_recv() {
                Ok(c) => {
                    batches += 1;
                    if c.heads.iter().any(|h| h.author == a_id && h.seq >= n) {
                        let _ = done_tx.send((Instant::now(), batches));
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(k)) => batches += k,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });

    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let (daemon_a, daemon_b) = rt.block_on(async {
        let da = Daemon::start(a.clone(), daemon_config(Vec::new())).await?;
        let db = Daemon::start(b.clone(), daemon_config(vec![da.local_addr().to_string()])).await?;
        anyhow::Ok((da, db))
    })?;
    let (mut connected, mut first) = (None, None);
    let applied = loop {
        let len = b.with_state(|s| s.len());
        let now = Instant::now();
        if connected.is_none() && daemon_b.is_connected(&a_id) {
            connected = Some(now);
        }
        if first.is_none() && len > 0 {
            first = Some(now);
        }
        if len >= n {
            break now;
        }
        if now - t0 > NET_DEADLINE {
            bail!("replicate: B holds {len} of {n} events after {NET_DEADLINE:?}");
        }
        thread::sleep(REPLICATE_POLL);
    };
    let (durable, b_batches) = done_rx
        .recv_timeout(NET_DEADLINE.saturating_sub(t0.elapsed()))
        .context("replicate: B's feed never reported A's last event durable")?;
    let mut cpu = thread_cpu();
    for (name, secs) in &cpu0 {
        if let Some(v) = cpu.get_mut(name) {
            *v -= secs;
        }
    }
    let peers = rt.block_on(daemon_b.peers());
    let a_str = a_id.to_string();
    let bytes = peers
        .iter()
        .find(|p| p["node"].as_str() == Some(a_str.as_str()))
        .and_then(|p| p["bytes_received"].as_u64())
        .unwrap_or(0);
    let b_hash = b.with_state(|s| s.state_hash());
    ensure!(b_hash == a_hash, "replicate: B's state differs from A's");
    let (shutdown_secs, ()) = time(|| {
        rt.block_on(async {
            tokio::join!(daemon_a.shutdown(), daemon_b.shutdown());
        })
    });
    drop((daemon_a, daemon_b));
    drop(rt);
    let _ = watcher.join();
    drop(a);
    drop(b);
    // What the feed called durable is in B's log.
    let (reopened, recovery) = Node::open(&dir_b).context("reopen node B")?;
    ensure!(
        recovery.records == n && recovery.torn.is_none(),
        "replicate: B's log recovered {recovery:?}, expected {n} records"
    );
    drop(reopened);
    let since = |t: Instant| (t - t0).as_secs_f64();
    Ok(ReplicateRun {
        fill_secs,
        connected_secs: connected.map(since),
        first_secs: first.map_or(f64::NAN, since),
        applied_secs: since(applied),
        durable_secs: since(durable),
        b_batches,
        bytes,
        shutdown_secs,
        cpu,
    })
}

/// automerge's sync protocol bringing an empty document up to `src`;
/// seconds.
fn am_replicate_run(src: &AutoCommit) -> Result<f64> {
    let mut x = src.clone();
    let mut y = AutoCommit::new();
    let (mut sx, mut sy) = (automerge::sync::State::new(), automerge::sync::State::new());
    let t = Instant::now();
    am_round(&mut x, &mut y, &mut sx, &mut sy)?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        x.get_heads() == y.get_heads(),
        "automerge replicas diverged"
    );
    Ok(secs)
}

/// A `MemStore` with events `0..n` of the mixed workload (256-byte
/// payloads) by one author, signed every `FILL_TASKS` events (about the
/// batches `fill` makes).
fn mem_source(n: u64) -> Result<MemStore> {
    let key = Keypair::from_secret([41; 32]);
    let mut store = MemStore::new();
    let mut clock = HlcClock::default();
    let mut i = 0;
    while i < n {
        let m = (n - i).min(FILL_TASKS as u64);
        store.commit(
            &key,
            &mut clock,
            BASE_MS + i / 100,
            (i..i + m).map(|j| mixed_draft(j, payload(j))),
        )?;
        i += m;
    }
    Ok(store)
}

/// weftlog's sync session bringing an empty `MemStore` up to `src`, in
/// memory: seconds in all, and in the sender's and the receiver's session.
fn mem_replicate_run(src: &MemStore, n: u64) -> Result<(f64, [f64; 2])> {
    let mut a = src.clone();
    let mut b = MemStore::new();
    let t = Instant::now();
    let (_, _, sides) = weft_round_timed(&mut a, &mut b)?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        b.len() == n && a.frontier_digest() == b.frontier_digest(),
        "MemStore replicas diverged"
    );
    Ok((secs, sides))
}

fn bench_replicate(cfg: &Config, report: &mut Report) -> Result<()> {
    let n = cfg.replicate_n;
    println!(
        "# replicate: building {n} automerge changes (with payloads) and a {n}-event MemStore…"
    );
    let (secs, src) = time(|| -> Result<(AutoCommit, MemStore)> {
        let mut doc = AutoCommit::new();
        doc.apply_changes(build_automerge(n, true)?)?;
        Ok((doc, mem_source(n)?))
    });
    let (mut am_src, mem_src) = src?;
    ensure!(am_src.get_changes(&[]).len() as u64 == n);
    println!("  built in {secs:.1} s");
    println!(
        "# replicate: {n} events from A to an empty B over QUIC on loopback, {} runs",
        cfg.runs
    );
    let (mut applied, mut durable, mut am, mut mem) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fill, mut connect, mut first, mut batches, mut wire) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mem_us: Vec<[f64; 2]> = Vec::new();
    let mut cpu_us: Vec<[f64; 2]> = Vec::new();
    for run in 0..cfg.runs {
        let w = weft_replicate_run(cfg, n)?;
        let a = am_replicate_run(&am_src)?;
        let (m, [m_send, m_recv]) = mem_replicate_run(&mem_src, n)?;
        let us = |secs: f64| secs * 1e6 / n as f64;
        let cpu_total: f64 = w.cpu.values().sum();
        let cpu_of = |prefix: &str| -> f64 {
            w.cpu
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v)
                .sum()
        };
        let (cpu_rt, cpu_commit, cpu_sync) = (
            cpu_of("tokio"),
            cpu_of("weftlog-commit"),
            cpu_of("weftlog-sync"),
        );
        println!(
            "  run {run}: fill A {} | connected {} ms, first event {:.1} ms, applied {:.3} s ({}), durable {:.3} s ({}), {} batches on B, {:.1} MiB on the wire, shutdown {:.2} s | automerge sync {:.3} s ({}) | MemStore session {:.3} s ({}; sender {:.2} µs/event, receiver {:.2} µs/event) | CPU while replicating {:.2} µs/event: runtime {:.2}, committers {:.2}, syncers {:.2}",
            rate(n as f64 / w.fill_secs),
            w.connected_secs.map_or("?".into(), |s| format!("{:.1}", s * 1e3)),
            w.first_secs * 1e3,
            w.applied_secs,
            rate(n as f64 / w.applied_secs),
            w.durable_secs,
            rate(n as f64 / w.durable_secs),
            w.b_batches,
            w.bytes as f64 / (1 << 20) as f64,
            w.shutdown_secs,
            a,
            rate(n as f64 / a),
            m,
            rate(n as f64 / m),
            us(m_send),
            us(m_recv),
            us(cpu_total),
            us(cpu_rt),
            us(cpu_commit),
            us(cpu_sync),
        );
        cpu_us.push([us(cpu_total), us(cpu_rt)]);
        applied.push(n as f64 / w.applied_secs);
        durable.push(n as f64 / w.durable_secs);
        am.push(n as f64 / a);
        mem.push(n as f64 / m);
        mem_us.push([m_send * 1e6 / n as f64, m_recv * 1e6 / n as f64]);
        fill.push(n as f64 / w.fill_secs);
        connect.push(w.connected_secs.unwrap_or(f64::NAN) * 1e3);
        first.push(w.first_secs * 1e3);
        batches.push(w.b_batches as f64);
        wire.push(w.bytes as f64 / n as f64);
    }
    let baselines = || {
        vec![
            Baseline {
                name: "automerge_sync".into(),
                unit: Unit::EventsPerSec,
                runs: am.clone(),
                n,
                note: "in memory, empty doc, one change per event".into(),
            },
            Baseline {
                name: "weftlog_session_memstore".into(),
                unit: Unit::EventsPerSec,
                runs: mem.clone(),
                n,
                note: "same protocol in memory: no QUIC, TLS or disk".into(),
            },
        ]
    };
    let mut extra = serde_json::Map::new();
    extra.insert("payload_bytes".into(), json!(PAYLOAD_BYTES));
    extra.insert("fill_events_per_s".into(), json!(median(&fill).round()));
    extra.insert(
        "connected_ms".into(),
        json!((median(&connect) * 10.0).round() / 10.0),
    );
    extra.insert(
        "first_event_ms".into(),
        json!((median(&first) * 10.0).round() / 10.0),
    );
    extra.insert("b_batches".into(), json!(median(&batches)));
    extra.insert("wire_bytes_per_event".into(), json!(median(&wire).round()));
    let us = |side: usize| {
        let v: Vec<f64> = mem_us.iter().map(|x| x[side]).collect();
        json!((median(&v) * 100.0).round() / 100.0)
    };
    extra.insert("memstore_sender_us_per_event".into(), us(0));
    extra.insert("memstore_receiver_us_per_event".into(), us(1));
    let cpu = |i: usize| {
        let v: Vec<f64> = cpu_us.iter().map(|x| x[i]).collect();
        json!((median(&v) * 100.0).round() / 100.0)
    };
    extra.insert("cpu_us_per_event".into(), cpu(0));
    extra.insert("runtime_cpu_us_per_event".into(), cpu(1));
    for (name, runs, what) in [
        ("replicate_applied", applied, "in B's state"),
        ("replicate_durable", durable, "B's feed: fdatasync done"),
    ] {
        let mut extra = extra.clone();
        extra.insert("until".into(), json!(what));
        report.add(
            cfg,
            Figure {
                group: "replicate",
                name: name.into(),
                unit: Unit::EventsPerSec,
                runs,
                n,
                baselines: baselines(),
                target: Some(Target::AtLeast(200_000.0)),
                extra,
            },
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// propagate

/// Sleep between two polls of the "applied" probe (the kernel's timer
/// slack adds about as much again).
const PROBE_POLL: Duration = Duration::from_micros(50);
/// Longest wait for one event to reach every node.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Appends per node before measuring (they also check the mesh syncs).
const PROPAGATE_WARMUP: u64 = 3;

/// Wait until `(author, seq)` is in the state of every node of `nodes`.
struct Probe {
    author: NodeId,
    seq: u64,
    t0: Instant,
    nodes: Vec<usize>,
}

/// A thread that polls nodes' states for an event by `(author, seq)`,
/// known before the append is made: the "applied" time. While an event is
/// in flight it wakes every ~0.1 ms, so it keeps a CPU out of deep idle;
/// the lone-node baseline runs one too, so both see the same.
struct Prober {
    tx: std_mpsc::Sender<Probe>,
    rx: std_mpsc::Receiver<Option<Instant>>,
    handle: thread::JoinHandle<()>,
}

impl Prober {
    fn start(nodes: Vec<Arc<Node>>) -> Prober {
        let (tx, probes) = std_mpsc::channel::<Probe>();
        let (seen_tx, rx) = std_mpsc::channel();
        let handle = thread::spawn(move || {
            while let Ok(p) = probes.recv() {
                let mut left = p.nodes;
                let seen = loop {
                    left.retain(|&j| {
                        !nodes[j].with_state(|s| s.event_id(&p.author, p.seq).is_some())
                    });
                    let now = Instant::now();
                    if left.is_empty() {
                        break Some(now);
                    }
                    if now - p.t0 > PROBE_TIMEOUT {
                        break None;
                    }
                    thread::sleep(PROBE_POLL);
                };
                if seen_tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Prober { tx, rx, handle }
    }

    fn probe(&self, p: Probe) -> Result<()> {
        self.tx.send(p).ok().context("the prober stopped")
    }

    /// When the last probe's event was in every node's state.
    fn wait(&self) -> Result<Instant> {
        self.rx
            .recv_timeout(PROBE_TIMEOUT + Duration::from_secs(1))
            .context("the prober stopped")?
            .with_context(|| format!("an event was not in every state within {PROBE_TIMEOUT:?}"))
    }

    fn stop(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

/// One run of the propagate group: per measured event, milliseconds.
struct PropagateRun {
    /// Empty without the probe.
    applied: Vec<f64>,
    durable: Vec<f64>,
    /// The origin's own append latency.
    ack: Vec<f64>,
    connect_secs: f64,
    /// Events sent by all sessions / deliveries needed (events × others).
    sends_per_delivery: f64,
    /// Received events already held, per event delivered (gossip counters).
    duplicates_per_delivery: f64,
    shutdown_secs: f64,
}

/// 5–10 ms, from `rng`.
fn spacing(rng: &mut u64) -> Duration {
    *rng = splitmix(*rng);
    Duration::from_micros(5_000 + *rng % 5_001)
}

fn weft_propagate_run(cfg: &Config, seed: u64) -> Result<PropagateRun> {
    let (k, m) = (cfg.propagate_nodes, cfg.propagate_m);
    let mut tmps = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..k {
        let (tmp, dir) = new_node(cfg, &format!("propagate-{i}-"))?;
        nodes.push(Arc::new(Node::open(&dir).context("open node")?.0));
        tmps.push(tmp);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id()).collect();

    // Durable: each node's feed, stamped by a thread of its own.
    let (feed_tx, feed_rx) = std_mpsc::channel::<(usize, EventId, Instant)>();
    let watchers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(j, node)| {
            let mut feed = node.subscribe();
            let tx = feed_tx.clone();
            thread::spawn(move || loop {
                match feed.blocking_recv() {
                    Ok(c) => {
                        let now = Instant::now();
                        for (id, _) in &c.events {
                            if tx.send((j, *id, now)).is_err() {
                                return;
                            }
                        }
                    }
                    // Cannot happen at this rate; a missed event times out.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            })
        })
        .collect();
    drop(feed_tx);
    let prober = cfg.propagate_probe.then(|| Prober::start(nodes.clone()));

    // The mesh: each node dials every node started before it.
    let rt = runtime()?;
    let t_connect = Instant::now();
    let daemons: Vec<Daemon> = rt.block_on(async {
        let mut ds: Vec<Daemon> = Vec::new();
        for node in &nodes {
            let peers = ds.iter().map(|d| d.local_addr().to_string()).collect();
            ds.push(Daemon::start(node.clone(), daemon_config(peers)).await?);
        }
        anyhow::Ok(ds)
    })?;
    loop {
        let up = (0..k).all(|i| (0..k).all(|j| i == j || daemons[i].is_connected(&ids[j])));
        if up {
            break;
        }
        if t_connect.elapsed() > Duration::from_secs(30) {
            bail!("propagate: the {k}-node mesh did not connect within 30 s");
        }
        thread::sleep(Duration::from_millis(1));
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();

    let warm = PROPAGATE_WARMUP * k as u64;
    let mut next_seq = vec![1u64; k];
    let mut durable_at: HashMap<EventId, Vec<Option<Instant>>> = HashMap::new();
    let mut rng = seed;
    let (mut applied, mut durable, mut ack) = (Vec::new(), Vec::new(), Vec::new());
    for e in 0..warm + m {
        let origin = (e % k as u64) as usize;
        let others: Vec<usize> = (0..k).filter(|&j| j != origin).collect();
        let seq = next_seq[origin];
        let t0 = Instant::now();
        if let Some(p) = &prober {
            p.probe(Probe {
                author: ids[origin],
                seq,
                t0,
                nodes: others.clone(),
            })?;
        }
        let appended = nodes[origin].append(mixed_draft(e, payload(e)))?;
        let acked = t0.elapsed();
        ensure!(
            appended.seq == seq && !appended.existing,
            "propagate: append {e} got seq {}, expected {seq}",
            appended.seq
        );
        next_seq[origin] = seq + 1;
        let deadline = t0 + PROBE_TIMEOUT;
        let times = loop {
            if durable_at
                .get(&appended.id)
                .is_some_and(|v| others.iter().all(|&j| v[j].is_some()))
            {
                break durable_at.remove(&appended.id).expect("present");
            }
            match feed_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((j, id, at)) => {
                    durable_at.entry(id).or_insert_with(|| vec![None; k])[j] = Some(at);
                }
                Err(_) => bail!(
                    "propagate: event {e} from node {origin} was not durable on every other node within {PROBE_TIMEOUT:?}"
                ),
            }
        };
        let last_durable = others
            .iter()
            .map(|&j| times[j].expect("checked above"))
            .max()
            .expect("at least one other node");
        let seen = match &prober {
            Some(p) => Some(p.wait().with_context(|| format!("propagate: event {e}"))?),
            None => None,
        };
        if e >= warm {
            if let Some(seen) = seen {
                applied.push(ms(seen - t0));
            }
            durable.push(ms(last_durable - t0));
            ack.push(ms(acked));
        }
        thread::sleep(spacing(&mut rng));
    }

    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        for d in &daemons {
            rows.extend(d.peers().await);
        }
        rows
    });
    let sent: u64 = rows.iter().filter_map(|r| r["events_sent"].as_u64()).sum();
    let needed = (warm + m) * (k as u64 - 1);
    let (delivered, duplicates) = daemons.iter().fold((0, 0), |(d, u), x| {
        let g = x.gossip();
        (
            d + g["delivered"].as_u64().unwrap_or(0),
            u + g["duplicates"].as_u64().unwrap_or(0),
        )
    });
    let (shutdown_secs, r) = time(|| {
        rt.block_on(async {
            let handles: Vec<_> = daemons
                .into_iter()
                .map(|d| tokio::spawn(async move { d.shutdown().await }))
                .collect();
            for h in handles {
                h.await?;
            }
            anyhow::Ok(())
        })
    });
    r?;
    if let Some(p) = prober {
        p.stop();
    }
    drop(rt);
    drop(nodes);
    for w in watchers {
        let _ = w.join();
    }
    Ok(PropagateRun {
        applied,
        durable,
        ack,
        connect_secs,
        sends_per_delivery: sent as f64 / needed as f64,
        duplicates_per_delivery: duplicates as f64 / delivered.max(1) as f64,
        shutdown_secs,
    })
}

/// The baseline: the same spaced appends on a lone node without daemons
/// (with the same prober, watching this node's own state); each append's
/// latency in ms.
fn local_append_latencies(cfg: &Config, seed: u64) -> Result<Vec<f64>> {
    let (_tmp, dir) = new_node(cfg, "propagate-local-")?;
    let node = Arc::new(Node::open(&dir).context("open node")?.0);
    let prober = cfg
        .propagate_probe
        .then(|| Prober::start(vec![node.clone()]));
    let warm = PROPAGATE_WARMUP * cfg.propagate_nodes as u64;
    let mut rng = seed;
    let mut out = Vec::new();
    for e in 0..warm + cfg.propagate_m {
        let t0 = Instant::now();
        if let Some(p) = &prober {
            p.probe(Probe {
                author: node.id(),
                seq: e + 1,
                t0,
                nodes: vec![0],
            })?;
        }
        node.append(mixed_draft(e, payload(e)))?;
        let lat = ms(t0.elapsed());
        if let Some(p) = &prober {
            p.wait()?;
        }
        if e >= warm {
            out.push(lat);
        }
        thread::sleep(spacing(&mut rng));
    }
    if let Some(p) = prober {
        p.stop();
    }
    Ok(out)
}

fn bench_propagate(cfg: &Config, report: &mut Report) -> Result<()> {
    let (k, m) = (cfg.propagate_nodes, cfg.propagate_m);
    println!(
        "# propagate: {k}-node full mesh on loopback, {m} appends from rotating origins 5–10 ms apart, {} runs{}",
        cfg.runs,
        if cfg.propagate_probe { "" } else { ", no applied probe" }
    );
    let (mut applied, mut durable, mut local, mut ack) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sends, mut connect, mut dups) = (Vec::new(), Vec::new(), Vec::new());
    let show = |v: &[f64]| {
        if v.is_empty() {
            return "-".to_string();
        }
        format!(
            "p50 {:.2} / p99 {:.2} / max {:.2} ms",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        )
    };
    for run in 0..cfg.runs {
        let seed = 1_000 + run as u64;
        let w = weft_propagate_run(cfg, seed)?;
        let l = local_append_latencies(cfg, seed)?;
        println!(
            "  run {run}: mesh up in {:.0} ms | applied {} | durable {} | origin ack {} | lone node append {} | {:.2} sends per delivery | {:.2} duplicates per delivered event | shutdown {:.2} s",
            w.connect_secs * 1e3,
            show(&w.applied),
            show(&w.durable),
            show(&w.ack),
            show(&l),
            w.sends_per_delivery,
            w.duplicates_per_delivery,
            w.shutdown_secs,
        );
        applied.push(w.applied);
        durable.push(w.durable);
        ack.push(w.ack);
        local.push(l);
        sends.push(w.sends_per_delivery);
        dups.push(w.duplicates_per_delivery);
        connect.push(w.connect_secs * 1e3);
    }
    let mut figures = vec![(
        "durable",
        &durable,
        "every other node's feed: fdatasync done",
    )];
    if cfg.propagate_probe {
        figures.insert(
            0,
            ("applied", &applied, "in every other node's state (polled)"),
        );
    }
    for (what, runs, until) in figures {
        for (tag, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
            let per_run: Vec<f64> = runs.iter().map(|v| percentile(v, p)).collect();
            let base: Vec<f64> = local.iter().map(|v| percentile(v, p)).collect();
            let round2 = |v: f64| (v * 100.0).round() / 100.0;
            let mut extra = serde_json::Map::new();
            extra.insert("nodes".into(), json!(k));
            extra.insert("until".into(), json!(until));
            extra.insert(
                "pooled".into(),
                json!(round2(percentile(&runs.concat(), p))),
            );
            extra.insert(
                "origin_ack".into(),
                json!(round2(percentile(&ack.concat(), p))),
            );
            if tag == "p50" {
                extra.insert("sends_per_delivery".into(), json!(round2(median(&sends))));
                extra.insert(
                    "duplicates_per_delivery".into(),
                    json!(round2(median(&dups))),
                );
                extra.insert("mesh_up_ms".into(), json!(median(&connect).round()));
            }
            report.add(
                cfg,
                Figure {
                    group: "propagate",
                    name: format!("propagate_{what}_{tag}"),
                    unit: Unit::Ms,
                    runs: per_run,
                    n: m,
                    baselines: vec![Baseline {
                        name: format!("lone_node_append_{tag}"),
                        unit: Unit::Ms,
                        runs: base,
                        n: m,
                        note: "one local durable append, same spacing".into(),
                    }],
                    target: (tag == "p99").then_some(Target::AtMost(10.0)),
                    extra,
                },
            );
        }
    }
    Ok(())
}
