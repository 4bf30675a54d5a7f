//! The session: one end of one peer connection, as a state machine (the
//! parent module's docs describe the protocol and the order of calls).
//!
//! This file holds the session's state, its settings and reports, and the
//! calls the shell makes; the work is in two parts that share that state:
//!
//! - `send`: what the peer is known to hold (per author a seq, per forked
//!   author its branch heads), and the send queue: a cursor per chain to
//!   send, merged through a heap into canonical order, fetched from the
//!   store only as messages are packed; and the lazy end's announcements.
//! - `receive`: what each message from the peer does: Hello and Frontier,
//!   the checks on every received event, unsigned runs, releasing signed
//!   runs into the pool and storing from it in canonical order.
//!
//! `receive` uses `send` (a received frontier rebuilds the send queue);
//! `send` does not use `receive`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use super::codec::{encode_message, frontier_digest, Head, Hello, Message};
use super::codec::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::error::SyncError;
use super::limits::{
    EVENTS_TARGET_BYTES, MAX_GRAFT_HEADS, MAX_PENDING_BYTES, MAX_PENDING_EVENTS, MAX_QUEUED_ASKS,
    MAX_REASON_BYTES, PRUNE_AFTER_DUPLICATE_PUSHES,
};
use super::pool::{Mail, Pending, Pool};
use super::store::Store;
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::rebalance::Ask;

mod receive;
mod send;

/// A session's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// The cluster id; a peer with another one is refused.
    pub cluster: [u8; 32],
    /// This node's id.
    pub node: NodeId,
    /// The peer's id if the transport authenticated it; a Hello naming
    /// another node is refused.
    pub peer: Option<NodeId>,
    /// An Events message is closed once its frames would exceed this many
    /// bytes (a single larger frame goes alone). Clamped to
    /// `1..=MAX_FRAME_BYTES`.
    pub events_bytes_target: usize,
    /// Most received events held at once while they wait for a signature or
    /// a dependency (in the session's runs and in the pool); more fails the
    /// session.
    pub max_pending_events: usize,
    /// Most bytes of such events.
    pub max_pending_bytes: usize,
    /// Whether the link starts eager (events are pushed) or lazy (only
    /// announced). Both ends should start alike; Prune and Graft change
    /// both.
    pub eager: bool,
    /// Live pushes in a row from the peer that carry only events this
    /// replica holds before the link is pruned (at least 1).
    pub prune_after: u32,
    /// Whether the session opens its first round at once (its Hello is the
    /// first message). When `false` it waits quietly until the peer's Hello
    /// or [`Session::start_round`]; until a round has exchanged frontiers it
    /// neither pushes nor announces. A node connecting to many peers at
    /// once uses this to catch up from one peer at a time, rather than
    /// receive the same missing events from every one of them.
    pub round_at_start: bool,
}

impl SessionConfig {
    /// Defaults for a node in `cluster` with id `node`.
    pub fn new(cluster: [u8; 32], node: NodeId) -> SessionConfig {
        SessionConfig {
            cluster,
            node,
            peer: None,
            events_bytes_target: EVENTS_TARGET_BYTES,
            max_pending_events: MAX_PENDING_EVENTS,
            max_pending_bytes: MAX_PENDING_BYTES,
            eager: true,
            prune_after: PRUNE_AFTER_DUPLICATE_PUSHES,
            round_at_start: true,
        }
    }
}

/// What a session reports to the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The Hello digests are equal: the round is over, nothing to exchange.
    InSync,
    /// Events were stored: from the peer, or from the pool, whichever
    /// session received them. `heads` holds, per author and branch, the
    /// highest event stored (always a signed event): tell every session,
    /// this one included ([`Session::handle_stored`]).
    Received {
        /// Events stored.
        count: u64,
        /// Ascending.
        heads: Vec<Head>,
    },
    /// The peer's Done arrived: everything it sent is stored.
    PeerDone,
    /// Both ends have sent and received Done: the round is over.
    RoundDone,
    /// A fork: two events with one `(author, seq)`. Both branches are
    /// exchanged and stored like any other events (the fold keeps both,
    /// `state` module docs); this only tells the shell, once per author and
    /// session.
    Equivocation(Equivocation),
    /// The peer (its end lazy) announced heads this replica lacks, or holds
    /// with another id at that seq (a fork: its branch must be fetched to
    /// prove it). Ascending by author. If the events have not arrived by
    /// another link when the policy's timer fires, call
    /// [`Session::graft`].
    Announced {
        /// The heads announced and not held.
        heads: Vec<Head>,
    },
    /// The peer grafted the link: it is eager at both ends, and what the
    /// peer is not known to hold is being pushed.
    Grafted,
    /// The link became lazy at both ends: this end received only events it
    /// already held by live push and sent Prune, or the peer sent one.
    Pruned,
    /// At the peer's Done, events this session received still wait for these
    /// (predecessors or deps that neither the store nor the pool holds; at most
    /// [`MAX_MISSING_DEPS`](super::MAX_MISSING_DEPS), ascending). The waiting
    /// events stay pooled: ask for these (a graft, a round with another peer).
    Missing {
        /// The ids waited for.
        deps: Vec<EventId>,
    },
    /// The peer asks for escrow rights (checked: [`Ask::check`]). Hand it
    /// to [`crate::replica::Replica::handle_ask`].
    Asked(Ask),
    /// The session failed; the last event it reports.
    Failed(SyncError),
}

/// Two ids for one `(author, seq)`: the proof of a fork.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Equivocation {
    /// The author that forked.
    pub author: NodeId,
    /// The seq held twice.
    pub seq: u64,
    /// The id this replica holds (or accepted first) at that seq.
    pub held: EventId,
    /// The other id, from the peer.
    pub other: EventId,
    /// `true` when `other` arrived in a run whose author signature verified
    /// (it covers `other` through `prev`); `false` when it is only named in
    /// the peer's frontier.
    pub proven: bool,
}

/// Traffic counters of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Messages handed out by `poll_transmit`.
    pub messages_sent: u64,
    /// Their bytes, length prefixes included.
    pub bytes_sent: u64,
    /// Messages handed in.
    pub messages_received: u64,
    /// Their bytes, length prefixes included.
    pub bytes_received: u64,
    /// Events sent.
    pub events_sent: u64,
    /// Events received (frames, duplicates included).
    pub events_received: u64,
    /// Events stored by this session's calls (received by it, or waiting
    /// in the pool).
    pub events_stored: u64,
    /// Received events the store (or the pool) already held.
    pub duplicates: u64,
    /// Heads announced to the peer (IHave).
    pub announcements_sent: u64,
    /// Heads the peer announced.
    pub announcements_received: u64,
    /// Graft messages sent.
    pub grafts_sent: u64,
    /// Graft messages received.
    pub grafts_received: u64,
    /// Prune messages sent.
    pub prunes_sent: u64,
    /// Prune messages received.
    pub prunes_received: u64,
    /// Asks for escrow rights sent.
    pub asks_sent: u64,
    /// Asks for escrow rights received.
    pub asks_received: u64,
}

/// Where a session is in its round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Our Hello is queued or sent; waiting for the peer's.
    AwaitHello,
    /// Digests differ; our Frontier is queued or sent; waiting for the peer's.
    AwaitFrontier,
    /// Streaming what the peer lacks; waiting for the peer's Done.
    Streaming,
    /// Between rounds: pushing new events.
    Live,
    /// Failed; nothing more.
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for the peer's Hello",
            Phase::AwaitFrontier => "waiting for the peer's Frontier",
            Phase::Streaming => "streaming",
            Phase::Live => "between rounds",
            Phase::Closed => "closed",
        }
    }
}

/// One chain's events to send: seqs `next..=end`. At least one heap entry
/// per cursor, keyed by the hlc of `next`; entries whose seq is not the
/// cursor's `next` are stale and skipped.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    next: u64,
    end: u64,
    /// `None`: the author's chain as [`Store::event_id`] follows it, skipped
    /// as far as the peer is known to hold it. `Some`: the chain that ends
    /// at this event, a branch of an author that forked, sent in full.
    head: Option<EventId>,
}

/// A cursor's key: the author, and for a branch the head it was made for.
type CursorKey = (NodeId, Option<EventId>);

/// Heap key: `(hlc of next, author, next, branch)`, smallest first.
type HeapEntry = Reverse<(Hlc, NodeId, u64, Option<EventId>)>;

/// One end of a sync connection. See the module docs for the protocol and
/// the order of calls.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    /// The peer's node id and the negotiated version, from its first Hello.
    peer: Option<(NodeId, u16)>,
    /// The frontier our current Hello's digest was taken from.
    snapshot: Vec<Head>,
    snapshot_digest: [u8; 32],
    /// The digest in the peer's Hello of this round.
    peer_digest: [u8; 32],
    /// Hello, Frontier, Graft, Prune: sent before any IHave or Events.
    control: VecDeque<Message>,
    /// What to send after a failure: the Error message, preceded by our
    /// unsent Hello when the peer's versions were refused (so that it can
    /// name both ranges itself, `PROTOCOL.md` §9.2).
    goodbye: VecDeque<Vec<u8>>,
    /// Set once the peer's frontier is known (equal digests or Frontier):
    /// from then on both ends push and accept Events, IHave, Graft, Prune.
    known: bool,
    /// Per author, the highest seq the peer is known to hold, on the chain
    /// [`Store::event_id`] follows.
    peer_has: BTreeMap<NodeId, u64>,
    /// Per author that forked: heads held here that the peer is known to
    /// hold (with everything before them on their chains), none on
    /// another's chain.
    tips: BTreeMap<NodeId, Vec<Head>>,
    cursors: BTreeMap<CursorKey, Cursor>,
    heap: BinaryHeap<HeapEntry>,
    sent_done: bool,
    got_done: bool,
    /// Per author, received events no signature covers yet: chains (more
    /// than one only while a forked author's branches cross).
    runs: BTreeMap<NodeId, Vec<Vec<Pending>>>,
    /// The ids of every event in `runs`: "is it in an open run?" without
    /// a scan (a hostile peer may hold up to the pending limit open).
    run_ids: BTreeSet<EventId>,
    /// Events and bytes in `runs`.
    run_events: usize,
    run_bytes: usize,
    /// Events and bytes this session put in the pool that still wait, as
    /// of the last call that was handed the store.
    pooled: (usize, usize),
    /// This session's tag in the pool it uses; set on the first call that
    /// is handed the store.
    origin: Option<u64>,
    /// The pool, when the store keeps none to share.
    own_pool: Pool,
    /// Whether this end of the link pushes events (eager) or announces
    /// their heads (lazy).
    eager: bool,
    /// Lazy: per author, the highest seq stored and not yet announced.
    announce: BTreeMap<NodeId, u64>,
    /// Lazy: heads of forked authors' branches stored and not yet announced.
    announce_branches: BTreeSet<Head>,
    /// Per author, the highest seq [`Session::handle_stored`] offered. A
    /// live push carries only what was stored since: what the peer is not
    /// known to hold from before was offered already (pushed, or announced
    /// while the link was lazy), and re-sending it on the strength of a
    /// stale view of the peer is what made duplicates; a gap is the graft's
    /// and the round's to fill, which ask with the peer's own heads.
    offered: BTreeMap<NodeId, u64>,
    /// Per author, the highest seq announced to the peer.
    announced: BTreeMap<NodeId, u64>,
    /// Authors the peer announced that this replica lacked, for the heads
    /// of the next Graft; at most [`MAX_GRAFT_HEADS`].
    wanted: BTreeSet<NodeId>,
    /// A Prune went out and no Graft since: a lazy end does not answer
    /// each late push with another Prune.
    prune_sent: bool,
    /// Live pushes in a row from the peer that carried only duplicates.
    dup_streak: u32,
    /// Authors seen to fork in this session (reported once each): their
    /// branches are sent by head ([`Session::tips`]).
    forked: BTreeSet<NodeId>,
    /// Authors whose fork this session reported.
    reported: BTreeSet<NodeId>,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
}

impl Session {
    /// A session on a new connection. Its first round starts at once: the
    /// Hello is the first message [`Session::poll_transmit`] returns.
    pub fn new<S: Store + ?Sized>(config: SessionConfig, store: &S) -> Session {
        let eager = config.eager;
        let mut s = Session {
            config,
            phase: Phase::Live,
            peer: None,
            snapshot: Vec::new(),
            snapshot_digest: [0; 32],
            peer_digest: [0; 32],
            control: VecDeque::new(),
            goodbye: VecDeque::new(),
            known: false,
            peer_has: BTreeMap::new(),
            tips: BTreeMap::new(),
            cursors: BTreeMap::new(),
            heap: BinaryHeap::new(),
            sent_done: false,
            got_done: false,
            runs: BTreeMap::new(),
            run_ids: BTreeSet::new(),
            run_events: 0,
            run_bytes: 0,
            pooled: (0, 0),
            origin: None,
            own_pool: Pool::new(),
            eager,
            announce: BTreeMap::new(),
            announce_branches: BTreeSet::new(),
            offered: BTreeMap::new(),
            announced: BTreeMap::new(),
            wanted: BTreeSet::new(),
            prune_sent: false,
            dup_streak: 0,
            forked: BTreeSet::new(),
            reported: BTreeSet::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        if s.config.round_at_start {
            s.open_round(store);
        }
        s
    }

    /// The peer's node id, once its Hello arrived.
    pub fn peer(&self) -> Option<NodeId> {
        self.peer.map(|(n, _)| n)
    }

    /// The negotiated protocol version, once the peer's Hello arrived.
    pub fn version(&self) -> Option<u16> {
        self.peer.map(|(_, v)| v)
    }

    /// Whether the session failed (it has at most its Error left to send).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether a round is in progress (a new one cannot start).
    pub fn in_round(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitHello | Phase::AwaitFrontier | Phase::Streaming
        )
    }

    /// Received events held while they wait for a signature or a
    /// dependency: this session's unsigned runs, and the events it put in
    /// the pool that still wait (as of the last call handed the store).
    pub fn pending_events(&self) -> usize {
        self.run_events + self.pooled.0
    }

    /// Per author, the highest seq the peer is known to hold: its last
    /// frontier plus everything either end sent or announced to the other
    /// since. Empty until the first round has exchanged frontiers.
    pub fn peer_heads(&self) -> &BTreeMap<NodeId, u64> {
        &self.peer_has
    }

    /// Traffic counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Whether this end of the link is eager: events stored later are
    /// pushed to the peer at once. A lazy end announces their heads
    /// instead (IHave).
    pub fn is_eager(&self) -> bool {
        self.eager
    }

    /// Sets this end's mode without telling the peer: the policy's choice
    /// for a link (a Graft or a Prune changes both ends). Announcements
    /// already queued are still sent.
    pub fn set_eager(&mut self, eager: bool) {
        self.eager = eager;
        self.prune_sent = false;
        self.dup_streak = 0;
    }

    /// Asks the peer for what it announced, when it has not arrived by
    /// another link (the policy's timer after [`SessionEvent::Announced`]):
    /// queues a Graft with this replica's heads for the authors announced
    /// and makes this end eager; the peer's end turns eager too and pushes
    /// what this replica lacks. Returns `false` (and does nothing) before
    /// the peer's frontier is known or after a failure.
    pub fn graft<S: Store + ?Sized>(&mut self, store: &S) -> bool {
        if self.phase == Phase::Closed || !self.known {
            return false;
        }
        let wanted = std::mem::take(&mut self.wanted);
        let heads: Vec<Head> = if wanted.is_empty() {
            Vec::new()
        } else {
            store
                .frontier()
                .into_iter()
                .filter(|h| wanted.contains(&h.author))
                .take(MAX_GRAFT_HEADS)
                .collect()
        };
        self.control.push_back(Message::Graft { heads });
        self.eager = true;
        self.prune_sent = false;
        self.dup_streak = 0;
        self.stats.grafts_sent += 1;
        true
    }

    /// Queues an ask for escrow rights to the peer ([`crate::rebalance`]).
    /// Returns `false`, queuing nothing, until the peer's frontier is
    /// known (the peer would refuse it), on a closed session, when
    /// [`MAX_QUEUED_ASKS`] asks already wait to be sent, or for an ask
    /// that [`Ask::check`] refuses.
    pub fn ask(&mut self, ask: Ask) -> bool {
        if self.phase == Phase::Closed || !self.known || ask.check().is_err() {
            return false;
        }
        let queued = self
            .control
            .iter()
            .filter(|m| matches!(m, Message::Ask(_)))
            .count();
        if queued >= MAX_QUEUED_ASKS {
            return false;
        }
        self.stats.asks_sent += 1;
        self.control.push_back(Message::Ask(ask));
        true
    }

    /// Starts an anti-entropy round: queues a Hello with the store's current
    /// frontier. Returns `false` (and does nothing) while a round is in
    /// progress or after a failure.
    pub fn start_round<S: Store + ?Sized>(&mut self, store: &S) -> bool {
        if self.phase != Phase::Live {
            return false;
        }
        self.open_round(store);
        true
    }

    /// Tells the session that the event `head` was stored, made locally or
    /// received from any peer; it must be signed (the end of a batch). If
    /// the peer is not known to hold it, an eager end queues it and the
    /// author's events before it that the peer lacks to send; a lazy end
    /// queues it for the next IHave.
    pub fn handle_stored<S: Store + ?Sized>(&mut self, head: Head, store: &S) {
        if self.phase == Phase::Closed || !self.known {
            return;
        }
        let Head { author, seq, .. } = head;
        if self.on_branch(store, &head) {
            if self.peer_holds(store, &head) {
                return;
            }
            if !self.eager {
                self.announce_branches.insert(head);
                return;
            }
            if let Err(e) = self.add_branch(store, head) {
                self.fail(e);
            }
            return;
        }
        let has = self.peer_has.get(&author).copied().unwrap_or(0);
        let offered = self.offered.get(&author).copied().unwrap_or(0);
        raise(&mut self.offered, author, seq);
        if seq <= has {
            return;
        }
        if !self.eager {
            raise(&mut self.announce, author, seq);
            return;
        }
        // A cursor that already runs for the author is extended.
        if let Err(e) = self.add_cursor(store, author, has.max(offered) + 1, seq) {
            self.fail(e);
        }
    }

    /// Stores the events waiting in the pool whose past is now complete.
    /// With a pool the store shares ([`Store::pool`]) every session that
    /// stores events does this for all; with none, call it after another
    /// session stored events, or the waiting ones wait for this session's
    /// next message. What is stored is reported as
    /// [`SessionEvent::Received`].
    pub fn retry_waiting<S: Store + ?Sized>(&mut self, store: &mut S) {
        if self.phase == Phase::Closed {
            return;
        }
        let r = self.with_pool(store, |s, store, pool, _| {
            s.drain(store, pool)?;
            s.read_mail(pool)
        });
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Handles one message from the peer: exactly the bytes its
    /// `poll_transmit` returned (length prefix included). On error the
    /// session is closed, an Error for the peer is queued, and the error is
    /// both returned and reported as [`SessionEvent::Failed`].
    pub fn handle_message<S: Store + ?Sized>(
        &mut self,
        bytes: &[u8],
        store: &mut S,
    ) -> Result<(), SyncError> {
        if self.phase == Phase::Closed {
            return Err(SyncError::Closed);
        }
        self.stats.messages_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let r = self.with_pool(store, |s, store, pool, shared| {
            if !shared && !pool.is_empty() {
                // Other sessions may have stored what these wait for (a
                // shared pool is drained by whoever stores).
                s.drain(store, pool)?;
            }
            s.handle_inner(bytes, store, pool)?;
            s.read_mail(pool)
        });
        if let Err(e) = &r {
            self.fail(e.clone());
        }
        r
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The next message to send (length prefix included), or `None` when
    /// there is nothing to send until the next input. Events are fetched
    /// from the store only here, one message at a time.
    pub fn poll_transmit<S: Store + ?Sized>(&mut self, store: &S) -> Option<Vec<u8>> {
        if self.phase == Phase::Closed {
            return self.goodbye.pop_front();
        }
        if let Some(msg) = self.control.pop_front() {
            return Some(self.encode(&msg));
        }
        if let Some(heads) = self.next_ihave(store) {
            self.stats.announcements_sent += heads.len() as u64;
            return Some(self.encode(&Message::IHave { heads }));
        }
        match self.next_events(store) {
            Err(e) => {
                self.fail(e);
                return self.goodbye.pop_front();
            }
            Ok(Some(frames)) => return Some(self.encode(&Message::Events { frames })),
            Ok(None) => {}
        }
        if self.phase == Phase::Streaming && !self.sent_done {
            self.sent_done = true;
            let msg = self.encode(&Message::Done);
            self.maybe_round_done();
            return Some(msg);
        }
        None
    }

    fn encode(&mut self, msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(msg, &mut out);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += out.len() as u64;
        out
    }

    /// Runs `f` with the pool: the store's shared one, taken out of the
    /// store for the call (so that `f` can hold the store too) and put
    /// back, or the session's own. `f` is told which.
    fn with_pool<S: Store + ?Sized, R>(
        &mut self,
        store: &mut S,
        f: impl FnOnce(&mut Session, &mut S, &mut Pool, bool) -> R,
    ) -> R {
        let shared = store.pool().map(std::mem::take);
        let is_shared = shared.is_some();
        let mut pool = shared.unwrap_or_else(|| std::mem::take(&mut self.own_pool));
        let origin = *self.origin.get_or_insert_with(|| pool.join());
        let r = f(self, store, &mut pool, is_shared);
        self.pooled = pool.held(origin);
        match store.pool() {
            Some(slot) if is_shared => *slot = pool,
            _ => self.own_pool = pool,
        }
        r
    }

    /// This session's pool tag (set by `with_pool` before any use).
    fn me(&self) -> u64 {
        debug_assert!(self.origin.is_some(), "pool tag used outside with_pool");
        self.origin.unwrap_or(u64::MAX)
    }

    /// Acts on what other sessions' drains found about this session's
    /// pooled events.
    fn read_mail(&mut self, pool: &mut Pool) -> Result<(), SyncError> {
        // The first refusal ends the session.
        match pool.collect_mail(self.me()).into_iter().next() {
            Some(Mail::Refused(err)) => Err(err),
            None => Ok(()),
        }
    }

    /// Takes a snapshot of the frontier and queues a Hello for it.
    fn open_round<S: Store + ?Sized>(&mut self, store: &S) {
        self.snapshot = store.frontier();
        self.snapshot_digest = frontier_digest(&self.snapshot);
        self.control.push_back(Message::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            cluster: self.config.cluster,
            node: self.config.node,
            digest: self.snapshot_digest,
        }));
        self.phase = Phase::AwaitHello;
    }

    fn fail(&mut self, err: SyncError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        if matches!(err, SyncError::VersionMismatch { .. }) {
            // A quiet end answers a Hello with its own: the peer refused
            // for its versions still gets it, and refuses in turn, naming
            // both ranges from its side.
            if let Some(hello) = self.control.iter().find(|m| matches!(m, Message::Hello(_))) {
                let hello = hello.clone();
                let out = self.encode(&hello);
                self.goodbye.push_back(out);
            }
        }
        if !matches!(err, SyncError::Peer { .. }) {
            let reason = truncate(err.to_string(), MAX_REASON_BYTES);
            let out = self.encode(&Message::Error { reason });
            self.goodbye.push_back(out);
        }
        self.control.clear();
        self.cursors.clear();
        self.heap.clear();
        self.runs.clear();
        self.run_ids.clear();
        self.run_events = 0;
        self.run_bytes = 0;
        self.announce.clear();
        self.announce_branches.clear();
        self.wanted.clear();
        self.events.push_back(SessionEvent::Failed(err));
    }

    fn unexpected(&self, message: &'static str) -> SyncError {
        SyncError::Unexpected {
            message,
            phase: self.phase.name(),
        }
    }

    fn maybe_round_done(&mut self) {
        if self.phase == Phase::Streaming && self.sent_done && self.got_done {
            self.phase = Phase::Live;
            self.events.push_back(SessionEvent::RoundDone);
        }
    }
}

/// `map[k] = max(map[k], v)`.
fn raise(map: &mut BTreeMap<NodeId, u64>, k: NodeId, v: u64) {
    let slot = map.entry(k).or_insert(0);
    *slot = (*slot).max(v);
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
