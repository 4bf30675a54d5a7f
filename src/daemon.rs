//! The node daemon behind `weftlog run`: one QUIC endpoint that keeps a
//! sync session with every reachable member, and the state the HTTP API
//! ([`crate::http`]) shows.
//!
//! # Connections
//!
//! Every address given with `--peer` (or found by mDNS) gets a dial loop:
//! it connects, runs the session until the connection ends, and dials again
//! with exponential backoff (100 ms doubling to 5 s, with jitter). Incoming
//! connections are served the same way. There is one connection per pair of
//! nodes: when two exist (both dialled at once), both ends keep the one
//! dialled by the smaller node id and close the other, so they agree
//! without talking. A connection that shows no sign of life for
//! [`Config::idle_timeout`] is dropped (QUIC keep-alives are sent at a
//! third of it), and the dial loop reconnects.
//!
//! # Sessions
//!
//! Each connection carries one bidirectional stream (opened by the dialer)
//! and one [`Session`]. Three tasks drive it: a reader that reads whole
//! messages (checking each length against the limit before allocating)
//! into a small bounded queue, a writer that writes the session's messages
//! from another, and the session loop between them. The loop hands the
//! session every received message, every batch the node makes durable
//! ([`Node::subscribe`]: live push of local and received events), and the
//! anti-entropy timer's rounds; it takes one outgoing message at a time and
//! only when the writer has room, so a slow peer slows its own session and
//! nothing else grows. A session that fails sends the peer its reason and
//! the connection closes; the dial loop starts a fresh one.
//!
//! # Anti-entropy
//!
//! Every [`Config::anti_entropy`] a random connected peer is asked for a
//! round (Hello with the current digest); equal digests settle it in one
//! round trip, and anything a push missed is repaired.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use weftlog_proto::sync::{
    message_len, Equivocation, Session, SessionConfig, SessionEvent, SessionStats, Store,
    SyncError, LENGTH_PREFIX_BYTES,
};
use weftlog_proto::NodeId;

use crate::node::Node;
use crate::tls::{self, peer_id, Members, SERVER_NAME};

/// Application close codes on a QUIC connection.
pub mod close {
    /// This node blocks the peer (`POST /v1/admin/partition`).
    pub const BLOCKED: u32 = 1;
    /// Another connection with the same peer is kept.
    pub const DUPLICATE: u32 = 2;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// The peer broke the protocol; the reason says how.
    pub const PROTOCOL: u32 = 4;
}

/// First wait before redialling.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before redialling.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a dial (handshake included) or the session stream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued between the reader, the session and the writer, each way.
pub const QUEUE_MESSAGES: usize = 16;
/// The equivocation file in a data directory: one JSON object per line.
pub const EQUIVOCATIONS_FILE: &str = "equivocations.jsonl";

/// The daemon's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// Peers to dial, `host:port`.
    pub peers: Vec<String>,
    /// Who may connect.
    pub members: Members,
    /// The cluster id ([`cluster_id`]); a peer in another cluster is refused.
    pub cluster: [u8; 32],
    /// Time between anti-entropy rounds (with a random peer).
    pub anti_entropy: Duration,
    /// A connection silent this long is dropped.
    pub idle_timeout: Duration,
    /// Announce this node and find peers with mDNS.
    pub mdns: bool,
}

impl Config {
    /// Defaults: no peers, anyone admitted, cluster "default", anti-entropy
    /// every 2 s, idle timeout 10 s, no mDNS.
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            peers: Vec::new(),
            members: Members::Anyone,
            cluster: cluster_id("default"),
            anti_entropy: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            mdns: false,
        }
    }
}

/// The cluster id of a cluster name.
pub fn cluster_id(name: &str) -> [u8; 32] {
    blake3::derive_key("weftlog v1 cluster id", name.as_bytes())
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// mDNS could not start.
    #[error("mDNS: {0}")]
    Mdns(String),
}

/// A fork seen by this node: two events with one `(author, seq)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    /// What the session reported.
    pub proof: Equivocation,
    /// The peer that sent the other branch.
    pub peer: NodeId,
}

impl Fork {
    fn json(&self) -> Value {
        json!({
            "author": self.proof.author.to_string(),
            "seq": self.proof.seq,
            "held": self.proof.held.to_string(),
            "other": self.proof.other.to_string(),
            "proven": self.proof.proven,
            "peer": self.peer.to_string(),
        })
    }
}

/// The equivocations a daemon recorded in `dir` (none if the file is
/// missing): one per `(author, seq)`, the proven record over a claim.
/// Lines that do not parse are skipped with a warning.
pub fn read_equivocations(dir: &Path) -> Vec<Value> {
    load_forks(dir).values().map(Fork::json).collect()
}

fn read_records(dir: &Path) -> Vec<Value> {
    let path = dir.join(EQUIVOCATIONS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(path = %path.display(), "skipping a damaged equivocation record: {e}");
                None
            }
        })
        .collect()
}

/// A request to a session loop.
enum Control {
    /// Start an anti-entropy round.
    Round,
    /// Report the session's view of the peer.
    Report(oneshot::Sender<Report>),
}

/// A session's view of its peer.
#[derive(Clone, Copy, Debug, Default)]
struct Report {
    /// Events this node holds that the peer is not known to hold; `None`
    /// before the first frontier exchange.
    behind: Option<u64>,
    stats: SessionStats,
}

/// The connection kept with a peer.
struct Live {
    generation: u64,
    /// Which end dialled.
    dialer: NodeId,
    conn: quinn::Connection,
    control: mpsc::Sender<Control>,
    /// The peer's first message arrived: it accepted this node too (a TLS
    /// 1.3 client finishes its handshake before the server has checked the
    /// client's certificate, so a dialer cannot tell earlier).
    established: bool,
}

#[derive(Default)]
struct PeerState {
    live: Option<Live>,
    addr: Option<SocketAddr>,
    /// The last report of the last session.
    last: Report,
    last_error: Option<String>,
    /// Events received from the peer, over all its sessions.
    received: u64,
}

#[derive(Default)]
struct Target {
    /// The node that answered at this address.
    id: Option<NodeId>,
    last_error: Option<String>,
}

struct Shared {
    node: Arc<Node>,
    me: NodeId,
    cluster: [u8; 32],
    members: Members,
    endpoint: quinn::Endpoint,
    anti_entropy: Duration,
    peers: Mutex<BTreeMap<NodeId, PeerState>>,
    targets: Mutex<BTreeMap<String, Target>>,
    blocked: watch::Sender<BTreeSet<NodeId>>,
    shutdown: watch::Sender<bool>,
    forks: Mutex<BTreeMap<(NodeId, u64), Fork>>,
    generation: AtomicU64,
}

/// A running daemon. Dropping it without [`Daemon::shutdown`] stops its
/// tasks at the runtime's end.
pub struct Daemon {
    shared: Arc<Shared>,
    mdns: Mutex<Option<mdns_sd::ServiceDaemon>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The daemon's maps hold no invariant a panic could break halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Starts serving `node` as `config` says: binds the QUIC endpoint,
    /// starts the dial loops, the accept loop, the anti-entropy timer and
    /// mDNS. Must be called within a tokio runtime.
    pub async fn start(node: Arc<Node>, config: Config) -> Result<Daemon, StartError> {
        let key = node.keypair();
        let mut server = tls::server_config(key, config.members.clone())?;
        let mut client = tls::client_config(key, config.members.clone())?;
        let transport = Arc::new(transport(config.idle_timeout));
        server.transport_config(transport.clone());
        client.transport_config(transport);
        let mut endpoint = quinn::Endpoint::server(server, config.listen).map_err(|source| {
            StartError::Listen {
                addr: config.listen,
                source,
            }
        })?;
        endpoint.set_default_client_config(client);
        let me = node.id();
        let forks = load_forks(node.dir());
        let shared = Arc::new(Shared {
            me,
            cluster: config.cluster,
            members: config.members.clone(),
            endpoint,
            anti_entropy: config.anti_entropy,
            peers: Mutex::new(BTreeMap::new()),
            targets: Mutex::new(BTreeMap::new()),
            blocked: watch::channel(BTreeSet::new()).0,
            shutdown: watch::channel(false).0,
            forks: Mutex::new(forks),
            generation: AtomicU64::new(0),
            node,
        });
        info!(node = %me, addr = %shared.endpoint.local_addr().map_or(config.listen, |a| a), "listening for peers (QUIC)");
        tokio::spawn(accept_loop(shared.clone()));
        tokio::spawn(anti_entropy_loop(shared.clone()));
        for p in &config.peers {
            add_target(&shared, p.clone());
        }
        let mdns = if config.mdns {
            Some(start_mdns(&shared).map_err(|e| StartError::Mdns(e.to_string()))?)
        } else {
            None
        };
        Ok(Daemon {
            shared,
            mdns: Mutex::new(mdns),
        })
    }

    /// The node served.
    pub fn node(&self) -> &Arc<Node> {
        &self.shared.node
    }

    /// The QUIC address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Dials `addr` (`host:port`) from now on, as `--peer` does.
    pub fn add_peer(&self, addr: &str) {
        add_target(&self.shared, addr.to_string());
    }

    /// Cuts this node off from `nodes` (both directions): their connections
    /// are closed, they are neither dialled nor accepted. An empty set heals.
    pub fn set_blocked(&self, nodes: BTreeSet<NodeId>) {
        if !nodes.is_empty() {
            info!(nodes = ?nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>(), "partition: blocking peers");
        } else {
            info!("partition healed: no peer blocked");
        }
        self.shared.blocked.send_replace(nodes);
    }

    /// The blocked nodes.
    pub fn blocked(&self) -> BTreeSet<NodeId> {
        self.shared.blocked.borrow().clone()
    }

    /// Whether a session with `peer` is up.
    pub fn is_connected(&self, peer: &NodeId) -> bool {
        lock(&self.shared.peers)
            .get(peer)
            .is_some_and(|p| p.live.as_ref().is_some_and(|l| l.established))
    }

    /// Asks every connected peer for an anti-entropy round now.
    pub fn sync_now(&self) {
        for p in lock(&self.shared.peers).values() {
            if let Some(l) = &p.live {
                let _ = l.control.try_send(Control::Round);
            }
        }
    }

    /// The forks this node has seen.
    pub fn forks(&self) -> Vec<Fork> {
        lock(&self.shared.forks).values().cloned().collect()
    }

    /// `weftlog status` plus `peers`, `blocked` and `equivocations`.
    pub async fn status(&self) -> Value {
        let node = &self.shared.node;
        let mut status = node.with_state(|s| crate::json::status(&node.id(), s));
        let peers = self.peers().await;
        let blocked: Vec<String> = self.blocked().iter().map(|n| n.to_string()).collect();
        let forks: Vec<Value> = self.forks().iter().map(Fork::json).collect();
        if let Value::Object(m) = &mut status {
            m.insert("peers".into(), Value::Array(peers));
            m.insert("blocked".into(), json!(blocked));
            m.insert("equivocations".into(), Value::Array(forks));
        }
        status
    }

    /// One object per known peer: `node` (null until it answered), `addr`,
    /// `connected`, `behind` (events this node holds that the peer is not
    /// known to hold; null before the first exchange), traffic counters and
    /// the last error.
    pub async fn peers(&self) -> Vec<Value> {
        let mut asks = Vec::new();
        let mut rows: BTreeMap<String, Value> = BTreeMap::new();
        let targets: Vec<(String, Option<NodeId>, Option<String>)> = lock(&self.shared.targets)
            .iter()
            .map(|(a, t)| (a.clone(), t.id, t.last_error.clone()))
            .collect();
        {
            let peers = lock(&self.shared.peers);
            for (id, p) in peers.iter() {
                let addr = targets
                    .iter()
                    .find(|t| t.1 == Some(*id))
                    .map(|t| t.0.clone())
                    .or(p.addr.map(|a| a.to_string()));
                if let Some(l) = &p.live {
                    let (tx, rx) = oneshot::channel();
                    if l.control.try_send(Control::Report(tx)).is_ok() {
                        asks.push((*id, rx));
                    }
                }
                rows.insert(
                    id.to_string(),
                    json!({
                        "node": id.to_string(),
                        "addr": addr,
                        "connected": p.live.as_ref().is_some_and(|l| l.established),
                        "behind": p.last.behind,
                        "events_received": p.received,
                        "events_sent": p.last.stats.events_sent,
                        "bytes_sent": p.last.stats.bytes_sent,
                        "bytes_received": p.last.stats.bytes_received,
                        "last_error": p.last_error,
                    }),
                );
            }
        }
        for (addr, id, err) in targets {
            if id.is_none_or(|id| !rows.contains_key(&id.to_string())) {
                rows.insert(
                    format!("~{addr}"),
                    json!({
                        "node": id.map(|i| i.to_string()),
                        "addr": addr,
                        "connected": false,
                        "behind": null,
                        "last_error": err,
                    }),
                );
            }
        }
        for (id, rx) in asks {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                if let Some(Value::Object(row)) = rows.get_mut(&id.to_string()) {
                    row.insert("behind".into(), json!(r.behind));
                    row.insert("events_sent".into(), json!(r.stats.events_sent));
                    row.insert("bytes_sent".into(), json!(r.stats.bytes_sent));
                    row.insert("bytes_received".into(), json!(r.stats.bytes_received));
                }
            }
        }
        rows.into_values().collect()
    }

    /// A receiver that turns `true` when the daemon shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shared.shutdown.subscribe()
    }

    /// Stops: closes every connection (telling peers why), stops the dial
    /// loops and mDNS, waits for the tasks to end, and waits until every
    /// event received is durable. Appends acknowledged before are durable
    /// already.
    pub async fn shutdown(&self) {
        if let Some(m) = lock(&self.mdns).take() {
            let _ = m.shutdown();
        }
        self.shared.shutdown.send_replace(true);
        self.shared
            .endpoint
            .close(close::SHUTDOWN.into(), b"node shutting down");
        // Every task holds the shared state; wait until they let go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.shared) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Long enough for the close frames to go out; dials still draining
        // are not waited for.
        let _ = tokio::time::timeout(Duration::from_millis(300), self.shared.endpoint.wait_idle())
            .await;
        let node = self.shared.node.clone();
        match tokio::task::spawn_blocking(move || node.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("flushing received events at shutdown: {e}"),
            Err(e) => warn!("flushing received events at shutdown: {e}"),
        }
    }
}

fn transport(idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One sync stream per connection; a peer cannot open more.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(idle / 3));
    t
}

fn load_forks(dir: &Path) -> BTreeMap<(NodeId, u64), Fork> {
    let mut out = BTreeMap::new();
    for v in read_records(dir) {
        let parsed = (|| {
            let s = |k: &str| v.get(k)?.as_str();
            Some(Fork {
                proof: Equivocation {
                    author: s("author")?.parse().ok()?,
                    seq: v.get("seq")?.as_u64()?,
                    held: s("held")?.parse().ok()?,
                    other: s("other")?.parse().ok()?,
                    proven: v.get("proven")?.as_bool()?,
                },
                peer: s("peer")?.parse().ok()?,
            })
        })();
        if let Some(f) = parsed {
            let key = (f.proof.author, f.proof.seq);
            let keep = out
                .get(&key)
                .is_none_or(|old: &Fork| !old.proof.proven && f.proof.proven);
            if keep {
                out.insert(key, f);
            }
        }
    }
    out
}

impl Shared {
    /// Records a fork once per `(author, seq)`, or again when proof arrives
    /// for a claim; appends it to the equivocation file.
    fn record_fork(&self, peer: NodeId, proof: Equivocation) {
        let key = (proof.author, proof.seq);
        let fork = Fork { proof, peer };
        {
            let mut forks = lock(&self.forks);
            if forks
                .get(&key)
                .is_some_and(|old| old.proof.proven || !proof.proven)
            {
                return;
            }
            forks.insert(key, fork.clone());
        }
        warn!(
            author = %proof.author, seq = proof.seq, held = %proof.held, other = %proof.other,
            proven = proof.proven, peer = %peer,
            "equivocation: the author signed two events with one seq"
        );
        let path: PathBuf = self.node.dir().join(EQUIVOCATIONS_FILE);
        let line = format!("{}\n", fork.json());
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            warn!(path = %path.display(), "cannot record the equivocation: {e}");
        }
    }

    /// Keeps `conn` as the connection with `peer` unless a better one is
    /// up; returns its generation, or `None` if it must be closed.
    fn register(
        &self,
        peer: NodeId,
        conn: &quinn::Connection,
        dialer: NodeId,
        control: mpsc::Sender<Control>,
    ) -> Option<u64> {
        let mut peers = lock(&self.peers);
        let state = peers.entry(peer).or_default();
        if let Some(old) = &state.live {
            // Same dialer: a reconnect, the old one is stale. Otherwise the
            // connection dialled by the smaller id wins, on both ends.
            if old.dialer != dialer && old.dialer < dialer {
                return None;
            }
            old.conn
                .close(close::DUPLICATE.into(), b"replaced by another connection");
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        state.live = Some(Live {
            generation,
            dialer,
            conn: conn.clone(),
            control,
            established: false,
        });
        state.addr = Some(conn.remote_address());
        Some(generation)
    }

    fn unregister(&self, peer: NodeId, generation: u64, last: Report, error: Option<String>) {
        let mut peers = lock(&self.peers);
        if let Some(state) = peers.get_mut(&peer) {
            if state
                .live
                .as_ref()
                .is_some_and(|l| l.generation == generation)
            {
                state.live = None;
                state.last = last;
                if error.is_some() {
                    state.last_error = error;
                }
            }
        }
    }

    /// Marks the connection `generation` with `peer` as established.
    fn established(&self, peer: NodeId, generation: u64) {
        let mut peers = lock(&self.peers);
        if let Some(l) = peers.get_mut(&peer).and_then(|p| p.live.as_mut()) {
            if l.generation == generation {
                l.established = true;
            }
        }
    }

    /// The live connection with `peer`, if any. A closed one still
    /// registered (its session is winding down) does not count: a dial loop
    /// waiting on it would spin.
    fn live_conn(&self, peer: &NodeId) -> Option<quinn::Connection> {
        lock(&self.peers)
            .get(peer)
            .and_then(|p| p.live.as_ref().map(|l| l.conn.clone()))
            .filter(|c| c.close_reason().is_none())
    }

    fn is_blocked(&self, peer: &NodeId) -> bool {
        self.blocked.borrow().contains(peer)
    }
}

/// Starts a dial loop for `addr` unless one runs; returns whether it did.
fn add_target(shared: &Arc<Shared>, addr: String) -> bool {
    {
        let mut targets = lock(&shared.targets);
        if targets.contains_key(&addr) {
            return false;
        }
        targets.insert(addr.clone(), Target::default());
    }
    tokio::spawn(dial_loop(shared.clone(), addr));
    true
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(incoming) = incoming else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(CONNECT_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => serve(shared, conn, false).await,
                Ok(Err(e)) => info!(%remote, "incoming connection refused: {e}"),
                Err(_) => info!(%remote, "incoming handshake timed out"),
            }
        });
    }
}

async fn dial(shared: &Shared, target: &str) -> Result<quinn::Connection, String> {
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to no address"))?;
    let connecting = shared
        .endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| format!("cannot dial {addr}: {e}"))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// A wait of `base` ± 25 %.
fn jitter(base: Duration) -> Duration {
    let r = rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 500;
    base.mul_f64(0.75 + f64::from(r) / 1000.0)
}

async fn dial_loop(shared: Arc<Shared>, target: String) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut blocked = shared.blocked.subscribe();
    let mut backoff = MIN_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let known = lock(&shared.targets).get(&target).and_then(|t| t.id);
        if let Some(id) = known {
            if let Some(conn) = shared.live_conn(&id) {
                // Connected already (perhaps dialled by the peer): wait.
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
            if shared.is_blocked(&id) {
                tokio::select! {
                    _ = blocked.wait_for(|b| !b.contains(&id)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                backoff = MIN_BACKOFF;
                continue;
            }
        }
        let started = Instant::now();
        match dial(&shared, &target).await {
            Ok(conn) => {
                if let Some(id) = peer_id(&conn) {
                    let mut targets = lock(&shared.targets);
                    let t = targets.entry(target.clone()).or_default();
                    t.id = Some(id);
                    t.last_error = None;
                }
                serve(shared.clone(), conn, true).await;
                if started.elapsed() > MAX_BACKOFF {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(e) => {
                debug!(peer = %target, "dial failed: {e}");
                lock(&shared.targets)
                    .entry(target.clone())
                    .or_default()
                    .last_error = Some(e);
            }
        }
        let known = lock(&shared.targets).get(&target).and_then(|t| t.id);
        if known.is_some_and(|id| shared.live_conn(&id).is_some()) {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(jitter(backoff)) => {}
            // A heal redials at once.
            _ = blocked.changed() => backoff = MIN_BACKOFF,
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn anti_entropy_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.anti_entropy) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let live: Vec<mpsc::Sender<Control>> = lock(&shared.peers)
            .values()
            .filter_map(|p| p.live.as_ref().map(|l| l.control.clone()))
            .collect();
        if live.is_empty() {
            continue;
        }
        let pick = rand_core::RngCore::next_u32(&mut rand_core::OsRng) as usize % live.len();
        let _ = live[pick].try_send(Control::Round);
    }
}

/// Runs a connection's session until it ends, then closes it.
async fn serve(shared: Arc<Shared>, conn: quinn::Connection, dialed: bool) {
    let Some(peer) = peer_id(&conn) else {
        conn.close(close::PROTOCOL.into(), b"no node id");
        return;
    };
    let remote = conn.remote_address();
    if shared.is_blocked(&peer) {
        debug!(%peer, %remote, "refusing a blocked peer");
        conn.close(close::BLOCKED.into(), b"blocked by partition");
        return;
    }
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let dialer = if dialed { shared.me } else { peer };
    let Some(generation) = shared.register(peer, &conn, dialer, ctl_tx) else {
        debug!(%peer, %remote, "keeping the other connection with this peer");
        conn.close(close::DUPLICATE.into(), b"another connection is kept");
        return;
    };
    debug!(%peer, %remote, dialed, "connection up; waiting for the peer's Hello");
    let mut report = Report::default();
    let end = run_session(
        &shared,
        peer,
        generation,
        &conn,
        dialed,
        ctl_rx,
        &mut report,
    )
    .await;
    let error = match end {
        End::Closed(reason) => {
            info!(%peer, "peer disconnected: {reason}");
            Some(reason)
        }
        End::Shutdown => {
            conn.close(close::SHUTDOWN.into(), b"node shutting down");
            None
        }
        End::Blocked => {
            info!(%peer, "disconnected by partition");
            conn.close(close::BLOCKED.into(), b"blocked by partition");
            None
        }
        End::Failed(e) => {
            warn!(%peer, "sync session failed: {e}");
            let reason = e.to_string();
            conn.close(
                close::PROTOCOL.into(),
                &reason.as_bytes()[..reason.len().min(512)],
            );
            Some(reason)
        }
    };
    shared.unregister(peer, generation, report, error);
}

enum End {
    /// The connection or stream ended.
    Closed(String),
    Shutdown,
    Blocked,
    /// The session failed (its goodbye was sent).
    Failed(String),
}

enum Inbound {
    Message(Vec<u8>),
    /// The stream or connection ended.
    Failed(String),
    /// The peer broke the framing (a length above the limit).
    Protocol(String),
}

/// Reads whole messages; a length above the limit fails before anything
/// is allocated.
async fn read_loop(mut recv: quinn::RecvStream, tx: mpsc::Sender<Inbound>) {
    loop {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        let failed = match recv.read_exact(&mut prefix).await {
            Ok(()) => match message_len(prefix) {
                Ok(len) => {
                    let mut msg = vec![0u8; LENGTH_PREFIX_BYTES + len];
                    msg[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix);
                    match recv.read_exact(&mut msg[LENGTH_PREFIX_BYTES..]).await {
                        Ok(()) => {
                            if tx.send(Inbound::Message(msg)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Err(e) => format!("the stream ended mid-message: {e}"),
                    }
                }
                Err(e) => {
                    let _ = tx.send(Inbound::Protocol(e.to_string())).await;
                    return;
                }
            },
            Err(quinn::ReadExactError::FinishedEarly(0)) => "the peer closed the stream".into(),
            Err(e) => format!("receive: {e}"),
        };
        let _ = tx.send(Inbound::Failed(failed)).await;
        return;
    }
}

/// Writes messages in order; after the last, finishes the stream and waits
/// (briefly) until the peer has it.
async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(msg) = rx.recv().await {
        if send.write_all(&msg).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
}

fn behind(session: &Session, store: &impl Store, synced: bool) -> Option<u64> {
    if !synced {
        return None;
    }
    let has = session.peer_heads();
    Some(
        store
            .frontier()
            .iter()
            .map(|h| {
                h.seq
                    .saturating_sub(has.get(&h.author).copied().unwrap_or(0))
            })
            .sum(),
    )
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    shared: &Arc<Shared>,
    peer: NodeId,
    generation: u64,
    conn: &quinn::Connection,
    dialed: bool,
    mut control: mpsc::Receiver<Control>,
    report: &mut Report,
) -> End {
    let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
        if dialed {
            conn.open_bi().await
        } else {
            conn.accept_bi().await
        }
    })
    .await;
    let (send, recv) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return End::Closed(e.to_string()),
        Err(_) => return End::Closed("the peer opened no sync stream".into()),
    };
    let node = shared.node.clone();
    // Subscribe before the session takes its snapshot: nothing made durable
    // in between is missed.
    let mut feed = node.subscribe();
    let mut blocked = shared.blocked.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    if shared.is_blocked(&peer) {
        return End::Blocked;
    }
    let (in_tx, mut inbound) = mpsc::channel(QUEUE_MESSAGES);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(QUEUE_MESSAGES);
    let reader = tokio::spawn(read_loop(recv, in_tx));
    let writer = tokio::spawn(write_loop(send, out_rx));
    let mut config = SessionConfig::new(shared.cluster, shared.me);
    config.peer = Some(peer);
    let mut session = Session::new(config, &node.sync_store());
    let mut out: Option<Vec<u8>> = None;
    let mut synced = false;
    // A round asked for while one runs starts when it ends.
    let mut round_wanted = false;
    let mut heard = false;
    let end = loop {
        let mut failed = None;
        while let Some(e) = session.poll_event() {
            match e {
                SessionEvent::InSync | SessionEvent::RoundDone => {
                    synced = true;
                    if round_wanted {
                        round_wanted = !session.start_round(&node.sync_store());
                    }
                }
                SessionEvent::Received { count, .. } => {
                    if let Some(p) = lock(&shared.peers).get_mut(&peer) {
                        p.received += count;
                    }
                }
                SessionEvent::Equivocation(proof) => shared.record_fork(peer, proof),
                SessionEvent::Failed(e) => failed = Some(e),
                SessionEvent::PeerDone
                | SessionEvent::Announced { .. }
                | SessionEvent::Grafted
                | SessionEvent::Pruned
                | SessionEvent::Missing { .. } => {}
            }
        }
        if out.is_none() {
            out = session.poll_transmit(&node.sync_store());
        }
        if let Some(e) = failed {
            // Send the goodbye, then let the writer finish.
            if let Some(msg) = out.take() {
                let _ = out_tx.send(msg).await;
            }
            break End::Failed(describe_failure(&e));
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break End::Shutdown,
            _ = blocked.changed() => {
                if shared.is_blocked(&peer) {
                    break End::Blocked;
                }
            }
            m = inbound.recv() => match m {
                Some(Inbound::Message(msg)) => {
                    if !heard {
                        heard = true;
                        shared.established(peer, generation);
                        info!(%peer, remote = %conn.remote_address(), dialed, "peer connected");
                    }
                    // A failure is reported by poll_event above.
                    let _ = session.handle_message(&msg, &mut node.sync_store());
                }
                Some(Inbound::Protocol(why)) => break End::Failed(why),
                Some(Inbound::Failed(why)) => {
                    if let Some(reason) = conn.close_reason() {
                        break End::Closed(reason.to_string());
                    }
                    break End::Closed(why);
                }
                None => break End::Closed("the reader stopped".into()),
            },
            permit = out_tx.reserve(), if out.is_some() => match permit {
                Ok(p) => p.send(out.take().expect("guarded by the branch condition")),
                Err(_) => break End::Closed("the writer stopped".into()),
            },
            c = feed.recv() => match c {
                Ok(batch) => {
                    let store = node.sync_store();
                    for &(author, seq) in &batch.heads {
                        session.handle_stored(author, seq, &store);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(%peer, "fell {n} batches behind the live feed; starting a round");
                    round_wanted = !session.start_round(&node.sync_store());
                }
                Err(broadcast::error::RecvError::Closed) => break End::Shutdown,
            },
            c = control.recv() => match c {
                Some(Control::Round) => {
                    round_wanted = !session.start_round(&node.sync_store());
                }
                Some(Control::Report(tx)) => {
                    let r = Report {
                        behind: behind(&session, &node.sync_store(), synced),
                        stats: session.stats(),
                    };
                    let _ = tx.send(r);
                }
                None => break End::Shutdown,
            },
        }
    };
    *report = Report {
        behind: behind(&session, &node.sync_store(), synced),
        stats: session.stats(),
    };
    reader.abort();
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    end
}

fn describe_failure(e: &SyncError) -> String {
    match e {
        SyncError::Peer { reason } => format!("the peer ended the session: {reason}"),
        e => e.to_string(),
    }
}

/// The mDNS service type nodes announce.
pub const MDNS_SERVICE: &str = "_weftlog._udp.local.";
/// Most addresses dialled per member found by mDNS.
pub const MDNS_ADDRS_PER_NODE: usize = 4;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Announces this node (instance name: the first 16 hex digits of its id;
/// TXT `node` = the full id, `cluster` = the first 8 bytes of the cluster
/// id) and dials every other member of the cluster that announces itself.
fn start_mdns(shared: &Arc<Shared>) -> Result<mdns_sd::ServiceDaemon, mdns_sd::Error> {
    let mdns = mdns_sd::ServiceDaemon::new()?;
    let port = shared.endpoint.local_addr().map_or(0, |a| a.port());
    let me = shared.me.to_string();
    let cluster = hex(&shared.cluster[..8]);
    let instance = &me[..16];
    let info = mdns_sd::ServiceInfo::new(
        MDNS_SERVICE,
        instance,
        &format!("weftlog-{instance}.local."),
        "",
        port,
        &[("node", me.as_str()), ("cluster", cluster.as_str())][..],
    )?
    .enable_addr_auto();
    mdns.register(info)?;
    let events = mdns.browse(MDNS_SERVICE)?;
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.subscribe();
        // Addresses dialled per member: announcements are LAN input, so
        // they may start only a few dial loops each.
        let mut dialled: BTreeMap<NodeId, usize> = BTreeMap::new();
        loop {
            let ev = tokio::select! {
                e = events.recv_async() => e,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let Ok(ev) = ev else { return };
            let mdns_sd::ServiceEvent::ServiceResolved(found) = ev else {
                continue;
            };
            let node = found.txt_properties.get_property_val_str("node");
            let Some(Ok(node)) = node.map(str::parse::<NodeId>) else {
                continue;
            };
            if node == shared.me
                || found.txt_properties.get_property_val_str("cluster") != Some(cluster.as_str())
            {
                continue;
            }
            if !shared.members.admits(&node) {
                debug!(%node, "mDNS: ignoring a node that is not a member");
                continue;
            }
            // One address is enough; prefer IPv4.
            let mut addrs: Vec<std::net::IpAddr> =
                found.addresses.iter().map(|a| a.to_ip_addr()).collect();
            addrs.sort_by_key(|a| (a.is_ipv6(), *a));
            let count = dialled.entry(node).or_default();
            if let Some(ip) = addrs.first().filter(|_| *count < MDNS_ADDRS_PER_NODE) {
                let addr = SocketAddr::new(*ip, found.port).to_string();
                if add_target(&shared, addr.clone()) {
                    *count += 1;
                    info!(%node, %addr, "mDNS: found a member");
                }
            }
        }
    });
    Ok(mdns)
}
