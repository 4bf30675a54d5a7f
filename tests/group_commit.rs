//! Appends that share a group commit keep their one-at-a-time meaning: a
//! command id races to exactly one event, an expected version lets exactly
//! one writer through, async and blocking appenders mix, and everything
//! acknowledged is there after a reopen.

use std::sync::Arc;

use weftlog::node::{self, AppendError, Node};
use weftlog_proto::state::{Draft, PrepareError};
use weftlog_proto::{Meta, Op};

fn draft(stream: &str, i: u64) -> Draft {
    Draft {
        stream: stream.into(),
        kind: "Counted".into(),
        ops: vec![Op::Add {
            counter: "n".into(),
            delta: 1,
        }],
        payload: format!("{{\"i\":{i}}}").into_bytes(),
        ..Draft::default()
    }
}

fn fresh() -> (tempfile::TempDir, Arc<Node>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    node::init(&dir).unwrap();
    let (n, _) = Node::open(&dir).unwrap();
    (tmp, Arc::new(n))
}

#[test]
fn one_command_id_raced_by_many_appenders_makes_one_event() {
    let (_tmp, node) = fresh();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut d = draft("orders/1", i);
                d.meta = Meta {
                    command_id: Some("order-1".into()),
                    user: None,
                };
                node.append(d).unwrap()
            })
        })
        .collect();
    let acks: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let first = acks.iter().find(|a| !a.existing).expect("one new event");
    assert_eq!(acks.iter().filter(|a| !a.existing).count(), 1);
    assert!(acks.iter().all(|a| a.id == first.id && a.version == 1));
    assert_eq!(node.with_state(|s| s.len()), 1);
}

#[test]
fn an_expected_version_lets_exactly_one_racing_writer_through() {
    let (_tmp, node) = fresh();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut d = draft("seat/7", i);
                d.expected_version = Some(0);
                node.append(d)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        match r {
            AppendError::Refused(PrepareError::VersionMismatch {
                expected, actual, ..
            }) => assert_eq!((*expected, *actual), (0, 1)),
            other => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(node.with_state(|s| s.version("seat/7")), 1);
}

#[test]
fn async_and_blocking_appenders_share_batches_and_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    node::init(&dir).unwrap();
    let (n, _) = Node::open(&dir).unwrap();
    let node = Arc::new(n);
    let blocking: Vec<_> = (0..8)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| node.append(draft(&format!("b/{t}"), i)).unwrap().id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut acked: Vec<_> = rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let node = node.clone();
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for i in 0..20 {
                        ids.push(
                            node.append_async(draft(&format!("a/{t}"), i))
                                .await
                                .unwrap()
                                .id,
                        );
                    }
                    ids
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    for t in blocking {
        acked.extend(t.join().unwrap());
    }
    assert_eq!(acked.len(), 8 * 50 + 64 * 20);
    drop(rt);
    let before = node.with_state(|s| s.state_hash());
    drop(node);
    let (reopened, recovery) = Node::open(&dir).unwrap();
    assert_eq!(recovery.torn, None);
    reopened.with_state(|s| {
        assert_eq!(s.len(), acked.len() as u64);
        assert!(acked.iter().all(|id| s.contains(id)));
        assert_eq!(s.state_hash(), before);
        assert_eq!(s.stream("a/3").unwrap().counters["n"], 20);
    });
}
