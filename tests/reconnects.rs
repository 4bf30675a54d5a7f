//! Guards "changes while you were offline" with real nodes on loopback: two
//! desks cut off from each other both edit one attendee's email, each edits
//! another stream, one sells seats; after the heal each desk's
//! `/v1/reconnects` names the other's concurrent events by stream and
//! field with the email conflict marked, and a `reconciled` notice carries
//! it. The list survives a restart (and `weftlog reconnects` reads it); a
//! desk restarted while cut off still reports after the heal; a short blip
//! with nothing concurrent stores nothing.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::server::{pair, tail, Proc, DEADLINE};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_millis(50);

/// Polls `f` until it gives something, up to [`DEADLINE`].
fn wait<T>(p: &Proc, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() > DEADLINE {
            panic!(
                "{}: {what}: not within {DEADLINE:?}; stderr:\n{}",
                p.name,
                tail(&p.log, 30)
            );
        }
        thread::sleep(POLL);
    }
}

/// Waits until `a` and `b` hold `events` events each and equal states.
fn converge(a: &Proc, b: &Proc, events: u64) {
    wait(a, "convergence", || {
        let (sa, sb) = (a.status(), b.status());
        (sa["events"] == events && sb["events"] == events && sa["state_hash"] == sb["state_hash"])
            .then_some(())
    });
}

fn reconnects(p: &Proc) -> Vec<Value> {
    p.get_json("/v1/reconnects")["reconnects"]
        .as_array()
        .unwrap()
        .clone()
}

/// The first report that names something received.
fn report(p: &Proc) -> Value {
    wait(p, "a reconnect report", || {
        reconnects(p)
            .into_iter()
            .find(|r| r["received"].as_u64() > Some(0))
    })
}

fn set(field: &str, value: &str, user: &str) -> Value {
    json!({"kind": "Changed", "set": {field: value}, "user": user})
}

/// The report's entry for `stream`.
fn stream<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == name)
        .unwrap_or_else(|| panic!("no {name} in {r:#}"))
}

fn field<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == name)
        .unwrap_or_else(|| panic!("no field {name} in {s:#}"))
}

/// Registers attendees 7, 8, 9 and a session of 10 seats (5 held by `b`),
/// then cuts `a` and `b` off from each other.
fn setup_and_cut(a: &Proc, b: &Proc) {
    for id in [7, 8, 9] {
        a.append(
            &format!("attendee/{id}"),
            json!({"kind": "AttendeeRegistered", "set": {"name": format!("A{id}"), "email": "old@x"}}),
        );
    }
    a.append(
        "session/1",
        json!({"kind": "SessionScheduled", "escrow_init": {"seats": 10},
               "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 5}]}),
    );
    converge(a, b, 4);
    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
}

#[test]
fn concurrent_edits_are_reported_on_both_sides_and_kept_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let [mut a, b] = pair(tmp.path(), &[]);
    setup_and_cut(&a, &b);
    a.append("attendee/7", set("email", "ann@a", "ann"));
    a.append("attendee/8", set("phone", "555", "ann"));
    b.append("attendee/7", set("email", "bob@b", "bob"));
    b.append("attendee/9", set("company", "Acme", "bob"));
    b.append(
        "session/1",
        json!({"kind": "SeatsPurchased", "escrow_consume": {"seats": 2}, "user": "bob"}),
    );
    let notices = a.sse("/v1/notifications", None);
    thread::sleep(Duration::from_millis(200));
    a.partition(&[]);
    b.partition(&[]);

    let ra = report(&a);
    assert_eq!(ra["peer"], b.id.as_str(), "{ra:#}");
    assert_eq!(
        (&ra["own_events"], &ra["received"]),
        (&json!(2), &json!(3)),
        "{ra:#}"
    );
    assert_eq!(ra["conflicts"], 1, "{ra:#}");
    let email = field(stream(&ra, "attendee/7"), "email");
    assert_eq!(email["conflict"], true, "{email:#}");
    assert_eq!(email["theirs"][0]["value"], "bob@b", "{email:#}");
    assert_eq!(email["theirs"][0]["user"], "bob", "{email:#}");
    assert_eq!(email["theirs"][0]["author"], b.id.as_str(), "{email:#}");
    assert_eq!(email["ours"][0]["value"], "ann@a", "{email:#}");
    let company = field(stream(&ra, "attendee/9"), "company");
    assert_eq!(
        (&company["conflict"], &company["shown"]),
        (&json!(false), &json!("Acme"))
    );
    let seats = &stream(&ra, "session/1")["counters"][0];
    assert_eq!(seats["counter"], "seats", "{seats:#}");
    assert_eq!(seats["escrow"], true, "{seats:#}");
    assert_eq!(
        seats["theirs"][0]["change"],
        json!({"sold": 2}),
        "{seats:#}"
    );
    assert_eq!(seats["value"], 8, "{seats:#}");
    assert!(
        ra["streams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["stream"] != "attendee/8"),
        "nothing others did there: {ra:#}"
    );

    let rb = report(&b);
    assert_eq!(rb["peer"], a.id.as_str(), "{rb:#}");
    assert_eq!(
        (&rb["own_events"], &rb["received"]),
        (&json!(3), &json!(2)),
        "{rb:#}"
    );
    let email = field(stream(&rb, "attendee/7"), "email");
    assert_eq!(email["conflict"], true, "{email:#}");
    assert_eq!(email["theirs"][0]["value"], "ann@a", "{email:#}");
    assert_eq!(email["ours"][0]["value"], "bob@b", "{email:#}");
    assert_eq!(field(stream(&rb, "attendee/8"), "phone")["shown"], "555");
    // Both desks show the same merged value.
    assert_eq!(
        field(stream(&ra, "attendee/7"), "email")["shown"],
        email["shown"]
    );

    let t0 = Instant::now();
    let told = loop {
        let (kind, _, data) = notices
            .recv_timeout(DEADLINE.saturating_sub(t0.elapsed()))
            .expect("a reconciled notice");
        if kind == "reconciled" {
            break data;
        }
    };
    assert_eq!(told, ra);

    // Kept across a restart, and readable with the CLI from the file.
    let before = reconnects(&a);
    a.sigterm();
    let cli = common::weftlog(&a.dir, &["reconnects"]);
    assert_eq!(cli.code, Some(0), "{}", cli.stderr);
    let lines: Vec<Value> = cli
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, before);
    a.launch();
    let after = reconnects(&a);
    assert!(after.ends_with(&before), "{after:#?}");
    assert_eq!(after.last().unwrap()["seq"], 1);
}

#[test]
fn a_desk_restarted_while_cut_off_still_reports_after_the_heal() {
    let tmp = tempfile::tempdir().unwrap();
    let [mut a, b] = pair(tmp.path(), &[]);
    setup_and_cut(&a, &b);
    a.append("attendee/7", set("email", "ann@a", "ann"));
    b.append("attendee/7", set("email", "bob@b", "bob"));
    a.sigterm();
    a.launch();
    // B still blocks A: A cannot reach it until B heals.
    thread::sleep(Duration::from_millis(500));
    assert!(reconnects(&a).is_empty());
    b.partition(&[]);
    let ra = report(&a);
    assert_eq!(
        (&ra["own_events"], &ra["received"]),
        (&json!(1), &json!(1)),
        "{ra:#}"
    );
    let email = field(stream(&ra, "attendee/7"), "email");
    assert_eq!(email["conflict"], true, "{email:#}");
    assert_eq!(email["ours"][0]["value"], "ann@a", "{email:#}");
    assert!(
        ra["offline_ms"].as_u64().unwrap() >= 500,
        "the period began before the restart: {ra:#}"
    );
}

#[test]
fn a_short_blip_with_nothing_concurrent_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = pair(tmp.path(), &[]);
    a.append("attendee/7", set("email", "a@x", "ann"));
    converge(&a, &b, 1);
    a.partition(&[&b.id]);
    a.append("attendee/7", set("email", "b@x", "ann"));
    a.partition(&[]);
    converge(&a, &b, 2);
    // Several anti-entropy rounds: the period has closed by now.
    thread::sleep(Duration::from_millis(1500));
    for p in [&a, &b] {
        assert_eq!(reconnects(p), Vec::<Value>::new(), "{}", p.name);
        assert!(!p.dir.join("reconnects.jsonl").exists(), "{}", p.name);
    }
}
