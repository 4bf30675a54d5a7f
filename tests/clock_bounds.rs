//! Guards the clock bound with real processes and real (faked) clocks: in a
//! cluster of two honest nodes, one whose wall clock runs an hour ahead and
//! one an hour behind (libfaketime, CLOCK_REALTIME only), the honest nodes'
//! new events keep hlcs at their wall time instead of following the fast
//! node's, every node still converges to the same state hash, and `status`
//! (HTTP and CLI) lists the events beyond each node's horizon.
//!
//! Needs Debian's `faketime` package (`.ci/run` installs it); without
//! libfaketime the test says so and passes without running.

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::server::{converge_to, init, Opts, Proc};
use serde_json::{json, Value};
use weftlog_proto::hlc::MAX_CLOCK_AHEAD_MS;
use weftlog_proto::Hlc;

/// Where Debian's `faketime` package puts the library, per architecture.
const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// How far the fast and the slow node's clocks are off.
const HOUR_MS: u64 = 3_600_000;

/// The test's (true) wall time.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Starts `weftlog run` with `env` added to its environment.
fn start<'a>(name: &str, dir: &Path, peers: &[&str], env: &[(&'a str, &'a str)]) -> Proc {
    Proc::start(
        name,
        dir,
        Opts {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            env: env.to_vec(),
            ..Default::default()
        },
    )
}

/// The milliseconds of an hlc as `append` and `status` print it.
fn hlc_ms(v: &Value) -> u64 {
    Hlc(v.as_u64().unwrap_or_else(|| panic!("not an hlc: {v}"))).ms()
}

#[test]
fn a_fast_and_a_slow_clock_do_not_drag_the_honest_nodes() {
    let Some(lib) = LIBFAKETIME.iter().find(|p| Path::new(p).exists()) else {
        eprintln!(
            "SKIPPED clock_bounds: libfaketime not found at {LIBFAKETIME:?}; \
             `apt-get install faketime` to run this test"
        );
        return;
    };
    // Only CLOCK_REALTIME is faked: tokio's and quinn's timers keep the
    // true monotonic clock.
    let faked = |offset: &'static str| {
        vec![
            ("LD_PRELOAD", *lib),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        init(&d);
        d
    };
    let (da, db, df, ds) = (dir("a"), dir("b"), dir("fast"), dir("slow"));
    let a = start("a", &da, &[], &[]);
    let f = start("fast", &df, &[&a.quic], &faked("+1h"));
    let s = start("slow", &ds, &[&a.quic], &faked("-1h"));
    let b = start("b", &db, &[&a.quic, &f.quic, &s.quic], &[]);
    let all = [&a, &b, &f, &s];

    // Everyone writes one field and a counter.
    let write = |p: &Proc, i: u64| {
        p.append(
            "attendee/1",
            json!({"kind": "Edited", "set": {"email": format!("{}-{i}", p.name)}, "add": {"n": 1}}),
        )
    };
    let t0 = wall_ms();
    let f1 = write(&f, 1);
    assert!(
        hlc_ms(&f1["hlc"]) >= t0 + HOUR_MS - 60_000,
        "libfaketime did not move the fast node's clock: {f1} at {t0}"
    );
    let s1 = write(&s, 1);
    assert!(hlc_ms(&s1["hlc"]) <= t0 - HOUR_MS + 60_000, "{s1} at {t0}");
    converge_to(&all, 2);
    let f2 = write(&f, 2);
    converge_to(&all, 3);

    // The honest nodes hold the fast node's events, but their new events
    // carry their own wall time, not the fast node's hour.
    let mut events = 3;
    for round in 0..3u64 {
        for p in [&a, &b] {
            let before = wall_ms();
            let e = write(p, round);
            let after = wall_ms();
            let ms = hlc_ms(&e["hlc"]);
            assert!(
                (before..=after + 1_000).contains(&ms),
                "{}: new event at hlc ms {ms}, wall time {before}..{after}: {e}",
                p.name
            );
            events += 1;
        }
        // The slow node's events stay at its wall time too: everything
        // else is beyond its horizon.
        let before = wall_ms();
        let e = write(&s, round + 2);
        let ms = hlc_ms(&e["hlc"]);
        assert!(
            ms + HOUR_MS <= wall_ms() + 1_000 && ms + HOUR_MS + 60_000 >= before,
            "slow: new event at hlc ms {ms}, wall time {before}: {e}"
        );
        events += 1;
        converge_to(&all, events);
    }
    let hash = converge_to(&all, events);
    eprintln!("converged: {events} events, state hash {hash}");

    // Status lists the fast node's events at every honest node: how many,
    // and the furthest (its last) with how far ahead it is.
    for p in [&a, &b] {
        let ahead = &p.status()["ahead"];
        eprintln!("{} GET /v1/status ahead: {ahead}", p.name);
        assert_eq!(ahead["bound_ms"], MAX_CLOCK_AHEAD_MS, "{}", p.name);
        assert_eq!(ahead["events"], 2, "{}: {ahead}", p.name);
        let far = &ahead["furthest"];
        assert_eq!(far["author"], f.id.as_str(), "{}: {ahead}", p.name);
        assert_eq!(far["seq"], 2, "{}: {ahead}", p.name);
        assert_eq!(far["id"], f2["id"], "{}: {ahead}", p.name);
        assert_eq!(far["hlc"], f2["hlc"], "{}: {ahead}", p.name);
        let ahead_ms = far["ahead_ms"].as_u64().unwrap();
        assert!(
            (HOUR_MS - 60_000..=HOUR_MS).contains(&ahead_ms),
            "{}: {ahead}",
            p.name
        );
    }
    // The CLI, given a running node's directory, shows the same.
    let r = common::weftlog(&da, &["status"]);
    assert_eq!(r.code, Some(0), "status: {}", r.stderr);
    let cli: Value = serde_json::from_str(&r.stdout).unwrap();
    eprintln!("a: weftlog status ahead: {}", cli["ahead"]);
    assert_eq!(cli["ahead"]["events"], 2);
    assert_eq!(cli["ahead"]["furthest"]["id"], f2["id"]);
    // The fast node sees nothing ahead; the slow one sees everyone else's.
    assert_eq!(f.status()["ahead"]["events"], 0);
    let slow = &s.status()["ahead"];
    eprintln!("slow GET /v1/status ahead: {slow}");
    assert_eq!(slow["events"].as_u64().unwrap(), events - 4, "{slow}");
    assert_eq!(slow["furthest"]["id"], f2["id"], "{slow}");
}
