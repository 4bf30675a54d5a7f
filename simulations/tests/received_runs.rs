//! A received run reaches the log whole, whatever a node does between the
//! messages that carry it: a node that appends and commits between every
//! two messages of a sync never advertises a head whose dependency it does
//! not serve, so a peer can sync from it at any moment.
//!
//! (A bug the simulator found: the node's committer thread could take a
//! batch between two inserts of one received run, ending it with an
//! unsigned received event and an own event that depends on it. The
//! replica, which the node and the simulator share, now never ends a batch
//! inside a received run; its unit tests in `weftlog_proto::replica`
//! reproduce that interleaving against it directly.)

use weftlog_proto::state::Draft;
use weftlog_proto::sync::{Session, SessionConfig, SessionEvent};
use weftlog_proto::{Keypair, Op};
use weftlog_sim::node::{Sabotage, SimNode};

const CLUSTER: [u8; 32] = [9; 32];

fn edit(field: &str, v: &str) -> Draft {
    Draft {
        stream: "attendee/1".into(),
        kind: "Edited".into(),
        ops: vec![Op::Set {
            field: field.into(),
            value: format!("{v:?}").into_bytes(),
            supersedes: vec![],
        }],
        ..Draft::default()
    }
}

fn node(secret: u8) -> SimNode {
    SimNode::new(Keypair::from_secret([secret; 32]), Sabotage::None).unwrap()
}

fn commit(n: &mut SimNode) {
    while n.start_commit() {
        n.finish_commit().unwrap();
    }
}

fn session(me: &mut SimNode, peer: &SimNode, one_event_per_message: bool) -> Session {
    let mut c = SessionConfig::new(CLUSTER, me.id());
    c.peer = Some(peer.id());
    if one_event_per_message {
        c.events_bytes_target = 1;
    }
    Session::new(c, &me.store())
}

fn failures(events: &[SessionEvent]) -> Vec<&SessionEvent> {
    events
        .iter()
        .filter(|e| matches!(e, SessionEvent::Failed(_)))
        .collect()
}

/// Syncs `a` and `b` until both are quiet; returns what each session
/// reported.
fn sync(a: &mut SimNode, b: &mut SimNode) -> (Vec<SessionEvent>, Vec<SessionEvent>) {
    let (mut sa, mut sb) = (session(a, b, false), session(b, a, false));
    loop {
        let mut quiet = true;
        while let Some(m) = sa.poll_transmit(&a.store()) {
            let _ = sb.handle_message(&m, &mut b.store());
            quiet = false;
        }
        while let Some(m) = sb.poll_transmit(&b.store()) {
            let _ = sa.handle_message(&m, &mut a.store());
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    (
        std::iter::from_fn(|| sa.poll_event()).collect(),
        std::iter::from_fn(|| sb.poll_event()).collect(),
    )
}

#[test]
fn a_node_committing_between_the_messages_of_a_received_run_stays_servable() {
    // X makes runs of several events, each signed only at its end.
    let mut x = node(1);
    for batch in 0..4u64 {
        for i in 0..6u64 {
            x.append(
                1_000 + batch * 10 + i,
                edit("email", &format!("x{batch}.{i}")),
            )
            .unwrap();
        }
        commit(&mut x);
    }
    assert_eq!(x.durable_len(), 24);
    // N receives them one event per message, and between every two
    // messages it appends (its edits depend on what it holds) and commits;
    // then a fresh peer syncs from it.
    let mut n = node(2);
    let (mut sx, mut sn) = (session(&mut x, &n, true), session(&mut n, &x, false));
    let mut delivered = 0;
    loop {
        let mut quiet = true;
        while let Some(m) = sx.poll_transmit(&x.store()) {
            sn.handle_message(&m, &mut n.store()).unwrap();
            delivered += 1;
            quiet = false;
            n.append(5_000 + delivered, edit("name", &format!("n{delivered}")))
                .unwrap();
            commit(&mut n);
            let mut p = node(3);
            let (_, at_p) = sync(&mut n, &mut p);
            assert!(
                failures(&at_p).is_empty(),
                "after {delivered} messages: {at_p:?}"
            );
            commit(&mut p);
            assert_eq!(p.frontier(), n.frontier());
        }
        while let Some(m) = sn.poll_transmit(&n.store()) {
            let _ = sx.handle_message(&m, &mut x.store());
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    assert!(delivered > 24, "one event per message");
    let events: Vec<SessionEvent> = std::iter::from_fn(|| sn.poll_event()).collect();
    assert!(failures(&events).is_empty(), "{events:?}");
    commit(&mut n);
    assert_eq!(n.state().len(), n.durable_len());
    assert_eq!(n.signed_heads()[&x.id()], 24);
}
