//! A seed replays exactly: two runs of one seed give the same trace hash
//! and the same report; different seeds differ; and the determinism check
//! catches a run that is not a function of its seed.

use weftlog_sim::cli::run_seeds;
use weftlog_sim::node::Sabotage;
use weftlog_sim::scenario::{Scenario, SeedRange};
use weftlog_sim::{run, RunOptions};

#[test]
fn every_scenario_replays_its_seeds_exactly() {
    for sc in Scenario::ci() {
        let seeds = SeedRange {
            start: sc.seeds.start,
            end: sc.seeds.start + 3,
        };
        let runs = run_seeds(&sc, &RunOptions::default(), seeds, 1, true, &mut |_| {});
        let mut hashes = Vec::new();
        for r in &runs {
            assert!(r.passed(), "{}: {:?}", r.replay, r.violations);
            hashes.push(r.trace_hash.clone());
        }
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), 3, "{}: seeds share a trace", sc.name);
        let a = run(&sc, seeds.start);
        let b = run(&sc, seeds.start);
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_eq!(a.state_hash, b.state_hash);
        assert_eq!(a.events, b.events);
        assert_eq!(a.messages, b.messages);
        assert_eq!(a.faults, b.faults);
        assert_eq!(a.convergence_ms, b.convergence_ms);
    }
}

#[test]
fn the_determinism_check_catches_a_run_that_is_not_a_function_of_its_seed() {
    let sc = Scenario::load("venue").unwrap();
    let opts = RunOptions {
        sabotage: Sabotage::Nondeterministic,
        duration_s: Some(8.0),
        ..RunOptions::default()
    };
    let runs = run_seeds(&sc, &opts, SeedRange::one(5), 1, true, &mut |_| {});
    assert!(
        runs[0].violations.iter().any(|v| v.oracle == "determinism"),
        "{:?}",
        runs[0].violations
    );
}

#[test]
fn restores_and_forks_replay_exactly_too() {
    // Left out of the CI seed set (forks do not converge yet), but a run
    // with restores is still a function of its seed.
    let mut sc = Scenario::load("venue-restore").unwrap();
    sc.quiesce_timeout_s = 5.0;
    let opts = RunOptions {
        duration_s: Some(26.0),
        ..RunOptions::default()
    };
    let a = weftlog_sim::run_with(&sc, 2, &opts, &mut |_| {});
    let b = weftlog_sim::run_with(&sc, 2, &opts, &mut |_| {});
    assert!(a.faults.get("restores").copied().unwrap_or(0) >= 2);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.faults, b.faults);
    assert_eq!(a.forks, b.forks);
    assert_eq!(a.violations, b.violations);
}
