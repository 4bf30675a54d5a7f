//! Peers: a node's peer policy as a sans-IO state machine.
//!
//! One [`Peers`] per node owns every sync [`Session`] the node has (one per
//! connection), and every decision about them: which connection to keep
//! with a peer, when to dial and how long to back off, live push of stored
//! events, anti-entropy rounds (with a random connected peer, at a fixed
//! period; a round asked for during a round starts when it ends), recovery
//! after the node's committed feed lagged, blocked peers (partitions set by
//! an operator), and the time of the last successful round with any member
//! ([`Peers::last_round_ms`]), which admission rules read. It carries
//! asks for escrow rights between connected peers ([`Peers::ask`],
//! [`PeerEvent::Asked`]); what to ask and answer is
//! [`crate::rebalance`]'s.
//!
//! It does no IO and reads no clock: the shell (the daemon in `src/`, the
//! simulator in `simulations/`) hands it what happened (`handle_*`, with
//! `now` in milliseconds of a monotonic clock of the shell's choice) and
//! carries out what it returns:
//!
//! - [`Peers::poll_event`]: [`PeerEvent`]s: dial a target, close a
//!   connection (with a goodbye message to write first), and reports.
//! - [`Peers::poll_transmit`]: the next message for one connection; the
//!   shell calls it while that connection's send queue has room, so a slow
//!   peer slows only its own session.
//! - [`Peers::poll_timeout`]: when to call [`Peers::handle_timeout`] next.
//!   Timers are data: dial backoffs and the anti-entropy period are
//!   deadlines kept here, and randomness (backoff jitter, the peer chosen
//!   for a round) comes from the [`Random`] the shell passes in: the OS in
//!   the daemon, a seeded stream in the simulator, so that both run this
//!   exact policy.
//!
//! # Order of calls
//!
//! After any `handle_*` call, drain [`Peers::poll_event`] and carry the
//! events out, then call [`Peers::poll_transmit`] for each connection with
//! room (the shell may wake every connection; a connection with nothing to
//! send returns `None`), and re-arm the timer from [`Peers::poll_timeout`].
//!
//! # Connections
//!
//! The shell dials ([`PeerEvent::Dial`]) and accepts; once a connection is
//! authenticated it reports it with [`Peers::handle_connected`], naming the
//! peer's node id and its *incarnation*: a value that changes every time
//! the peer process starts (the daemon derives it from the peer's TLS
//! certificate, which carries a random serial per start). One connection
//! is kept per peer:
//!
//! - a new incarnation replaces the old connection at once: the peer
//!   restarted, so the old connection is dead even if no timeout has said
//!   so yet (without this, a restarted node waits for the idle timeout);
//! - the same dialer again: a reconnect, the new one replaces the old;
//! - both ends dialled at once: both keep the one dialled by the smaller
//!   node id, so they agree without talking.
//!
//! A connection counts as established once the peer's first message
//! arrives (a TLS 1.3 client finishes its handshake before the server has
//! checked the client's certificate, so a dialer cannot know sooner).
//!
//! # Live push: the broadcast tree
//!
//! Sessions push along an epidemic broadcast tree (Plumtree: Leitão,
//! Pereira, Rodrigues, "Epidemic Broadcast Trees", SRDS 2007; `PROTOCOL.md`
//! §9.7): each link is eager (events pushed at once) or lazy (heads
//! announced), and a link that delivers only duplicates is pruned, so the
//! eager links settle into a spanning tree and each node receives each
//! event about once. The sessions carry out Prune and Graft; this policy
//! keeps the timers: when a lazy link announces heads this node lacks
//! ([`SessionEvent::Announced`]), it waits
//! [`PeersConfig::graft_timeout_ms`] for them to arrive by the tree, then
//! grafts the first link that announced them (a tree repair), and if they
//! still have not come after [`PeersConfig::regraft_timeout_ms`], the next
//! one. Events a session could not store for want of a dependency at its
//! peer's Done ([`SessionEvent::Missing`]) make the policy start a round
//! with another peer. Anti-entropy stays the safety net.
//!
//! # Dialling
//!
//! Each target (an address given with `--peer` or found by mDNS; a pair of
//! nodes in the simulator) is dialled until a connection with the node that
//! answers there is up. A failed attempt waits `backoff`, starting at
//! [`PeersConfig::min_backoff_ms`] and doubling to
//! [`PeersConfig::max_backoff_ms`], each wait scaled by a random factor in
//! [0.75, 1.25). A connection that was established resets the backoff;
//! when it ends, the target is redialled after one such wait. A target
//! whose node is blocked is not dialled until it is unblocked, and then at
//! once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::rebalance::Ask;
use crate::sync::{
    Equivocation, Head, Session, SessionConfig, SessionEvent, SessionStats, Store, SyncError,
};
use crate::NodeId;

/// A connection, named by the shell; unique for the life of a [`Peers`].
pub type ConnId = u64;
/// A dial target, named by the shell (the daemon maps addresses to these).
pub type TargetId = u64;

/// Randomness, injected: the daemon passes the OS generator, the simulator
/// a seeded stream.
pub trait Random {
    /// A uniformly random `u64`.
    fn next_u64(&mut self) -> u64;
}

/// Application close codes on a connection.
pub mod close {
    /// This node blocks the peer (a partition set by an operator).
    pub const BLOCKED: u32 = 1;
    /// Another connection with the same peer is kept.
    pub const DUPLICATE: u32 = 2;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// The peer broke the protocol; the reason says how.
    pub const PROTOCOL: u32 = 4;
    /// The peer restarted: a connection of its new incarnation replaced this.
    pub const REPLACED: u32 = 5;
}

/// The peer policy's settings. One type serves `weftlog run`'s flags, the
/// daemon and the simulator's scenario files (`[node]`), so their defaults
/// cannot drift.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    /// Time between anti-entropy rounds (each with a random connected peer).
    pub anti_entropy_ms: u64,
    /// First wait before redialling a target.
    pub min_backoff_ms: u64,
    /// Longest wait before redialling.
    pub max_backoff_ms: u64,
    /// A connection silent this long is dropped (the transport does it:
    /// QUIC's idle timeout in the daemon, the network model in the
    /// simulator; keep-alives go at a third of it).
    pub idle_timeout_ms: u64,
    /// How long one dial attempt may take, handshake included. Kept below
    /// QUIC's first retransmission of the handshake's Initial packet (about
    /// 1 s with the default initial RTT of 333 ms): an attempt that has to
    /// retransmit is abandoned and a fresh one made, rather than completing
    /// with its first packet counted as lost, which would cut the new
    /// connection's congestion window before any data is sent.
    pub connect_timeout_ms: u64,
    /// Messages a connection may have queued for sending; the shell's send
    /// queue bound (the daemon's writer queue, the simulator's window).
    pub window: usize,
    /// How long announced events may take to arrive by the broadcast tree
    /// before the announcing link is grafted.
    pub graft_timeout_ms: u64,
    /// How long after a graft the next announcing link is grafted, if the
    /// events still have not arrived.
    pub regraft_timeout_ms: u64,
    /// Whether links start eager (push along a tree that pruning shapes).
    /// `false` starts every link lazy: events then spread only by grafts
    /// and rounds (for experiments).
    pub eager: bool,
    /// Lazy links that announce each stored batch, drawn at random (all of
    /// them when there are fewer).
    pub lazy_fanout: usize,
    /// New connections whose first round runs at once, at most; the others
    /// wait until one of those ends (or the peer starts one), so that a
    /// node connecting to many peers at once (a start, a heal) catches up
    /// from a few rather than receive the same events from all of them.
    pub first_rounds: usize,
}

impl Default for PeersConfig {
    fn default() -> PeersConfig {
        PeersConfig {
            anti_entropy_ms: 2_000,
            min_backoff_ms: 100,
            max_backoff_ms: 5_000,
            idle_timeout_ms: 10_000,
            connect_timeout_ms: 900,
            window: 16,
            graft_timeout_ms: 500,
            regraft_timeout_ms: 250,
            eager: true,
            lazy_fanout: 4,
            first_rounds: 1,
        }
    }
}

/// What [`Peers`] asks of the shell, or tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// Dial this target now; report [`Peers::handle_connected`] or
    /// [`Peers::handle_dial_failed`].
    Dial {
        /// The target.
        target: TargetId,
    },
    /// Close this connection: write `last` first if given (the session's
    /// goodbye), then close with `code` and `reason`. Report
    /// [`Peers::handle_closed`] when it is gone.
    Close {
        /// The connection.
        conn: ConnId,
        /// A [`close`] code.
        code: u32,
        /// Why, for the peer and the log.
        reason: String,
        /// Last messages to send before closing (whole messages, one after
        /// the other).
        last: Option<Vec<u8>>,
    },
    /// The peer's first message arrived on the kept connection.
    Established {
        /// The peer.
        peer: NodeId,
        /// The connection.
        conn: ConnId,
    },
    /// A round with the peer ended in sync or done: both hold what the
    /// other had when it started.
    Synced {
        /// The peer.
        peer: NodeId,
        /// When (the shell's clock, ms).
        at_ms: u64,
    },
    /// A round with the peer ended (with [`PeerEvent::Synced`]): the peer
    /// holds this node's own events up to `seq` (0: none), and everything
    /// it sent is stored. Hand it to
    /// [`Replica::handle_own_head`](crate::replica::Replica::handle_own_head):
    /// it decides whether the peer confirmed the node's own frontier.
    OwnHead {
        /// The peer.
        peer: NodeId,
        /// The highest seq of this node's own events the peer holds.
        seq: u64,
        /// When (the shell's clock, ms).
        at_ms: u64,
    },
    /// Events from the peer were stored.
    Received {
        /// The peer.
        peer: NodeId,
        /// How many.
        count: u64,
        /// Per author and branch, the highest event stored, ascending.
        heads: Vec<Head>,
    },
    /// The peer showed a fork.
    Equivocation {
        /// The peer that sent the other branch.
        peer: NodeId,
        /// The proof.
        proof: Equivocation,
    },
    /// A session failed; a [`PeerEvent::Close`] of its connection follows.
    SessionFailed {
        /// The peer.
        peer: NodeId,
        /// The connection.
        conn: ConnId,
        /// Why (a [`SyncError::Peer`] when the peer ended it).
        error: SyncError,
    },
    /// The peer asks for escrow rights: hand it to
    /// [`Replica::handle_ask`](crate::replica::Replica::handle_ask), which
    /// decides what to give ([`crate::rebalance`]).
    Asked {
        /// The peer.
        peer: NodeId,
        /// Its ask (checked: [`Ask::check`]).
        ask: Ask,
    },
    /// A connection ended (after [`Peers::handle_closed`]).
    Disconnected {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
}

/// A connection's state as [`Peers::links`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The connection.
    pub conn: ConnId,
    /// The peer.
    pub peer: NodeId,
    /// Whether this node dialled it.
    pub dialed: bool,
    /// The peer's first message arrived.
    pub established: bool,
    /// A round has ended in sync or done on it.
    pub synced: bool,
    /// Events this node holds that the peer is not known to hold; `None`
    /// before the first round.
    pub behind: Option<u64>,
    /// The session's counters.
    pub stats: SessionStats,
}

/// A dial target as [`Peers::targets`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    /// The target.
    pub target: TargetId,
    /// The node that answered there, once one did.
    pub peer: Option<NodeId>,
    /// The last failure, cleared by a connection.
    pub last_error: Option<String>,
}

/// Counters over every session this node had, closed ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Received events stored (delivered).
    pub delivered: u64,
    /// Received events that were already held.
    pub duplicates: u64,
    /// Events sent.
    pub events_sent: u64,
    /// Anti-entropy rounds started.
    pub rounds: u64,
    /// Connections replaced because the peer restarted.
    pub replaced: u64,
    /// Heads announced to lazy links.
    pub announcements_sent: u64,
    /// Tree repairs: grafts this node sent because announced events did
    /// not arrive in time.
    pub grafts: u64,
    /// Links pruned (either end).
    pub prunes: u64,
    /// Asks for escrow rights sent.
    pub asks_sent: u64,
    /// Asks for escrow rights received.
    pub asks_received: u64,
}

#[derive(Debug)]
struct Link {
    peer: NodeId,
    dialer: NodeId,
    incarnation: u64,
    target: Option<TargetId>,
    session: Session,
    established: bool,
    synced: bool,
    round_wanted: bool,
    /// Its first round waits for a catching-up link to finish.
    deferred: bool,
    /// A close was asked for; the link waits for `handle_closed`.
    closing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    /// Dial at this time.
    At(u64),
    /// An attempt is out.
    Dialing,
    /// A connection with the target's node is up (or the node is blocked):
    /// nothing to do until it ends.
    Parked,
}

/// Announced events this node lacks: who announced them, and when to
/// graft the next announcer.
#[derive(Debug)]
struct Wanted {
    /// The id announced at this `(author, seq)`.
    id: crate::EventId,
    /// Links that announced it, in order; the first is grafted first.
    from: VecDeque<ConnId>,
    /// When to graft the next announcer.
    at_ms: u64,
}

#[derive(Debug)]
struct Target {
    peer: Option<NodeId>,
    backoff_ms: u64,
    dial: Dial,
    last_error: Option<String>,
}

/// A node's peers and sessions. See the module docs.
#[derive(Debug)]
pub struct Peers {
    config: PeersConfig,
    session: SessionConfig,
    links: BTreeMap<ConnId, Link>,
    /// The connection kept with each peer.
    kept: BTreeMap<NodeId, ConnId>,
    targets: BTreeMap<TargetId, Target>,
    blocked: BTreeSet<NodeId>,
    next_round_ms: Option<u64>,
    last_round_ms: Option<u64>,
    events: VecDeque<PeerEvent>,
    stats: PeerStats,
    /// Announced events not held, by `(author, seq)`.
    wanted: BTreeMap<(NodeId, u64), Wanted>,
    /// A deferred first round may start (a catching-up link closed).
    start_next: bool,
    /// Connections whose session may have something new to send since
    /// [`Peers::take_dirty`] last took them.
    dirty: BTreeSet<ConnId>,
}

impl Peers {
    /// A node's peer policy. `session` is the template for every session
    /// (cluster id, this node's id, limits); its `peer` is set per
    /// connection.
    pub fn new(config: PeersConfig, session: SessionConfig) -> Peers {
        Peers {
            config,
            session,
            links: BTreeMap::new(),
            kept: BTreeMap::new(),
            targets: BTreeMap::new(),
            blocked: BTreeSet::new(),
            next_round_ms: None,
            last_round_ms: None,
            events: VecDeque::new(),
            stats: PeerStats::default(),
            wanted: BTreeMap::new(),
            start_next: false,
            dirty: BTreeSet::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PeersConfig {
        &self.config
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.session.node
    }

    /// When a round with any peer last ended in sync or done (the shell's
    /// clock, ms); `None` if never.
    pub fn last_round_ms(&self) -> Option<u64> {
        self.last_round_ms
    }

    /// Counters over every session, closed ones included.
    pub fn stats(&self) -> PeerStats {
        let mut s = self.stats;
        for l in self.links.values() {
            let st = l.session.stats();
            add_session_stats(&mut s, &st);
        }
        s
    }

    /// The blocked nodes.
    pub fn blocked(&self) -> &BTreeSet<NodeId> {
        &self.blocked
    }

    /// Whether an established connection with `peer` is kept.
    pub fn is_connected(&self, peer: &NodeId) -> bool {
        self.kept
            .get(peer)
            .and_then(|c| self.links.get(c))
            .is_some_and(|l| l.established && !l.closing)
    }

    /// The peers with an established connection kept, ascending: those an
    /// ask for escrow rights may go to ([`Peers::ask`]).
    pub fn connected(&self) -> Vec<NodeId> {
        self.kept
            .keys()
            .filter(|p| self.is_connected(p))
            .copied()
            .collect()
    }

    /// Sends `ask` for escrow rights to `peer` on its kept connection
    /// ([`crate::sync::Session::ask`]). Returns whether it was queued (an
    /// established connection whose session knows the peer's frontier).
    pub fn ask(&mut self, peer: &NodeId, ask: Ask) -> bool {
        let Some(&conn) = self.kept.get(peer) else {
            return false;
        };
        let Some(l) = self.links.get_mut(&conn) else {
            return false;
        };
        if !l.established || l.closing || !l.session.ask(ask) {
            return false;
        }
        self.dirty.insert(conn);
        true
    }

    /// The peer of a connection.
    pub fn peer_of(&self, conn: ConnId) -> Option<NodeId> {
        self.links.get(&conn).map(|l| l.peer)
    }

    /// The connections, ascending by id.
    pub fn links<'a, S: Store + ?Sized>(
        &'a self,
        store: &'a S,
    ) -> impl Iterator<Item = LinkInfo> + 'a {
        let frontier = store.frontier();
        self.links.iter().map(move |(&conn, l)| LinkInfo {
            conn,
            peer: l.peer,
            dialed: l.dialer == self.session.node,
            established: l.established,
            synced: l.synced,
            behind: l.synced.then(|| {
                let has = l.session.peer_heads();
                frontier
                    .iter()
                    .map(|h| {
                        h.seq
                            .saturating_sub(has.get(&h.author).copied().unwrap_or(0))
                    })
                    .sum()
            }),
            stats: l.session.stats(),
        })
    }

    /// The dial targets, ascending by id.
    pub fn targets(&self) -> impl Iterator<Item = TargetInfo> + '_ {
        self.targets.iter().map(|(&target, t)| TargetInfo {
            target,
            peer: t.peer,
            last_error: t.last_error.clone(),
        })
    }

    /// The connections that may have something new to send since the last
    /// call, ascending: a shell that drives connections one by one calls
    /// [`Peers::poll_transmit`] for these (and for a connection whose send
    /// queue drained) rather than for all.
    pub fn take_dirty(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// When [`Peers::handle_timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let dials = self.targets.values().filter_map(|t| match t.dial {
            Dial::At(at) => Some(at),
            _ => None,
        });
        let grafts = self.wanted.values().map(|w| w.at_ms);
        let next = self.start_next.then_some(0);
        dials
            .chain(grafts)
            .chain(self.next_round_ms)
            .chain(next)
            .min()
    }

    /// Dials `target` from now on (at once), until a connection with the
    /// node that answers there is up; then again whenever it ends.
    /// Nothing if the target is known already.
    pub fn add_target(&mut self, target: TargetId, now_ms: u64) {
        self.targets.entry(target).or_insert(Target {
            peer: None,
            backoff_ms: self.config.min_backoff_ms,
            dial: Dial::At(now_ms),
            last_error: None,
        });
    }

    /// A dial attempt failed.
    pub fn handle_dial_failed(
        &mut self,
        target: TargetId,
        error: String,
        now_ms: u64,
        rng: &mut dyn Random,
    ) {
        let wait = self.jitter(self.target_backoff(target), rng);
        let max = self.config.max_backoff_ms;
        let Some(t) = self.targets.get_mut(&target) else {
            return;
        };
        t.last_error = Some(error);
        t.dial = Dial::At(now_ms + wait);
        t.backoff_ms = (t.backoff_ms.saturating_mul(2)).min(max);
    }

    /// An authenticated connection with `peer` is up: dialled by this node
    /// (to `target`) or accepted (`target` is `None`). `incarnation`
    /// changes whenever the peer process starts. The connection may be
    /// refused at once ([`PeerEvent::Close`]): a blocked peer, or another
    /// connection with the peer is kept. Otherwise its session starts (its
    /// Hello is the first message [`Peers::poll_transmit`] returns).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_connected<S: Store + ?Sized>(
        &mut self,
        conn: ConnId,
        peer: NodeId,
        dialed: bool,
        incarnation: u64,
        target: Option<TargetId>,
        now_ms: u64,
        store: &S,
    ) {
        let me = self.session.node;
        if let Some(t) = target.and_then(|t| self.targets.get_mut(&t)) {
            t.peer = Some(peer);
            t.last_error = None;
            t.dial = Dial::Parked;
        }
        let refuse = |code: u32, reason: &str| PeerEvent::Close {
            conn,
            code,
            reason: reason.into(),
            last: None,
        };
        if peer == me {
            self.events
                .push_back(refuse(close::PROTOCOL, "the peer has this node's own id"));
            self.redial(target, now_ms);
            return;
        }
        if self.blocked.contains(&peer) {
            self.events
                .push_back(refuse(close::BLOCKED, "blocked by partition"));
            return;
        }
        let dialer = if dialed { me } else { peer };
        if let Some(&old) = self.kept.get(&peer) {
            // Invariant: a kept connection is a link.
            let l = &self.links[&old];
            let (code, reason) = if l.incarnation != incarnation {
                self.stats.replaced += 1;
                (close::REPLACED, "replaced: the peer restarted")
            } else if l.dialer == dialer {
                (close::DUPLICATE, "replaced by a newer connection")
            } else if l.dialer < dialer {
                // Both dialled at once: the smaller dialer's connection wins.
                self.events
                    .push_back(refuse(close::DUPLICATE, "another connection is kept"));
                return;
            } else {
                (close::DUPLICATE, "another connection is kept")
            };
            self.close(old, code, reason);
        }
        let mut config = self.session.clone();
        config.peer = Some(peer);
        config.eager = self.config.eager;
        let catching_up = self
            .links
            .values()
            .filter(|l| !l.synced && !l.deferred && !l.closing)
            .count();
        let deferred = catching_up >= self.config.first_rounds.max(1);
        config.round_at_start = !deferred;
        self.links.insert(
            conn,
            Link {
                peer,
                dialer,
                incarnation,
                target,
                session: Session::new(config, store),
                established: false,
                synced: false,
                round_wanted: false,
                deferred,
                closing: false,
            },
        );
        self.kept.insert(peer, conn);
        self.dirty.insert(conn);
        // Targets pointing at this node need not dial while it is kept.
        for t in self.targets.values_mut() {
            if t.peer == Some(peer) && t.dial != Dial::Dialing {
                t.dial = Dial::Parked;
            }
        }
        if self.next_round_ms.is_none() {
            self.next_round_ms = Some(now_ms + self.config.anti_entropy_ms);
        }
    }

    /// A message from the connection's peer: exactly the bytes of one
    /// message, length prefix included.
    pub fn handle_message<S: Store + ?Sized>(
        &mut self,
        conn: ConnId,
        bytes: &[u8],
        now_ms: u64,
        store: &mut S,
    ) {
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        if l.closing {
            return;
        }
        if !l.established {
            l.established = true;
            self.events
                .push_back(PeerEvent::Established { peer: l.peer, conn });
            if let Some(t) = l.target.and_then(|t| self.targets.get_mut(&t)) {
                t.backoff_ms = self.config.min_backoff_ms;
            }
        }
        // A failure is reported by the session's events.
        let _ = l.session.handle_message(bytes, store);
        self.dirty.insert(conn);
        self.session_events(conn, now_ms, &*store);
    }

    /// The connection is gone (closed by either end, timed out, or refused
    /// after [`PeerEvent::Close`]).
    pub fn handle_closed(&mut self, conn: ConnId, reason: &str, now_ms: u64, rng: &mut dyn Random) {
        let Some(l) = self.links.remove(&conn) else {
            return;
        };
        add_session_stats(&mut self.stats, &l.session.stats());
        for w in self.wanted.values_mut() {
            w.from.retain(|c| *c != conn);
        }
        if self.kept.get(&l.peer) == Some(&conn) {
            self.kept.remove(&l.peer);
            self.events.push_back(PeerEvent::Disconnected {
                peer: l.peer,
                reason: reason.to_string(),
            });
            // Every target of this node redials (after one wait), unless
            // the node is blocked.
            let blocked = self.blocked.contains(&l.peer);
            let ids: Vec<TargetId> = self
                .targets
                .iter()
                .filter(|(_, t)| t.peer == Some(l.peer) && t.dial == Dial::Parked)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if !blocked {
                    let wait = self.jitter(self.target_backoff(id), rng);
                    if let Some(t) = self.targets.get_mut(&id) {
                        t.dial = Dial::At(now_ms + wait);
                    }
                }
            }
        }
        if let Some(t) = l.target.and_then(|t| self.targets.get_mut(&t)) {
            if !l.established && t.last_error.is_none() {
                t.last_error = Some(reason.to_string());
            }
        }
        if self.links.is_empty() {
            self.next_round_ms = None;
        }
        if !l.synced && !l.deferred && self.links.values().any(|l| l.deferred) {
            // A catching-up link ended: let a waiting one start (at the
            // next timeout, which is now).
            self.start_next = true;
        }
    }

    /// Events were stored and are durable and signed (the node's committed
    /// feed): the highest per author and branch. Every session pushes
    /// what its peer is not known to hold.
    ///
    /// Eager links push; lazy links announce, but only
    /// [`PeersConfig::lazy_fanout`] of them, drawn at random per batch: in a
    /// full mesh, announcing to every lazy link would cost each event a
    /// message per pair of nodes. A node that misses an event and its
    /// announcements is repaired by anti-entropy.
    pub fn handle_stored<S: Store + ?Sized>(
        &mut self,
        heads: &[Head],
        store: &S,
        rng: &mut dyn Random,
    ) {
        for h in heads {
            // Announced events that arrived: no graft needed.
            let done: Vec<(NodeId, u64)> = self
                .wanted
                .range((h.author, 0)..=(h.author, h.seq))
                .filter(|(_, w)| store.contains(&w.id))
                .map(|(k, _)| *k)
                .collect();
            for k in done {
                self.wanted.remove(&k);
            }
        }
        let lazy: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| !l.closing && !l.session.is_eager())
            .map(|(c, _)| *c)
            .collect();
        let mut announce: BTreeSet<ConnId> = BTreeSet::new();
        let fanout = self.config.lazy_fanout;
        if lazy.len() <= fanout {
            announce.extend(lazy);
        } else {
            while announce.len() < fanout {
                announce.insert(lazy[(rng.next_u64() % lazy.len() as u64) as usize]);
            }
        }
        for (c, l) in self.links.iter_mut().filter(|(_, l)| !l.closing) {
            if !l.session.is_eager() && !announce.contains(c) {
                continue;
            }
            for &h in heads {
                l.session.handle_stored(h, store);
            }
            self.dirty.insert(*c);
        }
    }

    /// The shell's feed of stored events fell behind and lost some: every
    /// session starts a round (now, or when its current one ends).
    pub fn handle_lagged<S: Store + ?Sized>(&mut self, store: &S) {
        let conns: Vec<ConnId> = self.links.keys().copied().collect();
        for c in conns {
            self.start_round(c, store);
        }
    }

    /// Blocks exactly `nodes` from now on (an empty set heals): their
    /// connections close and they are neither dialled nor accepted; targets
    /// of nodes unblocked are dialled at once.
    pub fn set_blocked(&mut self, nodes: BTreeSet<NodeId>, now_ms: u64) {
        let healed: Vec<NodeId> = self.blocked.difference(&nodes).copied().collect();
        self.blocked = nodes;
        let cut: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| self.blocked.contains(&l.peer))
            .map(|(c, _)| *c)
            .collect();
        for c in cut {
            self.close(c, close::BLOCKED, "blocked by partition");
        }
        for t in self.targets.values_mut() {
            if t.peer.is_some_and(|p| healed.contains(&p)) && t.dial == Dial::Parked {
                t.backoff_ms = self.config.min_backoff_ms;
                t.dial = Dial::At(now_ms);
            }
        }
    }

    /// Asks every connected peer for a round now.
    pub fn sync_now<S: Store + ?Sized>(&mut self, store: &S) {
        self.handle_lagged(store);
    }

    /// Carries out every timer due at `now_ms`: dials, and the anti-entropy
    /// round with a random established peer.
    pub fn handle_timeout<S: Store + ?Sized>(
        &mut self,
        now_ms: u64,
        store: &S,
        rng: &mut dyn Random,
    ) {
        for (&id, t) in self.targets.iter_mut() {
            if matches!(t.dial, Dial::At(at) if at <= now_ms) {
                let blocked = t.peer.is_some_and(|p| self.blocked.contains(&p));
                let connected = t.peer.is_some_and(|p| self.kept.contains_key(&p));
                if blocked || connected {
                    t.dial = Dial::Parked;
                } else {
                    t.dial = Dial::Dialing;
                    self.events.push_back(PeerEvent::Dial { target: id });
                }
            }
        }
        self.graft_due(now_ms, store);
        if std::mem::take(&mut self.start_next) {
            self.start_deferred(store);
        }
        if self.next_round_ms.is_some_and(|at| at <= now_ms) {
            self.next_round_ms = Some(now_ms + self.config.anti_entropy_ms);
            let live: Vec<ConnId> = self
                .links
                .iter()
                .filter(|(_, l)| (l.established || l.deferred) && !l.closing)
                .map(|(c, _)| *c)
                .collect();
            if !live.is_empty() {
                let pick = live[(rng.next_u64() % live.len() as u64) as usize];
                self.start_round(pick, store);
            }
        }
    }

    /// The next message for `conn`, or `None` when it has nothing to send
    /// until the next input.
    pub fn poll_transmit<S: Store + ?Sized>(
        &mut self,
        conn: ConnId,
        now_ms: u64,
        store: &S,
    ) -> Option<Vec<u8>> {
        let l = self.links.get_mut(&conn)?;
        if l.closing {
            return None;
        }
        let msg = l.session.poll_transmit(store);
        // Sending Done may end a round; a store bug may fail the session.
        self.session_events(conn, now_ms, store);
        if self.links.get(&conn).is_some_and(|l| l.closing) {
            return None;
        }
        msg
    }

    /// Starts the first round of the oldest link that waits for one, if
    /// fewer than [`PeersConfig::first_rounds`] links are catching up.
    fn start_deferred<S: Store + ?Sized>(&mut self, store: &S) {
        let catching_up = self
            .links
            .values()
            .filter(|l| !l.synced && !l.deferred && !l.closing)
            .count();
        if catching_up >= self.config.first_rounds.max(1) {
            return;
        }
        let next = self
            .links
            .iter()
            .find(|(_, l)| l.deferred && !l.closing)
            .map(|(c, _)| *c);
        if let Some(c) = next {
            if let Some(l) = self.links.get_mut(&c) {
                l.deferred = false;
            }
            self.start_round(c, store);
        }
    }

    /// Grafts the next announcer of every announced event still missing
    /// whose wait is over.
    fn graft_due<S: Store + ?Sized>(&mut self, now_ms: u64, store: &S) {
        let due: Vec<(NodeId, u64)> = self
            .wanted
            .iter()
            .filter(|(_, w)| w.at_ms <= now_ms)
            .map(|(k, _)| *k)
            .collect();
        let mut grafted: BTreeSet<ConnId> = BTreeSet::new();
        for key in due {
            if self.wanted.get(&key).is_some_and(|w| store.contains(&w.id)) {
                self.wanted.remove(&key);
                continue;
            }
            let Some(w) = self.wanted.get_mut(&key) else {
                continue;
            };
            let Some(conn) = w.from.pop_front() else {
                self.wanted.remove(&key);
                continue;
            };
            w.at_ms = now_ms + self.config.regraft_timeout_ms;
            // One graft per link per pass: it asks for everything missing.
            if grafted.insert(conn) {
                if let Some(l) = self.links.get_mut(&conn).filter(|l| !l.closing) {
                    if l.session.graft(store) {
                        self.stats.grafts += 1;
                        self.dirty.insert(conn);
                    }
                }
            }
        }
    }

    fn start_round<S: Store + ?Sized>(&mut self, conn: ConnId, store: &S) {
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        if l.closing {
            return;
        }
        if l.session.start_round(store) {
            self.stats.rounds += 1;
            self.dirty.insert(conn);
        } else {
            l.round_wanted = true;
        }
    }

    fn session_events<S: Store + ?Sized>(&mut self, conn: ConnId, now_ms: u64, store: &S) {
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        let peer = l.peer;
        let mut failed = None;
        let mut missing = false;
        let mut first_done = false;
        while let Some(e) = l.session.poll_event() {
            match e {
                SessionEvent::InSync | SessionEvent::RoundDone => {
                    if !l.synced {
                        first_done = true;
                    }
                    l.synced = true;
                    l.deferred = false;
                    self.last_round_ms = Some(now_ms);
                    self.events.push_back(PeerEvent::Synced {
                        peer,
                        at_ms: now_ms,
                    });
                    let me = self.session.node;
                    self.events.push_back(PeerEvent::OwnHead {
                        peer,
                        seq: l.session.peer_heads().get(&me).copied().unwrap_or(0),
                        at_ms: now_ms,
                    });
                    if l.round_wanted && l.session.start_round(store) {
                        l.round_wanted = false;
                        self.stats.rounds += 1;
                        self.dirty.insert(conn);
                    }
                }
                SessionEvent::Received { count, heads } => {
                    self.events
                        .push_back(PeerEvent::Received { peer, count, heads });
                }
                SessionEvent::Equivocation(proof) => {
                    self.events
                        .push_back(PeerEvent::Equivocation { peer, proof });
                }
                SessionEvent::Announced { heads } => {
                    for h in heads {
                        let w = self.wanted.entry((h.author, h.seq)).or_insert(Wanted {
                            id: h.id,
                            from: VecDeque::new(),
                            at_ms: now_ms + self.config.graft_timeout_ms,
                        });
                        if w.id == h.id && !w.from.contains(&conn) {
                            w.from.push_back(conn);
                        }
                    }
                    if self.wanted.len() > MAX_WANTED {
                        // Bounded: the oldest wait goes; anti-entropy repairs.
                        let first = *self.wanted.keys().next().expect("not empty");
                        self.wanted.remove(&first);
                    }
                }
                SessionEvent::Missing { .. } => missing = true,
                SessionEvent::Grafted | SessionEvent::Pruned => {}
                SessionEvent::Asked(ask) => {
                    self.events.push_back(PeerEvent::Asked { peer, ask });
                }
                SessionEvent::Failed(e) => failed = Some(e),
                SessionEvent::PeerDone => {}
            }
        }
        if first_done {
            self.start_deferred(store);
        }
        if missing {
            // What the peer's stream lacked may come from another peer.
            let others: Vec<ConnId> = self
                .links
                .iter()
                .filter(|(c, l)| **c != conn && l.established && !l.closing)
                .map(|(c, _)| *c)
                .collect();
            let pick = others
                .get((now_ms as usize) % others.len().max(1))
                .copied()
                .unwrap_or(conn);
            self.start_round(pick, store);
        }
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        if let Some(e) = failed {
            // The session's goodbye: its Error, after its unsent Hello
            // when it refused the peer's versions.
            let mut last: Option<Vec<u8>> = None;
            while let Some(m) = l.session.poll_transmit(store) {
                last.get_or_insert_with(Vec::new).extend_from_slice(&m);
            }
            l.closing = true;
            let reason = describe_failure(&e);
            self.events.push_back(PeerEvent::SessionFailed {
                peer,
                conn,
                error: e,
            });
            self.events.push_back(PeerEvent::Close {
                conn,
                code: close::PROTOCOL,
                reason,
                last,
            });
        }
    }

    fn close(&mut self, conn: ConnId, code: u32, reason: &str) {
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        if l.closing {
            return;
        }
        l.closing = true;
        self.events.push_back(PeerEvent::Close {
            conn,
            code,
            reason: reason.into(),
            last: None,
        });
    }

    fn redial(&mut self, target: Option<TargetId>, now_ms: u64) {
        let max = self.config.max_backoff_ms;
        if let Some(t) = target.and_then(|t| self.targets.get_mut(&t)) {
            t.dial = Dial::At(now_ms + t.backoff_ms);
            t.backoff_ms = (t.backoff_ms.saturating_mul(2)).min(max);
        }
    }

    fn target_backoff(&self, target: TargetId) -> u64 {
        self.targets
            .get(&target)
            .map_or(self.config.min_backoff_ms, |t| t.backoff_ms)
    }

    /// `base` scaled by a random factor in [0.75, 1.25).
    fn jitter(&self, base: u64, rng: &mut dyn Random) -> u64 {
        let r = rng.next_u64() % 500;
        base * (750 + r) / 1000
    }
}

impl std::ops::AddAssign for PeerStats {
    fn add_assign(&mut self, o: PeerStats) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.events_sent += o.events_sent;
        self.rounds += o.rounds;
        self.replaced += o.replaced;
        self.announcements_sent += o.announcements_sent;
        self.grafts += o.grafts;
        self.prunes += o.prunes;
        self.asks_sent += o.asks_sent;
        self.asks_received += o.asks_received;
    }
}

/// Announced events waited for at most (each a few dozen bytes).
pub const MAX_WANTED: usize = 65_536;

fn add_session_stats(s: &mut PeerStats, st: &SessionStats) {
    s.delivered += st.events_stored;
    s.duplicates += st.duplicates;
    s.events_sent += st.events_sent;
    s.announcements_sent += st.announcements_sent;
    s.prunes += st.prunes_sent + st.prunes_received;
    s.asks_sent += st.asks_sent;
    s.asks_received += st.asks_received;
}

/// A session failure as the log and the peer read it.
pub fn describe_failure(e: &SyncError) -> String {
    match e {
        SyncError::Peer { reason } => format!("the peer ended the session: {reason}"),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Draft;
    use crate::sync::MemStore;
    use crate::{HlcClock, Keypair, Op};

    struct Seq(u64);
    impl Random for Seq {
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
    }

    const CLUSTER: [u8; 32] = [5; 32];

    fn node(secret: u8) -> (Keypair, MemStore, Peers) {
        let key = Keypair::from_secret([secret; 32]);
        let peers = Peers::new(
            PeersConfig::default(),
            SessionConfig::new(CLUSTER, key.node_id()),
        );
        (key, MemStore::new(), peers)
    }

    fn draft(v: &str) -> Draft {
        Draft {
            stream: "s/1".into(),
            kind: "Set".into(),
            ops: vec![Op::Set {
                field: "f".into(),
                value: v.as_bytes().to_vec(),
                supersedes: vec![],
            }],
            ..Draft::default()
        }
    }

    fn events(p: &mut Peers) -> Vec<PeerEvent> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    /// Shuttles messages on connection `c` between two nodes until quiet.
    fn shuttle(
        a: &mut (Keypair, MemStore, Peers),
        b: &mut (Keypair, MemStore, Peers),
        c: ConnId,
        now: u64,
    ) {
        loop {
            let mut quiet = true;
            while let Some(m) = a.2.poll_transmit(c, now, &a.1) {
                b.2.handle_message(c, &m, now, &mut b.1);
                quiet = false;
            }
            while let Some(m) = b.2.poll_transmit(c, now, &b.1) {
                a.2.handle_message(c, &m, now, &mut a.1);
                quiet = false;
            }
            if quiet {
                break;
            }
        }
    }

    /// A lazy link announces; the event does not come by any tree; after
    /// the graft timeout the announcer is grafted and delivers it.
    #[test]
    fn an_announced_event_that_does_not_arrive_is_grafted_after_the_timeout() {
        let lazy = |secret: u8| {
            let key = Keypair::from_secret([secret; 32]);
            let config = PeersConfig {
                eager: false,
                ..PeersConfig::default()
            };
            let peers = Peers::new(config, SessionConfig::new(CLUSTER, key.node_id()));
            (key, MemStore::new(), peers)
        };
        let (mut a, mut b) = (lazy(1), lazy(2));
        let mut rng = Seq(7);
        let (ia, ib) = (a.0.node_id(), b.0.node_id());
        a.2.handle_connected(3, ib, true, 1, None, 0, &a.1);
        b.2.handle_connected(3, ia, false, 1, None, 0, &b.1);
        shuttle(&mut a, &mut b, 3, 0);
        events(&mut b.2);
        a.1.commit(&a.0, &mut HlcClock::default(), 1_000, [draft("x")])
            .unwrap();
        let head = a.1.frontier()[0];
        a.2.handle_stored(&[head], &a.1, &mut rng);
        shuttle(&mut a, &mut b, 3, 10);
        assert_eq!(b.1.len(), 0, "a lazy link only announces");
        let graft_at = b.2.poll_timeout().unwrap();
        assert_eq!(graft_at, 10 + PeersConfig::default().graft_timeout_ms);
        b.2.handle_timeout(graft_at - 1, &b.1, &mut rng);
        assert_eq!(b.2.stats().grafts, 0, "not before the timeout");
        b.2.handle_timeout(graft_at, &b.1, &mut rng);
        assert_eq!(b.2.stats().grafts, 1);
        shuttle(&mut a, &mut b, 3, graft_at);
        assert_eq!(b.1.len(), 1, "the graft brought the event");
        assert!(events(&mut b.2)
            .iter()
            .any(|e| matches!(e, PeerEvent::Received { count: 1, .. })));
        // Arrived: nothing is left to graft.
        b.2.handle_stored(&[head], &b.1, &mut rng);
        assert!(b.2.poll_timeout().is_none_or(|t| t > graft_at + 1_000));
    }

    /// A peer that shares no version is refused at its Hello: the node
    /// reports the failure naming both ranges (the daemon logs it), and
    /// the goodbye it writes before closing is its own Hello, then the
    /// Error with the same text, so that the peer refuses and logs in turn.
    #[test]
    fn a_peer_of_another_version_is_refused_naming_both() {
        use crate::sync::{
            decode_message, encode_message, frontier_digest, Hello, Message, MIN_PROTOCOL_VERSION,
            PROTOCOL_VERSION,
        };
        let mut a = node(1);
        let old = Keypair::from_secret([2; 32]).node_id();
        a.2.handle_connected(4, old, false, 1, None, 0, &a.1);
        let mut hello = Vec::new();
        encode_message(
            &Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                cluster: CLUSTER,
                node: old,
                digest: frontier_digest(&[]),
            }),
            &mut hello,
        );
        a.2.handle_message(4, &hello, 0, &mut a.1);
        let want = format!(
            "no common sync protocol version: this node speaks \
             {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer 1..=1"
        );
        let evs = events(&mut a.2);
        let failed = evs.iter().find_map(|e| match e {
            PeerEvent::SessionFailed { peer, error, .. } if *peer == old => {
                Some(describe_failure(error))
            }
            _ => None,
        });
        assert_eq!(failed.as_deref(), Some(want.as_str()));
        let last = evs
            .iter()
            .find_map(|e| match e {
                PeerEvent::Close {
                    conn: 4,
                    code: close::PROTOCOL,
                    last,
                    ..
                } => last.clone(),
                _ => None,
            })
            .expect("a goodbye");
        let (first, used) = decode_message(&last).unwrap().unwrap();
        assert!(matches!(
            first,
            Message::Hello(Hello { min_version, max_version, .. })
                if (min_version, max_version) == (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
        ));
        let (second, rest) = decode_message(&last[used..]).unwrap().unwrap();
        assert_eq!(second, Message::Error { reason: want });
        assert_eq!(used + rest, last.len());
    }

    #[test]
    fn a_connection_syncs_and_reports_the_round() {
        let mut a = node(1);
        let mut b = node(2);
        a.1.commit(&a.0, &mut HlcClock::default(), 1_000, [draft("x")])
            .unwrap();
        let (ia, ib) = (a.0.node_id(), b.0.node_id());
        a.2.handle_connected(7, ib, true, 1, None, 0, &a.1);
        b.2.handle_connected(7, ia, false, 1, None, 0, &b.1);
        shuttle(&mut a, &mut b, 7, 5);
        assert_eq!(b.1.len(), 1);
        assert_eq!(a.2.last_round_ms(), Some(5));
        assert!(a.2.is_connected(&ib) && b.2.is_connected(&ia));
        let ev = events(&mut b.2);
        assert!(ev
            .iter()
            .any(|e| matches!(e, PeerEvent::Received { count: 1, .. })));
        assert!(ev
            .iter()
            .any(|e| matches!(e, PeerEvent::Synced { at_ms: 5, .. })));
        // Each end learns how much of its own log the other holds: A's
        // event reached B; B has none of its own.
        assert!(ev.contains(&PeerEvent::OwnHead {
            peer: ia,
            seq: 0,
            at_ms: 5
        }));
        assert!(events(&mut a.2).contains(&PeerEvent::OwnHead {
            peer: ib,
            seq: 1,
            at_ms: 5
        }));
    }

    #[test]
    fn a_new_incarnation_replaces_the_kept_connection_whoever_dialled() {
        let (_, store, mut p) = node(1);
        let other = Keypair::from_secret([9; 32]).node_id();
        // The smaller id dialled the old connection (it would win a tie).
        let me = p.me();
        let dialed_old = me < other;
        p.handle_connected(1, other, dialed_old, 10, None, 0, &store);
        events(&mut p);
        // The peer restarted and dials in: a new incarnation.
        p.handle_connected(2, other, false, 11, None, 100, &store);
        let ev = events(&mut p);
        assert_eq!(
            ev,
            vec![PeerEvent::Close {
                conn: 1,
                code: close::REPLACED,
                reason: "replaced: the peer restarted".into(),
                last: None,
            }]
        );
        assert_eq!(p.stats().replaced, 1);
        // Same incarnation, both dialled at once: the smaller dialer wins.
        let loser_dialed = me > other; // this end dialled; it is larger
        p.handle_connected(3, other, loser_dialed, 11, None, 200, &store);
        let ev = events(&mut p);
        let refused = matches!(
            &ev[..],
            [PeerEvent::Close {
                conn: 3,
                code: close::DUPLICATE,
                ..
            }]
        );
        let replaced = matches!(
            &ev[..],
            [PeerEvent::Close {
                conn: 2,
                code: close::DUPLICATE,
                ..
            }]
        );
        assert!(refused || replaced, "{ev:?}");
    }

    #[test]
    fn dials_back_off_with_jitter_and_reset_after_a_connection() {
        let (_, store, mut p) = node(1);
        let mut rng = Seq(3);
        p.add_target(4, 0);
        assert_eq!(p.poll_timeout(), Some(0));
        p.handle_timeout(0, &store, &mut rng);
        assert_eq!(events(&mut p), vec![PeerEvent::Dial { target: 4 }]);
        assert_eq!(p.poll_timeout(), None, "no redial while an attempt is out");
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            p.handle_dial_failed(4, "refused".into(), now, &mut rng);
            let at = p.poll_timeout().unwrap();
            waits.push(at - now);
            now = at;
            p.handle_timeout(now, &store, &mut rng);
            assert_eq!(events(&mut p), vec![PeerEvent::Dial { target: 4 }]);
        }
        for (i, w) in waits.iter().enumerate() {
            let base = (100u64 << i).min(5_000);
            assert!(
                *w >= base * 3 / 4 && *w < base * 5 / 4,
                "wait {i}: {w} for {base}"
            );
        }
        // A connection parks the target; its end redials after one short wait.
        let peer = Keypair::from_secret([8; 32]).node_id();
        p.handle_connected(1, peer, true, 1, Some(4), now, &store);
        let hello = p.poll_transmit(1, now, &store).unwrap();
        let mut other = node(8);
        other
            .2
            .handle_connected(1, p.me(), false, 1, None, now, &other.1);
        other.2.handle_message(1, &hello, now, &mut other.1);
        let reply = other.2.poll_transmit(1, now, &other.1).unwrap();
        p.handle_message(1, &reply, now, &mut MemStore::new());
        assert!(p.is_connected(&peer));
        p.handle_timeout(now + 10_000, &store, &mut rng);
        assert!(!events(&mut p)
            .iter()
            .any(|e| matches!(e, PeerEvent::Dial { .. })));
        p.handle_closed(1, "gone", now + 20_000, &mut rng);
        let at = p.poll_timeout().unwrap();
        assert!(at >= now + 20_000 + 75 && at < now + 20_000 + 125, "{at}");
    }

    #[test]
    fn blocked_peers_are_cut_refused_and_redialled_on_heal() {
        let (_, store, mut p) = node(1);
        let mut rng = Seq(1);
        let peer = Keypair::from_secret([8; 32]).node_id();
        p.add_target(1, 0);
        p.handle_timeout(0, &store, &mut rng);
        events(&mut p);
        p.handle_connected(10, peer, true, 1, Some(1), 0, &store);
        p.set_blocked([peer].into(), 5);
        let ev = events(&mut p);
        assert!(matches!(
            &ev[..],
            [PeerEvent::Close {
                conn: 10,
                code: close::BLOCKED,
                ..
            }]
        ));
        p.handle_closed(10, "blocked", 6, &mut rng);
        assert!(matches!(
            &events(&mut p)[..],
            [PeerEvent::Disconnected { .. }]
        ));
        p.handle_connected(11, peer, false, 1, None, 7, &store);
        assert!(matches!(
            &events(&mut p)[..],
            [PeerEvent::Close {
                conn: 11,
                code: close::BLOCKED,
                ..
            }]
        ));
        assert_eq!(p.poll_timeout(), None, "a blocked node is not dialled");
        p.set_blocked(BTreeSet::new(), 50);
        assert_eq!(p.poll_timeout(), Some(50), "a heal redials at once");
    }
}
