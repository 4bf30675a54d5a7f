//! The desk page in a real browser: `weftlog demo --serve` runs three
//! desks; headless Chromium opens each desk's page, cuts desk A's network
//! from its page, sells workshop seats and edits one attendee's email and
//! notes on both sides, and heals (`tests/browser/desk.mjs`). Every page
//! must show the oversell alert and its compensation, the email conflict
//! with both values, the merged notes and the reconnect notice; a staff
//! override on one page and a conflict resolved on another must show on
//! all three. The desks end with equal state hashes, and the demo stops
//! cleanly at SIGINT. Screenshots are kept in `target/browser-artifacts`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::browser::{missing, Script};
use common::server::{agent, DEADLINE};
use serde_json::Value;

#[test]
fn three_desk_pages_live_through_a_partition() {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .args(["demo", "--serve", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("weftlog runs");
    let stdout = demo.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut urls = Vec::new();
    let mut said = Vec::new();
    while urls.len() < 3 {
        let line = lines
            .recv_timeout(DEADLINE * 2)
            .unwrap_or_else(|_| panic!("demo --serve printed no three URLs: {said:?}"));
        if let Some(at) = line.find("http://") {
            urls.push(line[at..].trim().trim_end_matches('/').to_string());
        }
        said.push(line);
    }
    assert!(said[0].contains("three registration desks"), "{said:?}");

    let mut page = Script::start("desk.mjs", &[&urls[0], &urls[1], &urls[2]]);
    let out = page.next(Duration::from_secs(240));
    assert_eq!(out["phase"], "done", "{out:#}");
    assert_eq!(out["errors"], Value::Array(vec![]), "page errors: {out:#}");
    for s in out["sales"]["a"]
        .as_array()
        .unwrap()
        .iter()
        .chain(out["sales"]["b"].as_array().unwrap())
    {
        assert!(
            s.as_str().unwrap().contains("sold"),
            "every sale was made: {out:#}"
        );
    }
    for desk in ["a", "b", "c"] {
        let shown = &out["shown"][desk];
        let text = |k: &str| shown[k].as_str().unwrap_or_default().to_string();
        assert!(text("oversell").contains("oversold"), "{desk}: {shown:#}");
        assert!(
            text("oversell").contains("compensated"),
            "{desk}: {shown:#}"
        );
        assert!(
            text("reconnect").contains("Back in touch"),
            "{desk}: {shown:#}"
        );
        assert!(
            text("conflict").contains("li.wen@harbor.example"),
            "{desk}: {shown:#}"
        );
        assert!(
            text("conflict").contains("wen.li@newmail.example"),
            "{desk}: {shown:#}"
        );
        // Desk B wrote before the text, desk A after it: both kept, in place.
        let notes = text("notes");
        let merged = "B: arrives by wheelchair. needs step-free access - A: prefers an aisle seat";
        assert_eq!(notes, merged, "{desk}");
        // 14 sold of 12; the 2 oversold went to the waitlist.
        assert!(
            text("sessions").starts_with("12 sold of 12"),
            "{desk}: {shown:#}"
        );
        let after = &shown["after"];
        assert!(
            after["oversell"]
                .as_str()
                .unwrap()
                .contains("decided by staff"),
            "{desk}: {after:#}"
        );
        let email = after["email"].as_str().unwrap();
        assert!(
            email == "li.wen@harbor.example" || email == "wen.li@newmail.example",
            "{desk}: {email}"
        );
    }
    let emails: Vec<&str> = ["a", "b", "c"]
        .iter()
        .map(|d| out["shown"][d]["after"]["email"].as_str().unwrap())
        .collect();
    assert!(
        emails.iter().all(|e| *e == emails[0]),
        "one email everywhere: {emails:?}"
    );
    page.finish();

    // The desks converge: equal state hashes.
    let agent = agent();
    let start = Instant::now();
    loop {
        let hashes: Vec<String> = urls
            .iter()
            .map(|u| {
                let mut r = agent.get(format!("{u}/v1/status")).call().unwrap();
                let v: Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                v["state_hash"].as_str().unwrap().to_string()
            })
            .collect();
        if hashes.iter().all(|h| *h == hashes[0]) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the desks did not converge: {hashes:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGINT stops the demo in order.
    unsafe { libc::kill(demo.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    loop {
        if let Some(status) = demo.try_wait().unwrap() {
            assert!(status.success(), "demo --serve exit: {status}");
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "demo --serve did not stop at SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("SIGINT: stopping the desks")),
        "{rest:?}"
    );
}
