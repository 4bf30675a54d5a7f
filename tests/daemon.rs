//! The QUIC sync daemon keeps members' logs converged and keeps everyone
//! else out: three daemons in a full mesh converge under concurrent appends
//! (a same-field edit made on two nodes shows as one conflict) and what a
//! node received survives a restart; a partition holds until it is healed;
//! appends are pushed live, with no anti-entropy; a non-member never
//! connects; a member that announces an oversized message or sends forged
//! events is cut off with nothing stored; garbage datagrams do no harm; a
//! graceful shutdown keeps everything received; and two connection races
//! stay fixed (a block set while a peer opens its stream, a dial loop
//! spinning on a closed connection).
//!
//! Everything runs in-process on 127.0.0.1, each daemon on its own port.
//! Nothing is timed except generous deadlines for convergence.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{set, Rng};
use serde_json::Value;
use weftlog::daemon::{self, close, Config, Daemon};
use weftlog::node::{self, Node};
use weftlog::tls::{self, Members, SERVER_NAME};
use weftlog_proto::state::{Prepared, State};
use weftlog_proto::sync::{
    message_len, MemStore, Session, SessionConfig, Store, SyncError, LENGTH_PREFIX_BYTES,
    MAX_MESSAGE_BYTES,
};
use weftlog_proto::{Event, EventId, HlcClock, Keypair, NodeId};

/// How long convergence (or any other awaited outcome) may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);
/// How long a partition or a refusal is watched for leaks.
const QUIET: Duration = Duration::from_millis(1500);
/// A test that outlives this is ended with the whole process.
const WATCHDOG: Duration = Duration::from_secs(60);

fn cluster() -> [u8; 32] {
    daemon::cluster_id("daemon-tests")
}

/// Logs to the test output when `RUST_LOG` is set.
fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs a test body on a runtime of two workers, logging as [`trace`] does.
/// A watchdog thread ends the process if the test outlives [`WATCHDOG`]:
/// when every worker is stuck (a task that never yields), even the test's
/// own deadlines cannot fire, and a hang would otherwise stall the whole
/// run without a word.
fn run(test: &'static str, body: impl std::future::Future<Output = ()>) {
    trace();
    let (done, watch) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(WATCHDOG) {
            eprintln!(
                "{test}: still running after {WATCHDOG:?}: the runtime's workers are stuck \
                 or the test hangs; ending the process"
            );
            std::process::exit(101);
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(body)));
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(done);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------
// Nodes and daemons.

/// A data directory made by `node::init`, and its key.
struct Member {
    name: &'static str,
    dir: PathBuf,
    key: Keypair,
}

impl Member {
    fn new(root: &Path, name: &'static str) -> Member {
        let dir = root.join(name);
        node::init(&dir).unwrap();
        let secret: [u8; 32] = std::fs::read(dir.join(node::KEY_FILE))
            .unwrap()
            .try_into()
            .unwrap();
        Member {
            name,
            dir,
            key: Keypair::from_secret(secret),
        }
    }

    fn id(&self) -> NodeId {
        self.key.node_id()
    }

    fn open(&self) -> Arc<Node> {
        Arc::new(Node::open(&self.dir).unwrap().0)
    }
}

fn members(of: &[&Member]) -> Members {
    Members::Only(Arc::new(of.iter().map(|m| m.id()).collect()))
}

/// A daemon config on a free loopback port.
fn config(members: &Members, peers: &[SocketAddr]) -> Config {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap());
    c.members = members.clone();
    c.cluster = cluster();
    c.peers = peers.iter().map(|a| a.to_string()).collect();
    c.policy.anti_entropy_ms = 500;
    c
}

async fn start(node: &Arc<Node>, config: Config) -> Daemon {
    Daemon::start(node.clone(), config)
        .await
        .expect("the daemon starts")
}

/// Two members, `a` and `b`, of a cluster of just them, with open nodes.
struct Two {
    ma: Member,
    mb: Member,
    all: Members,
    na: Arc<Node>,
    nb: Arc<Node>,
}

impl Two {
    fn new(root: &Path) -> Two {
        let (ma, mb) = (Member::new(root, "a"), Member::new(root, "b"));
        let all = members(&[&ma, &mb]);
        let (na, nb) = (ma.open(), mb.open());
        Two {
            ma,
            mb,
            all,
            na,
            nb,
        }
    }
}

/// Daemons for `na` and `nb` (b dials a) with the default config, once
/// their sessions are up.
async fn start_two(na: &Arc<Node>, nb: &Arc<Node>, all: &Members) -> (Daemon, Daemon) {
    let a = start(na, config(all, &[])).await;
    let b = start(nb, config(all, &[a.local_addr()])).await;
    wait_mesh(&[("a", &a), ("b", &b)]).await;
    (a, b)
}

/// Waits until `check` passes; fails naming `what` and the last reason.
async fn wait_until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let started = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if started.elapsed() > DEADLINE => {
                panic!("timed out after {DEADLINE:?} waiting for {what}: {why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Waits until every daemon has a session with every other.
async fn wait_mesh(ds: &[(&str, &Daemon)]) {
    wait_until("a full mesh of sessions", || {
        let missing: Vec<String> = ds
            .iter()
            .flat_map(|(n, d)| {
                ds.iter()
                    .filter(move |(m, _)| m != n)
                    .filter(|(_, e)| !d.is_connected(&e.node().id()))
                    .map(move |(m, _)| format!("{n}→{m}"))
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not connected: {}", missing.join(", ")))
        }
    })
    .await;
}

/// What replicas compare: equal frontiers must mean equal states.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snap {
    len: u64,
    hash: [u8; 32],
    frontier: Vec<(NodeId, u64, EventId)>,
    conflicts: usize,
}

impl Snap {
    fn of(node: &Node) -> Snap {
        node.with_state(|s| Snap {
            len: s.len(),
            hash: s.state_hash(),
            frontier: s.frontier(),
            conflicts: s.conflicts().count(),
        })
    }

    fn describe(&self) -> String {
        let heads: Vec<String> = self
            .frontier
            .iter()
            .map(|(a, seq, id)| format!("{}:{seq}={}", a.short(), id.short()))
            .collect();
        let hash: String = self.hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{} events, hash {hash}…, {} conflicts, frontier [{}]",
            self.len,
            self.conflicts,
            heads.join(" ")
        )
    }
}

/// Ok when all nodes hold `len` events with equal frontiers and state hashes.
fn converged(nodes: &[(&str, &Node)], len: u64) -> Result<Snap, String> {
    let snaps: Vec<(&str, Snap)> = nodes.iter().map(|(n, d)| (*n, Snap::of(d))).collect();
    let first = &snaps[0].1;
    if first.len == len && snaps.iter().all(|(_, s)| s == first) {
        return Ok(first.clone());
    }
    let each: Vec<String> = snaps
        .iter()
        .map(|(n, s)| format!("{n}: {}", s.describe()))
        .collect();
    Err(format!("want {len} events on each; {}", each.join("; ")))
}

fn has(node: &Node, id: &EventId) -> bool {
    node.with_state(|s| s.contains(id))
}

/// The conflicts of a node: `(stream, field, standing values)`.
fn conflicts(node: &Node) -> Vec<(String, String, BTreeSet<String>)> {
    node.with_state(|s| {
        s.conflicts()
            .map(|(st, f, w)| {
                let values = w
                    .values()
                    .map(|v| String::from_utf8_lossy(&v.value).into_owned())
                    .collect();
                (st.to_string(), f.to_string(), values)
            })
            .collect()
    })
}

fn one_conflict(
    stream: &str,
    field: &str,
    values: &[&str],
) -> Vec<(String, String, BTreeSet<String>)> {
    vec![(
        stream.to_string(),
        field.to_string(),
        values.iter().map(|v| format!("\"{v}\"")).collect(),
    )]
}

/// Shuts the daemon down, then reopens its node from disk (see [`reopen`]).
async fn shutdown_and_reopen(d: Daemon, node: Arc<Node>, dir: &Path) -> Node {
    d.shutdown().await;
    reopen(d, node, dir).await
}

/// Drops a daemon that was shut down, then closes and reopens its node. The
/// daemon's tasks must have let go of the node when `shutdown` returned.
async fn reopen(d: Daemon, node: Arc<Node>, dir: &Path) -> Node {
    drop(d);
    assert_eq!(
        Arc::strong_count(&node),
        1,
        "Daemon::shutdown returned while something still holds the node"
    );
    let node = Arc::into_inner(node).expect("the only reference");
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        drop(node); // joins the committer: blocking
        Node::open(&dir).expect("the node reopens").0
    })
    .await
    .unwrap()
}

/// Copies a data directory, files as they are now.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// A raw QUIC client with a member's key, speaking the protocol by hand.

fn client(key: &Keypair, members: &Members) -> quinn::Endpoint {
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(tls::client_config(key, members.clone(), 1).unwrap());
    e
}

async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    let connecting = ep.connect(addr, SERVER_NAME).unwrap();
    tokio::time::timeout(DEADLINE, connecting)
        .await
        .expect("the handshake finishes")
        .expect("a member is admitted")
}

/// Reads one length-prefixed message.
async fn read_message(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = message_len(prefix).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; LENGTH_PREFIX_BYTES + len];
    msg[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix);
    recv.read_exact(&mut msg[LENGTH_PREFIX_BYTES..])
        .await
        .map_err(|e| e.to_string())?;
    Ok(msg)
}

/// What the daemon did to a hand-driven session.
#[derive(Debug)]
struct Ended {
    /// The reason in the daemon's Error message, if it was read before the
    /// close (a close discards what the client had not read yet).
    error: Option<String>,
    /// How the daemon closed the connection; `None` if it kept it open
    /// for [`DEADLINE`].
    close: Option<quinn::ConnectionError>,
}

/// Runs a real [`Session`] as `me` over `store` on `conn` (it sends what
/// the store holds, forged or not) until the daemon ends it, or for at most
/// [`DEADLINE`].
async fn drive_session(
    conn: &quinn::Connection,
    me: NodeId,
    peer: NodeId,
    mut store: MemStore,
) -> Ended {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut cfg = SessionConfig::new(cluster(), me);
    cfg.peer = Some(peer);
    let mut session = Session::new(cfg, &store);
    let mut error = None;
    let started = Instant::now();
    loop {
        while let Some(msg) = session.poll_transmit(&store) {
            // A failed write shows as a failed read below.
            let _ = send.write_all(&msg).await;
        }
        let left = DEADLINE.saturating_sub(started.elapsed());
        let msg = match tokio::time::timeout(left, read_message(&mut recv)).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) => break,
            Err(_) => {
                conn.close(0u32.into(), b"the test gives up");
                return Ended { error, close: None };
            }
        };
        if let Err(SyncError::Peer { reason }) = session.handle_message(&msg, &mut store) {
            error = Some(reason);
        }
    }
    let close = tokio::time::timeout(DEADLINE, conn.closed()).await.ok();
    Ended { error, close }
}

fn protocol_close(e: &Ended, needle: &str) -> Result<(), String> {
    match &e.close {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(close::PROTOCOL)
                && String::from_utf8_lossy(&c.reason).contains(needle) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "want a PROTOCOL close naming {needle:?}, got {:?} (the daemon's Error message, \
             if read: {:?})",
            e.close, e.error
        )),
    }
}

/// The daemon's `peers` row for `id`.
async fn peer_row(d: &Daemon, id: &NodeId) -> Option<Value> {
    d.peers()
        .await
        .into_iter()
        .find(|r| r["node"].as_str() == Some(id.to_string().as_str()))
}

/// Waits until the daemon's `peers` row for `id` satisfies `ok`.
async fn wait_row(d: &Daemon, id: &NodeId, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let row = peer_row(d, id).await;
        if let Some(r) = row.as_ref().filter(|r| ok(r)) {
            return r.clone();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}: the row is {row:#?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Convergence.

const FIELDS: [&str; 3] = ["email", "phone", "city"];
const STREAMS: usize = 25;
const TASKS: usize = 4;
const PER_TASK: usize = 50;

#[test]
fn three_daemons_converge_under_concurrent_appends() {
    run("three_daemons_converge_under_concurrent_appends", async {
        let tmp = tempfile::tempdir().unwrap();
        let ms = ["a", "b", "c"].map(|n| Member::new(tmp.path(), n));
        let all = members(&[&ms[0], &ms[1], &ms[2]]);
        let nodes: Vec<Arc<Node>> = ms.iter().map(Member::open).collect();
        // One field edited on two nodes that have not seen each other: the
        // writes stand side by side once merged.
        nodes[0]
            .append_async(set("customer/0", "name", "Ada"))
            .await
            .unwrap();
        nodes[1]
            .append_async(set("customer/0", "name", "Ada King"))
            .await
            .unwrap();

        // A full mesh, dialled from both ends of every pair.
        let a = start(&nodes[0], config(&all, &[])).await;
        let b = start(&nodes[1], config(&all, &[a.local_addr()])).await;
        let c = start(&nodes[2], config(&all, &[a.local_addr(), b.local_addr()])).await;
        a.add_peer(&b.local_addr().to_string());
        a.add_peer(&c.local_addr().to_string());
        b.add_peer(&c.local_addr().to_string());
        wait_mesh(&[("a", &a), ("b", &b), ("c", &c)]).await;

        // Every node writes its own field of the shared streams, from several
        // tasks at once.
        let mut tasks = tokio::task::JoinSet::new();
        for (node, field) in nodes.iter().zip(FIELDS) {
            for t in 0..TASKS {
                let node = node.clone();
                tasks.spawn(async move {
                    for k in 0..PER_TASK {
                        let stream = format!("customer/{}", (t * PER_TASK + k) % STREAMS);
                        let made = node
                            .append_async(set(&stream, field, &format!("{field}-{t}-{k}")))
                            .await
                            .unwrap();
                        assert!(!made.existing);
                    }
                });
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let total = (FIELDS.len() * TASKS * PER_TASK + 2) as u64;
        let named: Vec<(&str, &Node)> = ms
            .iter()
            .map(|m| m.name)
            .zip(nodes.iter().map(|n| &**n))
            .collect();
        wait_until("the three nodes to converge", || {
            converged(&named, total).map(|_| ())
        })
        .await;

        let per_stream = (FIELDS.len() * TASKS * PER_TASK / STREAMS) as u64;
        for (name, node) in &named {
            assert_eq!(
                conflicts(node),
                one_conflict("customer/0", "name", &["Ada", "Ada King"]),
                "{name}: the same-field edit is exactly one conflict"
            );
            node.with_state(|s| {
                for j in 0..STREAMS {
                    let stream = format!("customer/{j}");
                    let st = s
                        .stream(&stream)
                        .unwrap_or_else(|| panic!("{name} lacks {stream}"));
                    let extra = if j == 0 { 2 } else { 0 };
                    assert_eq!(st.version, per_stream + extra, "{name}: events in {stream}");
                    for f in FIELDS {
                        let writes = st.fields.get(f).map_or(0, |w| w.len());
                        assert_eq!(
                            writes, 1,
                            "{name}: {stream}.{f} has {writes} standing writes"
                        );
                    }
                }
            });
        }

        // What c received is durable: it is all there after a restart.
        let before = Snap::of(&nodes[2]);
        let c_node = nodes[2].clone();
        drop(named);
        drop(nodes);
        let reopened = shutdown_and_reopen(c, c_node, &ms[2].dir).await;
        assert_eq!(
            Snap::of(&reopened),
            before,
            "c after a restart:\n  {}\nbefore:\n  {}",
            Snap::of(&reopened).describe(),
            before.describe()
        );
        a.shutdown().await;
        b.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Partitions.

#[test]
fn a_partition_holds_until_healed() {
    run("a_partition_holds_until_healed", async {
        let tmp = tempfile::tempdir().unwrap();
        let Two {
            ma,
            mb,
            all,
            na,
            nb,
        } = Two::new(tmp.path());
        // Frequent anti-entropy: a leak through the partition would show.
        let mut ca = config(&all, &[]);
        ca.policy.anti_entropy_ms = 200;
        let a = start(&na, ca).await;
        let mut cb = config(&all, &[a.local_addr()]);
        cb.policy.anti_entropy_ms = 200;
        let b = start(&nb, cb).await;
        a.add_peer(&b.local_addr().to_string());
        wait_mesh(&[("a", &a), ("b", &b)]).await;
        let first = na
            .append_async(set("order/1", "item", "book"))
            .await
            .unwrap();
        wait_until("b to receive a's first event", || {
            has(&nb, &first.id)
                .then_some(())
                .ok_or_else(|| Snap::of(&nb).describe())
        })
        .await;

        a.set_blocked([mb.id()].into());
        assert_eq!(a.blocked(), [mb.id()].into());
        wait_until("the partition to disconnect a and b", || {
            match (a.is_connected(&mb.id()), b.is_connected(&ma.id())) {
                (false, false) => Ok(()),
                sides => Err(format!("connected (a→b, b→a): {sides:?}")),
            }
        })
        .await;

        // Both sides write while cut off, one field on both.
        let mut a_side = Vec::new();
        let mut b_side = Vec::new();
        for (stream, field, value) in [
            ("order/1", "status", "paid by card"),
            ("order/2", "note", "from a"),
        ] {
            a_side.push(na.append_async(set(stream, field, value)).await.unwrap().id);
        }
        for (stream, field, value) in [
            ("order/1", "status", "paid in cash"),
            ("order/3", "note", "from b"),
        ] {
            b_side.push(nb.append_async(set(stream, field, value)).await.unwrap().id);
        }
        let until = Instant::now() + QUIET;
        while Instant::now() < until {
            assert!(
                !a.is_connected(&mb.id()),
                "a has a session with b, which it blocks"
            );
            for id in &a_side {
                assert!(
                    !has(&nb, id),
                    "a's event {} crossed the partition to b",
                    id.short()
                );
            }
            for id in &b_side {
                assert!(
                    !has(&na, id),
                    "b's event {} crossed the partition to a",
                    id.short()
                );
            }
            tokio::time::sleep(POLL).await;
        }

        a.set_blocked(BTreeSet::new());
        assert!(a.blocked().is_empty());
        wait_mesh(&[("a", &a), ("b", &b)]).await;
        wait_until("a and b to converge after the heal", || {
            converged(&[("a", &na), ("b", &nb)], 5).map(|_| ())
        })
        .await;
        for (name, node) in [("a", &na), ("b", &nb)] {
            assert_eq!(
                conflicts(node),
                one_conflict("order/1", "status", &["paid by card", "paid in cash"]),
                "{name}: the edit made on both sides of the partition"
            );
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Live push.

#[test]
fn appends_are_pushed_live_without_anti_entropy() {
    run("appends_are_pushed_live_without_anti_entropy", async {
        let tmp = tempfile::tempdir().unwrap();
        let Two {
            mb, all, na, nb, ..
        } = Two::new(tmp.path());
        // Some history on each side for the first round to exchange.
        for i in 0..5 {
            na.append_async(set("ledger/a", "n", &format!("{i}")))
                .await
                .unwrap();
        }
        for i in 0..3 {
            nb.append_async(set("ledger/b", "n", &format!("{i}")))
                .await
                .unwrap();
        }
        let hour = 3_600_000;
        let mut ca = config(&all, &[]);
        ca.policy.anti_entropy_ms = hour;
        let a = start(&na, ca).await;
        let mut cb = config(&all, &[a.local_addr()]);
        cb.policy.anti_entropy_ms = hour;
        let b = start(&nb, cb).await;
        wait_until("the first round to exchange the history", || {
            converged(&[("a", &na), ("b", &nb)], 8).map(|_| ())
        })
        .await;

        // From now on only pushes can carry an event: the next anti-entropy
        // round is an hour away.
        for i in 0..20 {
            let (from, to, name) = if i % 3 == 2 {
                (&nb, &na, "b→a")
            } else {
                (&na, &nb, "a→b")
            };
            let made = from
                .append_async(set("live/1", "n", &format!("{i}")))
                .await
                .unwrap();
            wait_until(&format!("push {i} ({name}) to arrive"), || {
                has(to, &made.id)
                    .then_some(())
                    .ok_or_else(|| format!("the receiver holds {}", Snap::of(to).describe()))
            })
            .await;
        }
        wait_until("a and b to agree", || {
            converged(&[("a", &na), ("b", &nb)], 28).map(|_| ())
        })
        .await;

        // What a user sees in `status`: the peer is connected and owed nothing.
        let started = Instant::now();
        loop {
            let status = a.status().await;
            let row = status["peers"]
                .as_array()
                .and_then(|p| {
                    p.iter()
                        .find(|r| r["node"].as_str() == Some(mb.id().to_string().as_str()))
                })
                .cloned();
            let ok = status["events"] == 28
                && row
                    .as_ref()
                    .is_some_and(|r| r["connected"] == true && r["behind"] == 0);
            if ok {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "a's status never showed b connected and owed nothing: {status:#}"
            );
            tokio::time::sleep(POLL).await;
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Who may connect.

#[test]
fn a_non_member_never_connects() {
    run("a_non_member_never_connects", async {
        let tmp = tempfile::tempdir().unwrap();
        let (ma, mb, mx) = (
            Member::new(tmp.path(), "a"),
            Member::new(tmp.path(), "b"),
            Member::new(tmp.path(), "x"),
        );
        let (na, nb, nx) = (ma.open(), mb.open(), mx.open());
        let first = na
            .append_async(set("vault/1", "code", "1234"))
            .await
            .unwrap();
        let xs = nx
            .append_async(set("vault/1", "code", "0000"))
            .await
            .unwrap();
        // x believes it is a member; a and b do not list it.
        let a = start(&na, config(&members(&[&ma, &mb]), &[])).await;
        let b = start(&nb, config(&members(&[&ma, &mb]), &[a.local_addr()])).await;
        let x = start(&nx, config(&members(&[&ma, &mb, &mx]), &[a.local_addr()])).await;
        // a dials x too: refused from that side as well.
        a.add_peer(&x.local_addr().to_string());
        wait_until("b to receive a's event", || {
            has(&nb, &first.id)
                .then_some(())
                .ok_or_else(|| Snap::of(&nb).describe())
        })
        .await;

        let before = Snap::of(&na);
        let until = Instant::now() + QUIET;
        while Instant::now() < until {
            assert!(
                !a.is_connected(&mx.id()),
                "a has a session with a non-member"
            );
            assert_eq!(
                Snap::of(&na),
                before,
                "a's state changed while x dialled it"
            );
            assert!(!has(&na, &xs.id), "a stored the non-member's event");
            assert!(!has(&nx, &first.id), "the non-member got a's event");
            tokio::time::sleep(POLL).await;
        }
        let peers = a.peers().await;
        assert!(
            peers
                .iter()
                .all(|r| r["node"].as_str() != Some(mx.id().to_string().as_str())),
            "a lists the non-member as a peer: {peers:#?}"
        );
        let x_target = peers
            .iter()
            .find(|r| r["addr"].as_str() == Some(x.local_addr().to_string().as_str()))
            .unwrap_or_else(|| panic!("a lists no row for the address it dials: {peers:#?}"));
        assert!(
            x_target["connected"] == false && x_target["last_error"].is_string(),
            "a's dial of the non-member shows why it failed: {x_target:#}"
        );

        // a keeps serving its member.
        let later = nb.append_async(set("vault/2", "code", "42")).await.unwrap();
        wait_until("a to receive b's event", || {
            has(&na, &later.id)
                .then_some(())
                .ok_or_else(|| Snap::of(&na).describe())
        })
        .await;
        assert!(!has(&na, &xs.id));
        a.shutdown().await;
        b.shutdown().await;
        x.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// A hostile member.

#[test]
fn a_hostile_member_is_cut_off_and_nothing_is_stored() {
    run("a_hostile_member_is_cut_off_and_nothing_is_stored", async {
        let tmp = tempfile::tempdir().unwrap();
        let (ma, mb, mm) = (
            Member::new(tmp.path(), "a"),
            Member::new(tmp.path(), "b"),
            Member::new(tmp.path(), "mallory"),
        );
        let all = members(&[&ma, &mb, &mm]);
        let (na, nb) = (ma.open(), mb.open());
        let a = start(&na, config(&all, &[])).await;
        let b = start(&nb, config(&all, &[a.local_addr()])).await;
        for i in 0..3 {
            na.append_async(set("account/1", "balance", &format!("{i}")))
                .await
                .unwrap();
        }
        wait_until("b to receive a's events", || {
            converged(&[("a", &na), ("b", &nb)], 3).map(|_| ())
        })
        .await;
        let before = Snap::of(&na);
        let ep = client(&mm.key, &all);

        // (a) A length prefix above the limit: the connection is closed before
        // anything is allocated for it.
        let conn = connect(&ep, a.local_addr()).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let too_big = u32::try_from(MAX_MESSAGE_BYTES + 1).unwrap();
        send.write_all(&too_big.to_le_bytes()).await.unwrap();
        // Closed with `close::PROTOCOL` and the reason.
        let closed = tokio::time::timeout(DEADLINE, conn.closed())
            .await
            .expect("a closes a connection that announced an oversized message");
        match &closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    quinn::VarInt::from_u32(close::PROTOCOL),
                    "{c:?}"
                );
                let reason = String::from_utf8_lossy(&c.reason);
                assert!(reason.contains(&too_big.to_string()), "{reason}");
            }
            e => panic!("closed without a protocol reason: {e}"),
        }
        // The member was admitted (a lists it) and dropped for the message.
        wait_row(
            &a,
            &mm.id(),
            "a to name the oversized message as the member's last error",
            |r| {
                r["connected"] == false
                    && r["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains(&too_big.to_string()))
            },
        )
        .await;

        // (b1) A signed event whose payload was changed after signing.
        let mut honest = MemStore::new();
        let draft = weftlog_proto::state::Draft {
            payload: br#"{"via":"desk"}"#.to_vec(),
            ..set("account/2", "owner", "mallory")
        };
        honest
            .commit(&mm.key, &mut HlcClock::default(), node::wall_ms(), [draft])
            .unwrap();
        let signed = honest.get(&mm.id(), 1).unwrap().clone();
        assert!(signed.sig.is_some());
        let at = signed
            .bytes
            .windows(4)
            .position(|w| w == b"desk")
            .expect("the payload is in the encoding");
        let mut tampered = signed.bytes.clone();
        tampered[at] ^= 1; // "desk" → "eesk": still a well-formed event
        let (_, tampered_id) = Event::decode(&tampered).expect("the tampered event decodes");
        assert_ne!(tampered_id, signed.id);
        let (event, id) = Event::decode(&signed.bytes).unwrap();
        let mut forged = MemStore::new();
        // The store keeps the bytes it is given: the session sends them as is.
        forged.insert(&event, id, &tampered, signed.sig).unwrap();
        let conn = connect(&ep, a.local_addr()).await;
        let ended = drive_session(&conn, mm.id(), ma.id(), forged).await;
        assert!(
            !has(&na, &tampered_id) && !has(&na, &signed.id),
            "a stored the tampered event"
        );
        assert_eq!(
            Snap::of(&na),
            before,
            "a stored something of a tampered stream"
        );
        protocol_close(&ended, "signature").unwrap();

        // (b2) An event claiming to be b's, signed with mallory's key.
        let Prepared::New(claim) = State::new()
            .prepare(
                mb.id(),
                &mut HlcClock::default(),
                node::wall_ms(),
                set("account/1", "balance", "1000000"),
            )
            .unwrap()
        else {
            unreachable!("a fresh state holds no command ids")
        };
        let (bytes, claim_id) = claim.seal();
        let mut forged = MemStore::new();
        forged
            .insert(&claim, claim_id, &bytes, Some(mm.key.sign(&claim_id)))
            .unwrap();
        let conn = connect(&ep, a.local_addr()).await;
        let ended = drive_session(&conn, mm.id(), ma.id(), forged).await;
        assert!(!has(&na, &claim_id), "a stored an event forged in b's name");
        assert_eq!(
            Snap::of(&na),
            before,
            "a stored something of a forged stream"
        );
        protocol_close(&ended, "signature").unwrap();
        assert!(
            a.forks().is_empty(),
            "forged events recorded as forks: {:?}",
            a.forks()
        );

        // a keeps working: b's own first event (the seq the forgery claimed)
        // reaches it, and b's head is b's real event.
        let real = nb
            .append_async(set("account/1", "balance", "4"))
            .await
            .unwrap();
        assert_eq!(real.seq, 1);
        wait_until("a to receive b's real event", || {
            let head = na.with_state(|s| {
                s.frontier()
                    .into_iter()
                    .find(|h| h.0 == mb.id())
                    .map(|(_, seq, id)| (seq, id))
            });
            match head {
                Some((1, id)) if id == real.id => Ok(()),
                other => Err(format!("a's head for b: {other:?}")),
            }
        })
        .await;
        wait_until("a and b to converge", || {
            converged(&[("a", &na), ("b", &nb)], 4).map(|_| ())
        })
        .await;
        a.shutdown().await;
        b.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Garbage on the wire.

#[test]
fn garbage_datagrams_do_no_harm() {
    run("garbage_datagrams_do_no_harm", async {
        let tmp = tempfile::tempdir().unwrap();
        let Two {
            mb, all, na, nb, ..
        } = Two::new(tmp.path());
        let (a, b) = start_two(&na, &nb, &all).await;

        let target = a.local_addr();
        let seed = 0x5eed_da7a_u64;
        let sent = tokio::task::spawn_blocking(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut rng = Rng(seed);
            let mut sent = 0;
            for i in 0..3000 {
                let len = 1 + rng.below(1500) as usize;
                let mut d = rng.bytes(len);
                match i % 3 {
                    // A QUIC v1 long header (Initial, Handshake, …), so that
                    // the endpoint parses past the first bytes.
                    0 if len >= 5 => {
                        d[0] |= 0xc0;
                        d[1..5].copy_from_slice(&1u32.to_be_bytes());
                    }
                    // A short header: a packet for some connection.
                    1 => {
                        d[0] = (d[0] & 0x3f) | 0x40;
                    }
                    _ => {}
                }
                if sock.send_to(&d, target).is_ok() {
                    sent += 1;
                }
                if i % 200 == 199 {
                    // Let the endpoint drain its socket buffer.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            sent
        })
        .await
        .unwrap();
        assert!(sent > 0, "no datagram was sent (seed {seed:#x})");

        for (i, (from, to, name)) in [(&na, &nb, "a→b"), (&nb, &na, "b→a")]
            .into_iter()
            .enumerate()
        {
            let made = from
                .append_async(set("after/garbage", "n", &format!("{i}")))
                .await
                .unwrap();
            wait_until(
                &format!("{name} to sync after the garbage (seed {seed:#x})"),
                || {
                    has(to, &made.id)
                        .then_some(())
                        .ok_or_else(|| Snap::of(to).describe())
                },
            )
            .await;
        }
        let peers = a.peers().await;
        assert!(
            peers
                .iter()
                .all(|r| r["node"].as_str() == Some(mb.id().to_string().as_str())),
            "a lists peers besides b after the garbage: {peers:#?}"
        );
        a.shutdown().await;
        b.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Shutdown.

#[test]
fn a_graceful_shutdown_keeps_everything_received() {
    run("a_graceful_shutdown_keeps_everything_received", async {
        let tmp = tempfile::tempdir().unwrap();
        let Two {
            mb, all, na, nb, ..
        } = Two::new(tmp.path());
        let (a, b) = start_two(&na, &nb, &all).await;

        const N: usize = 300;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..3 {
            let na = na.clone();
            tasks.spawn(async move {
                for k in 0..N / 3 {
                    na.append_async(set(&format!("parcel/{k}"), &format!("leg{t}"), "scanned"))
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // Shut b down the moment it holds everything: the last events it
        // received may not be durable yet.
        let mut received = None;
        wait_until("b to receive a's acknowledged appends", || {
            let r = converged(&[("a", &na), ("b", &nb)], N as u64)?;
            received = Some(r);
            Ok(())
        })
        .await;
        let received = received.expect("set by the wait");
        b.shutdown().await;
        // What is on disk the moment shutdown returns, the node still open:
        // shutdown itself must have made everything received durable.
        let copy = tmp.path().join("b-at-shutdown");
        copy_dir(&mb.dir, &copy);
        let on_disk = tokio::task::spawn_blocking(move || {
            let (node, _) = Node::open(&copy).expect("the copy opens");
            let snap = Snap::of(&node);
            drop(node);
            snap
        })
        .await
        .unwrap();
        assert_eq!(
            on_disk,
            received,
            "b's files when shutdown returned:\n  {}\nreceived before:\n  {}",
            on_disk.describe(),
            received.describe()
        );
        let reopened = reopen(b, nb, &mb.dir).await;
        assert_eq!(
            Snap::of(&reopened),
            received,
            "b after a graceful shutdown and restart:\n  {}\nbefore:\n  {}",
            Snap::of(&reopened).describe(),
            received.describe()
        );
        a.shutdown().await;
    });
}

// ---------------------------------------------------------------------------
// Regressions: races in the daemon's connection handling.

/// A block set after a peer's handshake but before it opened its sync
/// stream holds: the peer is cut off and nothing crosses (the session must
/// check the blocked set once it has subscribed to its changes).
#[test]
fn a_block_set_while_a_peer_opens_its_stream_holds() {
    run("a_block_set_while_a_peer_opens_its_stream_holds", async {
        let tmp = tempfile::tempdir().unwrap();
        let (ma, mm) = (Member::new(tmp.path(), "a"), Member::new(tmp.path(), "m"));
        let all = members(&[&ma, &mm]);
        let na = ma.open();
        let a_event = na.append_async(set("doc/1", "title", "a")).await.unwrap();
        let a = start(&na, config(&all, &[])).await;
        let ep = client(&mm.key, &all);
        let conn = connect(&ep, a.local_addr()).await;
        // a lists the member once it has taken the connection (and waits
        // for its stream).
        wait_row(&a, &mm.id(), "a to take the member's connection", |_| true).await;

        // a waits for the member's stream; the block comes now.
        a.set_blocked([mm.id()].into());

        let mut store = MemStore::new();
        store
            .commit(
                &mm.key,
                &mut HlcClock::default(),
                node::wall_ms(),
                [set("doc/1", "title", "m")],
            )
            .unwrap();
        let m_event = store.get(&mm.id(), 1).unwrap().id;
        match conn.open_bi().await {
            // a closed the connection at the block, before the stream.
            Err(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(close::BLOCKED));
            }
            Err(e) => panic!("the stream failed otherwise: {e}"),
            Ok((mut send, mut recv)) => {
                let (tx, mut inbound) = tokio::sync::mpsc::channel(64);
                tokio::spawn(async move {
                    while let Ok(m) = read_message(&mut recv).await {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                });
                let mut cfg = SessionConfig::new(cluster(), mm.id());
                cfg.peer = Some(ma.id());
                let mut session = Session::new(cfg, &store);
                let started = Instant::now();
                while started.elapsed() < QUIET * 2 {
                    while let Some(m) = session.poll_transmit(&store) {
                        let _ = send.write_all(&m).await;
                    }
                    match tokio::time::timeout(POLL * 5, inbound.recv()).await {
                        Ok(Some(m)) => {
                            let _ = session.handle_message(&m, &mut store);
                        }
                        Ok(None) => break, // a closed the connection, as it should
                        Err(_) => {}
                    }
                }
            }
        }
        assert!(
            !has(&na, &m_event),
            "a stored an event from a peer it blocks"
        );
        assert!(
            !store.state().contains(&a_event.id),
            "a sent its log to a peer it blocks"
        );
        assert!(
            !a.is_connected(&mm.id()),
            "a keeps a session with a peer it blocks"
        );
        a.shutdown().await;
    });
}

/// When a peer goes away, the daemon keeps serving. The node runs on a
/// one-thread runtime, so a task that never yields stops everything: a dial
/// loop that waited on the peer's connection must not spin on it while the
/// closed connection is still registered (its session winding down).
#[test]
fn a_peer_going_away_does_not_starve_the_runtime() {
    trace();
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m2) = (Member::new(tmp.path(), "1"), Member::new(tmp.path(), "2"));
    // x keeps the connection y dialled (the smaller id's), so its own dial
    // loop for y waits on a connection it did not dial.
    let (mx, my) = if m1.id() > m2.id() {
        (m1, m2)
    } else {
        (m2, m1)
    };
    let all = members(&[&mx, &my]);
    let yrt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let xrt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (nx, ny) = (mx.open(), my.open());
    let dy = yrt.block_on(start(&ny, config(&all, &[])));
    let dx = xrt.block_on(start(&nx, config(&all, &[dy.local_addr()])));
    {
        let _in = yrt.enter();
        dy.add_peer(&dx.local_addr().to_string());
    }
    let xh = xrt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || {
        xrt.block_on(async {
            let _ = stopped.await;
        });
    });
    let responsive = |what: &str| {
        let (tx, rx) = std::sync::mpsc::channel();
        xh.spawn(async move {
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "x's runtime runs no task for 5 s {what}"
        );
    };
    let started = Instant::now();
    while !(dx.is_connected(&my.id()) && dy.is_connected(&mx.id())) {
        assert!(started.elapsed() < DEADLINE, "x and y never connected");
        std::thread::sleep(POLL);
    }
    // Let the two dials settle on one connection.
    std::thread::sleep(Duration::from_millis(500));
    responsive("while connected");

    yrt.block_on(dy.shutdown());
    responsive("after its peer shut down");
    let started = Instant::now();
    while dx.is_connected(&my.id()) {
        assert!(
            started.elapsed() < DEADLINE,
            "x still shows a session with y {DEADLINE:?} after y shut down"
        );
        std::thread::sleep(POLL);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    xh.spawn(async move {
        dx.shutdown().await;
        let _ = tx.send(());
    });
    rx.recv_timeout(DEADLINE).expect("x shuts down");
    let _ = stop.send(());
    driver.join().unwrap();
}
