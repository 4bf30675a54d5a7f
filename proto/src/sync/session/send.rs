//! The sending half of a session: what the peer is known to hold, and the
//! queue of what it lacks.
//!
//! Per author the session keeps the highest seq the peer holds
//! (`peer_has`), and for an author that forked the branch heads it holds
//! (`tips`), since a seq does not say which branch. What to send is a
//! cursor per chain (an author's, or one branch of a forked author's),
//! each with one heap entry keyed by the hlc of its next event, so that
//! the streams of all authors merge in canonical order with memory
//! O(authors), and events are fetched only as [`Session::poll_transmit`]
//! packs them.

use std::cmp::Reverse;

use super::{raise, Cursor, Session};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::sync::codec::{encode_wire_frame, wire_frame_len, Head};
use crate::sync::error::SyncError;
use crate::sync::limits::{MAX_FRAME_BYTES, MAX_IHAVE_HEADS};
use crate::sync::store::Store;

impl Session {
    /// Whether `head` is sent by head (a branch of an author that forked):
    /// its author is known to fork in this session, or `head` is not on
    /// the chain `event_id` follows (the author forked in the store).
    pub(super) fn on_branch<S: Store + ?Sized>(&mut self, store: &S, head: &Head) -> bool {
        if self.forked.contains(&head.author) {
            return true;
        }
        if store.event_id(&head.author, head.seq) != Some(head.id) {
            self.peer_has.remove(&head.author);
            self.forked.insert(head.author);
            return true;
        }
        false
    }

    /// The highest seq of the chain ending at `head` that the peer is
    /// known to hold: its tips of the author, and the chain `event_id`
    /// follows as far as `peer_has` says.
    pub(super) fn held_on<S: Store + ?Sized>(&self, store: &S, head: &Head) -> u64 {
        let mut have = 0;
        for t in self.tips.get(&head.author).into_iter().flatten() {
            have = have.max(store.common_seq(&head.id, &t.id));
        }
        let along = self
            .peer_has
            .get(&head.author)
            .copied()
            .unwrap_or(0)
            .min(head.seq);
        if along > have && store.chain_id(&head.id, along) == store.event_id(&head.author, along) {
            have = along;
        }
        have
    }

    /// Whether the peer is known to hold `head`.
    pub(super) fn peer_holds<S: Store + ?Sized>(&self, store: &S, head: &Head) -> bool {
        self.held_on(store, head) >= head.seq
    }

    /// Records that the peer holds `head` (and its chain), which this
    /// replica holds too.
    pub(super) fn note_held<S: Store + ?Sized>(&mut self, store: &S, head: Head) {
        if !self.forked.contains(&head.author)
            && store.event_id(&head.author, head.seq) == Some(head.id)
        {
            raise(&mut self.peer_has, head.author, head.seq);
            return;
        }
        if self.peer_holds(store, &head) {
            return;
        }
        let tips = self.tips.entry(head.author).or_default();
        // Tips the new one implies go; there are as many as branches.
        tips.retain(|t| store.common_seq(&t.id, &head.id) < t.seq);
        tips.push(head);
    }

    /// Queues the chain ending at `head` from the first event the peer is
    /// not known to hold, or extends a branch cursor this chain continues.
    pub(super) fn add_branch<S: Store + ?Sized>(
        &mut self,
        store: &S,
        head: Head,
    ) -> Result<(), SyncError> {
        let from = self.held_on(store, &head) + 1;
        if from > head.seq {
            return Ok(());
        }
        for (key, c) in self.cursors.iter_mut() {
            if key.0 != head.author {
                continue;
            }
            let Some(h) = c.head else { continue };
            if c.end <= head.seq && store.chain_id(&head.id, c.end) == Some(h) {
                c.head = Some(head.id);
                c.end = head.seq;
                return Ok(());
            }
            if c.end >= head.seq && store.chain_id(&h, head.seq) == Some(head.id) {
                return Ok(()); // already on its way
            }
        }
        let hlc = branch_hlc(store, &head.id, from).ok_or(SyncError::LocalMissing {
            author: head.author,
            seq: from,
        })?;
        self.cursors.insert(
            (head.author, Some(head.id)),
            Cursor {
                next: from,
                end: head.seq,
                head: Some(head.id),
            },
        );
        self.heap
            .push(Reverse((hlc, head.author, from, Some(head.id))));
        Ok(())
    }

    /// Replaces the send queue by the store's events the peer is not known
    /// to hold: per author, the chain `event_id` follows above what the
    /// peer holds of it, and for an author that forked each branch from
    /// where the peer's known heads leave it.
    pub(super) fn rebuild_cursors<S: Store + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<(), SyncError> {
        self.cursors.clear();
        self.heap.clear();
        let frontier = store.frontier();
        for w in frontier.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for h in frontier {
            if self.on_branch(store, &h) {
                self.add_branch(store, h)?;
                // What will have been sent counts for the next branches.
                self.tips.entry(h.author).or_default().push(h);
                continue;
            }
            let has = self.peer_has.get(&h.author).copied().unwrap_or(0);
            if h.seq > has {
                self.add_cursor(store, h.author, has + 1, h.seq)?;
            }
        }
        Ok(())
    }

    /// Queues `author`'s seqs `from..=to` on the chain `event_id` follows,
    /// or extends its cursor to `to`.
    pub(super) fn add_cursor<S: Store + ?Sized>(
        &mut self,
        store: &S,
        author: NodeId,
        from: u64,
        to: u64,
    ) -> Result<(), SyncError> {
        if from > to {
            return Ok(());
        }
        if let Some(c) = self.cursors.get_mut(&(author, None)) {
            c.end = c.end.max(to);
            return Ok(());
        }
        let hlc = store
            .hlc(&author, from)
            .ok_or(SyncError::LocalMissing { author, seq: from })?;
        self.cursors.insert(
            (author, None),
            Cursor {
                next: from,
                end: to,
                head: None,
            },
        );
        self.heap.push(Reverse((hlc, author, from, None)));
        Ok(())
    }

    /// The frames of the next Events message, if there is anything to send:
    /// events popped from the merge in canonical order until the next would
    /// overflow the target. A cursor advances only when its event is packed,
    /// so an event that does not fit is fetched again for the next message.
    pub(super) fn next_events<S: Store + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let target = self.config.events_bytes_target.clamp(1, MAX_FRAME_BYTES);
        let mut frames = Vec::new();
        let mut count = 0u64;
        while let Some(&Reverse((_, author, queued, branch))) = self.heap.peek() {
            let key = (author, branch);
            let Some(c) = self.cursors.get_mut(&key) else {
                self.heap.pop(); // its cursor is done
                continue;
            };
            if c.next != queued {
                self.heap.pop(); // stale
                continue;
            }
            let seq = match c.head {
                Some(_) => queued,
                None => {
                    let has = self.peer_has.get(&author).copied().unwrap_or(0);
                    queued.max(has.saturating_add(1))
                }
            };
            if seq > c.end {
                // The peer got the rest meanwhile (from us or by its own pushes).
                self.heap.pop();
                self.cursors.remove(&key);
                continue;
            }
            if seq != queued {
                self.heap.pop();
                c.next = seq;
                let hlc = store
                    .hlc(&author, seq)
                    .ok_or(SyncError::LocalMissing { author, seq })?;
                self.heap.push(Reverse((hlc, author, seq, branch)));
                continue;
            }
            let end = c.end;
            let head = c.head;
            let stored = match head {
                None => store.fetch(&author, seq),
                Some(h) => store.chain_id(&h, seq).and_then(|id| store.fetch_id(&id)),
            }
            .ok_or(SyncError::LocalMissing { author, seq })?;
            if seq == end && stored.sig.is_none() {
                return Err(SyncError::LocalUnsigned { author, seq });
            }
            let len = wire_frame_len(stored.bytes.len(), stored.sig.is_some());
            if count > 0 && frames.len() + len > target {
                break;
            }
            self.heap.pop();
            if seq == end {
                self.cursors.remove(&key);
            } else {
                let hlc = match head {
                    None => store.hlc(&author, seq + 1),
                    Some(h) => branch_hlc(store, &h, seq + 1),
                }
                .ok_or(SyncError::LocalMissing {
                    author,
                    seq: seq + 1,
                })?;
                if let Some(c) = self.cursors.get_mut(&key) {
                    c.next = seq + 1;
                }
                self.heap.push(Reverse((hlc, author, seq + 1, branch)));
            }
            encode_wire_frame(&mut frames, &stored.bytes, stored.sig.as_ref());
            count += 1;
            if head.is_none() {
                raise(&mut self.peer_has, author, seq);
            }
        }
        self.stats.events_sent += count;
        Ok((count > 0).then_some(frames))
    }

    /// The heads of the next IHave, if a lazy end has any to announce:
    /// queued heads the peer is not known to hold, ascending.
    pub(super) fn next_ihave<S: Store + ?Sized>(&mut self, store: &S) -> Option<Vec<Head>> {
        let mut heads = Vec::new();
        while heads.len() < MAX_IHAVE_HEADS {
            let Some((author, seq)) = self.announce.pop_first() else {
                break;
            };
            let has = self.peer_has.get(&author).copied().unwrap_or(0);
            let told = self.announced.get(&author).copied().unwrap_or(0);
            if seq <= has.max(told) {
                continue;
            }
            if let Some(id) = store.event_id(&author, seq) {
                heads.push(Head { author, seq, id });
                raise(&mut self.announced, author, seq);
            }
        }
        while heads.len() < MAX_IHAVE_HEADS {
            let Some(h) = self.announce_branches.pop_first() else {
                break;
            };
            if !self.peer_holds(store, &h) {
                heads.push(h);
            }
        }
        heads.sort_unstable();
        heads.dedup();
        (!heads.is_empty()).then_some(heads)
    }
}

/// The hlc of the event at `seq` on the chain that ends at `head`.
fn branch_hlc<S: Store + ?Sized>(store: &S, head: &EventId, seq: u64) -> Option<Hlc> {
    Some(store.fetch_id(&store.chain_id(head, seq)?)?.hlc)
}
