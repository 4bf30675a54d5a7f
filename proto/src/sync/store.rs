//! What a session needs from a replica ([`Store`]), and [`MemStore`], the
//! in-memory replica that tests and the simulator use. The node's store is
//! [`crate::replica`]'s; a session never learns which one it talks to.

use std::collections::BTreeMap;

use super::codec::{frontier_digest, Head};
use super::pool::Pool;
use crate::event::{Event, Keypair, Signature};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{EventId, NodeId};
use crate::state::{Draft, Inserted, Invalid, PrepareError, Prepared, State};

/// An event as a store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The canonical encoding.
    pub bytes: Vec<u8>,
    /// The id.
    pub id: EventId,
    /// The hlc.
    pub hlc: Hlc,
    /// The author's signature, if the store holds one for this event.
    pub sig: Option<Signature>,
}

/// What a session needs from a replica. See the module docs for the
/// contract on heads and signatures.
///
/// An author that forked has several chains. `event_id`, `hlc` and `fetch`
/// by `(author, seq)` follow one of them (the replica's choice, the same on
/// every call: [`State::event_id`]); `chain_id`, `common_seq` and
/// `fetch_id` reach the others.
pub trait Store {
    /// Every branch head, strictly ascending by `(author, seq, id)`: one per
    /// author, or one per branch of an author that forked. The events up to
    /// the heads are causally closed and each head carries a signature.
    fn frontier(&self) -> Vec<Head>;
    /// The id of an author's event by seq.
    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId>;
    /// The id of the event at `seq` in the chain that ends at `head`.
    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId>;
    /// The highest seq at which the chains ending at `a` and `b` hold the
    /// same event (0 if none, or if either is not held).
    fn common_seq(&self, a: &EventId, b: &EventId) -> u64;
    /// Whether the event is stored.
    fn contains(&self, id: &EventId) -> bool;
    /// The hlc of an author's event by seq (the merge's sort key; cheaper
    /// than [`Store::fetch`]).
    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc>;
    /// An author's event by seq.
    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored>;
    /// An event by id.
    fn fetch_id(&self, id: &EventId) -> Option<Stored>;
    /// Checks an authenticated event against the replica and stores it with
    /// its signature, as [`State::insert`] does: on error nothing changes.
    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid>;
    /// The pool of events waiting for a dependency that all sessions on this
    /// store share, so that an event can wait for one that arrives over another
    /// connection. `None` (the default): each session keeps a private pool, and
    /// an event whose dependency another session stored waits until
    /// [`Session::retry_waiting`](super::Session::retry_waiting) or the
    /// session's next message. A store returns the same pool on every call.
    fn pool(&mut self) -> Option<&mut Pool> {
        None
    }
}

/// An in-memory replica: a [`State`], every event's bytes and signature,
/// and a [`Pool`] its sessions share.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    state: State,
    events: BTreeMap<EventId, Stored>,
    pool: Pool,
}

impl MemStore {
    /// An empty replica.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// The folded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Events stored.
    pub fn len(&self) -> u64 {
        self.state.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// [`frontier_digest`] of the frontier.
    pub fn frontier_digest(&self) -> [u8; 32] {
        frontier_digest(&self.frontier())
    }

    /// An author's event by seq (on the chain [`State::event_id`] follows).
    pub fn get(&self, author: &NodeId, seq: u64) -> Option<&Stored> {
        self.events.get(&self.state.event_id(author, seq)?)
    }

    /// The events its sessions received that wait for a dependency.
    pub fn waiting(&self) -> &Pool {
        &self.pool
    }

    /// Makes an event of `key`'s author from `draft`, as a node does
    /// ([`State::prepare`], [`Event::seal`]), and stores it unsigned, as part
    /// of a batch that [`MemStore::sign`] ends. `None` when the draft's
    /// command id is already in the log.
    pub fn append(
        &mut self,
        key: &Keypair,
        clock: &mut HlcClock,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Option<EventId>, PrepareError> {
        let event = match self.state.prepare(key.node_id(), clock, now_ms, draft)? {
            Prepared::New(event) => event,
            Prepared::Existing(_) => return Ok(None),
        };
        let (bytes, id) = event.seal();
        self.insert(&event, id, &bytes, None)?;
        Ok(Some(id))
    }

    /// Ends a batch: signs `key`'s author's head (the one its local events
    /// extend). Returns its id, or `None` when the author has no event.
    pub fn sign(&mut self, key: &Keypair) -> Option<EventId> {
        let author = key.node_id();
        let id = self
            .state
            .event_id(&author, self.state.local_seq(&author))?;
        let stored = self.events.get_mut(&id)?;
        stored.sig = Some(key.sign(&stored.id));
        Some(stored.id)
    }

    /// Appends each draft and signs the last event made, as a node's group
    /// commit does. At the first draft refused, the events made before it
    /// stay (signed) and the error is returned.
    pub fn commit(
        &mut self,
        key: &Keypair,
        clock: &mut HlcClock,
        now_ms: u64,
        drafts: impl IntoIterator<Item = Draft>,
    ) -> Result<Vec<EventId>, PrepareError> {
        let mut made = Vec::new();
        let mut result = Ok(());
        for draft in drafts {
            match self.append(key, clock, now_ms, draft) {
                Ok(Some(id)) => made.push(id),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !made.is_empty() {
            self.sign(key);
        }
        result.map(|()| made)
    }
}

impl Store for MemStore {
    fn frontier(&self) -> Vec<Head> {
        self.state
            .frontier()
            .into_iter()
            .map(|(author, seq, id)| Head { author, seq, id })
            .collect()
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.state.event_id(author, seq)
    }

    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId> {
        self.state.chain_id(head, seq)
    }

    fn common_seq(&self, a: &EventId, b: &EventId) -> u64 {
        self.state.common_seq(a, b)
    }

    fn contains(&self, id: &EventId) -> bool {
        self.state.contains(id)
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.state.hlc_of(&self.state.event_id(author, seq)?)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored> {
        self.fetch_id(&self.state.event_id(author, seq)?)
    }

    fn fetch_id(&self, id: &EventId) -> Option<Stored> {
        self.events.get(id).cloned()
    }

    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid> {
        let r = self.state.insert(event, id)?;
        if r == Inserted::New {
            self.events.insert(
                id,
                Stored {
                    bytes: bytes.to_vec(),
                    id,
                    hlc: event.hlc,
                    sig,
                },
            );
        }
        Ok(r)
    }

    fn pool(&mut self) -> Option<&mut Pool> {
        Some(&mut self.pool)
    }
}
