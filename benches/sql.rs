//! The SQL read model against raw inserts, each measured in the same run.
//!
//! ```text
//! cargo bench --bench sql                          # full sizes
//! WEFTLOG_BENCH_QUICK=1 cargo bench --bench sql    # tiny sizes (CI smoke check)
//! ```
//!
//! - `mirror`: events/s that `weftlog sql --rebuild` mirrors from a node's
//!   log of n events (1,000 streams; each event sets a field, adds to a
//!   counter and carries a small JSON payload; every 10th also sells a
//!   seat of an escrow counter), into SQLite and into PostgreSQL: decode,
//!   fold, rows of the touched streams, events rows and checkpoint, in
//!   transactions of `MAX_BATCH_EVENTS`. Baseline: the same `events` rows
//!   inserted raw into a table of the same shape, in transactions of the
//!   same size (a prepared INSERT per row in SQLite, one `UNNEST` insert
//!   per transaction in PostgreSQL), read from the log beforehand.
//! - `lag`: a node appending at a steady 5,000 events/s while
//!   `Live` mirrors it (as `weftlog run --sql` does): for the k-th
//!   acknowledged append, the time until the mirror's checkpoint reached
//!   k events (polled every 0.2 ms). p50 and p99.
//!
//! Figures are medians of the runs (3, or 1 in quick mode). PostgreSQL
//! figures need `WEFTLOG_TEST_POSTGRES` (a server URL; a database is created
//! per run) and are skipped without it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weftlog::node::{self, Node};
use weftlog::sql::{self, Live, Url, MAX_BATCH_EVENTS};
use weftlog_proto::state::Draft;
use weftlog_proto::{Meta, Op};

/// Appender threads that build the log (group commit batches them).
const BUILD_THREADS: usize = 64;
/// Streams of the workload.
const STREAMS: u64 = 1000;
/// The steady append rate of the lag figure.
const LAG_RATE: u64 = 5000;

struct Config {
    quick: bool,
    n: u64,
    runs: usize,
    lag_secs: f64,
    postgres: Option<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn draft(i: u64) -> Draft {
    let mut ops = vec![
        Op::Set {
            field: format!("f{}", i % 8),
            value: format!("{{\"i\":{i}}}").into_bytes(),
            supersedes: vec![],
        },
        Op::Add {
            counter: "n".into(),
            delta: 1,
        },
    ];
    let stream = if i % 10 == 9 {
        ops = vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: 1,
        }];
        "venue".to_string()
    } else {
        format!("s/{}", i % STREAMS)
    };
    Draft {
        stream,
        kind: "Edited".into(),
        ops,
        payload: format!("{{\"n\":{i}}}").into_bytes(),
        meta: Meta {
            command_id: None,
            user: Some("bench".into()),
        },
        ..Draft::default()
    }
}

fn venue(capacity: u64) -> Draft {
    Draft {
        stream: "venue".into(),
        kind: "Opened".into(),
        ops: vec![Op::EscrowInit {
            counter: "seats".into(),
            capacity,
        }],
        ..Draft::default()
    }
}

/// A node in `dir` holding `n` events of the workload (and the venue).
fn build_log(dir: &Path, n: u64) -> Result<Node> {
    node::init(dir)?;
    let (node, _) = Node::open(dir)?;
    node.append(venue(10 * n + 10))?;
    let node = Arc::new(node);
    let next = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..BUILD_THREADS)
        .map(|_| {
            let (node, next) = (node.clone(), next.clone());
            thread::spawn(move || -> Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok(());
                    }
                    node.append(draft(i))?;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("builder panicked")?;
    }
    Arc::try_unwrap(node).map_err(|_| anyhow::anyhow!("node still shared"))
}

/// A fresh PostgreSQL database on the server at `base`.
fn postgres_db(base: &str, name: &str) -> Result<String> {
    let mut c = postgres::Client::connect(base, postgres::NoTls)?;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))?;
    c.batch_execute(&format!("CREATE DATABASE {name}"))?;
    let (head, _) = base.rsplit_once('/').context("a URL with a database")?;
    Ok(format!("{head}/{name}"))
}

/// The events rows as the mirror writes them.
type Row = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn rows(node: &Node) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    let mut pos = 0;
    node.scan(|e, id| {
        pos += 1;
        out.push((
            pos,
            id.to_string(),
            e.author.to_string(),
            e.seq as i64,
            e.hlc.0.to_string(),
            e.stream.clone(),
            e.kind.clone(),
            e.meta.user.clone(),
            e.meta.command_id.clone(),
            (!e.payload.is_empty()).then(|| weftlog::json::bytes_value(&e.payload).to_string()),
        ));
    })?;
    Ok(out)
}

fn raw_sqlite(path: &Path, rows: &[Row]) -> Result<f64> {
    let c = rusqlite::Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.execute_batch(
        "CREATE TABLE events (position INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, author TEXT NOT NULL, seq INTEGER NOT NULL, hlc NOT NULL, stream TEXT NOT NULL, kind TEXT NOT NULL, user_name TEXT, command_id TEXT, payload TEXT)",
    )?;
    let mut c = c;
    let t0 = Instant::now();
    for chunk in rows.chunks(MAX_BATCH_EVENTS) {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for r in chunk {
                st.execute(rusqlite::params![
                    r.0,
                    r.1,
                    r.2,
                    r.3,
                    r.4.parse::<i64>().unwrap_or(0),
                    r.5,
                    r.6,
                    r.7,
                    r.8,
                    r.9
                ])?;
            }
        }
        tx.commit()?;
    }
    Ok(rows.len() as f64 / t0.elapsed().as_secs_f64())
}

fn raw_postgres(url: &str, rows: &[Row]) -> Result<f64> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(
        "CREATE TABLE events (position BIGINT PRIMARY KEY, id TEXT NOT NULL UNIQUE, author TEXT NOT NULL, seq BIGINT NOT NULL, hlc NUMERIC(20, 0) NOT NULL, stream TEXT NOT NULL, kind TEXT NOT NULL, user_name TEXT, command_id TEXT, payload JSONB)",
    )?;
    let st = c.prepare(
        "INSERT INTO events SELECT p, i, a, s, h::numeric, st, k, u, c, pl::jsonb FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) AS t(p, i, a, s, h, st, k, u, c, pl)",
    )?;
    let t0 = Instant::now();
    for chunk in rows.chunks(MAX_BATCH_EVENTS) {
        let mut tx = c.transaction()?;
        let p: Vec<i64> = chunk.iter().map(|r| r.0).collect();
        let s: Vec<i64> = chunk.iter().map(|r| r.3).collect();
        let col = |f: fn(&Row) -> Option<String>| chunk.iter().map(f).collect::<Vec<_>>();
        tx.execute(
            &st,
            &[
                &p,
                &col(|r| Some(r.1.clone())),
                &col(|r| Some(r.2.clone())),
                &s,
                &col(|r| Some(r.4.clone())),
                &col(|r| Some(r.5.clone())),
                &col(|r| Some(r.6.clone())),
                &col(|r| r.7.clone()),
                &col(|r| r.8.clone()),
                &col(|r| r.9.clone()),
            ],
        )?;
        tx.commit()?;
    }
    Ok(rows.len() as f64 / t0.elapsed().as_secs_f64())
}

fn mirror_rate(node: &Node, url: &Url) -> Result<f64> {
    let t0 = Instant::now();
    let (at, _) = sql::mirror_once(node, url, true)?;
    Ok(at.position as f64 / t0.elapsed().as_secs_f64())
}

/// The lag figure: (p50, p99) in ms.
fn lag_run(cfg: &Config, dir: &Path, url: &Url) -> Result<(f64, f64)> {
    node::init(dir)?;
    let (node, _) = Node::open(dir)?;
    node.append(venue(1_000_000_000))?;
    let node = Arc::new(node);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let live = Live::start(node.clone(), url, rt.handle().clone())?;
    let lag = live.lag();
    let base = lag.mirrored();
    let total = (cfg.lag_secs * LAG_RATE as f64) as u64;
    let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let watcher = {
        let (lag, stop, seen) = (lag.clone(), stop.clone(), seen.clone());
        thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let m = lag.mirrored();
                if m != last {
                    seen.lock().unwrap().push((m, Instant::now()));
                    last = m;
                }
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    rt.block_on(async {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..total {
            // Steady: event i is due at i / rate.
            let due = t0 + Duration::from_secs_f64(i as f64 / LAG_RATE as f64);
            tokio::time::sleep_until(due.into()).await;
            let (node, acks) = (node.clone(), acks.clone());
            tasks.push(tokio::spawn(async move {
                node.append_async(draft(i)).await?;
                acks.lock().unwrap().push(Instant::now());
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    let t0 = Instant::now();
    while lag.mirrored() < base + total && t0.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(2));
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher panicked");
    live.stop()?;
    let mut acks = acks.lock().unwrap().clone();
    acks.sort();
    let seen = seen.lock().unwrap().clone();
    let mut lags = Vec::with_capacity(acks.len());
    let mut j = 0;
    for (k, ack) in acks.iter().enumerate() {
        let want = base + k as u64 + 1;
        while j < seen.len() && seen[j].0 < want {
            j += 1;
        }
        let Some((_, at)) = seen.get(j) else { break };
        lags.push(at.saturating_duration_since(*ack).as_secs_f64() * 1e3);
    }
    anyhow::ensure!(!lags.is_empty(), "no lag measured");
    Ok((percentile(&lags, 0.5), percentile(&lags, 0.99)))
}

fn main() -> Result<()> {
    let quick = std::env::var("WEFTLOG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let cfg = Config {
        quick,
        n: std::env::var("WEFTLOG_BENCH_SQL_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 2_000 } else { 100_000 }),
        runs: if quick { 1 } else { 3 },
        lag_secs: if quick { 0.5 } else { 2.0 },
        postgres: std::env::var("WEFTLOG_TEST_POSTGRES").ok(),
    };
    // Cargo passes `--bench`; any other argument is not ours to refuse.
    println!(
        "sql bench: n = {} events{}, {} run(s); PostgreSQL: {}",
        cfg.n,
        if cfg.quick { " (QUICK)" } else { "" },
        cfg.runs,
        if cfg.postgres.is_some() {
            "yes"
        } else {
            "skipped (WEFTLOG_TEST_POSTGRES not set)"
        }
    );
    let tmp = tempfile::tempdir()?;
    let t0 = Instant::now();
    let node = build_log(&tmp.path().join("node"), cfg.n)?;
    let events = node.with_state(|s| s.len());
    println!(
        "  log of {events} events built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let rows = rows(&node)?;
    let mut table = Vec::new();
    let (mut m, mut r) = (Vec::new(), Vec::new());
    for run in 0..cfg.runs {
        m.push(mirror_rate(
            &node,
            &Url::Sqlite(tmp.path().join(format!("m{run}.db"))),
        )?);
        r.push(raw_sqlite(&tmp.path().join(format!("r{run}.db")), &rows)?);
    }
    table.push(("mirror into SQLite (events/s)", median(m), median(r)));
    if let Some(base) = &cfg.postgres {
        let pid = std::process::id();
        let (mut m, mut r) = (Vec::new(), Vec::new());
        for run in 0..cfg.runs {
            let url = postgres_db(base, &format!("weftlog_bench_m{run}_{pid}"))?;
            m.push(mirror_rate(&node, &Url::parse(&url)?)?);
            let url = postgres_db(base, &format!("weftlog_bench_r{run}_{pid}"))?;
            r.push(raw_postgres(&url, &rows)?);
        }
        table.push(("mirror into PostgreSQL (events/s)", median(m), median(r)));
    }
    drop(node);
    let mut lags = Vec::new();
    let mut urls = vec![("SQLite", None)];
    if let Some(base) = &cfg.postgres {
        urls.push(("PostgreSQL", Some(base.clone())));
    }
    for (name, base) in urls {
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for run in 0..cfg.runs {
            let dir = tmp.path().join(format!("lag-{name}-{run}"));
            let url = match &base {
                None => Url::Sqlite(tmp.path().join(format!("lag-{name}-{run}.db"))),
                Some(b) => Url::parse(&postgres_db(
                    b,
                    &format!("weftlog_bench_lag{run}_{}", std::process::id()),
                )?)?,
            };
            let (a, b) = lag_run(&cfg, &dir, &url)?;
            p50.push(a);
            p99.push(b);
        }
        lags.push((name, median(p50), median(p99)));
    }
    println!();
    println!(
        "{:<36} {:>14} {:>14} {:>7}",
        "figure (median)", "mirror", "raw inserts", "ratio"
    );
    for (name, m, r) in &table {
        println!("{name:<36} {m:>14.0} {r:>14.0} {:>7.2}", m / r);
        println!(
            "{}",
            serde_json::json!({"figure": name, "mirror": m.round(), "baseline_raw_inserts": r.round(), "events": events, "quick": cfg.quick})
        );
    }
    for (name, p50, p99) in &lags {
        println!("mirror lag into {name} at {LAG_RATE} events/s: p50 {p50:.1} ms, p99 {p99:.1} ms");
        println!(
            "{}",
            serde_json::json!({"figure": format!("lag {name}"), "rate": LAG_RATE, "p50_ms": p50, "p99_ms": p99, "quick": cfg.quick})
        );
    }
    Ok(())
}
