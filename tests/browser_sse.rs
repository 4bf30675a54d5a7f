//! A real EventSource in headless Chromium subscribes to `GET /v1/events`
//! from the beginning; the node is restarted mid-stream (same HTTP
//! address) and more events are appended; the page must end with every
//! event exactly once, in log order, having reconnected by itself with
//! `Last-Event-ID`. The screenshot is kept in `target/browser-artifacts`.

mod common;

use std::time::Duration;

use common::browser::{missing, Script};
use common::server::{free_port, init, Opts, Proc, DEADLINE};
use serde_json::json;

const FIRST: usize = 150;
const MORE: usize = 150;

#[test]
fn an_event_source_gets_every_event_once_across_a_node_restart() {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let http = free_port();
    let mut p = Proc::start(
        "a",
        &dir,
        Opts {
            http: Some(http.clone()),
            ..Opts::default()
        },
    );
    for i in 0..FIRST {
        p.append("s", json!({"kind": "Noted", "set": {"n": i}}));
    }
    let total = (FIRST + MORE).to_string();
    let mut page = Script::start(
        "sse_restart.mjs",
        &[&format!("http://{http}"), &FIRST.to_string(), &total],
    );
    let first = page.next(DEADLINE * 2);
    assert_eq!(first["phase"], "first", "{first}");
    let (status, _) = p.sigterm();
    assert!(status.success());
    // Appended while the page is cut off: it must get them on reconnecting.
    p.launch();
    for i in 0..MORE {
        p.append("s", json!({"kind": "Noted", "set": {"n": FIRST + i}}));
    }
    page.send("go");
    let done = page.next(DEADLINE * 3);
    assert_eq!(done["phase"], "done", "{done}");
    let pos: Vec<u64> = done["pos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(pos, (1..=(FIRST + MORE) as u64).collect::<Vec<_>>());
    let ids: Vec<String> = done["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let (code, body) = p.get("/v1/log?from=0");
    assert_eq!(code, 200);
    let log: Vec<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, log, "the page's events are the log's, in log order");
    assert!(
        done["opens"].as_u64().unwrap() >= 2,
        "the page reconnected: {done}"
    );
    assert_eq!(done["errors"], json!([]));
    page.finish();
    std::thread::sleep(Duration::from_millis(1));
}
