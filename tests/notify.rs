//! Guards staff notification (`--notify-url`) against real `weftlog run`
//! processes and a local receiver that fails the first two requests: two
//! desks oversell under the risk window across a partition, and after the
//! heal the receiver is told of each oversold sale once, by the desk whose
//! compensation took effect, with the sale as the idempotency key, after
//! retries; a restart sends nothing that was acknowledged.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{pair, DEADLINE};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_millis(50);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    key: Option<String>,
    content_type: Option<String>,
    body: Value,
    accepted: bool,
}

/// A receiver on loopback that answers 503 to the first `fail` requests
/// and 200 after; every request is kept.
fn receiver(fail: usize) -> (String, Arc<Mutex<Vec<Got>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let kept = got.clone();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut headers = BTreeMap::new();
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let mut g = kept.lock().unwrap();
            let accepted = g.len() >= fail;
            g.push(Got {
                key: headers.get("idempotency-key").cloned(),
                content_type: headers.get("content-type").cloned(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                accepted,
            });
            drop(g);
            let status = if accepted {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
        thread::sleep(POLL);
    }
}

#[test]
fn each_oversold_sale_is_sent_once_by_the_desk_that_compensated_it() {
    let (url, got) = receiver(2);
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = pair(tmp.path(), &["--notify-url", &url]);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.append(
        "session/7",
        json!({"kind": "SessionOpened", "escrow_init": {"seats": 10},
               "escrow_policy": {"seats": {"mode": "risk-window", "max_overdraft": 3}},
               "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 5}]}),
    );
    for n in [a, b] {
        wait("a sync round after the setup", || {
            n.status()["seats"][0]["may_sell"] == 8
        });
    }
    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    for (n, beyond) in [(a, 2), (b, 3)] {
        for seats in [5, beyond] {
            let body = json!({"kind": "SeatsSold", "escrow_consume": {"seats": seats}});
            let (code, e) = n.post("/v1/streams/session/7/events", &body);
            assert_eq!(code, 201, "{}: {e}", n.name);
        }
    }
    a.partition(&[]);
    b.partition(&[]);

    // Both desks agree on two compensated sales.
    let mut rows = Vec::new();
    wait("two compensated sales on both desks", || {
        let ra = a.get_json("/v1/oversold");
        let rb = b.get_json("/v1/oversold");
        let done = ra.as_array().unwrap().len() == 2
            && ra
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["state"] == "compensated");
        rows = ra.as_array().unwrap().clone();
        done && ra == rb
    });
    let by_sale: BTreeMap<String, Value> = rows
        .iter()
        .map(|r| (r["sale"].as_str().unwrap().to_string(), r.clone()))
        .collect();

    // The receiver is told of each, after two failures.
    wait("an accepted notification per sale", || {
        let g = got.lock().unwrap();
        by_sale
            .keys()
            .all(|s| g.iter().any(|x| x.accepted && x.key.as_deref() == Some(s)))
    });
    // Time for anything that would come twice to come.
    thread::sleep(Duration::from_secs(4));
    let seen = got.lock().unwrap().clone();
    assert!(
        seen.len() >= 4,
        "two failures, then two deliveries: {seen:#?}"
    );
    assert!(!seen[0].accepted && !seen[1].accepted);
    let accepted: Vec<&Got> = seen.iter().filter(|x| x.accepted).collect();
    assert_eq!(accepted.len(), 2, "one per sale: {seen:#?}");
    for x in &accepted {
        let key = x.key.as_deref().expect("an Idempotency-Key header");
        let row = &by_sale[key];
        let write = &row["compensation"]["write"];
        assert_eq!(x.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            x.body,
            json!({
                "sale": key,
                "stream": "session/7",
                "counter": "seats",
                "action": "waitlist",
                "seats": row["units"],
                "node": write["author"],
                "event": write["event"],
            }),
            "sent by the desk whose compensation took effect"
        );
    }
    // Every request, failed or not, was about one of the sales, from the
    // desk that wrote its compensation.
    for x in &seen {
        let key = x.key.as_deref().unwrap();
        assert_eq!(
            x.body["node"],
            by_sale[key]["compensation"]["write"]["author"]
        );
    }
    for n in [a, b] {
        let text = std::fs::read_to_string(n.dir.join("notified.jsonl")).unwrap_or_default();
        let mine = accepted
            .iter()
            .filter(|x| x.body["node"] == n.id.as_str())
            .count();
        assert_eq!(text.lines().count(), mine, "{}: {text}", n.name);
    }

    // A restart sends nothing again.
    for n in nodes.iter_mut() {
        let (status, _) = n.sigterm();
        assert!(status.success(), "{}: {status}", n.name);
        n.launch();
    }
    thread::sleep(Duration::from_secs(5));
    assert_eq!(
        got.lock().unwrap().len(),
        seen.len(),
        "nothing sent again after a restart"
    );
}
