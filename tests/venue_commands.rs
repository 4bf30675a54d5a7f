//! Guards the conference commands end to end, against real `weftlog run`
//! nodes: every command through `POST /v1/venue/commands`, a retried
//! command id taking effect once, the seat figures the page reads (a
//! cancellation puts seats back on sale, a sale beyond the rights is
//! refused under `escrow` and sold on credit under `risk-window`), an email
//! changed on both sides of a partition shown as a conflict with both
//! values and authors and resolved on both desks, and the answers to bad
//! bodies (400 naming the field) and unknown attendees (404).

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::server::{init, pair, tail, Opts, Proc, DEADLINE};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_millis(50);

fn command(n: &Proc, body: Value) -> (u16, Value) {
    n.post("/v1/venue/commands", &body)
}

/// Runs a command that must take effect (201); its answer.
fn run(n: &Proc, body: Value) -> Value {
    let (code, v) = command(n, body.clone());
    assert_eq!(code, 201, "{}: {body}: {v}", n.name);
    v
}

fn session(n: &Proc, id: &str) -> Value {
    let all = n.get_json("/v1/venue/sessions");
    all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{}: no session {id}: {all}", n.name))
}

/// Polls `what` on `n` until `ok`, up to [`DEADLINE`].
fn wait(n: &Proc, what: &str, get: impl Fn() -> Value, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let v = get();
        if ok(&v) {
            return v;
        }
        if t0.elapsed() > DEADLINE {
            panic!(
                "{}: {what}: not within {DEADLINE:?}: {v}\n--- stderr (tail):\n{}",
                n.name,
                tail(&n.log, 20)
            );
        }
        thread::sleep(POLL);
    }
}

fn converged(a: &Proc, b: &Proc) {
    wait(
        a,
        "convergence",
        || json!([a.status()["state_hash"], b.status()["state_hash"]]),
        |v| v[0] == v[1],
    );
}

#[test]
fn every_command_end_to_end_on_one_desk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("desk");
    init(&dir);
    let n = Proc::start("desk", &dir, Opts::default());

    let v = run(
        &n,
        json!({"type": "ScheduleSession", "command_id": "s-1", "user": "Ana",
               "session_id": "rust-101", "name": "Rust 101", "capacity": 3,
               "starts": "Tue 10:00", "room": "B2"}),
    );
    assert_eq!(v["kind"], "SessionScheduled", "{v}");
    assert_eq!(v["stream"], "session/rust-101", "{v}");
    assert_eq!(v["event"]["version"], 1, "{v}");
    // The id is taken: scheduling it again is a conflict.
    let (code, e) = command(
        &n,
        json!({"type": "ScheduleSession", "command_id": "s-2",
               "session_id": "rust-101", "name": "Again", "capacity": 1}),
    );
    assert_eq!(code, 409, "{e}");

    run(
        &n,
        json!({"type": "RegisterAttendee", "command_id": "r-1", "attendee_id": "bo",
               "name": "Bo Lind", "email": "bo@example.org", "company": "Acme"}),
    );
    run(
        &n,
        json!({"type": "RegisterAttendee", "command_id": "r-2", "attendee_id": "cy",
               "name": "Cy Adams", "email": "cy@example.org"}),
    );
    for (ty, value, kind) in [
        ("ChangeName", "Bo Lindqvist", "NameChanged"),
        ("ChangeEmail", "bo@lind.se", "EmailChanged"),
        ("ChangePhone", "+46 70 123", "PhoneChanged"),
        ("ChangeCompany", "Acme AB", "CompanyChanged"),
    ] {
        let v = run(
            &n,
            json!({"type": ty, "command_id": format!("c-{ty}"), "attendee_id": "bo",
                   "value": value}),
        );
        assert_eq!(v["kind"], kind, "{v}");
    }
    // A stale screen: the expected version no longer matches.
    let (code, e) = command(
        &n,
        json!({"type": "ChangeName", "command_id": "c-stale", "attendee_id": "bo",
               "value": "X", "expected_version": 1}),
    );
    assert_eq!(code, 409, "{e}");

    let v = run(
        &n,
        json!({"type": "EditNotes", "command_id": "n-1", "attendee_id": "bo",
               "splices": [[0, 0, "vegan"]]}),
    );
    assert_eq!(v["kind"], "NotesEdited");
    let bo = n.get_json("/v1/venue/attendees/bo");
    run(
        &n,
        json!({"type": "EditNotes", "command_id": "n-2", "attendee_id": "bo",
               "splices": [[5, 0, ", no nuts"]], "base": bo["notes_heads"]}),
    );
    let v = run(
        &n,
        json!({"type": "PrintBadge", "command_id": "b-1", "attendee_id": "bo"}),
    );
    assert_eq!(v["kind"], "BadgePrinted");

    let bo = n.get_json("/v1/venue/attendees/bo");
    assert_eq!(bo["name"], "Bo Lindqvist", "{bo}");
    assert_eq!(bo["email"], "bo@lind.se", "{bo}");
    assert_eq!(bo["phone"], "+46 70 123", "{bo}");
    assert_eq!(bo["company"], "Acme AB", "{bo}");
    assert_eq!(bo["badge_printed"], true, "{bo}");
    assert_eq!(bo["notes"], "vegan, no nuts", "{bo}");
    assert_eq!(bo["conflicts"], json!([]), "{bo}");
    assert_eq!(bo["fields"]["email"]["value"], "bo@lind.se", "{bo}");

    // Seats: sell two of three, a retry takes effect once.
    let buy = json!({"type": "PurchaseSeats", "command_id": "p-1", "user": "Ana",
                     "session_id": "rust-101", "attendee_id": "bo", "seats": 2});
    let first = run(&n, buy.clone());
    assert_eq!(first["kind"], "SeatsPurchased");
    let (code, again) = command(&n, buy);
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["event"]["existing"], true, "{again}");
    assert_eq!(again["event"]["id"], first["event"]["id"], "{again}");
    let s = session(&n, "rust-101");
    assert_eq!(
        (&s["sold"], &s["available"], &s["capacity"]),
        (&json!(2), &json!(1), &json!(3)),
        "{s}"
    );
    assert_eq!(s["held"], json!({"bo": 2}), "{s}");
    assert_eq!(s["name"], "Rust 101", "{s}");
    assert_eq!(s["room"], "B2", "{s}");
    assert_eq!(s["policy"]["mode"], "escrow", "{s}");
    assert_eq!(s["rule"]["may_sell"], 1, "{s}");
    let bo = n.get_json("/v1/venue/attendees/bo");
    assert_eq!(
        bo["seats"],
        json!([{"session": "rust-101", "name": "Rust 101", "held": 2}]),
        "{bo}"
    );

    // Beyond the rights under escrow: refused, nothing sold.
    let (code, e) = command(
        &n,
        json!({"type": "PurchaseSeats", "command_id": "p-2", "session_id": "rust-101",
               "attendee_id": "cy", "seats": 2}),
    );
    assert_eq!(code, 422, "{e}");
    assert_eq!(session(&n, "rust-101")["available"], 1);

    // Cancelling more than held is refused; cancelling one returns it.
    let (code, e) = command(
        &n,
        json!({"type": "CancelSeats", "command_id": "k-0", "session_id": "rust-101",
               "attendee_id": "bo", "seats": 3}),
    );
    assert_eq!(code, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("holds 2"), "{e}");
    let v = run(
        &n,
        json!({"type": "CancelSeats", "command_id": "k-1", "session_id": "rust-101",
               "attendee_id": "bo", "seats": 1}),
    );
    assert_eq!(v["kind"], "SeatsCancelled");
    let s = session(&n, "rust-101");
    assert_eq!(
        (&s["sold"], &s["available"], &s["held"]),
        (&json!(1), &json!(2), &json!({"bo": 1})),
        "{s}"
    );
    run(
        &n,
        json!({"type": "PurchaseSeats", "command_id": "p-3", "session_id": "rust-101",
               "attendee_id": "cy", "seats": 2}),
    );

    // More seats, a policy, rights to another desk.
    let v = run(
        &n,
        json!({"type": "AddSeats", "command_id": "a-1", "session_id": "rust-101", "seats": 4}),
    );
    assert_eq!(v["kind"], "SeatsAdded");
    assert_eq!(session(&n, "rust-101")["available"], 4);
    let v = run(
        &n,
        json!({"type": "ChangeSeatPolicy", "command_id": "pol-1", "session_id": "rust-101",
               "policy": {"mode": "risk-window", "max_overdraft": 2}}),
    );
    assert_eq!(v["kind"], "SeatPolicyChanged");
    let s = session(&n, "rust-101");
    assert_eq!(s["policy"]["mode"], "risk-window", "{s}");
    assert_eq!(s["policy"]["max_overdraft"], 2, "{s}");
    let other = tmp.path().join("other");
    let other_id = init(&other);
    let v = run(
        &n,
        json!({"type": "GiveSeatRights", "command_id": "g-1", "session_id": "rust-101",
               "to": other_id, "seats": 3}),
    );
    assert_eq!(v["kind"], "SeatRightsGiven");
    assert_eq!(session(&n, "rust-101")["rule"]["held"], 1);

    // The waitlist, in the order people joined.
    for (id, who, seats) in [("w-1", "cy", 1), ("w-2", "bo", 2)] {
        let v = run(
            &n,
            json!({"type": "JoinWaitlist", "command_id": id, "session_id": "rust-101",
                   "attendee_id": who, "seats": seats}),
        );
        assert_eq!(v["kind"], "WaitlistJoined");
    }
    let wl = &session(&n, "rust-101")["waitlist"];
    assert_eq!(wl[0]["attendee"], "cy", "{wl}");
    assert_eq!(wl[1]["attendee"], "bo", "{wl}");
    assert_eq!(wl[1]["seats"], 2, "{wl}");
    let v = run(
        &n,
        json!({"type": "LeaveWaitlist", "command_id": "w-3", "session_id": "rust-101",
               "attendee_id": "cy"}),
    );
    assert_eq!(v["kind"], "WaitlistLeft");
    let wl = &session(&n, "rust-101")["waitlist"];
    assert_eq!(wl.as_array().unwrap().len(), 1, "{wl}");
    assert_eq!(wl[0]["attendee"], "bo", "{wl}");

    // ResolveConflict writes over the standing value even without a conflict.
    let v = run(
        &n,
        json!({"type": "ResolveConflict", "command_id": "x-1", "stream": "attendee/cy",
               "field": "company", "value": "Initech"}),
    );
    assert_eq!(v["kind"], "ConflictResolved");

    // A decision on a sale that is not oversold: the node's own refusal.
    let (code, e) = command(
        &n,
        json!({"type": "DecideOversell", "command_id": "d-1",
               "sale": first["event"]["id"], "action": "honour"}),
    );
    assert_eq!(code, 422, "{e}");

    // Search.
    let found = n.get_json("/v1/venue/attendees?q=INITECH");
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["attendees"][0]["id"], "cy", "{found}");
    let all = n.get_json("/v1/venue/attendees?limit=1");
    assert_eq!(all["total"], 2, "{all}");
    assert_eq!(all["attendees"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all["attendees"][0]["id"], "bo", "sorted by name: {all}");

    // Bad bodies: 400, naming the field.
    for (body, field) in [
        (
            json!({"type": "Dance", "command_id": "z"}),
            "ScheduleSession",
        ),
        (
            json!({"type": "PrintBadge", "attendee_id": "bo"}),
            "command_id",
        ),
        (
            json!({"type": "RegisterAttendee", "command_id": "z", "attendee_id": "dee",
                   "name": "Dee", "email": "no-at-sign"}),
            "email",
        ),
        (
            json!({"type": "PurchaseSeats", "command_id": "z", "session_id": "rust-101",
                   "attendee_id": "bo", "seats": 0}),
            "seats",
        ),
        (
            json!({"type": "PrintBadge", "command_id": "z", "attendee_id": "b o"}),
            "attendee_id",
        ),
        (
            json!({"type": "ChangeEmail", "command_id": "z", "attendee_id": "bo"}),
            "value",
        ),
    ] {
        let (code, e) = command(&n, body.clone());
        assert_eq!(code, 400, "{body}: {e}");
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg}");
    }

    // Unknown attendee: 404 for a command and for the query.
    let (code, e) = command(
        &n,
        json!({"type": "PrintBadge", "command_id": "z", "attendee_id": "nobody"}),
    );
    assert_eq!(code, 404, "{e}");
    let (code, body) = n.get("/v1/venue/attendees/nobody");
    assert_eq!(code, 404, "{body}");
}

#[test]
fn an_email_changed_on_both_sides_of_a_partition_is_a_conflict_until_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = pair(tmp.path(), &[]);
    run(
        &a,
        json!({"type": "RegisterAttendee", "command_id": "r-1", "attendee_id": "bo",
               "name": "Bo", "email": "bo@example.org"}),
    );
    converged(&a, &b);
    wait(
        &b,
        "the attendee",
        || b.get_json("/v1/venue/attendees?q=bo"),
        |v| v["total"] == 1,
    );

    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    run(
        &a,
        json!({"type": "ChangeEmail", "command_id": "e-a", "user": "Ana",
               "attendee_id": "bo", "value": "bo@a.org"}),
    );
    run(
        &b,
        json!({"type": "ChangeEmail", "command_id": "e-b", "user": "Ben",
               "attendee_id": "bo", "value": "bo@b.org"}),
    );
    a.partition(&[]);
    b.partition(&[]);
    converged(&a, &b);

    for n in [&a, &b] {
        let bo = wait(
            n,
            "the conflict",
            || n.get_json("/v1/venue/attendees/bo"),
            |v| v["conflicts"] == json!(["email"]),
        );
        let writes = bo["fields"]["email"]["conflict"].as_array().unwrap();
        assert_eq!(writes.len(), 2, "{bo}");
        let mut seen: Vec<(String, String, String)> = writes
            .iter()
            .map(|w| {
                (
                    w["value"].as_str().unwrap().to_string(),
                    w["author"].as_str().unwrap().to_string(),
                    w["user"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("bo@a.org".into(), a.id.clone(), "Ana".into()),
                ("bo@b.org".into(), b.id.clone(), "Ben".into()),
            ],
            "{}: {bo}",
            n.name
        );
        let list = n.get_json("/v1/venue/attendees?q=bo");
        assert_eq!(
            list["attendees"][0]["conflicts"],
            json!(["email"]),
            "{list}"
        );
    }

    run(
        &b,
        json!({"type": "ResolveConflict", "command_id": "x-1", "user": "Ben",
               "stream": "attendee/bo", "field": "email", "value": "bo@a.org"}),
    );
    converged(&a, &b);
    for n in [&a, &b] {
        let bo = wait(
            n,
            "the resolution",
            || n.get_json("/v1/venue/attendees/bo"),
            |v| v["conflicts"] == json!([]),
        );
        assert_eq!(bo["email"], "bo@a.org", "{bo}");
        assert!(bo["fields"]["email"].get("conflict").is_none(), "{bo}");
    }
}

#[test]
fn a_sale_beyond_the_rights_is_sold_on_credit_under_risk_window() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = pair(tmp.path(), &[]);
    run(
        &a,
        json!({"type": "ScheduleSession", "command_id": "s-1", "session_id": "k",
               "name": "Keynote", "capacity": 4,
               "policy": {"mode": "risk-window", "max_overdraft": 2, "on_oversell": "notify"}}),
    );
    run(
        &a,
        json!({"type": "RegisterAttendee", "command_id": "r-1", "attendee_id": "bo",
               "name": "Bo", "email": "bo@example.org"}),
    );
    converged(&a, &b);
    // A sync round after the setup: the overdraft is admitted then.
    wait(
        &a,
        "a sync round after the setup",
        || session(&a, "k")["rule"].clone(),
        |r| r["may_sell"] == 6,
    );
    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    let v = run(
        &a,
        json!({"type": "PurchaseSeats", "command_id": "p-1", "session_id": "k",
               "attendee_id": "bo", "seats": 5}),
    );
    assert_eq!(v["kind"], "SeatsPurchased", "{v}");
    let s = session(&a, "k");
    assert_eq!(s["held"], json!({"bo": 5}), "{s}");
    assert_eq!(s["oversold"], 1, "{s}");
    assert_eq!(s["available"], 0, "{s}");
    let (code, e) = command(
        &a,
        json!({"type": "PurchaseSeats", "command_id": "p-2", "session_id": "k",
               "attendee_id": "bo", "seats": 2}),
    );
    assert_eq!(code, 422, "beyond the overdraft bound: {e}");
}
