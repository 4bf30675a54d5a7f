//! Mutual TLS over QUIC on loopback: a member connects and both sides learn
//! each other's node id from the handshake; a non-member is refused at the
//! handshake whichever side dials; the member file format is checked.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weftlog::tls::{client_config, peer_id, server_config, Members, SERVER_NAME};
use weftlog_proto::Keypair;

fn members(keys: &[&Keypair]) -> Members {
    Members::Only(Arc::new(
        keys.iter().map(|k| k.node_id()).collect::<BTreeSet<_>>(),
    ))
}

fn server(key: &Keypair, m: Members) -> quinn::Endpoint {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    quinn::Endpoint::server(server_config(key, m, 1).unwrap(), addr).unwrap()
}

fn client(key: &Keypair, m: Members) -> quinn::Endpoint {
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(client_config(key, m, 1).unwrap());
    e
}

/// Accepts one connection attempt; its outcome.
async fn accept_one(server: &quinn::Endpoint) -> Result<quinn::Connection, String> {
    let incoming = server.accept().await.ok_or("endpoint closed")?;
    incoming.await.map_err(|e| e.to_string())
}

async fn dial(client: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let connecting = client
        .connect(addr, SERVER_NAME)
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_prove_their_ids_and_non_members_are_refused() {
    let (a, b, c) = (
        Keypair::from_secret([1; 32]),
        Keypair::from_secret([2; 32]),
        Keypair::from_secret([3; 32]),
    );
    let cluster = members(&[&a, &b]);

    // B dials A: both are members; each learns the other's id.
    let sa = server(&a, cluster.clone());
    let addr = sa.local_addr().unwrap();
    let cb = client(&b, cluster.clone());
    let (server_side, client_side) = tokio::join!(accept_one(&sa), dial(&cb, addr));
    let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
    assert_eq!(peer_id(&client_side), Some(a.node_id()));
    assert_eq!(peer_id(&server_side), Some(b.node_id()));
    // The connection carries data.
    let (mut send, _recv) = client_side.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    send.finish().unwrap();
    let (_s, mut recv) = server_side.accept_bi().await.unwrap();
    assert_eq!(recv.read_to_end(64).await.unwrap(), b"hello");

    // C, not a member, dials A: refused at the handshake.
    let cc = client(&c, Members::Anyone);
    let (server_side, client_side) = tokio::join!(accept_one(&sa), dial(&cc, addr));
    let err = server_side.expect_err("A accepted a non-member");
    assert!(
        !err.is_empty(),
        "the server reports why the handshake failed"
    );
    // In TLS 1.3 the client's side may complete before the server checks
    // its certificate; the server's refusal then closes the connection.
    if let Ok(conn) = client_side {
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the refused connection is closed");
        assert!(
            conn.open_bi().await.is_err(),
            "a refused connection carries nothing ({closed})"
        );
    }

    // B dials C, which admits anyone: B refuses C.
    let sc = server(&c, Members::Anyone);
    let addr_c = sc.local_addr().unwrap();
    let (_server_side, client_side) = tokio::join!(accept_one(&sc), dial(&cb, addr_c));
    let err = client_side.expect_err("B accepted a non-member server");
    assert!(err.contains("not a member"), "{err}");
}

#[test]
fn member_files_list_one_node_id_per_line() {
    let a = Keypair::from_secret([1; 32]).node_id();
    let b = Keypair::from_secret([2; 32]).node_id();
    let text = format!("# desks at the venue\n{a}\n\n  {b}  \n");
    let m = Members::parse(&text).unwrap();
    assert!(m.admits(&a) && m.admits(&b));
    assert!(!m.admits(&Keypair::from_secret([3; 32]).node_id()));
    let err = Members::parse(&format!("{a}\nnot-a-node\n")).unwrap_err();
    assert!(err.contains("line 2"), "{err}");
}
