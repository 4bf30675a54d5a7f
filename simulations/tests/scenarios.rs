//! Every built-in scenario over its CI seeds — its long seeds with
//! `WEFTLOG_SIM_LONG=1` — holds every oracle on every seed, and injects the
//! faults it is about. CI runs at least 500 seeds in all.

use weftlog_sim::cli::run_seeds;
use weftlog_sim::report::{Rebalance, Summary};
use weftlog_sim::scenario::{Scenario, BUILTIN};
use weftlog_sim::RunOptions;

fn long() -> bool {
    std::env::var("WEFTLOG_SIM_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Runs a scenario's seeds, fails with every failing seed's replay
/// command, and returns the summary.
fn run_scenario(name: &str) -> Summary {
    run_scenario_as(Scenario::load(name).expect("built-in scenario"), name)
}

fn run_scenario_as(sc: Scenario, name: &str) -> Summary {
    let seeds = if long() { sc.long_seeds() } else { sc.seeds };
    let opts = RunOptions {
        scenario_arg: Some(name.to_string()),
        ..RunOptions::default()
    };
    let started = std::time::Instant::now();
    let runs = run_seeds(&sc, &opts, seeds, 1, false, &mut |_| {});
    let summary = Summary::of(&runs, started.elapsed().as_secs_f64());
    eprintln!("{}", summary.to_text());
    let failures: Vec<String> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| {
            let v: Vec<String> = r
                .violations
                .iter()
                .map(|v| format!("  [{}] at {} ms: {}", v.oracle, v.at_ms, v.detail))
                .collect();
            format!(
                "seed {} failed; replay: {}\n{}",
                r.seed,
                r.replay,
                v.join("\n")
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(summary.seeds, seeds.len());
    summary
}

fn fault(s: &Summary, kind: &str) -> u64 {
    s.faults.get(kind).copied().unwrap_or(0)
}

#[test]
fn random_ops_under_every_partition_shape() {
    let s = run_scenario("random");
    for shape in ["split", "isolate", "one_way", "bridge", "flaky"] {
        assert!(
            fault(&s, &format!("partition_{shape}")) > 0,
            "no {shape} partition"
        );
    }
    assert!(fault(&s, "torn_writes") > 0);
    assert!(fault(&s, "packets_lost") > 0 && fault(&s, "packets_reordered") > 0);
    assert!(s.conflicts > 0);
}

#[test]
fn venue_desks_sell_and_edit_while_partitioned() {
    let s = run_scenario("venue");
    assert!(s.oversell_refused > 0, "no sale was refused");
    assert!(s.escrow_consumed <= s.escrow_capacity);
    assert!(s.conflicts > 0 && s.appends.refused_version > 0);
    assert!(s.convergence.count > 0);
}

#[test]
fn multi_site_survives_long_wan_partitions() {
    let s = run_scenario("multi-site");
    assert!(fault(&s, "partition_site") > 0);
    assert!(s.convergence.count > 0);
}

#[test]
fn crashes_tear_writes_and_one_way_cuts_heal() {
    let s = run_scenario("crash-oneway");
    assert!(fault(&s, "torn_writes") > 0 && fault(&s, "torn_tails_recovered") > 0);
    assert!(fault(&s, "partition_one_way") >= s.seeds);
    assert!(fault(&s, "clock_steps") > 0);
    assert!(s.appends.lost_unacked > 0);
}

#[test]
fn splits_that_change_over_time() {
    let s = run_scenario("rolling");
    assert!(fault(&s, "partition_changes") > 0);
}

#[test]
fn a_byzantine_member_and_clock_jumps_neither_fail_nor_split_nor_drag() {
    let s = run_scenario("adversary");
    for kind in [
        "byzantine_frames_duplicated",
        "byzantine_frames_replayed",
        "byzantine_messages_reordered",
        "byzantine_messages_swapped",
    ] {
        assert!(fault(&s, kind) > 0, "no {kind}");
    }
    // Two scheduled jumps a seed, and random ones.
    assert!(fault(&s, "clock_jumps") > 2 * s.seeds);
    assert_eq!(fault(&s, "clock_jumps"), fault(&s, "clock_jumps_back"));
    // Events made during a jump are still ahead of the others' clocks.
    assert!(fault(&s, "events_ahead_at_end") > 0);
    assert!(s.convergence.count > 0);
}

/// Restores fork the restored desk's author; the core keeps both branches,
/// every node reports the fork, and every node converges.
#[test]
fn restored_desks_fork_and_every_node_reports_and_converges() {
    let s = run_scenario("venue-restore");
    assert!(fault(&s, "restores") >= 2 * s.seeds);
    assert!(fault(&s, "restores_isolated") >= s.seeds);
    assert!(s.forks > 0 && fault(&s, "forks_reported") > 0);
    // Restarted with peers, a desk holds its commands until a peer
    // confirms its own log: restored that way it takes its newer events
    // back first and rarely forks (only when the wait passes before any
    // peer answers); restored while cut off, it forks.
    let r = s.restores;
    assert!(r.with_peers >= s.seeds && r.isolated >= s.seeds, "{r:?}");
    assert!(r.isolated_forked * 2 > r.isolated, "{r:?}");
    assert!(r.with_peers_forked * 10 < r.with_peers, "{r:?}");
    assert!(s.held.commands > 0 && s.held.confirmed > 0, "{:?}", s.held);
}

/// Without the hold (`confirm_wait_ms = 0`, as a node started without
/// peers), a desk restored with its peers reachable forks whenever a
/// command reaches it before its first sync round ends.
#[test]
fn without_the_hold_restores_with_peers_fork_more() {
    let run = |wait_ms: u64| {
        let mut sc = Scenario::load("venue-restore").unwrap();
        sc.node.confirm_wait_ms = wait_ms;
        sc.seeds = weftlog_sim::SeedRange { start: 1, end: 21 };
        run_scenario_as(sc, "venue-restore").restores
    };
    let (held, not) = (run(weftlog_proto::replica::CONFIRM_WAIT_MS), run(0));
    assert_eq!(held.with_peers, not.with_peers);
    assert!(
        not.with_peers_forked > held.with_peers_forked,
        "held {held:?}, not held {not:?}"
    );
}

#[test]
fn ci_covers_at_least_500_seeds_and_every_scenario_file() {
    let total: u64 = Scenario::ci().iter().map(|s| s.seeds.len()).sum();
    assert!(total >= 500, "CI runs only {total} seeds");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let sc = Scenario::from_toml(&text, &path.display().to_string()).unwrap();
        assert!(
            BUILTIN.iter().any(|(n, t)| *n == sc.name && *t == text),
            "{} is not built in under its name {:?}",
            path.display(),
            sc.name
        );
    }
    assert_eq!(Scenario::builtin().len(), BUILTIN.len());
    assert_eq!(Scenario::ci().len(), BUILTIN.len());
}

/// Rebalancing (`weftlog_proto::rebalance`, run by the simulated nodes
/// through their replicas) moves rights to the desks that sell while they
/// are connected, and a sale refused while a connected desk is seen with
/// spare rights waits for its transfer: no refusal is left that a
/// connected desk's spare rights covered one round trip before (of the
/// hundreds without rebalancing), and some waiting sales go through.
#[test]
fn rebalancing_leaves_no_refusal_that_spare_rights_could_cover() {
    let on = Scenario::load("venue").expect("built-in scenario");
    let mut off = on.clone();
    off.node.rebalance = false;
    let (mut with, mut without) = (Rebalance::default(), Rebalance::default());
    for seed in 1..21 {
        with += weftlog_sim::run(&on, seed).rebalance;
        without += weftlog_sim::run(&off, seed).rebalance;
    }
    eprintln!("with rebalancing: {with:?}\nwithout: {without:?}");
    assert_eq!((without.asks, without.transfers), (0, 0));
    assert!(with.transfers > 0 && with.rights_moved >= with.transfers);
    assert!(without.avoidable > 50, "{without:?}");
    assert_eq!(with.avoidable, 0, "{with:?}");
    assert!(
        with.waited_sold > 0 && with.waited_sold <= with.waited,
        "{with:?}"
    );
    assert_eq!((without.waited, without.waited_sold), (0, 0), "{without:?}");
}

/// The venue under a risk window: desks cut off keep selling beyond their
/// rights within the overdraft, so more seats are sold than under escrow;
/// every oversold seat is marked identically on every node (the
/// escrow-marks oracle) and compensated by the policy's `on_oversell`
/// (the escrow oracle fails a run with a mark and no compensation). Under
/// escrow nothing is oversold.
#[test]
fn a_risk_window_sells_more_and_every_oversold_seat_is_compensated() {
    let escrow = Scenario::load("venue").expect("built-in scenario");
    let risk = RunOptions {
        policy: Some("risk-window,max_overdraft=3".into()),
        ..RunOptions::default()
    }
    .apply(&escrow);
    let (mut sold, mut oversold, mut compensated) = ([0u64; 2], 0, 0);
    for seed in 1..11 {
        let (e, r) = (
            weftlog_sim::run(&escrow, seed),
            weftlog_sim::run(&risk, seed),
        );
        assert!(
            e.passed() && r.passed(),
            "seed {seed}: {:?} {:?}",
            e.violations,
            r.violations
        );
        assert_eq!(e.oversold.seats, 0, "seed {seed}");
        sold[0] += e.escrow_consumed;
        sold[1] += r.escrow_consumed;
        oversold += r.oversold.seats;
        compensated += r.oversold.compensated;
        assert_eq!(
            r.oversold.released, r.oversold.compensated,
            "waitlist releases"
        );
    }
    assert!(sold[1] > sold[0], "{sold:?}");
    assert!(
        oversold > 0 && compensated == oversold,
        "{oversold} {compensated}"
    );
}
