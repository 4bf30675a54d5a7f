//! The node daemon behind `weftlog run`: one QUIC endpoint that keeps a
//! sync session with every reachable member, and the state the HTTP API
//! ([`crate::http`]) shows.
//!
//! Every decision about peers is made by the sans-IO peer policy,
//! [`weftlog_proto::peers::Peers`], the same code the simulator runs: which
//! connection to keep with a peer (a restarted peer's new connection
//! replaces the old one at once), when to dial and how long to back off,
//! live push, anti-entropy rounds, and the time of the last successful
//! round. This module only carries out what it asks, over quinn:
//!
//! - **Dials.** [`PeerEvent::Dial`] starts one attempt at the target's
//!   address, bounded by [`PeersConfig::connect_timeout_ms`]; its outcome
//!   goes back as `handle_connected` or `handle_dial_failed`.
//! - **Connections.** Each authenticated connection (dialled or accepted)
//!   carries one bidirectional stream (opened by the dialer) and is driven
//!   by three tasks: a reader that reads whole messages (checking each
//!   length against the limit before allocating) into a small bounded
//!   queue, a writer that writes from another, and a connection loop
//!   between them that hands messages to the policy and takes one outgoing
//!   message at a time from it, only when the writer has room, so a slow
//!   peer slows only its own session. A connection that shows no sign of
//!   life for [`PeersConfig::idle_timeout_ms`] is dropped by QUIC
//!   (keep-alives go at a third of it).
//! - **Transport.** Flow-control windows sized for a WAN's round trip,
//!   the congestion controller and the UDP socket's buffers are
//!   [`crate::transport`]'s; the node's window budget is split among its
//!   open connections ([`share_windows`]).
//! - **Live push.** One task hands every batch the node makes durable
//!   ([`Node::subscribe`]) to the policy, which pushes it to the peers that
//!   lack it.
//! - **Timers.** One task sleeps until the policy's next deadline
//!   ([`Peers::poll_timeout`]) and hands it the time.
//! - **Rebalancing.** One task, woken by every durable batch and at least
//!   every [`REBALANCE_TICK`], sends the asks for escrow rights the
//!   replica says are due to the connected peers ([`Peers::ask`]); a
//!   peer's ask ([`PeerEvent::Asked`]) and an open ask the node can now
//!   answer become ordinary transfer commands
//!   ([`weftlog_proto::rebalance`]).
//!
//! The policy sits behind one mutex; its randomness is the OS generator.
//! Its clock is the milliseconds since the daemon started (monotonic).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tracing::{debug, info, warn};
use weftlog_proto::fork_proof::{ForkProof, ForkProofJson};
use weftlog_proto::peers::{ConnId, PeerEvent, Peers, PeersConfig, Random, TargetId};
use weftlog_proto::sync::{message_len, Equivocation, SessionConfig, LENGTH_PREFIX_BYTES};
use weftlog_proto::NodeId;

use crate::node::Node;
use crate::notices::{Notice, Notices};
use crate::reconnects::Reconnects;
use crate::tls::{self, peer_id, Members, SERVER_NAME};
use crate::transport;

/// Application close codes on a QUIC connection (the peer policy's).
pub use weftlog_proto::peers::close;

/// How long the sync stream may take to open once a connection is up.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued between the reader, the connection loop and the writer,
/// each way, when [`PeersConfig::window`] does not say otherwise.
pub const QUEUE_MESSAGES: usize = 16;
/// How long `weftlog run` holds appends at start, by default, for a peer
/// to confirm the node's own log ([`Config::confirm_wait`];
/// [`weftlog_proto::replica::CONFIRM_WAIT_MS`]).
pub const CONFIRM_WAIT: Duration = Duration::from_millis(weftlog_proto::replica::CONFIRM_WAIT_MS);
/// How often the daemon looks for asks for escrow rights to send, at least
/// ([`weftlog_proto::rebalance`]); every durable batch wakes it too.
pub const REBALANCE_TICK: Duration = Duration::from_millis(100);
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
    /// The peer policy: anti-entropy period, backoff, timeouts, queues.
    pub policy: PeersConfig,
    /// Announce this node and find peers with mDNS.
    pub mdns: bool,
    /// How long appends wait at start for a peer to confirm this node's
    /// own log ([`Node::await_confirmation`]), when the node has peers to
    /// dial or finds them by mDNS; zero holds nothing.
    pub confirm_wait: Duration,
    /// QUIC's windows, congestion controller and socket buffers
    /// ([`crate::transport`]).
    pub transport: transport::Settings,
}

impl Config {
    /// Defaults: no peers, anyone admitted, cluster "default", the policy's
    /// defaults ([`PeersConfig::default`]), no mDNS, appends not held at
    /// start (`weftlog run` holds them [`CONFIRM_WAIT`] by default).
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            peers: Vec::new(),
            members: Members::Anyone,
            cluster: cluster_id("default"),
            policy: PeersConfig::default(),
            mdns: false,
            confirm_wait: Duration::ZERO,
            transport: transport::Settings::default(),
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
    /// The peer that sent the other branch; this node's own id when the
    /// fork was found in its state rather than met by a session (both
    /// branches arrived in one message).
    pub peer: NodeId,
    /// The third-party-verifiable record of both events, once this node
    /// holds both branches durably up to a signed event
    /// ([`weftlog_proto::fork_proof`]); `None` until then.
    pub fork_proof: Option<ForkProof>,
}

impl Fork {
    fn json(&self) -> Value {
        let mut v = json!({
            "author": self.proof.author.to_string(),
            "seq": self.proof.seq,
            "held": self.proof.held.to_string(),
            "other": self.proof.other.to_string(),
            "proven": self.proof.proven,
            "peer": self.peer.to_string(),
        });
        if let Some(p) = &self.fork_proof {
            v["fork_proof"] = crate::json::fork_proof(p);
        }
        v
    }

    /// Whether `self` says more than `old` about the same `(author, seq)`:
    /// proven over a claim, then a fork proof over none.
    fn better_than(&self, old: &Fork) -> bool {
        (self.proof.proven, self.fork_proof.is_some())
            > (old.proof.proven, old.fork_proof.is_some())
    }
}

/// The equivocations a daemon recorded in `dir` (none if the file is
/// missing): one per `(author, seq)`, the proven record over a claim, a
/// record with a fork proof over one without. Lines that do not parse are
/// skipped with a warning; a fork proof that does not parse or verify is
/// dropped (the node makes it again once it holds both branches).
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

/// A connection as the daemon holds it, beside the policy's view.
struct ConnHandle {
    conn: quinn::Connection,
    /// Wakes the connection loop: the policy may have something to send,
    /// or a close to carry out.
    wake: Arc<Notify>,
    /// A close the policy asked for, with a last message to write first.
    close: Mutex<Option<(u32, String, Vec<u8>)>>,
}

/// What the daemon keeps about a peer beyond the policy: for `status`.
#[derive(Default)]
struct PeerNotes {
    /// Events received from the peer, over all its sessions.
    received: u64,
    /// Why the last connection ended, when it did not end cleanly.
    last_error: Option<String>,
    /// The remote address of the last connection.
    addr: Option<SocketAddr>,
}

/// Dial targets: the address of each, and back.
#[derive(Default)]
struct Targets {
    addrs: BTreeMap<TargetId, String>,
    ids: BTreeMap<String, TargetId>,
}

/// The OS generator, as the policy's [`Random`].
struct OsRandom;

impl Random for OsRandom {
    fn next_u64(&mut self) -> u64 {
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    }
}

struct Shared {
    node: Arc<Node>,
    me: NodeId,
    cluster: [u8; 32],
    members: Members,
    endpoint: quinn::Endpoint,
    connect_timeout: Duration,
    window: usize,
    /// Each QUIC flow-control window at full size, shrunk while many
    /// connections are open ([`share_windows`]); `None` for quinn's.
    window_bytes: Option<u64>,
    /// The peer policy; lock it before the node's state (the sync store).
    peers: Mutex<Peers>,
    conns: Mutex<BTreeMap<ConnId, Arc<ConnHandle>>>,
    next_conn: AtomicU64,
    targets: Mutex<Targets>,
    notes: Mutex<BTreeMap<NodeId, PeerNotes>>,
    /// Wakes the timer task: the policy's next deadline may have moved.
    timer: Notify,
    /// Wakes the rebalancing task: the state changed, or a peer asked.
    rebalance: Notify,
    /// The wall-clock time (ms since the epoch) of the last round that
    /// ended in sync or done with any peer; 0 if none.
    last_round_wall_ms: AtomicU64,
    started: Instant,
    blocked: watch::Sender<BTreeSet<NodeId>>,
    shutdown: watch::Sender<bool>,
    forks: Mutex<BTreeMap<(NodeId, u64), Fork>>,
    /// What `GET /v1/notifications` carries.
    notices: Notices,
    /// Wakes the notice task: a batch became durable.
    noticed: Notify,
    /// The disconnected periods per peer and their reports.
    reconnects: Arc<Reconnects>,
}

/// A running daemon. Dropping it without [`Daemon::shutdown`] stops its
/// tasks at the runtime's end.
pub struct Daemon {
    shared: Arc<Shared>,
    mdns: Mutex<Option<mdns_sd::ServiceDaemon>>,
    projections: crate::projections::Projections,
    /// The SQL mirror's lag, when `run --sql` mirrors ([`crate::sql`]).
    sql_lag: std::sync::OnceLock<Arc<crate::sql::SqlLag>>,
    /// Set by `weftlog demo --serve`: the desk page offers to cut and heal
    /// this desk's network ([`crate::desk`]).
    demo: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The daemon's maps hold no invariant a panic could break halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Starts serving `node` as `config` says: binds the QUIC endpoint,
    /// starts the policy's tasks (live push, timers), the accept loop, the
    /// dials and mDNS. Must be called within a tokio runtime.
    pub async fn start(node: Arc<Node>, config: Config) -> Result<Daemon, StartError> {
        let key = node.keypair();
        // A new value each start: peers replace a connection of an older one.
        let incarnation = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        let mut server = tls::server_config(key, config.members.clone(), incarnation)?;
        let mut client = tls::client_config(key, config.members.clone(), incarnation)?;
        let transport = Arc::new(transport::config(
            &config.transport,
            Duration::from_millis(config.policy.idle_timeout_ms),
        ));
        server.transport_config(transport.clone());
        client.transport_config(transport);
        let listen_err = |source| StartError::Listen {
            addr: config.listen,
            source,
        };
        let (socket, buffers) =
            transport::bind(config.listen, config.transport.socket_buffer_bytes)
                .map_err(listen_err)?;
        if buffers.capped() {
            static CAPPED: std::sync::Once = std::sync::Once::new();
            CAPPED.call_once(|| {
                warn!(
                    asked = buffers.asked,
                    receive = buffers.receive,
                    send = buffers.send,
                    "the kernel granted smaller UDP socket buffers than asked \
                     (net.core.rmem_max / wmem_max); datagrams may be dropped \
                     in bursts, which QUIC counts as loss"
                );
            });
        }
        debug!(
            receive = buffers.receive,
            send = buffers.send,
            "UDP socket buffers"
        );
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(listen_err)?;
        endpoint.set_default_client_config(client);
        let me = node.id();
        if !config.peers.is_empty() || config.mdns {
            // Before any session or HTTP request: the first append waits.
            node.await_confirmation(config.confirm_wait);
        }
        let forks = load_forks(node.dir());
        let policy = Peers::new(
            config.policy.clone(),
            SessionConfig::new(config.cluster, me),
        );
        let shared = Arc::new(Shared {
            me,
            cluster: config.cluster,
            members: config.members.clone(),
            endpoint,
            connect_timeout: Duration::from_millis(config.policy.connect_timeout_ms.max(1)),
            window: config.policy.window.max(1),
            window_bytes: config.transport.window_bytes,
            peers: Mutex::new(policy),
            conns: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(0),
            targets: Mutex::new(Targets::default()),
            notes: Mutex::new(BTreeMap::new()),
            timer: Notify::new(),
            rebalance: Notify::new(),
            last_round_wall_ms: AtomicU64::new(0),
            started: Instant::now(),
            blocked: watch::channel(BTreeSet::new()).0,
            shutdown: watch::channel(false).0,
            forks: Mutex::new(forks),
            notices: Notices::new(),
            noticed: Notify::new(),
            reconnects: Arc::new(Reconnects::open(
                node.dir(),
                node.durable_pos(),
                crate::node::wall_ms(),
            )),
            node,
        });
        info!(node = %me, addr = %shared.endpoint.local_addr().map_or(config.listen, |a| a), "listening for peers (QUIC)");
        // Subscribed before any session takes its first snapshot: nothing
        // made durable in between is missed.
        let feed = shared.node.subscribe();
        tokio::spawn(feed_loop(shared.clone(), feed));
        tokio::spawn(timer_loop(shared.clone()));
        tokio::spawn(rebalance_loop(shared.clone()));
        tokio::spawn(notice_loop(shared.clone()));
        tokio::spawn(accept_loop(shared.clone()));
        for p in &config.peers {
            add_target(&shared, p.clone());
        }
        let mdns = if config.mdns {
            Some(start_mdns(&shared).map_err(|e| StartError::Mdns(e.to_string()))?)
        } else {
            None
        };
        Ok(Daemon {
            projections: crate::projections::Projections::start(&shared.node),
            shared,
            mdns: Mutex::new(mdns),
            sql_lag: std::sync::OnceLock::new(),
            demo: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The kept notices after `after` and a receiver for the next ones
    /// ([`Notices::after`]).
    pub fn notices_after(&self, after: u64) -> (Vec<Notice>, broadcast::Receiver<Notice>) {
        self.shared.notices.after(after)
    }

    /// The disconnected periods and their reports ([`crate::reconnects`]).
    pub fn reconnects(&self) -> &Reconnects {
        &self.shared.reconnects
    }

    /// The node served.
    pub fn node(&self) -> &Arc<Node> {
        &self.shared.node
    }

    /// The node's ordered projections ([`crate::projections`]).
    pub fn projections(&self) -> &crate::projections::Projections {
        &self.projections
    }

    /// Who may connect (`run --members`). It gates connections only: the
    /// HTTP API also marks events by non-members in `log` and `status`, and
    /// refuses them at import unless asked not to.
    pub fn members(&self) -> &Members {
        &self.shared.members
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
        self.shared.blocked.send_replace(nodes.clone());
        let (pos, wall) = (self.shared.node.durable_pos(), crate::node::wall_ms());
        for n in &nodes {
            self.shared.reconnects.handle_down(*n, pos, wall);
        }
        let now = self.shared.now_ms();
        self.shared.policy(|p, _, _| p.set_blocked(nodes, now));
    }

    /// The blocked nodes.
    pub fn blocked(&self) -> BTreeSet<NodeId> {
        self.shared.blocked.borrow().clone()
    }

    /// Whether a session with `peer` is up.
    pub fn is_connected(&self, peer: &NodeId) -> bool {
        lock(&self.shared.peers).is_connected(peer)
    }

    /// Asks every connected peer for an anti-entropy round now.
    pub fn sync_now(&self) {
        self.shared.policy(|p, store, _| p.sync_now(store));
    }

    /// The forks this node has seen.
    pub fn forks(&self) -> Vec<Fork> {
        lock(&self.shared.forks).values().cloned().collect()
    }

    /// When a round with any member last ended in sync or done, as
    /// milliseconds since the Unix epoch by this node's wall clock; `None`
    /// if never since the daemon started.
    pub fn last_round_ms(&self) -> Option<u64> {
        let at = self.shared.last_round_wall_ms.load(Ordering::Relaxed);
        (at > 0).then_some(at)
    }

    /// `weftlog status` plus `writes` and `disk_full` ([`write_status`]),
    /// `peers`, `blocked`, `equivocations`, `last_round_ms`,
    /// `non_members` ([`crate::json::non_members`]) and `own_frontier`
    /// ([`crate::json::own_frontier`]).
    pub async fn status(&self) -> Value {
        let node = &self.shared.node;
        let (mut status, non_members) = node.with_state(|s| {
            (
                crate::json::status(&node.id(), s),
                crate::json::non_members(s, &self.shared.members),
            )
        });
        write_status(node, &mut status);
        let peers = self.peers().await;
        let blocked: Vec<String> = self.blocked().iter().map(|n| n.to_string()).collect();
        let forks: Vec<Value> = self.forks().iter().map(Fork::json).collect();
        if let Value::Object(m) = &mut status {
            m.insert("peers".into(), Value::Array(peers));
            m.insert("blocked".into(), json!(blocked));
            m.insert("equivocations".into(), Value::Array(forks));
            m.insert("last_round_ms".into(), json!(self.last_round_ms()));
            m.insert("seats".into(), crate::json::seat_status(&node.seat_rules()));
            m.insert("gossip".into(), self.gossip());
            m.insert("non_members".into(), non_members);
            m.insert(
                "own_frontier".into(),
                crate::json::own_frontier(&node.own_frontier()),
            );
        }
        status
    }

    /// The live-push counters over every session since the daemon started:
    /// `delivered` (events received and stored), `duplicates` (received
    /// events already held; recognised by id before decoding), `events_sent`,
    /// `announcements_sent` (heads announced on lazy links), `tree_repairs`
    /// (grafts for announced events that did not arrive in time), `prunes`,
    /// `rounds` (anti-entropy rounds started) and `replaced` (connections
    /// replaced because the peer restarted).
    pub fn gossip(&self) -> Value {
        let s = lock(&self.shared.peers).stats();
        json!({
            "delivered": s.delivered,
            "duplicates": s.duplicates,
            "events_sent": s.events_sent,
            "announcements_sent": s.announcements_sent,
            "tree_repairs": s.grafts,
            "prunes": s.prunes,
            "rounds": s.rounds,
            "replaced": s.replaced,
        })
    }

    /// One object per known peer: `node` (null until it answered), `addr`,
    /// `connected`, `behind` (events this node holds that the peer is not
    /// known to hold; null before the first exchange), traffic counters and
    /// the last error.
    pub async fn peers(&self) -> Vec<Value> {
        let shared = &self.shared;
        let mut rows: BTreeMap<String, Value> = BTreeMap::new();
        let targets: Vec<(String, Option<NodeId>, Option<String>)> = {
            let t = lock(&shared.targets);
            let p = lock(&shared.peers);
            p.targets()
                .filter_map(|i| Some((t.addrs.get(&i.target)?.clone(), i.peer, i.last_error)))
                .collect()
        };
        let links: Vec<_> = {
            let p = lock(&shared.peers);
            let store = shared.node.sync_store();
            p.links(&store).collect()
        };
        let notes = lock(&shared.notes);
        let addr_of = |id: &NodeId| {
            targets
                .iter()
                .find(|t| t.1 == Some(*id))
                .map(|t| t.0.clone())
                .or_else(|| notes.get(id).and_then(|n| n.addr.map(|a| a.to_string())))
        };
        for l in &links {
            let n = notes.get(&l.peer);
            rows.insert(
                l.peer.to_string(),
                json!({
                    "node": l.peer.to_string(),
                    "addr": addr_of(&l.peer),
                    "connected": l.established,
                    "behind": l.behind,
                    "events_received": n.map_or(0, |n| n.received),
                    "events_sent": l.stats.events_sent,
                    "bytes_sent": l.stats.bytes_sent,
                    "bytes_received": l.stats.bytes_received,
                    "last_error": n.and_then(|n| n.last_error.clone()),
                }),
            );
        }
        for (id, n) in notes.iter() {
            rows.entry(id.to_string()).or_insert_with(|| {
                json!({
                    "node": id.to_string(),
                    "addr": addr_of(id),
                    "connected": false,
                    "behind": null,
                    "events_received": n.received,
                    "last_error": n.last_error,
                })
            });
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
        rows.into_values().collect()
    }

    /// Records the SQL mirror's lag (`run --sql`) for readers such as
    /// metrics; the first call wins.
    pub fn set_sql_lag(&self, lag: Arc<crate::sql::SqlLag>) {
        let _ = self.sql_lag.set(lag);
    }

    /// The SQL mirror's lag, if one runs ([`crate::sql::SqlLag`]).
    pub fn sql_lag(&self) -> Option<Arc<crate::sql::SqlLag>> {
        self.sql_lag.get().cloned()
    }

    /// Marks this daemon as one of `weftlog demo --serve`'s desks.
    pub fn set_demo(&self, demo: bool) {
        self.demo.store(demo, Ordering::Relaxed);
    }

    /// Whether this daemon is a demo's desk ([`Daemon::set_demo`]).
    pub fn is_demo(&self) -> bool {
        self.demo.load(Ordering::Relaxed)
    }

    /// A receiver that turns `true` when the daemon shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shared.shutdown.subscribe()
    }

    /// Stops: closes every connection (telling peers why), stops the dials
    /// and mDNS, waits for the tasks to end, and waits until every event
    /// received is durable. Appends acknowledged before are durable already.
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

/// Adds to a running node's `status` object what it says of the node's
/// writes (a stopped node has none to report): `writes` (`"ok"`, `"paused:
/// disk full"`, or `"stopped: <why>"` after a fatal failure), `disk_full`
/// (`null`, or `since_ms`, `last_try_ms`, `tries` and the storage `error`
/// while writes are paused; see [`crate::node`]).
pub fn write_status(node: &Node, status: &mut Value) {
    let Value::Object(m) = status else { return };
    let full = node.disk_full();
    let writes = match (node.failed(), &full) {
        (Some(why), _) => format!("stopped: {why}"),
        (None, Some(_)) => "paused: disk full".to_string(),
        (None, None) => "ok".to_string(),
    };
    m.insert("writes".into(), json!(writes));
    m.insert(
        "disk_full".into(),
        match full {
            Some(f) => json!({
                "since_ms": f.since_ms,
                "last_try_ms": f.last_try_ms,
                "tries": f.tries,
                "error": f.error,
            }),
            None => Value::Null,
        },
    );
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
                fork_proof: v
                    .get("fork_proof")
                    .and_then(|p| serde_json::from_value::<ForkProofJson>(p.clone()).ok())
                    .and_then(|p| ForkProof::from_json(&p).ok())
                    .filter(|p| p.verify().is_ok()),
            })
        })();
        if let Some(f) = parsed {
            let key = (f.proof.author, f.proof.seq);
            let keep = out.get(&key).is_none_or(|old: &Fork| f.better_than(old));
            if keep {
                out.insert(key, f);
            }
        }
    }
    out
}

impl Shared {
    /// Milliseconds since the daemon started: the policy's clock.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs `f` on the policy (with the node as its store and the OS
    /// generator), then carries out the events it queued and wakes every
    /// connection and the timer.
    fn policy<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Peers, &mut crate::node::SyncStore<'_>, &mut OsRandom) -> T,
    ) -> T {
        self.run_policy(true, f)
    }

    /// [`Shared::policy`] for a call that changes nothing other connections
    /// or the timer care about (taking a message to send): it wakes them
    /// only if the call queued events.
    fn policy_quiet<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Peers, &mut crate::node::SyncStore<'_>) -> T,
    ) -> T {
        self.run_policy(false, |p, store, _| f(p, store))
    }

    fn run_policy<T>(
        self: &Arc<Self>,
        wake: bool,
        f: impl FnOnce(&mut Peers, &mut crate::node::SyncStore<'_>, &mut OsRandom) -> T,
    ) -> T {
        let (out, events) = {
            let mut p = lock(&self.peers);
            let mut store = self.node.sync_store();
            let out = f(&mut p, &mut store, &mut OsRandom);
            drop(store);
            let events: Vec<PeerEvent> = std::iter::from_fn(|| p.poll_event()).collect();
            (out, events)
        };
        if wake || !events.is_empty() {
            for e in events {
                self.carry_out(e);
            }
            for c in lock(&self.conns).values() {
                c.wake.notify_one();
            }
            self.timer.notify_one();
        }
        out
    }

    fn carry_out(self: &Arc<Self>, e: PeerEvent) {
        match e {
            PeerEvent::Dial { target } => {
                let addr = lock(&self.targets).addrs.get(&target).cloned();
                if let Some(addr) = addr {
                    tokio::spawn(dial_once(self.clone(), target, addr));
                }
            }
            PeerEvent::Close {
                conn,
                code,
                reason,
                last,
            } => {
                let Some(h) = lock(&self.conns).get(&conn).cloned() else {
                    return;
                };
                debug!(conn, code, "closing a connection: {reason}");
                match last {
                    // The connection loop writes it, then closes.
                    Some(last) => *lock(&h.close) = Some((code, reason, last)),
                    None => h.conn.close(code.into(), clip(&reason)),
                }
            }
            PeerEvent::Established { peer, conn } => {
                let addr = lock(&self.conns)
                    .get(&conn)
                    .map(|h| h.conn.remote_address());
                let mut notes = lock(&self.notes);
                let n = notes.entry(peer).or_default();
                n.addr = addr.or(n.addr);
                info!(%peer, remote = ?addr, "peer connected");
            }
            PeerEvent::Synced { peer, .. } => {
                let now = crate::node::wall_ms();
                self.last_round_wall_ms.fetch_max(now, Ordering::Relaxed);
                self.node.handle_synced();
                if let Some(period) = self.reconnects.handle_synced(peer) {
                    // Blocking: it flushes the log and reads the period's window.
                    let shared = self.clone();
                    tokio::task::spawn_blocking(move || {
                        let report = shared.reconnects.report(&shared.node, peer, period, now);
                        if let Some(v) = report {
                            shared.notices.publish("reconciled", v);
                        }
                    });
                }
            }
            PeerEvent::OwnHead { peer, seq, .. } => {
                let first = !self.node.own_frontier().confirmed;
                if self.node.handle_own_head(peer, seq) && first {
                    info!(%peer, seq = self.node.own_frontier().seq, "own log confirmed by a peer");
                }
            }
            PeerEvent::SessionFailed { peer, error, .. } => {
                warn!(%peer, "sync session failed: {}", weftlog_proto::peers::describe_failure(&error));
            }
            PeerEvent::Received { peer, count, .. } => {
                lock(&self.notes).entry(peer).or_default().received += count;
            }
            PeerEvent::Equivocation { peer, proof } => self.record_fork(peer, proof),
            PeerEvent::Asked { peer, ask } => {
                if let Some(draft) = self.node.handle_ask(peer, &ask) {
                    tokio::spawn(append_transfer(self.node.clone(), draft));
                }
            }
            PeerEvent::Disconnected { peer, reason } => {
                info!(%peer, "peer disconnected: {reason}");
                self.reconnects
                    .handle_down(peer, self.node.durable_pos(), crate::node::wall_ms());
                lock(&self.notes).entry(peer).or_default().last_error = Some(reason);
            }
            _ => {}
        }
    }

    /// Records a fork once per `(author, seq)`, again when proof arrives
    /// for a claim, and again when the node can make its fork proof;
    /// appends it to the equivocation file.
    fn record_fork(&self, peer: NodeId, proof: Equivocation) {
        let key = (proof.author, proof.seq);
        let mut fork = Fork {
            proof,
            peer,
            fork_proof: None,
        };
        {
            let forks = lock(&self.forks);
            if forks.get(&key).is_some_and(|old| !fork.better_than(old)) {
                return;
            }
        }
        // Outside the forks lock: it reads the node's state and log.
        fork.fork_proof = self.prove(&proof);
        {
            let mut forks = lock(&self.forks);
            if forks.get(&key).is_some_and(|old| !fork.better_than(old)) {
                return;
            }
            forks.insert(key, fork.clone());
        }
        self.notices
            .note_fork(&proof.author.to_string(), proof.seq, &peer.to_string());
        warn!(
            author = %proof.author, seq = proof.seq, held = %proof.held, other = %proof.other,
            proven = proof.proven, peer = %peer, fork_proof = fork.fork_proof.is_some(),
            "equivocation: the author signed two events with one seq"
        );
        self.append_fork(&fork);
    }

    /// The fork proof of an equivocation, if this node holds both events
    /// durably, each with its branch up to a signed event.
    fn prove(&self, e: &Equivocation) -> Option<ForkProof> {
        match ForkProof::build(&self.node.sync_store(), e.author, [e.held, e.other]) {
            Ok(p) => Some(p),
            Err(why) => {
                debug!(author = %e.author, seq = e.seq, "no fork proof yet: {why}");
                None
            }
        }
    }

    /// Records the forks the state holds that no session reported: both
    /// branches can arrive in one message, before either is stored, and
    /// the session then sees no event at a seq it holds. Such a record
    /// names this node as the peer. One record per forked author: a fork a
    /// session reported (at whatever seq it met it) is not recorded again.
    fn note_forks(&self) {
        let forks = self.node.with_state(|s| s.forks());
        let me = self.node.id();
        for f in forks {
            let [held, other, ..] = f.events[..] else {
                continue;
            };
            if lock(&self.forks).keys().any(|(a, _)| *a == f.author) {
                continue;
            }
            self.record_fork(
                me,
                Equivocation {
                    author: f.author,
                    seq: f.seq,
                    held,
                    other,
                    proven: true,
                },
            );
        }
    }

    /// Tries again to make the fork proofs this node lacks (after a batch
    /// became durable: the other branch or its signature may be in it),
    /// and records those it makes.
    fn prove_pending(&self) {
        let pending: Vec<Fork> = lock(&self.forks)
            .values()
            .filter(|f| f.fork_proof.is_none())
            .cloned()
            .collect();
        for mut fork in pending {
            let Some(p) = self.prove(&fork.proof) else {
                continue;
            };
            fork.fork_proof = Some(p);
            let key = (fork.proof.author, fork.proof.seq);
            {
                let mut forks = lock(&self.forks);
                if forks.get(&key).is_some_and(|old| !fork.better_than(old)) {
                    continue;
                }
                forks.insert(key, fork.clone());
            }
            info!(author = %fork.proof.author, seq = fork.proof.seq, "fork proof recorded: both branches are held up to a signed event");
            self.append_fork(&fork);
        }
    }

    /// Appends a fork record to the equivocation file.
    fn append_fork(&self, fork: &Fork) {
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

    fn is_blocked(&self, peer: &NodeId) -> bool {
        self.blocked.borrow().contains(peer)
    }
}

/// A close reason as QUIC carries it: at most 512 bytes.
fn clip(reason: &str) -> &[u8] {
    &reason.as_bytes()[..reason.len().min(512)]
}

/// Dials `addr` (`host:port`) from now on, unless it is a target already;
/// returns whether it was new.
fn add_target(shared: &Arc<Shared>, addr: String) -> bool {
    let id = {
        let mut t = lock(&shared.targets);
        if t.ids.contains_key(&addr) {
            return false;
        }
        let id = t.addrs.len() as TargetId;
        t.addrs.insert(id, addr.clone());
        t.ids.insert(addr, id);
        id
    };
    let now = shared.now_ms();
    shared.policy(|p, _, _| p.add_target(id, now));
    true
}

/// Hands every batch the node makes durable to the policy (live push); a
/// lagged feed asks every peer for a round.
async fn feed_loop(
    shared: Arc<Shared>,
    mut feed: broadcast::Receiver<Arc<crate::node::Committed>>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let c = tokio::select! {
            c = feed.recv() => c,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match c {
            Ok(batch) => {
                shared.policy(|p, store, rng| p.handle_stored(&batch.heads, store, rng));
                shared.rebalance.notify_one();
                shared.prove_pending();
                shared.note_forks();
                shared.noticed.notify_one();
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!("fell {n} batches behind the live feed; asking every peer for a round");
                shared.policy(|p, store, _| p.handle_lagged(store));
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How often, at most, the notice task looks at the state again.
const NOTICE_EVERY: Duration = Duration::from_millis(200);

/// Publishes the notices the state calls for ([`crate::notices`]): after
/// durable batches, at most every [`NOTICE_EVERY`].
async fn notice_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut epoch = shared.node.epoch();
    loop {
        tokio::select! {
            _ = shared.noticed.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        shared.node.with_state(|s| shared.notices.note_oversold(s));
        let now = shared.node.epoch();
        if now != epoch {
            shared.notices.publish(
                "epoch",
                serde_json::json!({ "was": epoch.to_string(), "epoch": now.to_string() }),
            );
            epoch = now;
        }
        tokio::time::sleep(NOTICE_EVERY).await;
    }
}

/// Rebalancing escrow rights ([`weftlog_proto::rebalance`]): after each
/// durable batch, at once when a sale waits for rights
/// ([`Node::rights_wanted`]), and at least every [`REBALANCE_TICK`] (a
/// refused sale, which makes no batch, is asked for within it), sends the asks the
/// replica says are due to the connected peers, and appends the transfers
/// for open asks the node can now answer.
async fn rebalance_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REBALANCE_TICK) => {}
            _ = shared.rebalance.notified() => {}
            _ = shared.node.rights_wanted() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for draft in shared.node.poll_answers() {
            tokio::spawn(append_transfer(shared.node.clone(), draft));
        }
        let connected = lock(&shared.peers).connected();
        let asks = shared.node.poll_asks(&connected);
        if !asks.is_empty() {
            shared.policy(|p, _, _| {
                for (peer, ask) in asks {
                    p.ask(&peer, ask);
                }
            });
        }
    }
}

/// Appends a rebalancing transfer; a refusal (the rights went meanwhile)
/// is only logged.
async fn append_transfer(node: Arc<Node>, draft: weftlog_proto::Draft) {
    if let Err(e) = node.append_async(draft).await {
        debug!("a rebalancing transfer was not made: {e}");
    }
}

/// Sleeps until the policy's next deadline and hands it the time.
async fn timer_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let next = lock(&shared.peers).poll_timeout();
        let sleep = match next {
            Some(at) => {
                let now = shared.now_ms();
                Duration::from_millis(at.saturating_sub(now))
            }
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shared.timer.notified() => continue,
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let now = shared.now_ms();
        shared.policy(|p, store, rng| p.handle_timeout(now, store, rng));
    }
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
            match tokio::time::timeout(STREAM_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => serve(shared, conn, None).await,
                Ok(Err(e)) => info!(%remote, "incoming connection refused: {e}"),
                Err(_) => info!(%remote, "incoming handshake timed out"),
            }
        });
    }
}

/// One dial attempt, bounded by the policy's connect timeout: a fresh
/// connection each time rather than one whose handshake retransmits (see
/// [`PeersConfig::connect_timeout_ms`]).
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
    match tokio::time::timeout(shared.connect_timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!(
            "{addr}: no answer within {:?}",
            shared.connect_timeout
        )),
    }
}

async fn dial_once(shared: Arc<Shared>, target: TargetId, addr: String) {
    if *shared.shutdown.borrow() {
        return;
    }
    match dial(&shared, &addr).await {
        Ok(conn) => serve(shared, conn, Some(target)).await,
        Err(e) => {
            debug!(peer = %addr, "dial failed: {e}");
            let now = shared.now_ms();
            shared.policy(|p, _, rng| p.handle_dial_failed(target, e, now, rng));
        }
    }
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

/// Runs an authenticated connection until it ends: hands it to the policy,
/// opens the sync stream, and drives it (see the module docs).
async fn serve(shared: Arc<Shared>, conn: quinn::Connection, target: Option<TargetId>) {
    let dialed = target.is_some();
    let (Some(peer), Some(incarnation)) = (peer_id(&conn), tls::incarnation(&conn)) else {
        conn.close(close::PROTOCOL.into(), b"no node id");
        if let Some(t) = target {
            let now = shared.now_ms();
            let e = "the peer presented no node id".to_string();
            shared.policy(|p, _, rng| p.handle_dial_failed(t, e, now, rng));
        }
        return;
    };
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let handle = Arc::new(ConnHandle {
        conn: conn.clone(),
        wake: Arc::new(Notify::new()),
        close: Mutex::new(None),
    });
    lock(&shared.conns).insert(id, handle.clone());
    share_windows(&shared);
    let now = shared.now_ms();
    shared.policy(|p, store, _| {
        p.handle_connected(id, peer, dialed, incarnation, target, now, &*store)
    });
    debug!(%peer, remote = %conn.remote_address(), dialed, "connection up; waiting for the peer's Hello");
    let reason = drive(&shared, id, peer, &handle, dialed).await;
    lock(&shared.conns).remove(&id);
    share_windows(&shared);
    let now = shared.now_ms();
    shared.policy(|p, _, rng| p.handle_closed(id, &reason, now, rng));
}

/// Splits the node's window budget among its open connections
/// ([`transport::window_share`]), so that a node with many peers cannot be
/// made to hold a full window each way on every one. Credit already given
/// to a peer stands; a smaller window only slows what it is given next.
fn share_windows(shared: &Shared) {
    let Some(full) = shared.window_bytes else {
        return;
    };
    let conns = lock(&shared.conns);
    let share = transport::window_share(full, conns.len());
    let window = quinn::VarInt::from_u64(share).unwrap_or(quinn::VarInt::MAX);
    for c in conns.values() {
        c.conn.set_receive_window(window);
        c.conn.set_send_window(share);
    }
}

/// The connection loop; returns why the connection ended.
async fn drive(
    shared: &Arc<Shared>,
    id: ConnId,
    peer: NodeId,
    handle: &ConnHandle,
    dialed: bool,
) -> String {
    let conn = &handle.conn;
    let mut shutdown = shared.shutdown.subscribe();
    let opened = tokio::select! {
        o = tokio::time::timeout(STREAM_TIMEOUT, async {
            if dialed { conn.open_bi().await } else { conn.accept_bi().await }
        }) => o,
        _ = shutdown.wait_for(|s| *s) => return "node shutting down".into(),
    };
    let (send, recv) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"no sync stream opened");
            return "the peer opened no sync stream".into();
        }
    };
    if shared.is_blocked(&peer) {
        conn.close(close::BLOCKED.into(), b"blocked by partition");
        return "blocked by partition".into();
    }
    let (in_tx, mut inbound) = mpsc::channel(shared.window);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(shared.window);
    let reader = tokio::spawn(read_loop(recv, in_tx));
    let writer = tokio::spawn(write_loop(send, out_rx));
    let mut out: Option<Vec<u8>> = None;
    let end = loop {
        let asked = lock(&handle.close).take();
        if let Some((code, reason, last)) = asked {
            // The policy closed the session: its goodbye goes first.
            let _ = out_tx.send(last).await;
            drop(out_tx);
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
            conn.close(code.into(), clip(&reason));
            reader.abort();
            return reason;
        }
        if out.is_none() {
            let now = shared.now_ms();
            out = shared.policy_quiet(|p, store| p.poll_transmit(id, now, &*store));
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => {
                conn.close(close::SHUTDOWN.into(), b"node shutting down");
                break "node shutting down".to_string();
            }
            reason = conn.closed() => break reason.to_string(),
            m = inbound.recv() => match m {
                Some(Inbound::Message(msg)) => {
                    let now = shared.now_ms();
                    shared.policy(|p, store, _| p.handle_message(id, &msg, now, store));
                }
                Some(Inbound::Protocol(why)) => {
                    warn!(%peer, "sync session failed: {why}");
                    conn.close(close::PROTOCOL.into(), clip(&why));
                    break why;
                }
                Some(Inbound::Failed(why)) => {
                    break conn.close_reason().map_or(why, |r| r.to_string());
                }
                None => break "the reader stopped".into(),
            },
            permit = out_tx.reserve(), if out.is_some() => match permit {
                Ok(p) => p.send(out.take().expect("guarded by the branch condition")),
                Err(_) => break "the writer stopped".into(),
            },
            _ = handle.wake.notified() => {}
        }
    };
    reader.abort();
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    end
}

/// The mDNS service type nodes announce.
pub const MDNS_SERVICE: &str = "_weftlog._udp.local.";
/// Most addresses dialled per member found by mDNS.
pub const MDNS_ADDRS_PER_NODE: usize = 4;

/// Announces this node (instance name: the first 16 hex digits of its id;
/// TXT `node` = the full id, `cluster` = the first 8 bytes of the cluster
/// id) and dials every other member of the cluster that announces itself.
fn start_mdns(shared: &Arc<Shared>) -> Result<mdns_sd::ServiceDaemon, mdns_sd::Error> {
    let mdns = mdns_sd::ServiceDaemon::new()?;
    let port = shared.endpoint.local_addr().map_or(0, |a| a.port());
    let me = shared.me.to_string();
    let cluster = crate::json::hex(&shared.cluster[..8]);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster id vector of `PROTOCOL.md` §9.8.
    #[test]
    fn cluster_id_matches_protocol_md() {
        assert_eq!(
            crate::json::hex(&cluster_id("default")),
            "7ef1716e4e9b7c396868dcd6ba8a58af2f2eb2b0b8cfb655f2a41fde781e05ab"
        );
    }
}
