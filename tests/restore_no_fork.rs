//! A node restored from a backup of its data directory does not fork when
//! its peers are reachable: on start it holds appends until a peer has
//! confirmed how much of its own log it holds, takes back the events the
//! backup lacked, and appends after them; `status` says by whom and when
//! its own frontier was confirmed. Offline it starts anyway and appends
//! once the wait passes, unconfirmed.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::server::{converge_to, copy_dir, init, post, tail, Opts, Proc};

fn sale(p: &Proc, n: u64) -> Value {
    p.append("desk/a", json!({ "kind": "Sold", "set": { "n": n } }))
}

#[test]
fn a_restored_node_takes_its_own_events_back_before_it_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (da, db, dc) = (t.join("a"), t.join("b"), t.join("c"));
    let (ia, ib, ic) = (init(&da), init(&db), init(&dc));
    let b = Proc::start("b", &db, Opts::default());
    let c = Proc::start(
        "c",
        &dc,
        Opts {
            peers: vec![b.quic.clone()],
            ..Opts::default()
        },
    );
    let mut a = Proc::start(
        "a",
        &da,
        Opts {
            peers: vec![b.quic.clone(), c.quic.clone()],
            extra: vec!["--confirm-wait-ms", "20000"],
            ..Opts::default()
        },
    );
    assert_eq!(sale(&a, 1)["seq"], 1);
    assert_eq!(sale(&a, 2)["seq"], 2);
    converge_to(&[&a, &b, &c], 2);
    let s = a.status();
    assert_eq!(s["own_frontier"]["confirmed"], true, "{s}");

    // A backup taken while A runs; A goes on, and its peers hold it all.
    let backup = t.join("a-backup");
    copy_dir(&da, &backup);
    assert_eq!(sale(&a, 3)["seq"], 3);
    assert_eq!(sale(&a, 4)["seq"], 4);
    converge_to(&[&a, &b, &c], 4);

    // A's disk is lost; the backup comes back. Its peers keep it out for
    // a moment, so that an append surely arrives before any round.
    let (status, _) = a.sigterm();
    assert!(status.success(), "{}", tail(&a.log, 20));
    fs::remove_dir_all(&da).unwrap();
    fs::rename(&backup, &da).unwrap();
    b.partition(&[&ia]);
    c.partition(&[&ia]);
    a.launch();
    let (agent, url) = (a.agent.clone(), a.url("/v1/streams/desk/a/events"));
    let append = thread::spawn(move || {
        post(&agent, &url, &json!({ "kind": "Sold", "set": { "n": 5 } })).unwrap()
    });
    thread::sleep(Duration::from_millis(700));
    assert!(!append.is_finished(), "the append is held, not refused");
    assert_eq!(a.status()["own_frontier"]["confirmed"], false);
    b.partition(&[]);
    c.partition(&[]);
    let (code, e) = append.join().unwrap();
    assert_eq!(code, 201, "{e}");
    assert_eq!(e["seq"], 5, "appended after its own events taken back: {e}");
    converge_to(&[&a, &b, &c], 5);
    let s = a.status();
    let own = &s["own_frontier"];
    assert_eq!(own["confirmed"], true, "{s}");
    assert_eq!(own["seq"], 4, "{own}");
    assert!(own["at_ms"].as_u64().is_some(), "{own}");
    let by: BTreeSet<&str> = own["by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !by.is_empty() && by.iter().all(|p| *p == ib || *p == ic),
        "{own}"
    );
    for p in [&a, &b, &c] {
        let s = p.status();
        assert_eq!(s["equivocations"], json!([]), "{}: no fork: {s}", p.name);
    }
    assert_eq!(s["frontier"][&ia]["seq"], 5);

    // Offline: no peer answers; A starts anyway and appends once the wait
    // is over, unconfirmed.
    drop((b, c));
    let (status, _) = a.sigterm();
    assert!(status.success());
    let i = a.args.iter().position(|x| x == "20000").unwrap();
    a.args[i] = "1500".into();
    a.launch();
    let t0 = Instant::now();
    let e = sale(&a, 6);
    let waited = t0.elapsed();
    assert_eq!(e["seq"], 6, "{e}");
    assert!(
        waited >= Duration::from_millis(1_000),
        "the append waited for a confirmation: {waited:?}"
    );
    let s = a.status();
    let own = &s["own_frontier"];
    assert_eq!(own["confirmed"], false, "{s}");
    assert_eq!(own["by"], json!([]), "{own}");
    assert!(own["wait_until_ms"].as_u64().is_some(), "{own}");
}
