//! Simulated events per second of wall time, and duplicate deliveries per
//! delivered event: the venue scenario (partitions, crashes, loss, skew) on
//! full meshes of 10, 20, 50 and 200 nodes and on sparse random graphs
//! (each node dials 4 others) of 10, 50, 200 and 1,000 nodes. Live push
//! runs along the broadcast tree (`weftlog_proto::peers`), so each event
//! reaches each node about once whatever the node count; what still grows
//! with a mesh is the number of connections, rounds and announcements.
//! Each row is the median of 3 runs of different seeds.
//!
//! ```text
//! cargo bench --bench sim            # in simulations/
//! WEFTLOG_SIM_BENCH_QUICK=1 cargo bench --bench sim   # 1 run per row, no 200-node mesh or 1,000-node graph
//! ```

use std::time::Instant;

use weftlog_sim::scenario::{Scenario, Topology};
use weftlog_sim::{run_with, RunOptions};

struct Row {
    nodes: usize,
    topology: &'static str,
    virtual_s: f64,
    events: u64,
    wall_s: f64,
    events_per_wall_s: f64,
    messages: u64,
    duplicates: u64,
    delivered: u64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn bench(nodes: usize, topology: Topology, name: &'static str, duration_s: f64, reps: u64) -> Row {
    let mut sc = Scenario::load("venue").expect("built-in venue scenario");
    sc.topology = topology;
    let opts = RunOptions {
        nodes: Some(nodes),
        duration_s: Some(duration_s),
        ..RunOptions::default()
    };
    let mut walls = Vec::new();
    let mut rates = Vec::new();
    let mut last = None;
    for seed in 1..=reps {
        let started = Instant::now();
        let r = run_with(&sc, seed, &opts, &mut |_| {});
        let wall = started.elapsed().as_secs_f64();
        assert!(r.passed(), "{}: {:?}", r.replay, r.violations);
        walls.push(wall);
        rates.push(r.events as f64 / wall);
        last = Some(r);
    }
    let r = last.expect("at least one run");
    Row {
        nodes,
        topology: name,
        virtual_s: r.virtual_ms as f64 / 1000.0,
        events: r.events,
        wall_s: median(walls),
        events_per_wall_s: median(rates),
        messages: r.messages,
        duplicates: r.duplicate_deliveries,
        delivered: r.delivered,
    }
}

fn main() {
    let quick = std::env::var("WEFTLOG_SIM_BENCH_QUICK").is_ok();
    let reps = if quick { 1 } else { 3 };
    let random = || Topology::Random { degree: 4 };
    let mut rows = vec![bench(10, Topology::Mesh, "mesh", 40.0, reps)];
    rows.push(bench(20, Topology::Mesh, "mesh", 40.0, reps));
    rows.push(bench(50, Topology::Mesh, "mesh", 10.0, reps));
    if !quick {
        rows.push(bench(200, Topology::Mesh, "mesh", 2.0, 1));
    }
    rows.push(bench(10, random(), "random, 4 dials", 40.0, reps));
    rows.push(bench(50, random(), "random, 4 dials", 10.0, reps));
    rows.push(bench(200, random(), "random, 4 dials", 2.0, reps));
    if !quick {
        rows.push(bench(1000, random(), "random, 4 dials", 2.0, 1));
    }
    println!("venue scenario: 3 commands per desk per virtual second, partitions, crashes, loss, clock skew");
    println!("(medians of {reps} seeds; events, messages and duplicates of the last seed)");
    println!(
        "{:>5}  {:<16} {:>9} {:>8} {:>9} {:>14} {:>11} {:>15} {:>13}",
        "nodes",
        "topology",
        "virtual s",
        "events",
        "wall s",
        "events/wall s",
        "messages",
        "dup deliveries",
        "dup/delivered"
    );
    for r in &rows {
        println!(
            "{:>5}  {:<16} {:>9.1} {:>8} {:>9.2} {:>14.0} {:>11} {:>15} {:>13.2}",
            r.nodes,
            r.topology,
            r.virtual_s,
            r.events,
            r.wall_s,
            r.events_per_wall_s,
            r.messages,
            r.duplicates,
            r.duplicates as f64 / r.delivered.max(1) as f64
        );
    }
}
