//! Batch append against the disk's own limit and SQLite, in the same run.
//!
//! ```text
//! cargo bench --bench batch                           # full sizes
//! WEFTLOG_BENCH_QUICK=1 cargo bench --bench batch     # small sizes (CI smoke check)
//! ```
//!
//! Figures, each the median of `WEFTLOG_BENCH_RUNS` runs (at least 3; the
//! three kinds of run alternate, so drift on a busy machine hits all):
//! - **weftlog**: `Node::append_many` of batches of [`BATCH`] events (an
//!   `Add` and a 256-byte payload each, as the `append` group of the
//!   `weftlog` bench appends), durable when it returns, from 1 and from 4
//!   callers at once (`WEFTLOG_BENCH_CALLERS`), each on its own stream, on
//!   a fresh node. Drafts are built before the clock starts. Events per
//!   second from the first call until the last batch is acknowledged.
//! - **disk**: the disk's own limit for the same bytes: one file, written
//!   as the log writes its segments (positioned writes of the batch's
//!   bytes, zero-filled ahead in the log's 4 MiB steps), one `fdatasync`
//!   per batch of [`BATCH`] records, with the average record size the
//!   weftlog run of that round wrote (frames, signatures included). No CPU
//!   work but the copy: the ceiling of any durable append of these bytes.
//! - **sqlite**: SQLite (bundled, WAL, `synchronous=FULL`) inserting the
//!   same batches, one transaction of [`BATCH`] rows each (blake3 id over
//!   the row as primary key, as the `append` group's baseline does).
//!
//! A ratio above 1 means weftlog is faster. The issue's targets: at least
//! 600k events/s, and (for every append figure) at least 0.8× the disk.
//!
//! Environment (all optional): `WEFTLOG_BENCH_QUICK=1`; `WEFTLOG_BENCH_RUNS`;
//! `WEFTLOG_BENCH_BATCHES` (batches per run, over all callers);
//! `WEFTLOG_BENCH_CALLERS` (comma-separated); `WEFTLOG_BENCH_DIR` (scratch
//! directory; default `target/bench-tmp`, which should be on a real disk).

#[path = "common/mod.rs"]
mod common;

use common::{env_or, median, payload, splitmix};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rusqlite::{params, Connection};
use serde_json::json;
use weftlog::node::{self, Node};
use weftlog_proto::event::{Meta, Op};
use weftlog_proto::log::{decode_frame, HEADER_BYTES, SEGMENT_ALLOC_BYTES};
use weftlog_proto::state::Draft;

/// Events per batch: one `append_many`, one fdatasync of the disk
/// baseline, one SQLite transaction.
const BATCH: usize = 1_000;
/// The issue's target for batch append.
const TARGET_EVENTS_PER_SEC: f64 = 600_000.0;
/// The issue's target against the disk's own limit.
const TARGET_DISK_RATIO: f64 = 0.8;

struct Config {
    quick: bool,
    runs: usize,
    batches: usize,
    callers: Vec<usize>,
    dir: PathBuf,
}

impl Config {
    fn from_env() -> Result<Config> {
        let quick = std::env::var("WEFTLOG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let callers = match std::env::var("WEFTLOG_BENCH_CALLERS") {
            Ok(v) => v
                .split(',')
                .map(|t| t.trim().parse::<usize>().context("WEFTLOG_BENCH_CALLERS"))
                .collect::<Result<Vec<_>>>()?,
            Err(_) => vec![1, 4],
        };
        if callers.contains(&0) {
            bail!("WEFTLOG_BENCH_CALLERS: a caller count is 0");
        }
        let default_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench-tmp");
        Ok(Config {
            quick,
            runs: env_or("WEFTLOG_BENCH_RUNS", if quick { 3 } else { 5usize })?.max(3),
            batches: env_or("WEFTLOG_BENCH_BATCHES", if quick { 8 } else { 400usize })?.max(1),
            callers,
            dir: std::env::var_os("WEFTLOG_BENCH_DIR").map_or(default_dir, PathBuf::from),
        })
    }

    fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.dir)
            .with_context(|| format!("temp dir in {}", self.dir.display()))
    }
}

/// Event `i` of `caller`'s stream.
fn draft(caller: usize, i: u64, payload: &[u8]) -> Draft {
    Draft {
        stream: format!("batch/{caller}"),
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

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

/// What one weftlog run measured.
struct WeftRun {
    events_per_sec: f64,
    /// Frame bytes per record in the log (the disk baseline writes these).
    record_bytes: f64,
    /// Records per group commit (signed records: one per commit).
    per_commit: f64,
}

/// One run: `callers` threads, each calling `append_many` on its share of
/// `cfg.batches` batches in turn.
fn weft_run(cfg: &Config, callers: usize) -> Result<WeftRun> {
    let tmp = cfg.tempdir("batch-")?;
    let dir = tmp.path().join("node");
    node::init(&dir).context("node init")?;
    let (node, _) = Node::open(&dir).context("open node")?;
    let node = Arc::new(node);
    let per_caller = cfg.batches.div_ceil(callers);
    let work: Vec<Vec<Vec<Draft>>> = (0..callers)
        .map(|c| {
            let p = payload(c as u64);
            (0..per_caller)
                .map(|b| {
                    (0..BATCH)
                        .map(|i| draft(c, (b * BATCH + i) as u64, &p))
                        .collect()
                })
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let handles: Vec<_> = work
        .into_iter()
        .map(|batches| {
            let node = node.clone();
            thread::spawn(move || {
                for batch in batches {
                    for outcome in node.append_many(batch) {
                        outcome?;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("caller panicked")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(node);
    let events = (per_caller * callers * BATCH) as u64;
    let (records, bytes, signed) = scan_log(&dir)?;
    ensure!(
        records == events,
        "the log holds {records} records, {events} were acknowledged"
    );
    Ok(WeftRun {
        events_per_sec: events as f64 / secs,
        record_bytes: bytes as f64 / records as f64,
        per_commit: records as f64 / signed.max(1) as f64,
    })
}

/// Records, frame bytes and signed records in a node's log.
fn scan_log(node_dir: &Path) -> Result<(u64, u64, u64)> {
    let mut segs: Vec<PathBuf> = fs::read_dir(node_dir.join(node::LOG_DIR))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let (mut records, mut bytes, mut signed) = (0, 0, 0);
    for seg in segs {
        let data = fs::read(&seg)?;
        let mut off = HEADER_BYTES;
        // Segments are zero-filled past their records.
        while off < data.len() && data[off..].iter().any(|&b| b != 0) {
            let (frame, used) = decode_frame(&data[off..])
                .map_err(|e| anyhow::anyhow!("{}: {e}", seg.display()))?;
            records += 1;
            bytes += used as u64;
            signed += frame.sig.is_some() as u64;
            off += used;
        }
    }
    Ok((records, bytes, signed))
}

/// One run of the disk's own limit: `batches` batches of [`BATCH`] records
/// of `record_bytes` each, written as the log writes (zero-fill ahead in
/// its steps), one `fdatasync` per batch.
fn disk_run(cfg: &Config, batches: usize, record_bytes: f64) -> Result<f64> {
    let tmp = cfg.tempdir("batch-disk-")?;
    let path = tmp.path().join("raw.seg");
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let batch_bytes = (record_bytes * BATCH as f64).round() as usize;
    let data: Vec<u8> = (0..batch_bytes)
        .map(|i| splitmix(i as u64) as u8 | 1)
        .collect();
    let zeros = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    f.write_all_at(&[0u8; HEADER_BYTES], 0)?;
    let (mut end, mut alloc) = (HEADER_BYTES as u64, 0u64);
    for _ in 0..batches {
        f.write_all_at(&data, end)?;
        end += data.len() as u64;
        if end > alloc {
            let target = end.max(alloc + SEGMENT_ALLOC_BYTES);
            let mut at = end;
            while at < target {
                let n = (target - at).min(zeros.len() as u64);
                f.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            alloc = target;
        }
        f.sync_data()?;
    }
    Ok((batches * BATCH) as f64 / t0.elapsed().as_secs_f64())
}

/// One run of SQLite: `batches` transactions of [`BATCH`] rows.
fn sqlite_run(cfg: &Config, batches: usize) -> Result<f64> {
    let tmp = cfg.tempdir("batch-sqlite-")?;
    let conn = Connection::open(tmp.path().join("events.db"))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "SQLite refused WAL mode");
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE events(
             id BLOB PRIMARY KEY, author BLOB, seq INTEGER,
             stream TEXT, kind TEXT, payload BLOB);",
    )?;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events(id, author, seq, stream, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let author = [7u8; 32];
    let p = payload(0);
    let t0 = Instant::now();
    let mut seq = 0u64;
    for _ in 0..batches {
        conn.execute_batch("BEGIN")?;
        for _ in 0..BATCH {
            seq += 1;
            let mut h = blake3::Hasher::new();
            h.update(&author);
            h.update(&seq.to_le_bytes());
            h.update(b"batch/0");
            h.update(b"Appended");
            h.update(&p);
            let id = *h.finalize().as_bytes();
            stmt.execute(params![
                &id[..],
                &author[..],
                seq as i64,
                "batch/0",
                "Appended",
                &p
            ])?;
        }
        conn.execute_batch("COMMIT")?;
    }
    Ok((batches * BATCH) as f64 / t0.elapsed().as_secs_f64())
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    fs::create_dir_all(&cfg.dir).with_context(|| format!("create {}", cfg.dir.display()))?;
    println!(
        "batch bench: {} runs of {} batches of {BATCH}{}, {} cores (load average {}), scratch {}",
        cfg.runs,
        cfg.batches,
        if cfg.quick { ", QUICK sizes" } else { "" },
        thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        cfg.dir.display(),
    );
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run `cargo bench` for release figures.");
    }
    let mut rows = Vec::new();
    for &callers in &cfg.callers {
        let (mut weft, mut disk, mut sql, mut sizes, mut commits) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..cfg.runs {
            let w = weft_run(&cfg, callers)?;
            let d = disk_run(&cfg, cfg.batches, w.record_bytes)?;
            let s = sqlite_run(&cfg, cfg.batches)?;
            println!(
                "  {callers} caller(s), run {run}: weftlog {} ({:.0} records per group commit, {:.0} bytes per record), disk {}, sqlite {}",
                rate(w.events_per_sec),
                w.per_commit,
                w.record_bytes,
                rate(d),
                rate(s)
            );
            weft.push(w.events_per_sec);
            sizes.push(w.record_bytes);
            commits.push(w.per_commit);
            disk.push(d);
            sql.push(s);
        }
        let (w, d, s) = (median(&weft), median(&disk), median(&sql));
        println!(
            "{}",
            json!({
                "bench": "batch",
                "figure": format!("append_many_batch{BATCH}_callers{callers}"),
                "unit": "events/s",
                "median": w,
                "runs": weft,
                "quick": cfg.quick,
                "record_bytes": median(&sizes),
                "records_per_commit": median(&commits),
                "disk": { "median": d, "runs": disk, "ratio": w / d },
                "sqlite_wal_full_tx1000": { "median": s, "runs": sql, "ratio": w / s },
                "target": { "events_per_sec": TARGET_EVENTS_PER_SEC, "disk_ratio": TARGET_DISK_RATIO },
                "load_average": load_average(),
            })
        );
        rows.push((callers, w, d, s, median(&commits)));
    }
    println!();
    println!("| callers | weftlog append_many (median) | records per group commit | disk limit (median) | ratio to disk | SQLite WAL FULL (median) | ratio to SQLite | ≥ 600k | ≥ 0.8× disk |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (callers, w, d, s, c) in rows {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "| {callers} | {} | {c:.0} | {} | {:.2}× | {} | {:.2}× | {} | {} |",
            rate(w),
            rate(d),
            w / d,
            rate(s),
            w / s,
            yes(w >= TARGET_EVENTS_PER_SEC),
            yes(w / d >= TARGET_DISK_RATIO),
        );
    }
    println!("(load average {})", load_average());
    Ok(())
}
