//! Catch-up subscriptions: `Node::subscribe_from` in process, and
//! `GET /v1/events` / `weftlog log --from --follow` against a running node.
//! Every event is delivered exactly once, in log order, across the hand-over
//! from the log to the live feed, a subscriber that falls far behind, a
//! restart of the node, and a restore from a copy (which starts the reader
//! again from the beginning, saying so).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::server::{copy_dir, init, Opts, Proc, DEADLINE};
use common::set;
use serde_json::{json, Value};
use weftlog::node::{self, Node, FEED_CAP};
use weftlog::subscribe::Positioned;

fn open(dir: &Path) -> Node {
    node::init(dir).unwrap();
    Node::open(dir).unwrap().0
}

/// Reads `n` events from the subscription (failing after [`DEADLINE`]).
fn take(
    rt: &tokio::runtime::Runtime,
    sub: &mut weftlog::subscribe::LogSubscription,
    n: usize,
) -> Vec<Positioned> {
    rt.block_on(async {
        let mut got = Vec::new();
        while got.len() < n {
            let e = tokio::time::timeout(DEADLINE, sub.next())
                .await
                .expect("an event within the deadline")
                .expect("the subscription goes on")
                .expect("no error");
            got.push(e);
        }
        got
    })
}

/// Positions `from+1 ..` in order, each once, with the log's own ids.
fn assert_log_order(node: &Node, got: &[Positioned], from: u64) {
    for (i, e) in got.iter().enumerate() {
        assert_eq!(
            e.pos,
            from + 1 + i as u64,
            "event {i} is out of order or repeated"
        );
    }
    let log = node.read_from(from, got.len()).unwrap();
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        got.iter().map(|e| e.id).collect::<Vec<_>>()
    );
}

#[test]
fn a_subscription_replays_then_follows_with_no_gap_and_no_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let node = open(tmp.path());
    for i in 0..200 {
        node.append(set(&format!("s/{}", i % 7), "f", &i.to_string()))
            .unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut sub = node.subscribe_from(50);
    let node = std::sync::Arc::new(node);
    // Appends go on while the subscriber reads the log and reaches the feed.
    let writer = {
        let node = node.clone();
        thread::spawn(move || {
            for i in 0..300 {
                node.append(set("live", "f", &i.to_string())).unwrap();
            }
        })
    };
    let got = take(&rt, &mut sub, 450);
    writer.join().unwrap();
    assert_log_order(&node, &got, 50);
    assert_eq!(node.durable_pos(), 500);
}

#[test]
fn a_subscriber_far_behind_the_feed_is_caught_up_from_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let node = open(tmp.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sub = node.subscribe_from(0);
    // Each append is its own batch: far more than the feed keeps.
    let n = FEED_CAP * 2 + 100;
    for i in 0..n {
        node.append(set("s", "f", &i.to_string())).unwrap();
    }
    let got = take(&rt, &mut sub, n);
    assert_log_order(&node, &got, 0);
    // And it follows live afterwards.
    node.append(set("s", "f", "last")).unwrap();
    let next = take(&rt, &mut sub, 1);
    assert_eq!(next[0].pos, n as u64 + 1);
}

#[test]
fn tokens_name_one_history_and_a_restored_log_starts_readers_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let copy = tmp.path().join("copy");
    let node = open(&dir);
    for i in 0..10 {
        node.append(set("s", "f", &i.to_string())).unwrap();
    }
    let at5 = node.token_at(5).unwrap().unwrap();
    assert_eq!(
        node.resume(&at5).unwrap(),
        weftlog::subscribe::Resume::After(5)
    );
    let epoch = node.epoch();
    drop(node);
    copy_dir(&dir, &copy);
    let node = Node::open(&dir).unwrap().0;
    assert_eq!(node.epoch(), epoch, "the epoch is kept across restarts");
    for i in 10..20 {
        node.append(set("s", "f", &i.to_string())).unwrap();
    }
    let at15 = node.token_at(15).unwrap().unwrap();
    drop(node);
    // The copy is put back; new events are written at the old positions.
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&copy, &dir);
    let node = Node::open(&dir).unwrap().0;
    for i in 0..10 {
        node.append(set("t", "g", &i.to_string())).unwrap();
    }
    match node.resume(&at15).unwrap() {
        weftlog::subscribe::Resume::Restart(why) => {
            assert!(why.contains("another history"), "{why}")
        }
        r => panic!("a token of the lost history resumed: {r:?}"),
    }
    let mut far = at15;
    far.pos = 25;
    far.check = None;
    assert!(matches!(
        node.resume(&far).unwrap(),
        weftlog::subscribe::Resume::Restart(_)
    ));
    let mut other = at5;
    other.epoch = weftlog::subscribe::Epoch(at5.epoch.0 ^ 1);
    match node.resume(&other).unwrap() {
        weftlog::subscribe::Resume::Restart(why) => assert!(why.contains("epoch"), "{why}"),
        r => panic!("a token of another epoch resumed: {r:?}"),
    }
    // Position 5 still names the same event: the copy holds it.
    assert_eq!(
        node.resume(&at5).unwrap(),
        weftlog::subscribe::Resume::After(5)
    );
}

/// The SSE messages of `GET path` on `p`, read in a thread, sent to the
/// channel as (event name, id, data).
fn sse_reader(
    p: &Proc,
    path: &str,
    last_event_id: Option<&str>,
) -> mpsc::Receiver<(String, Option<String>, Value)> {
    let (tx, rx) = mpsc::channel();
    let url = p.url(path);
    let last = last_event_id.map(str::to_string);
    thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let mut req = agent.get(&url);
        if let Some(l) = &last {
            req = req.header("last-event-id", l);
        }
        let Ok(r) = req.call() else { return };
        let reader = BufReader::new(r.into_body().into_reader());
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if line.is_empty() {
                if !data.is_empty() {
                    let v = serde_json::from_str(&data).unwrap_or(Value::Null);
                    if tx.send((event.clone(), id.clone(), v)).is_err() {
                        return;
                    }
                }
                (event, id, data) = (String::new(), None, String::new());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = v.into();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.into());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
    });
    rx
}

/// The next `n` `event` messages: (token, data).
fn events(rx: &mpsc::Receiver<(String, Option<String>, Value)>, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let (event, id, data) = rx
            .recv_timeout(DEADLINE)
            .expect("an SSE message within the deadline");
        if event == "event" {
            out.push((id.expect("every event has an id"), data));
        }
    }
    out
}

fn append(p: &Proc, stream: &str, i: usize) {
    p.append(stream, json!({"kind": "Noted", "set": {"n": i}}));
}

#[test]
fn sse_replays_follows_filters_and_resumes_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let mut p = Proc::start("a", &dir, Opts::default());
    for i in 0..30 {
        append(&p, if i % 3 == 0 { "room/1" } else { "desk/1" }, i);
    }
    let rx = sse_reader(&p, "/v1/events?from=0", None);
    let first = events(&rx, 30);
    for (i, (_, v)) in first.iter().enumerate() {
        assert_eq!(v["pos"], i + 1);
    }
    // Live, after the replay, with no duplicate at the hand-over.
    for i in 30..40 {
        append(&p, "desk/1", i);
    }
    let live = events(&rx, 10);
    assert_eq!(live[0].1["pos"], 31);
    assert_eq!(live[9].1["pos"], 40);
    let last_token = live[9].0.clone();

    // Filters: a stream prefix, a kind.
    let rooms = sse_reader(&p, "/v1/events?from=0&stream_prefix=room/", None);
    let got = events(&rooms, 10);
    assert!(got.iter().all(|(_, v)| v["stream"] == "room/1"));
    let rx_kind = sse_reader(&p, "/v1/events?from=0&kind=Other", None);
    append(&p, "x", 99);
    p.append("x", json!({"kind": "Other", "set": {"n": 0}}));
    let other = events(&rx_kind, 1);
    assert_eq!(other[0].1["kind"], "Other");
    assert_eq!(other[0].1["pos"], 42);

    // A restart: the client resumes after its Last-Event-ID.
    let (status, _) = p.sigterm();
    assert!(status.success());
    p.launch();
    for i in 0..5 {
        append(&p, "after", i);
    }
    let rx = sse_reader(&p, "/v1/events?from=0", Some(&last_token));
    let resumed = events(&rx, 7);
    let pos: Vec<u64> = resumed
        .iter()
        .map(|(_, v)| v["pos"].as_u64().unwrap())
        .collect();
    assert_eq!(pos, (41..=47).collect::<Vec<_>>());

    // A token of another epoch starts again from the beginning, saying so.
    let mut parts: Vec<String> = last_token.split('-').map(str::to_string).collect();
    parts[0] = format!("{:016x}", u64::from_str_radix(&parts[0], 16).unwrap() ^ 1);
    let rx = sse_reader(&p, "/v1/events", Some(&parts.join("-")));
    let (event, _, data) = rx.recv_timeout(DEADLINE).unwrap();
    assert_eq!(event, "restart");
    assert!(data["reason"].as_str().unwrap().contains("epoch"), "{data}");
    assert_eq!(events(&rx, 1)[0].1["pos"], 1);

    // A bad position is refused with a reason.
    let (code, body) = p.get("/v1/events?from=yesterday");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("a position is"), "{body}");
}

#[test]
fn curl_and_the_cli_read_the_log_in_order_with_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let p = Proc::start("a", &dir, Opts::default());
    for i in 0..12 {
        append(&p, "s", i);
    }
    // curl -N: the replay, then the stream stays open until --max-time.
    let out = Command::new("curl")
        .args(["-N", "-s", "--max-time", "2", &p.url("/v1/events?from=4")])
        .output()
        .expect("curl runs");
    let text = String::from_utf8(out.stdout).unwrap();
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids.len(), 8, "{text}");
    assert!(ids[0].split('-').nth(1) == Some("5"), "{text}");

    // The CLI against the running node: --from, then --follow.
    let exe = env!("CARGO_BIN_EXE_weftlog");
    let from = Command::new(exe)
        .arg("--data")
        .arg(&dir)
        .args(["log", "--from", "10"])
        .output()
        .unwrap();
    assert!(
        from.status.success(),
        "{}",
        String::from_utf8_lossy(&from.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(from.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|v| v["pos"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [11, 12]
    );
    let token = lines[0]["token"].as_str().unwrap().to_string();
    let mut follow = Command::new(exe)
        .arg("--data")
        .arg(&dir)
        .args(["log", "--follow", "--from", &token])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    append(&p, "s", 12);
    let mut seen = BTreeSet::new();
    let mut reader = BufReader::new(stdout);
    while seen.len() < 2 {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "follow ended early"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(seen.insert(v["pos"].as_u64().unwrap()), "repeated: {line}");
    }
    assert_eq!(seen, BTreeSet::from([12, 13]));
    let _ = follow.kill();
    let _ = follow.wait();
    drop(p);
    // And on the stopped node: --from reads its log; --follow says why not.
    let stopped = Command::new(exe)
        .arg("--data")
        .arg(&dir)
        .args(["log", "--from", "12"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(stopped.stdout).unwrap().lines().count(),
        1
    );
    let no = Command::new(exe)
        .arg("--data")
        .arg(&dir)
        .args(["log", "--follow"])
        .output()
        .unwrap();
    assert!(!no.status.success());
    assert!(String::from_utf8_lossy(&no.stderr).contains("needs the node running"));
    thread::sleep(Duration::from_millis(1));
}
