//! Two real nodes sync over QUIC on loopback with mutual TLS: divergent
//! logs converge in one round, a second round finds them in sync in one
//! round trip, and what was received is durable.

mod common;

use common::set;
use std::net::SocketAddr;
use std::sync::Arc;

use weftlog::net::sync_round;
use weftlog::node::{self, Node};
use weftlog::tls::{client_config, server_config, Members, SERVER_NAME};
use weftlog_proto::Keypair;

const CLUSTER: [u8; 32] = [5; 32];

fn key_of(dir: &std::path::Path) -> Keypair {
    let secret: [u8; 32] = std::fs::read(dir.join(node::KEY_FILE))
        .unwrap()
        .try_into()
        .unwrap();
    Keypair::from_secret(secret)
}

#[test]
fn two_nodes_converge_over_quic() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    node::init(&da).unwrap();
    node::init(&db).unwrap();
    let (ka, kb) = (key_of(&da), key_of(&db));
    let members = Members::Only(Arc::new([ka.node_id(), kb.node_id()].into_iter().collect()));
    let a = Arc::new(Node::open(&da).unwrap().0);
    let b = Arc::new(Node::open(&db).unwrap().0);
    for i in 0..300 {
        a.append(set(
            &format!("customer/{}", i % 40),
            "email",
            &format!("a{i}@x"),
        ))
        .unwrap();
        b.append(set(
            &format!("customer/{}", i % 40),
            "phone",
            &format!("{i}"),
        ))
        .unwrap();
    }
    a.append(set("customer/0", "name", "Ada")).unwrap();
    b.append(set("customer/0", "name", "Ada King")).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds = rt.block_on(async {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server =
            quinn::Endpoint::server(server_config(&ka, members.clone(), 1).unwrap(), addr).unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(&kb, members.clone(), 2).unwrap());
        let (sa, sb) = tokio::join!(
            async { server.accept().await.unwrap().await.unwrap() },
            async { client.connect(addr, SERVER_NAME).unwrap().await.unwrap() }
        );
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let (ra, rb) = tokio::join!(
                sync_round(&a, &sa, CLUSTER, false),
                sync_round(&b, &sb, CLUSTER, true)
            );
            rounds.push((ra.unwrap(), rb.unwrap()));
            // Let the committers make what they received durable, so the
            // next round advertises it.
            let (a2, b2) = (a.clone(), b.clone());
            tokio::task::spawn_blocking(move || {
                a2.flush().unwrap();
                b2.flush().unwrap();
            })
            .await
            .unwrap();
        }
        rounds
    });
    let (first_a, first_b) = &rounds[0];
    assert_eq!((first_a.received, first_b.received), (301, 301));
    assert_eq!(first_a.peer, Some(kb.node_id()));
    let (second_a, second_b) = &rounds[1];
    assert!(second_a.in_sync && second_b.in_sync, "{rounds:?}");
    assert!(
        second_b.bytes_sent <= 200,
        "an in-sync check costs {} bytes",
        second_b.bytes_sent
    );
    let hash = |n: &Node| n.with_state(|s| (s.state_hash(), s.len(), s.conflicts().count()));
    assert_eq!(hash(&a), hash(&b));
    assert_eq!(hash(&a).1, 602);
    assert_eq!(hash(&a).2, 1, "the same-field edit is one conflict");
    drop(rt);
    let before = hash(&b);
    drop(Arc::try_unwrap(b).ok().expect("b is no longer shared"));
    let (b, _) = Node::open(&db).unwrap();
    assert_eq!(hash(&b), before);
}
