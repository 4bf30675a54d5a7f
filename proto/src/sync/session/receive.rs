//! The receiving half of a session: what each message from the peer does.
//!
//! Hello and Frontier settle what the peer holds and rebuild the send
//! queue (through the sending half). Every received event passes the checks
//! the parent module's docs list, in that order; unsigned events wait in
//! open runs until a signature covers them, then go to the [`Pool`], from
//! which every segment whose past is complete is stored in canonical order.

use std::collections::BTreeSet;

use super::{raise, truncate, Phase, Session, SessionEvent};
use crate::event::{verify, Event};
use crate::id::{EventId, EventRef, NodeId};
use crate::state::Inserted;
use crate::sync::codec::{
    decode_message, decode_wire_frame, frontier_digest, Head, Hello, Message, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::sync::error::SyncError;
use crate::sync::limits::{
    LENGTH_PREFIX_BYTES, MAX_FRONTIER_ENTRIES, MAX_GRAFT_HEADS, MAX_IHAVE_HEADS, MAX_REASON_BYTES,
};
use crate::sync::pool::{Mail, Pending, Pool, PoolKey};
use crate::sync::session::Equivocation;
use crate::sync::store::Store;

/// What the drain decided about one released event.
enum Verdict {
    Store,
    Duplicate,
    Wait,
}

impl Session {
    pub(super) fn handle_inner<S: Store + ?Sized>(
        &mut self,
        bytes: &[u8],
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        let msg = match decode_message(bytes)? {
            Some((msg, used)) if used == bytes.len() => msg,
            _ => {
                // The bytes end inside the message, or more follow it.
                let announced = bytes
                    .first_chunk::<LENGTH_PREFIX_BYTES>()
                    .map_or(0, |p| u32::from_le_bytes(*p) as usize);
                return Err(SyncError::LengthMismatch {
                    announced,
                    got: bytes.len().saturating_sub(LENGTH_PREFIX_BYTES),
                });
            }
        };
        // Events, IHave, Graft and Prune need the peer's frontier: a peer
        // sends them only once it has ours, and ours is always sent first.
        if !self.known
            && matches!(
                msg,
                Message::Events { .. }
                    | Message::IHave { .. }
                    | Message::Graft { .. }
                    | Message::Prune
                    | Message::Ask(_)
            )
        {
            return Err(self.unexpected(msg.name()));
        }
        match msg {
            Message::Hello(hello) => self.on_hello(hello, store),
            Message::Frontier { heads } => {
                if self.phase != Phase::AwaitFrontier {
                    return Err(self.unexpected("Frontier"));
                }
                self.on_frontier(heads, store)
            }
            Message::Events { frames } => self.on_events(&frames, store, pool),
            Message::Done => {
                if self.phase != Phase::Streaming || self.got_done {
                    return Err(self.unexpected("Done"));
                }
                self.on_done(store, pool)
            }
            Message::Error { reason } => Err(SyncError::Peer {
                reason: truncate(reason, MAX_REASON_BYTES),
            }),
            Message::IHave { heads } => self.on_ihave(heads, store, pool),
            Message::Graft { heads } => self.on_graft(heads, store),
            Message::Prune => {
                self.stats.prunes_received += 1;
                self.eager = false;
                self.events.push_back(SessionEvent::Pruned);
                Ok(())
            }
            Message::Ask(ask) => {
                ask.check()
                    .map_err(|e| SyncError::Malformed(format!("Ask: {e}")))?;
                self.stats.asks_received += 1;
                self.events.push_back(SessionEvent::Asked(ask));
                Ok(())
            }
        }
    }

    fn on_hello<S: Store + ?Sized>(&mut self, hello: Hello, store: &S) -> Result<(), SyncError> {
        match self.phase {
            Phase::AwaitHello => {}
            // The peer opened a round: answer with our own Hello.
            Phase::Live => self.open_round(store),
            _ => return Err(self.unexpected("Hello")),
        }
        let version = PROTOCOL_VERSION.min(hello.max_version);
        let common = hello.min_version <= hello.max_version
            && version >= MIN_PROTOCOL_VERSION.max(hello.min_version);
        if let Some((_, first)) = self.peer {
            // The connection's version was agreed at its first Hello, and
            // a peer's build does not change within a connection: a later
            // Hello that would agree on another is a broken peer, not a
            // version to refuse in the middle of a sync.
            if !common || version != first {
                return Err(SyncError::VersionChanged {
                    first,
                    theirs_min: hello.min_version,
                    theirs_max: hello.max_version,
                });
            }
        } else if !common {
            return Err(SyncError::VersionMismatch {
                ours_min: MIN_PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            });
        }
        if hello.cluster != self.config.cluster {
            return Err(SyncError::WrongCluster {
                ours: self.config.cluster,
                theirs: hello.cluster,
            });
        }
        if hello.node == self.config.node {
            return Err(SyncError::OwnNodeId(hello.node));
        }
        let expected = self.peer.map(|(n, _)| n).or(self.config.peer);
        if let Some(expected) = expected.filter(|e| *e != hello.node) {
            return Err(SyncError::WrongPeer {
                expected,
                got: hello.node,
            });
        }
        self.peer = Some((hello.node, version));
        if hello.digest == self.snapshot_digest {
            // Same frontier as our snapshot: the peer holds exactly that.
            self.peer_has.clear();
            self.tips.clear();
            for h in std::mem::take(&mut self.snapshot) {
                if store.contains(&h.id) {
                    self.note_held(store, h);
                }
            }
            self.known = true;
            self.phase = Phase::Live;
            self.events.push_back(SessionEvent::InSync);
            if self.eager {
                // Push what was stored since the snapshot.
                return self.rebuild_cursors(store);
            }
            // Announce it.
            for h in store.frontier() {
                if self.on_branch(store, &h) {
                    if !self.peer_holds(store, &h) {
                        self.announce_branches.insert(h);
                    }
                    continue;
                }
                let has = self.peer_has.get(&h.author).copied().unwrap_or(0);
                if h.seq > has {
                    raise(&mut self.announce, h.author, h.seq);
                }
            }
            Ok(())
        } else {
            if self.snapshot.len() > MAX_FRONTIER_ENTRIES {
                return Err(SyncError::LocalFrontierTooLarge {
                    entries: self.snapshot.len(),
                });
            }
            self.peer_digest = hello.digest;
            let heads = std::mem::take(&mut self.snapshot);
            self.control.push_back(Message::Frontier { heads });
            self.phase = Phase::AwaitFrontier;
            Ok(())
        }
    }

    fn on_frontier<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
    ) -> Result<(), SyncError> {
        if heads.len() > MAX_FRONTIER_ENTRIES {
            return Err(SyncError::FrontierTooLarge {
                entries: heads.len(),
            });
        }
        if heads.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SyncError::FrontierInvalid(
                "heads are not strictly ascending by (author, seq, id)",
            ));
        }
        if heads.iter().any(|h| h.seq == 0) {
            return Err(SyncError::FrontierInvalid("a head has seq 0"));
        }
        if frontier_digest(&heads) != self.peer_digest {
            return Err(SyncError::FrontierDigestMismatch);
        }
        self.known = true;
        // The peer's frontier is the truth about what it holds: what this
        // end believed beyond it (events sent that the peer could not store
        // yet, or dropped with a session) is forgotten, so the round sends
        // it again rather than never.
        self.peer_has.clear();
        self.tips.clear();
        let ours = store.frontier();
        for w in ours.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for w in heads.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for h in &heads {
            if store.contains(&h.id) {
                self.note_held(store, *h);
                continue;
            }
            match store.event_id(&h.author, h.seq) {
                Some(held) => {
                    // Another event at that seq here: the peer holds a
                    // branch this replica lacks, and lacks ours from
                    // where they diverge (unknown here: from the start).
                    self.claim_fork(Equivocation {
                        author: h.author,
                        seq: h.seq,
                        held,
                        other: h.id,
                        proven: false,
                    });
                }
                // Only authors this replica holds: nothing else is ever sent
                // to the peer, and the map stays bounded by the store. The
                // peer is ahead on this chain, or on a branch that forked
                // above it: then its events tell, and the next round sends
                // ours by head.
                None if store.event_id(&h.author, 1).is_some() => {
                    raise(&mut self.peer_has, h.author, h.seq)
                }
                None => {}
            }
        }
        self.phase = Phase::Streaming;
        self.sent_done = false;
        self.got_done = false;
        self.rebuild_cursors(store)
    }

    /// Reports a fork of `e.author` (once per session) and from now on
    /// sends its chains by head.
    /// Whether the author was not known to fork in this session before.
    /// What the peer holds of its chains is known by heads from now on:
    /// a seq says nothing about which branch.
    fn claim_fork(&mut self, e: Equivocation) -> bool {
        if self.reported.insert(e.author) {
            self.events.push_back(SessionEvent::Equivocation(e));
        }
        self.peer_has.remove(&e.author);
        self.forked.insert(e.author)
    }

    fn on_ihave<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
        pool: &Pool,
    ) -> Result<(), SyncError> {
        check_heads("IHave", &heads, MAX_IHAVE_HEADS)?;
        if heads.is_empty() {
            return Err(SyncError::InvalidHeads {
                message: "IHave",
                why: "it announces nothing",
            });
        }
        self.stats.announcements_received += heads.len() as u64;
        let mut lacking = Vec::new();
        for h in heads {
            if store.contains(&h.id) {
                self.note_held(store, h);
                continue;
            }
            match store.event_id(&h.author, h.seq) {
                // Another event at that seq: a branch, to be fetched.
                Some(_) => self.forked.extend([h.author]),
                // Only authors this replica holds are tracked.
                None if store.event_id(&h.author, 1).is_some() => {
                    raise(&mut self.peer_has, h.author, h.seq)
                }
                None => {}
            }
            if !pool.contains(&h.id) {
                lacking.push(h);
            }
        }
        if !lacking.is_empty() {
            for h in &lacking {
                if self.wanted.len() < MAX_GRAFT_HEADS {
                    self.wanted.insert(h.author);
                }
            }
            self.events
                .push_back(SessionEvent::Announced { heads: lacking });
        }
        Ok(())
    }

    fn on_graft<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
    ) -> Result<(), SyncError> {
        check_heads("Graft", &heads, MAX_GRAFT_HEADS)?;
        self.stats.grafts_received += 1;
        for h in heads {
            if store.contains(&h.id) {
                self.note_held(store, h);
            }
        }
        self.eager = true;
        self.prune_sent = false;
        self.dup_streak = 0;
        // Everything the peer lacks is pushed now: nothing to announce.
        self.announce.clear();
        self.announce_branches.clear();
        self.events.push_back(SessionEvent::Grafted);
        self.rebuild_cursors(store)
    }

    fn on_events<S: Store + ?Sized>(
        &mut self,
        frames: &[u8],
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        if frames.is_empty() {
            return Err(SyncError::EmptyEvents);
        }
        // Everything outside the peer's stream of a round (from its
        // Frontier to its Done) is a live push.
        let live = self.phase != Phase::Streaming || self.got_done;
        let me = self.me();
        let mut offset = 0;
        let mut index = 0;
        let mut released = false;
        let (mut fresh, mut dups) = (0u64, 0u64);
        // Signed heads of forked authors received, and authors found to
        // fork in this message.
        let mut got: Vec<Head> = Vec::new();
        let mut new_forks: Vec<NodeId> = Vec::new();
        while offset < frames.len() {
            let (bytes, sig, used) =
                decode_wire_frame(&frames[offset..]).map_err(|source| SyncError::Frame {
                    index,
                    offset,
                    source,
                })?;
            let id = EventId(*blake3::hash(bytes).as_bytes());
            let at = index;
            offset += used;
            index += 1;
            self.stats.events_received += 1;
            if self.run_ids.contains(&id) {
                // Sent again while its run is still open here.
                self.stats.duplicates += 1;
                dups += 1;
                continue;
            }
            // A pooled event may be the signed end of a run open here (its
            // signature covers the run): checked as the run's next event.
            let ends_run = !store.contains(&id)
                && EventRef::peek(id, bytes)
                    .is_some_and(|r| self.runs.get(&r.author).is_some_and(|r| !r.is_empty()));
            if (store.contains(&id) || pool.contains(&id)) && !ends_run {
                // A duplicate, known by its id: neither decoded nor
                // verified. Only its author and seq are read (the bytes are
                // those of an event held here). An open run cannot need a
                // stored one: what is stored has its whole chain stored, so
                // the run's next event names a held prev.
                if let Some(EventRef { author, seq, .. }) = EventRef::peek(id, bytes) {
                    if store.contains(&id) {
                        self.note_held(&*store, Head { author, seq, id });
                        self.drop_held_runs(author, &*store);
                    }
                    self.stats.duplicates += 1;
                    dups += 1;
                    continue;
                }
            }
            let (event, _) = Event::decode(bytes).map_err(|source| SyncError::Event {
                index: at,
                id,
                event: EventRef::describe_bytes(id, bytes),
                source: Box::new(source),
            })?;
            let author = event.author;
            let eref = EventRef {
                id,
                author,
                seq: event.seq,
            };
            // The run this event continues: the one that ends at its prev.
            // Else it starts one: its prev is held (or it is seq 1), or no
            // run of its author is open (it waits for its prev).
            let runs = self.runs.entry(author).or_default();
            let run_ix = match runs
                .iter()
                .position(|r| r.last().is_some_and(|l| Some(l.id) == event.prev))
            {
                Some(i) => i,
                None => {
                    // Its prev may sit inside another open run (a branch
                    // leaving it): it then waits in the pool for that run.
                    let held = event.prev.is_none_or(|p| {
                        store.contains(&p) || pool.contains(&p) || self.run_ids.contains(&p)
                    });
                    if !held {
                        if let Some(last) = runs.iter().filter_map(|r| r.last()).next() {
                            let why = if event.seq != last.event.seq.saturating_add(1) {
                                "its seq does not follow"
                            } else {
                                "its prev is not that event"
                            };
                            return Err(SyncError::BrokenRun {
                                event: eref,
                                after_seq: last.event.seq,
                                why,
                            });
                        }
                    }
                    runs.push(Vec::new());
                    runs.len() - 1
                }
            };
            if let Some(sig) = &sig {
                verify(&author, &id, sig).map_err(|source| SyncError::BadSignature {
                    event: eref,
                    source,
                })?;
            }
            let (in_pool, in_pool_bytes) = pool.held(me);
            if self.run_events + in_pool + 1 > self.config.max_pending_events
                || self.run_bytes + in_pool_bytes + bytes.len() > self.config.max_pending_bytes
            {
                return Err(SyncError::PendingLimit {
                    max_events: self.config.max_pending_events,
                    max_bytes: self.config.max_pending_bytes,
                });
            }
            self.run_events += 1;
            self.run_bytes += bytes.len();
            fresh += 1;
            let signed = sig.is_some();
            let runs = self.runs.entry(author).or_default();
            self.run_ids.insert(id);
            runs[run_ix].push(Pending {
                event,
                id,
                bytes: bytes.to_vec(),
                sig,
                seg: (0, id),
                origin: me,
            });
            if signed {
                // The signature covers the whole run through `prev`: it is
                // authenticated, and the peer holds it.
                let run = runs.swap_remove(run_ix);
                if runs.is_empty() {
                    self.runs.remove(&author);
                }
                for p in &run {
                    self.run_ids.remove(&p.id);
                }
                self.run_events -= run.len();
                self.run_bytes -= run.iter().map(|p| p.bytes.len()).sum::<usize>();
                // An event at a seq held here with another id proves a
                // fork: both branches are kept.
                let fork = run.iter().find_map(|p| {
                    let held = store.event_id(&author, p.event.seq)?;
                    (held != p.id).then_some(Equivocation {
                        author,
                        seq: p.event.seq,
                        held,
                        other: p.id,
                        proven: true,
                    })
                });
                if let Some(e) = fork {
                    if self.claim_fork(e) {
                        new_forks.push(author);
                    }
                }
                if self.forked.contains(&author) {
                    got.push(Head {
                        author,
                        seq: eref.seq,
                        id,
                    });
                } else {
                    raise(&mut self.peer_has, author, eref.seq);
                }
                self.stats.duplicates += pool.add_run(run, (eref.seq, id), me)?;
                released = true;
            }
        }
        debug_assert_eq!(self.run_ids.len(), self.run_events, "run_ids indexes runs");
        if released {
            self.drain(store, pool)?;
        }
        for h in got {
            if store.contains(&h.id) {
                self.note_held(&*store, h);
            }
        }
        for author in new_forks {
            // The peer holds another branch: send it ours, from where its
            // branch leaves ours.
            for h in store.frontier().into_iter().filter(|h| h.author == author) {
                self.add_branch(&*store, h)?;
                // What will have been sent counts for the next branches.
                self.tips.entry(h.author).or_default().push(h);
            }
        }
        if live && fresh > 0 {
            self.dup_streak = 0;
        } else if live && dups > 0 {
            self.dup_streak = self.dup_streak.saturating_add(1);
        }
        if self.dup_streak >= self.config.prune_after.max(1) && (self.eager || !self.prune_sent) {
            // The peer's pushes bring only what this replica holds: another
            // link brings them first. Both ends turn lazy.
            self.dup_streak = 0;
            self.eager = false;
            self.prune_sent = true;
            self.control.push_back(Message::Prune);
            self.stats.prunes_sent += 1;
            self.events.push_back(SessionEvent::Pruned);
        }
        Ok(())
    }

    /// Drops `author`'s open runs whose last event the store now holds
    /// (another link brought them, signed): their whole chain is held.
    fn drop_held_runs<S: Store + ?Sized>(&mut self, author: NodeId, store: &S) {
        let Some(runs) = self.runs.get_mut(&author) else {
            return;
        };
        let mut dropped = (0, 0);
        let ids = &mut self.run_ids;
        runs.retain(|r| {
            let held = r.last().is_some_and(|l| store.contains(&l.id));
            if held {
                for p in r {
                    ids.remove(&p.id);
                }
                dropped.0 += r.len();
                dropped.1 += r.iter().map(|p| p.bytes.len()).sum::<usize>();
            }
            !held
        });
        if runs.is_empty() {
            self.runs.remove(&author);
        }
        self.run_events -= dropped.0;
        self.run_bytes -= dropped.1;
        self.stats.duplicates += dropped.0 as u64;
    }

    fn on_done<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        self.drain(store, pool)?;
        let authors: Vec<NodeId> = self.runs.keys().copied().collect();
        for a in authors {
            self.drop_held_runs(a, &*store);
        }
        if let Some(run) = self.runs.values().flatten().find(|r| !r.is_empty()) {
            return Err(SyncError::Unsigned {
                first: run[0].eref(),
                last_seq: run[run.len() - 1].event.seq,
            });
        }
        // Events waiting for a dependency stay pooled: it may come over
        // another link. The policy learns what to ask for.
        let deps = pool.missing(self.me(), |id| store.contains(id));
        if !deps.is_empty() {
            self.events.push_back(SessionEvent::Missing { deps });
        }
        self.got_done = true;
        self.events.push_back(SessionEvent::PeerDone);
        self.maybe_round_done();
        Ok(())
    }

    /// What to do with a pooled event, given the store and the events
    /// this drain pass accepted before it (`tent`): by id alone, so that
    /// both branches of a fork are stored.
    fn verdict<S: Store + ?Sized>(p: &Pending, store: &S, tent: &BTreeSet<EventId>) -> Verdict {
        let held = |id: &EventId| tent.contains(id) || store.contains(id);
        if held(&p.id) {
            return Verdict::Duplicate;
        }
        if p.event.prev.iter().chain(&p.event.deps).all(held) {
            Verdict::Store
        } else {
            Verdict::Wait
        }
    }

    /// Stores every segment in the pool that can be stored whole, in
    /// canonical order, whichever session received it. A pass walks the
    /// pool in canonical order, accepting each event whose predecessor and
    /// deps are stored or accepted before it; a segment with an event that
    /// must wait is excluded whole, and if part of it was already accepted
    /// the pass is run again without it.
    ///
    /// Cost: a pass is linear in the events pooled. In honest traffic over
    /// a stable tree nothing waits, so the pool is empty after every drain
    /// and the work is linear in what arrives. Events that keep waiting
    /// (which a hostile author can sign) are walked again on each release:
    /// bounded by the pool's limits; shells rate-limit peers.
    pub(super) fn drain<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        let mut excluded: BTreeSet<(NodeId, (u64, EventId))> = BTreeSet::new();
        loop {
            let mut tent: BTreeSet<EventId> = BTreeSet::new();
            let mut seg_accepted: BTreeSet<(NodeId, (u64, EventId))> = BTreeSet::new();
            let mut accepted: Vec<(PoolKey, bool)> = Vec::new();
            let mut again = false;
            for (key, p) in &pool.entries {
                let seg = (p.event.author, p.seg);
                if excluded.contains(&seg) {
                    continue;
                }
                let store_it = match Self::verdict(p, &*store, &tent) {
                    Verdict::Store => true,
                    Verdict::Duplicate => false,
                    Verdict::Wait => {
                        again |= seg_accepted.contains(&seg);
                        excluded.insert(seg);
                        continue;
                    }
                };
                accepted.push((*key, store_it));
                tent.insert(p.id);
                seg_accepted.insert(seg);
            }
            if again {
                continue;
            }
            if self.commit(accepted, store, pool)? {
                continue;
            }
            return Ok(());
        }
    }

    /// Stores the accepted events in order. Returns `true` when the store
    /// refused an event that another session received: that session is
    /// told, its events of the author are dropped, and the caller passes
    /// again (what was accepted after it may have depended on it).
    fn commit<S: Store + ?Sized>(
        &mut self,
        accepted: Vec<(PoolKey, bool)>,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<bool, SyncError> {
        let me = self.me();
        let mut count = 0u64;
        let mut heads: BTreeSet<Head> = BTreeSet::new();
        let mut result = Ok(false);
        for (key, store_it) in accepted {
            let Some(p) = pool.take(&key) else {
                debug_assert!(false, "accepted keys come from the pool and are distinct");
                continue;
            };
            if !store_it {
                self.stats.duplicates += 1;
                continue;
            }
            match store.insert(&p.event, p.id, &p.bytes, p.sig) {
                Ok(Inserted::New) => {
                    count += 1;
                    if p.sig.is_some() {
                        // A signed head; what it extends is no longer one.
                        if let Some(prev) = p.event.prev {
                            heads.remove(&Head {
                                author: p.event.author,
                                seq: p.event.seq - 1,
                                id: prev,
                            });
                        }
                        heads.retain(|h| {
                            h.author != p.event.author || store.chain_id(&p.id, h.seq) != Some(h.id)
                        });
                        heads.insert(Head {
                            author: p.event.author,
                            seq: p.event.seq,
                            id: p.id,
                        });
                    }
                }
                Ok(Inserted::Duplicate) => self.stats.duplicates += 1,
                Err(source) => {
                    let err = SyncError::InvalidEvent {
                        event: p.eref(),
                        source: Box::new(source),
                    };
                    if p.origin == me {
                        result = Err(err);
                    } else {
                        pool.drop_author(p.event.author, p.origin);
                        pool.post(p.origin, Mail::Refused(err));
                        result = Ok(true);
                    }
                    break;
                }
            }
        }
        self.stats.events_stored += count;
        if count > 0 {
            // Reported even when a later event failed: these are stored.
            self.events.push_back(SessionEvent::Received {
                count,
                heads: heads.into_iter().collect(),
            });
        }
        result
    }
}

/// Checks the heads of an IHave or Graft: the limit, strictly ascending
/// authors, seqs from 1.
fn check_heads(message: &'static str, heads: &[Head], max: usize) -> Result<(), SyncError> {
    if heads.len() > max {
        return Err(SyncError::TooManyHeads {
            message,
            entries: heads.len(),
            max,
        });
    }
    if heads.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SyncError::InvalidHeads {
            message,
            why: "heads are not strictly ascending by (author, seq, id)",
        });
    }
    if heads.iter().any(|h| h.seq == 0) {
        return Err(SyncError::InvalidHeads {
            message,
            why: "a head has seq 0",
        });
    }
    Ok(())
}
