//! Ordered projections ([`weftlog_proto::projection`]): throughput in
//! order, and the cost of one late event at depth d.
//!
//! ```text
//! cargo bench --bench projection                         # full sizes
//! WEFTLOG_BENCH_QUICK=1 cargo bench --bench projection   # small sizes (CI smoke check)
//! ```
//!
//! Workload: events by 4 authors with rising hlcs on 100 session streams
//! (each opened with 100 seats); half are sales of 1 or 2 seats, the rest
//! edits. Events are made directly and sealed (a projection reads events;
//! it does not check them), and read back from a `MemorySource`.
//!
//! - `in_order`: a projector given every event in canonical order (each
//!   applied at once, a checkpoint every `CHECKPOINT_EVERY`), for
//!   `kind_counts` and `seat_order`. Baseline: the projection's `apply`
//!   called in a loop on a bare state, with no index and no checkpoints.
//!   Ratio = baseline / projector time.
//! - `late`: a projector holding every event but one, then given that one,
//!   which sorts d events before its position (d in 10, 1k, 100k; quick:
//!   10, 1k, 10k): the time of `insert` + `catch_up`, and the events it
//!   replayed. It restores the newest checkpoint before the event and
//!   replays from there, so it replays d + 1 plus less than d / 4 +
//!   `CHECKPOINT_EVERY` events: O(d + N). Baseline: a replay of all n
//!   events from scratch, as a projection without checkpoints would do.
//!
//! Every figure is the median of `WEFTLOG_BENCH_RUNS` runs (at least 3).
//! Output: a table at the end, and one JSON line per figure (lines
//! starting with `{`). Environment (optional): `WEFTLOG_BENCH_QUICK=1`,
//! `WEFTLOG_BENCH_RUNS`, `WEFTLOG_BENCH_PROJECTION_N` (events).

use std::time::Instant;

use weftlog_proto::event::Meta;
use weftlog_proto::projection::{
    KindCounts, MemorySource, Projection, Projector, SeatOrder, CHECKPOINT_EVERY,
};
use weftlog_proto::{Event, EventId, Hlc, NodeId, Op};

/// Session streams of the workload.
const STREAMS: u64 = 100;

struct Config {
    quick: bool,
    runs: usize,
    n: usize,
    depths: Vec<usize>,
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("WEFTLOG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let runs = var("WEFTLOG_BENCH_RUNS", if quick { 3 } else { 5 }).max(3);
        let n = var(
            "WEFTLOG_BENCH_PROJECTION_N",
            if quick { 20_000 } else { 200_000 },
        );
        let depths = if quick {
            vec![10, 1_000, 10_000]
        } else {
            vec![10, 1_000, 100_000]
        };
        Config {
            quick,
            runs,
            n,
            depths: depths.into_iter().filter(|&d| d < n).collect(),
        }
    }
}

/// `n` events in canonical order (rising hlc).
fn workload(n: usize) -> Vec<(Event, EventId)> {
    let mut seqs = [0u64; 4];
    (0..n as u64)
        .map(|i| {
            let a = (i % 4) as usize;
            seqs[a] += 1;
            let stream = i % STREAMS;
            let (kind, ops) = if i < STREAMS {
                (
                    "Opened",
                    vec![Op::EscrowInit {
                        counter: "seats".into(),
                        capacity: 100,
                    }],
                )
            } else if i % 2 == 0 {
                (
                    "SeatsSold",
                    vec![Op::EscrowConsume {
                        counter: "seats".into(),
                        amount: 1 + i % 3 / 2,
                    }],
                )
            } else {
                ("Edited", vec![])
            };
            let e = Event {
                version: 2,
                author: NodeId([a as u8 + 1; 32]),
                seq: seqs[a],
                prev: None,
                deps: vec![],
                hlc: Hlc::from_ms(1_000 + i),
                stream: format!("session/{stream}"),
                kind: kind.into(),
                ops,
                payload: vec![],
                meta: Meta {
                    command_id: None,
                    user: Some(format!("desk-{a}")),
                },
            };
            let (_, id) = e.seal();
            (e, id)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    group: &'static str,
    case: String,
    figure: String,
    baseline: String,
    ratio: f64,
}

fn emit(rows: &mut Vec<Row>, row: Row, json: String) {
    println!("{json}");
    rows.push(row);
}

/// Events per second through a projector in canonical order, and through
/// bare `apply` calls.
fn in_order<P: Projection + Copy>(
    cfg: &Config,
    p: P,
    events: &[(Event, EventId)],
    rows: &mut Vec<Row>,
) {
    let mut engine = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..cfg.runs {
        let t = Instant::now();
        let mut pr = Projector::new(p);
        for (i, (e, id)) in events.iter().enumerate() {
            pr.insert(e, *id, i as u64 + 1);
        }
        assert_eq!(pr.lag(), 0);
        std::hint::black_box(pr.state_hash());
        engine.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut s = P::State::default();
        for (e, id) in events {
            p.apply(&mut s, e, id);
        }
        std::hint::black_box(&s);
        bare.push(t.elapsed().as_secs_f64());
    }
    let (e, b) = (median(engine), median(bare));
    let n = events.len() as f64;
    let name = p.name().to_string();
    emit(
        rows,
        Row {
            group: "in_order",
            case: name.clone(),
            figure: format!("{:.0} ev/s", n / e),
            baseline: format!("{:.0} ev/s", n / b),
            ratio: b / e,
        },
        format!(
            r#"{{"group":"in_order","projection":"{name}","events":{n},"events_per_s":{:.0},"baseline_events_per_s":{:.0}}}"#,
            n / e,
            n / b
        ),
    );
}

/// The cost of one late event `d` deep, against a full replay.
fn late<P: Projection + Copy>(
    cfg: &Config,
    p: P,
    events: &[(Event, EventId)],
    rows: &mut Vec<Row>,
) {
    let n = events.len();
    let mut source = MemorySource::new();
    for (e, _) in events {
        source.push(e.clone());
    }
    // A full replay from scratch: every event read back and applied.
    let mut all = Projector::new(p);
    for (i, (e, id)) in events.iter().enumerate() {
        all.insert(e, *id, i as u64 + 1);
    }
    let mut full = Vec::new();
    for _ in 0..cfg.runs {
        let mut fresh = Projector::new(p);
        // The index as a restarted projector holds it, nothing applied:
        // given newest first, every event waits.
        for (i, (e, id)) in events.iter().enumerate().rev() {
            fresh.insert(e, *id, i as u64 + 1);
        }
        let t = Instant::now();
        fresh
            .catch_up(&mut source)
            .expect("the source holds every event");
        full.push(t.elapsed().as_secs_f64());
        assert_eq!(fresh.state_hash(), all.state_hash());
    }
    let full = median(full);
    for &d in &cfg.depths {
        let at = n - 1 - d;
        let mut base = Projector::new(p);
        for (i, (e, id)) in events.iter().enumerate() {
            if i != at {
                base.insert(e, *id, i as u64 + 1);
            }
        }
        let mut times = Vec::new();
        let mut replayed = 0;
        for _ in 0..cfg.runs {
            let mut pr = base.clone();
            let (e, id) = &events[at];
            let t = Instant::now();
            pr.insert(e, *id, at as u64 + 1);
            pr.catch_up(&mut source)
                .expect("the source holds every event");
            times.push(t.elapsed().as_secs_f64());
            assert_eq!(pr.lag(), 0);
            replayed = pr.replayed();
        }
        let t = median(times);
        let name = p.name().to_string();
        emit(
            rows,
            Row {
                group: "late",
                case: format!("{name} d={d}"),
                figure: format!("{:.1} µs, {replayed} replayed", t * 1e6),
                baseline: format!("{:.1} µs (full replay of {n})", full * 1e6),
                ratio: full / t,
            },
            format!(
                r#"{{"group":"late","projection":"{name}","events":{n},"depth":{d},"checkpoint_every":{CHECKPOINT_EVERY},"late_us":{:.1},"replayed":{replayed},"full_replay_us":{:.1}}}"#,
                t * 1e6,
                full * 1e6
            ),
        );
    }
}

fn main() {
    let cfg = Config::from_env();
    println!(
        "projection bench: {} events, {} runs each{}",
        cfg.n,
        cfg.runs,
        if cfg.quick { ", QUICK sizes" } else { "" }
    );
    let events = workload(cfg.n);
    let mut rows = Vec::new();
    in_order(&cfg, KindCounts, &events, &mut rows);
    in_order(&cfg, SeatOrder, &events, &mut rows);
    late(&cfg, KindCounts, &events, &mut rows);
    late(&cfg, SeatOrder, &events, &mut rows);
    println!();
    println!(
        "{:<10} {:<24} {:>32} {:>34} {:>8}",
        "group", "case", "weftlog", "baseline", "ratio"
    );
    for r in &rows {
        println!(
            "{:<10} {:<24} {:>32} {:>34} {:>8.2}",
            r.group, r.case, r.figure, r.baseline, r.ratio
        );
    }
}
