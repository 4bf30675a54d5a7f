//! Two real nodes (file logs, group commit) reach the same state through the
//! sync protocol, over an in-memory link: concurrent edits merge, same-field
//! edits surface as one conflict, a live push arrives, and everything
//! received is durable after a reopen.

mod common;

use common::set;
use weftlog::node::{self, Node};
use weftlog_proto::sync::{Session, SessionConfig, SessionEvent, Store};
use weftlog_proto::State;

const CLUSTER: [u8; 32] = [9; 32];

/// Shuttles messages both ways until neither side has anything to send.
fn shuttle(a: &Node, sa: &mut Session, b: &Node, sb: &mut Session) -> Vec<SessionEvent> {
    // A store per call, as the daemon does: one holds its node's state
    // lock from its first insert until dropped.
    let mut events = Vec::new();
    loop {
        let mut moved = false;
        while let Some(m) = sa.poll_transmit(&a.sync_store()) {
            sb.handle_message(&m, &mut b.sync_store())
                .expect("b accepts a's message");
            moved = true;
        }
        while let Some(m) = sb.poll_transmit(&b.sync_store()) {
            sa.handle_message(&m, &mut a.sync_store())
                .expect("a accepts b's message");
            moved = true;
        }
        while let Some(e) = sa.poll_event().or_else(|| sb.poll_event()) {
            events.push(e);
        }
        if !moved {
            return events;
        }
    }
}

/// Two fresh nodes, `a` and `b`, in one temporary directory.
fn two_nodes() -> (tempfile::TempDir, Node, Node) {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = ["a", "b"].map(|n| {
        let dir = tmp.path().join(n);
        node::init(&dir).unwrap();
        Node::open(&dir).unwrap().0
    });
    (tmp, a, b)
}

fn summary(s: &State) -> ([u8; 32], usize) {
    (s.state_hash(), s.conflicts().count())
}

#[test]
fn two_nodes_converge_over_the_sync_protocol_and_keep_what_they_received() {
    let (tmp, a, b) = two_nodes();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    // Offline work on both sides, several commits each.
    for i in 0..20 {
        a.append(set(&format!("customer/{i}"), "email", "a@x"))
            .unwrap();
        b.append(set(&format!("customer/{i}"), "phone", "555"))
            .unwrap();
    }
    a.append(set("customer/0", "name", "Ada")).unwrap();
    b.append(set("customer/0", "name", "Ada King")).unwrap();

    let mut sa = Session::new(SessionConfig::new(CLUSTER, a.id()), &a.sync_store());
    let mut sb = Session::new(SessionConfig::new(CLUSTER, b.id()), &b.sync_store());
    let events = shuttle(&a, &mut sa, &b, &mut sb);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Received { .. })),
        "{events:?}"
    );
    assert_eq!(a.with_state(summary), b.with_state(summary));
    assert_eq!(a.with_state(|s| s.len()), 42);
    assert_eq!(a.with_state(|s| s.conflicts().count()), 1);
    let merged = a.with_state(|s| s.stream("customer/7").unwrap().fields.len());
    assert_eq!(merged, 2, "email and phone merged");

    // A live push: a new event on A reaches B once A's session hears of it.
    let pushed = a
        .append(set("customer/0", "name", "Augusta Ada King"))
        .unwrap();
    let head = weftlog_proto::sync::Head {
        author: pushed.author,
        seq: pushed.seq,
        id: pushed.id,
    };
    sa.handle_stored(head, &a.sync_store());
    shuttle(&a, &mut sa, &b, &mut sb);
    assert!(b.with_state(|s| s.contains(&pushed.id)));
    assert_eq!(b.with_state(|s| s.conflicts().count()), 0, "resolved");

    // What B received is durable: after a flush and a reopen it is there,
    // and B now advertises it (an anti-entropy round finds nothing to do).
    b.flush().unwrap();
    let before = (a.with_state(summary), b.with_state(summary));
    drop((sa, sb));
    drop(a);
    drop(b);
    let (a, _) = Node::open(&da).unwrap();
    let (b, rb) = Node::open(&db).unwrap();
    assert_eq!(rb.torn, None);
    assert_eq!((a.with_state(summary), b.with_state(summary)), before);
    // B serves A's events from its reopened log, signatures and all.
    let got = Store::fetch(&b.sync_store(), &a.id(), 21).expect("b holds a:21");
    assert_eq!(Some(got.id), a.with_state(|s| s.event_id(&a.id(), 21)));
    assert!(got.sig.is_some(), "a's last event of a commit is signed");
    let mut sa = Session::new(SessionConfig::new(CLUSTER, a.id()), &a.sync_store());
    let mut sb = Session::new(SessionConfig::new(CLUSTER, b.id()), &b.sync_store());
    let events = shuttle(&a, &mut sa, &b, &mut sb);
    assert!(
        events.iter().any(|e| matches!(e, SessionEvent::InSync)),
        "{events:?}"
    );
}

/// Received events that are still in the committer's hands when the node is
/// dropped reach the log all the same.
#[test]
fn events_received_just_before_a_drop_are_durable() {
    let (tmp, a, b) = two_nodes();
    let db = tmp.path().join("b");
    for i in 0..50 {
        a.append(set("customer/1", "visits", &i.to_string()))
            .unwrap();
    }
    let mut sa = Session::new(SessionConfig::new(CLUSTER, a.id()), &a.sync_store());
    let mut sb = Session::new(SessionConfig::new(CLUSTER, b.id()), &b.sync_store());
    shuttle(&a, &mut sa, &b, &mut sb);
    let hash = b.with_state(|s| s.state_hash());
    drop((sa, sb));
    drop(b); // no flush
    let (b, _) = Node::open(&db).unwrap();
    assert_eq!(b.with_state(|s| (s.len(), s.state_hash())), (50, hash));
}
