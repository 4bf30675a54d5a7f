//! Guards that `GET /metrics` tells an operator what happened: two real
//! nodes append, write one field concurrently across a partition, heal and
//! converge, and one imports the other's export (all duplicates); each
//! node's scrape then counts exactly what it appended and received (by sync
//! and by import), shows its peer connected and not behind, the open
//! conflict, its durable log position, and histograms that saw every
//! append; and `promtool check metrics` accepts the text (the test says it
//! was skipped where promtool is missing, except under CI, which installs
//! it).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{converge_to, init, tail, Opts, Proc, DEADLINE};
use serde_json::json;

/// The value of the sample `series` (name and labels as written), if the
/// exposition has it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a sample value is a number"))
}

fn scrape(p: &Proc) -> String {
    let (code, body) = p.get("/metrics");
    assert_eq!(code, 200, "{}: GET /metrics: {body}", p.name);
    body
}

/// Scrapes `p` until `ok` holds of the text, up to [`DEADLINE`].
fn scrape_until(p: &Proc, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let text = scrape(p);
        if ok(&text) {
            return text;
        }
        if t0.elapsed() > DEADLINE {
            panic!(
                "{}: {what} not seen in\n{text}\n--- stderr (tail):\n{}",
                p.name,
                tail(&p.log, 20)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `text`: `None` where promtool is missing,
/// else its exit success and output.
fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

#[test]
fn metrics_count_what_two_nodes_appended_and_received() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&da);
    init(&db);
    let a = Proc::start("a", &da, Opts::default());
    let b = Proc::start(
        "b",
        &db,
        Opts {
            peers: vec![a.quic.clone()],
            ..Default::default()
        },
    );

    for i in 0..4 {
        a.append(
            &format!("attendee/{i}"),
            json!({"kind": "Registered", "set": {"name": format!("A{i}")}}),
        );
    }
    for i in 0..2 {
        b.append(
            "session/7",
            json!({"kind": "Scheduled", "add": {"slots": 1}, "set": {"room": i}}),
        );
    }
    // One field written on both sides of a partition: one open conflict.
    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    a.append(
        "attendee/9",
        json!({"kind": "Badged", "set": {"badge": "red"}}),
    );
    b.append(
        "attendee/9",
        json!({"kind": "Badged", "set": {"badge": "blue"}}),
    );
    a.partition(&[]);
    b.partition(&[]);
    let (appended_a, appended_b) = (5.0, 3.0);
    converge_to(&[&a, &b], 8);

    // `a` imports `b`'s export: every event is one it holds.
    let (data, dups) = {
        let mut r = b
            .agent
            .post(b.url("/v1/export"))
            .send(Vec::<u8>::new())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let data = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap();
        (data, 8.0)
    };
    let mut r = a.agent.post(a.url("/v1/import")).send(data).unwrap();
    let answer = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{answer}");

    let b_peer = format!("{{peer=\"{}\"}}", b.id);
    let ma = scrape_until(&a, "b connected and not behind", |t| {
        value(t, &format!("weftlog_peer_connected{b_peer}")) == Some(1.0)
            && value(t, &format!("weftlog_peer_events_behind{b_peer}")) == Some(0.0)
    });
    for (series, want) in [
        ("weftlog_events_appended_total", appended_a),
        ("weftlog_events_received_total{via=\"sync\"}", appended_b),
        ("weftlog_events_received_total{via=\"import\"}", 0.0),
        ("weftlog_duplicates_received_total{via=\"import\"}", dups),
        ("weftlog_append_latency_seconds_count", appended_a),
        (
            "weftlog_append_latency_seconds_bucket{le=\"+Inf\"}",
            appended_a,
        ),
        ("weftlog_log_durable_position", 8.0),
        ("weftlog_conflicts_open", 1.0),
        ("weftlog_equivocations", 0.0),
    ] {
        assert_eq!(value(&ma, series), Some(want), "a: {series} in\n{ma}");
    }
    let batches = value(&ma, "weftlog_fsync_duration_seconds_count").unwrap_or(0.0);
    assert!(
        (1.0..=8.0).contains(&batches),
        "a: 8 events in 1..=8 batches: {batches}\n{ma}"
    );
    assert!(value(&ma, "weftlog_log_size_bytes").is_some_and(|v| v > 0.0));
    assert!(
        value(&ma, &format!("weftlog_peer_received_bytes_total{b_peer}")).is_some_and(|v| v > 0.0)
    );
    assert!(value(&ma, &format!("weftlog_peer_sent_bytes_total{b_peer}")).is_some_and(|v| v > 0.0));
    // The node's projections report their lag; the SQL mirror's gauge is
    // absent without `--sql`.
    for p in ["kind_counts", "seat_order"] {
        let series = format!("weftlog_projection_lag_events{{projection=\"{p}\"}}");
        assert!(value(&ma, &series).is_some(), "{series} in\n{ma}");
    }
    assert!(!ma.contains("weftlog_sql_lag_events"));

    let a_peer = format!("{{peer=\"{}\"}}", a.id);
    let mb = scrape_until(&b, "a connected and not behind", |t| {
        value(t, &format!("weftlog_peer_events_behind{a_peer}")) == Some(0.0)
    });
    for (series, want) in [
        ("weftlog_events_appended_total", appended_b),
        ("weftlog_events_received_total{via=\"sync\"}", appended_a),
        ("weftlog_duplicates_received_total{via=\"import\"}", 0.0),
        (&format!("weftlog_peer_connected{a_peer}"), 1.0),
        ("weftlog_log_durable_position", 8.0),
        ("weftlog_conflicts_open", 1.0),
    ] {
        assert_eq!(value(&mb, series), Some(want), "b: {series} in\n{mb}");
    }

    // Prometheus asks for OpenMetrics and gets it.
    let mut r = a
        .agent
        .get(a.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .call()
        .unwrap();
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    let om = r.body_mut().read_to_string().unwrap();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# UNIT weftlog_append_latency_seconds seconds"));

    for (name, text) in [("a", &ma), ("b", &mb)] {
        match promtool(text) {
            None => {
                // CI installs it (`.ci/run`): there, missing is a failure.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "promtool not found, and CI must have it (.ci/run installs Debian's prometheus)"
                );
                println!("skipped: promtool not found");
                return;
            }
            Some((ok, said)) => assert!(ok, "{name}: promtool check metrics: {said}\n{text}"),
        }
    }
}
