//! A bug the simulator found in the node (`src/node.rs`), now fixed there,
//! with a minimal deterministic reproduction on the same state machines.
//!
//! The node's sync session stores a received run event by event, each under
//! the state lock; the committer thread may take the received queue (and
//! apply a local command) between two of those inserts. Then a batch ends
//! with an unsigned received event X1 and an own event L that depends on
//! it: the node advertises L (signed, durable) but not X1 (its durable,
//! signed head for X is below it), so its frontier is not causally closed,
//! breaking the `Store` contract, and a peer that lacks X1 is left at the
//! node's Done with L waiting for it (reported as missing; before sync
//! version 2 it failed the round: "depends on event …, which the peer never
//! sent"). Transient (the next batch writes X2, which signs the run). The node now holds the state lock across one `handle_message`
//! (a received run is stored whole), which removes it; the simulator's
//! `node.race` knob models the node as it was, and is 0 in the scenarios.

use weftlog_proto::state::Draft;
use weftlog_proto::sync::{Session, SessionConfig, SessionEvent, SyncError};
use weftlog_proto::{Keypair, Op};
use weftlog_sim::node::{Race, Sabotage, SimNode};
use weftlog_sim::rng::Rng;

const CLUSTER: [u8; 32] = [9; 32];

fn edit(v: &str) -> Draft {
    Draft {
        stream: "attendee/1".into(),
        kind: "Edited".into(),
        ops: vec![Op::Set {
            field: "email".into(),
            value: format!("{v:?}").into_bytes(),
            supersedes: vec![],
        }],
        ..Draft::default()
    }
}

/// Shuttles messages between two nodes' sessions until both are quiet;
/// returns the events each session reported.
fn sync(a: &mut SimNode, b: &mut SimNode) -> (Vec<SessionEvent>, Vec<SessionEvent>) {
    let mut ca = SessionConfig::new(CLUSTER, a.id());
    ca.peer = Some(b.id());
    let mut cb = SessionConfig::new(CLUSTER, b.id());
    cb.peer = Some(a.id());
    let mut sa = Session::new(ca, &*a);
    let mut sb = Session::new(cb, &*b);
    loop {
        let mut quiet = true;
        while let Some(m) = sa.poll_transmit(&*a) {
            let _ = sb.handle_message(&m, b);
            quiet = false;
        }
        while let Some(m) = sb.poll_transmit(&*b) {
            let _ = sa.handle_message(&m, a);
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

fn node(secret: u8) -> SimNode {
    SimNode::new(Keypair::from_secret([secret; 32]), Sabotage::None).unwrap()
}

fn commit(n: &mut SimNode) {
    assert!(n.start_commit());
    n.finish_commit().unwrap();
}

/// X makes a run of two events (one batch: X1 unsigned, X2 signed); N
/// receives it, with its committer running between the two inserts and a
/// local command L waiting; N writes its first batch [X1, L] only; then P,
/// which has nothing, syncs with N. Returns P's session events.
fn scenario(race: bool) -> Vec<SessionEvent> {
    let mut x = node(1);
    x.append(1_000, edit("x1")).unwrap();
    x.append(1_001, edit("x2")).unwrap();
    commit(&mut x);
    let mut n = node(2);
    if race {
        n.set_race(Race::new(1.0, Rng::new(7)));
        n.park(0, 2_000, edit("n-local"));
    } else {
        n.append(2_000, edit("n-local")).unwrap();
    }
    let (_, at_n) = sync(&mut x, &mut n);
    assert!(at_n.iter().all(|e| !matches!(e, SessionEvent::Failed(_))));
    // The first group commit becomes durable; the second is still syncing.
    commit(&mut n);
    let mut p = node(3);
    let (_, at_p) = sync(&mut n, &mut p);
    at_p
}

#[test]
fn a_committer_running_inside_a_received_run_breaks_the_frontier_contract() {
    let at_p = scenario(true);
    let failed: Vec<&SyncError> = at_p
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Failed(err) => Some(err),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{at_p:?}");
    assert!(
        at_p.iter()
            .any(|e| matches!(e, SessionEvent::Missing { deps } if deps.len() == 1)),
        "{at_p:?}"
    );
}

#[test]
fn without_the_interleaving_the_same_steps_sync_cleanly() {
    let at_p = scenario(false);
    assert!(
        at_p.iter().all(|e| !matches!(e, SessionEvent::Failed(_))),
        "{at_p:?}"
    );
}
