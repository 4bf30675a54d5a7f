//! Ordered projections: user read models that fold events in the canonical
//! order (`DESIGN.md` §3), kept equal to a replay in that order whatever
//! order the events arrive in.
//!
//! **The model.** The CRDT fold ([`crate::state`]) is order-free; a
//! [`Projection`] may not be ("the first 100 registrants get the early
//! price", seat numbers in order of sale). Its `apply` is called in the
//! *canonical order*, ascending [`Key`] = `(hlc, author, seq, id)`, the
//! order every replica holding the same events agrees on. The fold checks
//! that an event's hlc is above its `prev`'s and every dep's, so this order
//! is a linear extension of causality: an event is applied after
//! everything it saw.
//!
//! **The engine.** A [`Projector`] owns one projection, its state and the
//! ordered index of every event it was given (`Key -> log position`). It
//! takes events in any causally valid order, with duplicates
//! ([`Projector::insert`]):
//! - a duplicate (a key already in the index) changes nothing;
//! - an event that sorts after the position (the last applied key), while
//!   nothing waits, is applied at once, from the event in hand;
//! - a *late* event (one that sorts before the position) rewinds the
//!   projection to the newest checkpoint strictly before its key: that
//!   state is restored, checkpoints after it are dropped, and every event
//!   the index holds after it waits. [`Projector::catch_up`] then replays
//!   them in canonical order, reading each from an [`EventSource`] by the
//!   position the shell gave with it, so the engine never holds events
//!   (the node reads its log; tests keep a [`MemorySource`]).
//!
//! After `catch_up` returns `Ok`, [`Projector::lag`] is 0 and the state is
//! exactly that of a replay of the index in canonical order; so replicas
//! holding the same events have equal [`Projector::state_hash`]es. A read
//! that fails leaves the projection at the last event replayed, with the
//! rest counted in the lag; the next `catch_up` goes on from there.
//!
//! **Checkpoints.** After every [`CHECKPOINT_EVERY`] events applied the
//! engine keeps a clone of the state. Checkpoint `i` (taken after
//! `i * CHECKPOINT_EVERY` events) is kept while its age `a = newest - i`
//! is below [`CHECKPOINTS_RECENT`], or when `i` is a multiple of `2^k`,
//! `k = floor(log2(a / CHECKPOINTS_RECENT)) + 1`. The newest 16 are thus
//! one interval apart, and older ones are thinned exponentially with age:
//! about `16 + 8 * log2(n / (16 * CHECKPOINT_EVERY))` are kept for `n`
//! events (about 90 for ten million), and the empty state before the
//! first event is always there. A late event `d` events deep finds one
//! less than `d / 4 + CHECKPOINT_EVERY` events before it (about `d / 8`
//! at worst for large `d`), so it costs `O(d + CHECKPOINT_EVERY)` applies (`benches/projection.rs` measures
//! it), even days deep: nothing is final until compaction exists, so no
//! depth is refused. The rule only ever drops more as a checkpoint ages,
//! so it is applied incrementally.
//!
//! Checkpoints live in memory and are rebuilt on start, never persisted:
//! until compaction exists nothing is final, so a persisted checkpoint
//! would still need the whole log behind it for a deep late event, and a
//! rebuild from the log applies each event once, which is cheap next to
//! reading it. For the same reason a changed [`Projection::version`]
//! rebuilds by itself: a node started with new projection code replays its
//! log into it ([`Projector::upgrade`] does the same in a running one).
//!
//! **The state hash** is blake3 over [`HASH_CONTEXT`], the projection's
//! name and version, and the postcard encoding of its state. postcard
//! encodes a `BTreeMap` in key order, so a state built of ordered maps,
//! vectors and plain values encodes canonically; a projection must not put
//! a `HashMap` (or anything whose encoding depends on iteration order) in
//! its state.
//!
//! **Shipped projections**, shared by the node and the simulator:
//! [`KindCounts`] (events per kind per stream prefix) and [`SeatOrder`]
//! (the order of sales on every escrow counter, with seat numbers and
//! waitlist positions, for the venue desk).
//!
//! Memory: the index holds about 120 bytes per event (its key, its
//! position and the tree's overhead), on top of the projection's state and
//! its checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Op};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};

/// Events applied between two checkpoints.
pub const CHECKPOINT_EVERY: u64 = 1024;
/// Checkpoints kept at every interval, newest first; older ones are
/// thinned exponentially (module docs).
pub const CHECKPOINTS_RECENT: u64 = 16;
/// Longest projection name, in bytes.
pub const MAX_PROJECTION_NAME_BYTES: usize = 64;
/// Domain separation for [`Projector::state_hash`].
pub const HASH_CONTEXT: &[u8] = b"weftlog/v1/projection";

/// A read model folded in canonical order: user code. The projection value
/// holds its configuration; its state is separate, so that checkpoints
/// clone only the state.
///
/// ```
/// use std::collections::BTreeMap;
/// use weftlog_proto::projection::Projection;
/// use weftlog_proto::{Event, EventId};
///
/// /// The first three registrants of each session get the early price.
/// struct EarlyBirds;
///
/// impl Projection for EarlyBirds {
///     type State = BTreeMap<String, Vec<String>>;
///     type View = BTreeMap<String, Vec<String>>;
///     fn name(&self) -> &str {
///         "early_birds"
///     }
///     fn version(&self) -> u32 {
///         1
///     }
///     fn apply(&self, state: &mut Self::State, event: &Event, _id: &EventId) {
///         if event.kind == "Registered" {
///             let first = state.entry(event.stream.clone()).or_default();
///             if first.len() < 3 {
///                 first.push(event.meta.user.clone().unwrap_or_default());
///             }
///         }
///     }
///     fn view(&self, state: &Self::State) -> Self::View {
///         state.clone()
///     }
/// }
/// ```
pub trait Projection {
    /// The state folded from the events; cloned for checkpoints, encoded
    /// with postcard for the state hash (module docs: no `HashMap`).
    type State: Clone + Default + Serialize;
    /// What readers see (the node serves it as JSON).
    type View: Serialize;
    /// A short name, unique on a node: lowercase ASCII letters, digits,
    /// `_` and `-`, at most [`MAX_PROJECTION_NAME_BYTES`] bytes.
    fn name(&self) -> &str;
    /// The version of the projection's rules; change it whenever `apply`
    /// or the state changes meaning, and the projection is rebuilt.
    fn version(&self) -> u32;
    /// Folds one event into `state`. Called in canonical order, once per
    /// event; must be deterministic (no clock, no randomness, no `HashMap`
    /// order) and must not panic on any valid event.
    fn apply(&self, state: &mut Self::State, event: &Event, id: &EventId);
    /// The state as readers see it.
    fn view(&self, state: &Self::State) -> Self::View;
}

/// An event's place in the canonical order: ascending `(hlc, author, seq,
/// id)` (field order is the order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Key {
    /// The event's hlc.
    pub hlc: Hlc,
    /// Its author.
    pub author: NodeId,
    /// Its seq in the author's chain.
    pub seq: u64,
    /// Its id (two branches of a forked author may share the rest).
    pub id: EventId,
}

impl Key {
    /// The key of `event`, whose id is `id`.
    pub fn of(event: &Event, id: EventId) -> Key {
        Key {
            hlc: event.hlc,
            author: event.author,
            seq: event.seq,
            id,
        }
    }
}

/// Why a replay could not read an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The source could not give the event at that position.
    #[error("cannot read event {id} at log position {pos}: {reason}")]
    Unreadable {
        /// The position the shell gave with the event.
        pos: u64,
        /// The event's id.
        id: EventId,
        /// What went wrong, in one sentence.
        reason: String,
    },
    /// The source gave another event than the one indexed there.
    #[error("log position {pos} holds another event than {id}")]
    Mismatch {
        /// The position the shell gave with the event.
        pos: u64,
        /// The id indexed at that position.
        id: EventId,
    },
}

/// Where a replay reads events: by the position the shell gave with each
/// event ([`Projector::insert`]), and its id.
pub trait EventSource {
    /// The event `id` at position `pos`.
    fn event(&mut self, pos: u64, id: &EventId) -> Result<Event, ReplayError>;
}

impl<F: FnMut(u64, &EventId) -> Result<Event, ReplayError>> EventSource for F {
    fn event(&mut self, pos: u64, id: &EventId) -> Result<Event, ReplayError> {
        self(pos, id)
    }
}

/// An [`EventSource`] in memory, for tests and the simulator: events at
/// positions 1, 2, 3 … in the order they were pushed, as a log holds them.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    events: Vec<Event>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Appends `event`; returns its position (1-based).
    pub fn push(&mut self, event: Event) -> u64 {
        self.events.push(event);
        self.events.len() as u64
    }

    /// Events held.
    pub fn len(&self) -> u64 {
        self.events.len() as u64
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl EventSource for MemorySource {
    fn event(&mut self, pos: u64, id: &EventId) -> Result<Event, ReplayError> {
        let at = pos.checked_sub(1).and_then(|i| usize::try_from(i).ok());
        at.and_then(|i| self.events.get(i))
            .cloned()
            .ok_or_else(|| ReplayError::Unreadable {
                pos,
                id: *id,
                reason: format!("the source holds {} events", self.events.len()),
            })
    }
}

/// What [`Projector::insert`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Applied at once: it sorts after everything applied.
    Applied,
    /// Already indexed: nothing changed.
    Duplicate,
    /// Indexed; it waits for [`Projector::catch_up`] (it was late, which
    /// rewound the projection, or other events wait before it).
    Waiting,
}

/// A state kept to rewind to: after `count` events, the last of them `key`.
#[derive(Debug, Clone)]
struct Checkpoint<S> {
    count: u64,
    state: S,
}

/// One projection kept equal to a replay in canonical order; see the module
/// docs. Call [`Projector::insert`] for each event (any causal order,
/// duplicates allowed), then [`Projector::catch_up`] before reading.
#[derive(Debug, Clone)]
pub struct Projector<P: Projection> {
    projection: P,
    /// Every event given: its key and the position to read it from.
    index: BTreeMap<Key, u64>,
    state: P::State,
    /// The last key applied; every key of the index up to it is applied.
    at: Option<Key>,
    /// Events applied: the index's keys up to `at`.
    applied: u64,
    /// Checkpoints by the key of their last event.
    checkpoints: BTreeMap<Key, Checkpoint<P::State>>,
    /// Events applied between two checkpoints.
    every: u64,
    /// Rewinds made, and events applied by replays, since it was made.
    rewinds: u64,
    replayed: u64,
}

impl<P: Projection> Projector<P> {
    /// A projector for `projection`, at the empty state, with a checkpoint
    /// every [`CHECKPOINT_EVERY`] events.
    ///
    /// # Panics
    /// If the projection's name is not a valid name ([`Projection::name`]).
    pub fn new(projection: P) -> Projector<P> {
        Projector::with_checkpoint_every(projection, CHECKPOINT_EVERY)
    }

    /// A projector with a checkpoint every `every` events (tests and
    /// benchmarks use small intervals; the rule of the module docs is the
    /// same in intervals).
    ///
    /// # Panics
    /// If the projection's name is not a valid name ([`Projection::name`]),
    /// or `every` is 0.
    pub fn with_checkpoint_every(projection: P, every: u64) -> Projector<P> {
        assert!(every > 0, "a checkpoint interval of at least one event");
        let name = projection.name();
        assert!(
            valid_name(name),
            "projection name {name:?}: lowercase letters, digits, _ and -, at most {MAX_PROJECTION_NAME_BYTES} bytes"
        );
        Projector {
            projection,
            index: BTreeMap::new(),
            state: P::State::default(),
            at: None,
            applied: 0,
            checkpoints: BTreeMap::new(),
            every,
            rewinds: 0,
            replayed: 0,
        }
    }

    /// Takes event `event` (whose id is `id`), which the shell can read
    /// again at position `pos` of its [`EventSource`]. Applies it at once
    /// when it sorts after everything applied and nothing waits; rewinds
    /// when it is late.
    pub fn insert(&mut self, event: &Event, id: EventId, pos: u64) -> Inserted {
        let key = Key::of(event, id);
        if self.index.contains_key(&key) {
            return Inserted::Duplicate;
        }
        self.index.insert(key, pos);
        let after = self.at.is_none_or(|at| key > at);
        // `lag` counts the new key too: 1 means only it waits.
        if after && self.lag() == 1 {
            self.apply(event, key);
            return Inserted::Applied;
        }
        if !after {
            self.rewind_before(&key);
        }
        Inserted::Waiting
    }

    /// Applies every event that waits, in canonical order, reading each from
    /// `source`: afterwards the state equals a replay of the index in
    /// canonical order and [`Projector::lag`] is 0. Returns the events it
    /// applied. On a failed read, what was applied stays applied, the rest
    /// waits (the next call goes on from there).
    pub fn catch_up<S: EventSource + ?Sized>(
        &mut self,
        source: &mut S,
    ) -> Result<u64, ReplayError> {
        let mut n = 0;
        loop {
            let next = match self.at {
                None => self.index.iter().next(),
                Some(at) => self
                    .index
                    .range((Bound::Excluded(at), Bound::Unbounded))
                    .next(),
            };
            let Some((&key, &pos)) = next else {
                return Ok(n);
            };
            let event = source.event(pos, &key.id)?;
            if Key::of(&event, key.id) != key {
                return Err(ReplayError::Mismatch { pos, id: key.id });
            }
            self.apply(&event, key);
            self.replayed += 1;
            n += 1;
        }
    }

    /// [`Projector::insert`], then [`Projector::catch_up`].
    pub fn handle(
        &mut self,
        event: &Event,
        id: EventId,
        pos: u64,
        source: &mut (impl EventSource + ?Sized),
    ) -> Result<Inserted, ReplayError> {
        let inserted = self.insert(event, id, pos);
        if inserted == Inserted::Waiting {
            self.catch_up(source)?;
        }
        Ok(inserted)
    }

    /// Forgets every event, state and checkpoint: as new (the shell's log
    /// positions named another history, say).
    pub fn reset(&mut self) {
        self.index.clear();
        self.state = P::State::default();
        self.at = None;
        self.applied = 0;
        self.checkpoints.clear();
    }

    /// Replaces the projection's code. When the name or the version
    /// differs, the state and its checkpoints are dropped and every indexed
    /// event waits: the next [`Projector::catch_up`] rebuilds it. Returns
    /// whether it will rebuild.
    ///
    /// # Panics
    /// If the new name is not valid ([`Projection::name`]).
    pub fn upgrade(&mut self, projection: P) -> bool {
        assert!(
            valid_name(projection.name()),
            "projection name {:?} is not valid",
            projection.name()
        );
        let rebuild = projection.name() != self.projection.name()
            || projection.version() != self.projection.version();
        self.projection = projection;
        if rebuild {
            self.state = P::State::default();
            self.at = None;
            self.applied = 0;
            self.checkpoints.clear();
        }
        rebuild
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        self.projection.name()
    }

    /// The projection's version.
    pub fn version(&self) -> u32 {
        self.projection.version()
    }

    /// The state: a replay in canonical order of the events up to
    /// [`Projector::at`].
    pub fn state(&self) -> &P::State {
        &self.state
    }

    /// The state as readers see it ([`Projection::view`]).
    pub fn view(&self) -> P::View {
        self.projection.view(&self.state)
    }

    /// The position: events applied.
    pub fn position(&self) -> u64 {
        self.applied
    }

    /// The key of the last event applied.
    pub fn at(&self) -> Option<&Key> {
        self.at.as_ref()
    }

    /// Events given (duplicates once).
    pub fn known(&self) -> u64 {
        self.index.len() as u64
    }

    /// Events given but not yet applied: 0 after a successful
    /// [`Projector::catch_up`].
    pub fn lag(&self) -> u64 {
        self.known() - self.applied
    }

    /// Events applied between two checkpoints.
    pub fn checkpoint_every(&self) -> u64 {
        self.every
    }

    /// Checkpoints kept (module docs).
    pub fn checkpoints(&self) -> usize {
        self.checkpoints.len()
    }

    /// Rewinds made by late events since the projector was made.
    pub fn rewinds(&self) -> u64 {
        self.rewinds
    }

    /// Events applied by replays (not at once) since the projector was made.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// blake3 over [`HASH_CONTEXT`], the name's length (u64 LE) and bytes,
    /// the version (u32 LE) and the postcard encoding of the state: equal
    /// on every replica that applied the same events.
    ///
    /// # Panics
    /// If the state's `Serialize` fails, which postcard only does for a
    /// type that reports an error itself (a bug in the projection).
    pub fn state_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(HASH_CONTEXT);
        let name = self.projection.name().as_bytes();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name);
        h.update(&self.projection.version().to_le_bytes());
        postcard::to_io(&self.state, &mut h).expect("a projection state that encodes");
        *h.finalize().as_bytes()
    }

    fn apply(&mut self, event: &Event, key: Key) {
        debug_assert!(self.at.is_none_or(|at| key > at), "applied in order");
        self.projection.apply(&mut self.state, event, &key.id);
        self.at = Some(key);
        self.applied += 1;
        if self.applied.is_multiple_of(self.every) {
            self.checkpoint(key);
        }
    }

    /// Keeps the state as a checkpoint at `key`, and thins the older ones.
    fn checkpoint(&mut self, key: Key) {
        let every = self.every;
        let newest = self.applied / every;
        self.checkpoints.insert(
            key,
            Checkpoint {
                count: self.applied,
                state: self.state.clone(),
            },
        );
        self.checkpoints
            .retain(|_, c| keep_checkpoint(c.count / every, newest));
    }

    /// Restores the newest checkpoint strictly before `key` (the empty
    /// state if none) and drops the checkpoints after it.
    fn rewind_before(&mut self, key: &Key) {
        // Checkpoints at or after `key` include events that now follow it.
        drop(self.checkpoints.split_off(key));
        match self.checkpoints.last_key_value() {
            Some((&k, c)) => {
                self.state = c.state.clone();
                self.at = Some(k);
                self.applied = c.count;
            }
            None => {
                self.state = P::State::default();
                self.at = None;
                self.applied = 0;
            }
        }
        self.rewinds += 1;
    }
}

/// Whether checkpoint `i` is kept while the newest is `newest` (module docs).
fn keep_checkpoint(i: u64, newest: u64) -> bool {
    let age = newest.saturating_sub(i);
    if age < CHECKPOINTS_RECENT {
        return true;
    }
    // floor(log2(age / RECENT)) + 1; age / RECENT >= 1 here, and below
    // 2^60, so the shift is in range.
    let k = 64 - (age / CHECKPOINTS_RECENT).leading_zeros();
    i.is_multiple_of(1u64 << k)
}

/// Whether `name` is a valid projection name ([`Projection::name`]).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PROJECTION_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------------------
// kind_counts

/// Events per kind per stream prefix (the part of the stream name before
/// its first `/`, or the whole name): `{"customer": {"Registered": 12}}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KindCounts;

/// [`KindCounts`]' state and view: prefix → kind → events.
pub type KindCountsState = BTreeMap<String, BTreeMap<String, u64>>;

impl Projection for KindCounts {
    type State = KindCountsState;
    type View = KindCountsState;

    fn name(&self) -> &str {
        "kind_counts"
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, state: &mut KindCountsState, event: &Event, _id: &EventId) {
        let prefix = event.stream.split('/').next().unwrap_or_default();
        let kinds = match state.get_mut(prefix) {
            Some(k) => k,
            None => state.entry(prefix.to_string()).or_default(),
        };
        match kinds.get_mut(&event.kind) {
            Some(n) => *n += 1,
            None => {
                kinds.insert(event.kind.clone(), 1);
            }
        }
    }

    fn view(&self, state: &KindCountsState) -> KindCountsState {
        state.clone()
    }
}

// ---------------------------------------------------------------------------
// seat_order

/// The order of sales on every escrow counter, in canonical order: each
/// sale ([`Op::EscrowConsume`] or [`Op::EscrowOverdraw`]) gets the next
/// seat numbers (1-based), and the seats past the counter's capacity (the
/// sum of its [`Op::EscrowInit`]s, seats added later included) are on the
/// waitlist, numbered by sale. So the venue desk can say "seat 37" or
/// "waitlist #2" ([`Placement`]), the same on every replica.
///
/// This is first come, first seated, across all desks: a late sale from a
/// desk that was offline takes its place by its hlc and moves the seats of
/// the sales after it. It is a read model for people, beside the fold's
/// own oversell marks ([`crate::seats`]), which judge each sale by the
/// rights in its causal past and drive compensation.
///
/// A sale in an event whose command id (with its stream) an earlier event
/// in canonical order already carried is a retry that the fold ignores, and
/// is ignored here too (among events that touch an escrow counter).
#[derive(Debug, Clone, Copy, Default)]
pub struct SeatOrder;

/// [`SeatOrder`]'s state. Its clone (a checkpoint) copies no sale: the
/// sales are [`Chunked`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SeatOrderState {
    /// By `(stream, counter)`.
    pub counters: BTreeMap<(String, String), SeatCounter>,
    /// [`command_key`] of the `(stream, command id)` of each event that
    /// touched an escrow counter.
    pub commands: BTreeSet<[u8; 16]>,
}

/// One escrow counter in [`SeatOrderState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SeatCounter {
    /// The sum of the inits: 0 while none is known.
    pub capacity: u128,
    /// Seats sold: the sum of the sales' amounts.
    pub sold: u128,
    /// The sales in canonical order.
    pub sales: Chunked<Sale>,
}

/// A command's key in [`SeatOrderState::commands`]: the first 16 bytes of
/// blake3 over the stream's length (u64 LE), the stream and the command
/// id. Fixed-size keys keep a checkpoint's copy of the set cheap.
pub fn command_key(stream: &str, command: &str) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&(stream.len() as u64).to_le_bytes());
    h.update(stream.as_bytes());
    h.update(command.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&h.finalize().as_bytes()[..16]);
    key
}

/// Elements per chunk of a [`Chunked`].
pub const CHUNK_LEN: usize = 256;

/// An append-only vector whose clone is cheap: chunks of [`CHUNK_LEN`]
/// shared between clones, a chunk copied only when a clone appends to it.
/// For states that grow with the log, so that a checkpoint costs
/// `O(len / CHUNK_LEN)`. Encoded (serde) as the flat sequence.
#[derive(Debug, Clone)]
pub struct Chunked<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Chunked<T> {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> Chunked<T> {
    /// Appends `value`.
    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK_LEN => Arc::make_mut(c).push(value),
            _ => {
                let mut c = Vec::with_capacity(CHUNK_LEN);
                c.push(value);
                self.chunks.push(Arc::new(c));
            }
        }
        self.len += 1;
    }
}

impl<T> Chunked<T> {
    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `i`.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK_LEN)?.get(i % CHUNK_LEN)
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The index of the first element for which `pred` is false, `pred`
    /// being true on a prefix (as [`slice::partition_point`]).
    pub fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        // Every chunk but the last is full.
        let c = self
            .chunks
            .partition_point(|c| c.last().is_some_and(&mut pred));
        match self.chunks.get(c) {
            Some(chunk) => c * CHUNK_LEN + chunk.partition_point(pred),
            None => self.len,
        }
    }
}

impl<T: PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Chunked<T>) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<T: Eq> Eq for Chunked<T> {}

impl<T: Serialize> Serialize for Chunked<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // The length first, as a vector's (postcard needs it).
        let mut seq = s.serialize_seq(Some(self.len))?;
        for x in self.iter() {
            seq.serialize_element(x)?;
        }
        seq.end()
    }
}

/// One sale in [`SeatCounter::sales`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    /// The event.
    pub id: EventId,
    /// Its author (the selling desk).
    pub author: NodeId,
    /// Its hlc.
    pub hlc: Hlc,
    /// The acting user, if the event names one.
    pub user: Option<String>,
    /// The op's index in the event (an event may sell more than once).
    pub op: u32,
    /// Seats sold.
    pub seats: u64,
    /// The number of its first seat (1-based).
    pub first: u128,
    /// Sold by an overdraft ([`Op::EscrowOverdraw`]).
    pub overdraft: bool,
}

impl Sale {
    /// The number of its last seat.
    pub fn last(&self) -> u128 {
        self.first + self.seats as u128 - 1
    }
}

/// Where a sale's seats are: what the venue desk tells the buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "placement")]
pub enum Placement {
    /// Every seat within capacity (or no capacity known yet): seats
    /// `first..=last`.
    Seated {
        /// First seat number.
        first: u128,
        /// Last seat number.
        last: u128,
    },
    /// Seats `first..=last` within capacity, the rest on the waitlist at
    /// `waitlist`.
    Partly {
        /// First seat number.
        first: u128,
        /// Last seat number within capacity.
        last: u128,
        /// Its place on the waitlist (1-based, by sale).
        waitlist: u64,
    },
    /// Past capacity: its place on the waitlist (1-based, by sale).
    Waitlisted {
        /// Its place on the waitlist.
        waitlist: u64,
    },
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seats = |f: &mut fmt::Formatter<'_>, first: u128, last: u128| {
            if first == last {
                write!(f, "seat {first}")
            } else {
                write!(f, "seats {first}-{last}")
            }
        };
        match *self {
            Placement::Seated { first, last } => seats(f, first, last),
            Placement::Partly {
                first,
                last,
                waitlist,
            } => {
                seats(f, first, last)?;
                write!(f, ", the rest waitlist #{waitlist}")
            }
            Placement::Waitlisted { waitlist } => write!(f, "waitlist #{waitlist}"),
        }
    }
}

impl SeatCounter {
    /// Where each sale's seats are, in canonical order of sale.
    pub fn placements(&self) -> Vec<(&Sale, Placement)> {
        let cap = self.capacity;
        // Sales whose last seat is past capacity are a suffix (seat
        // numbers grow along the sales).
        let waiting_from = if cap == 0 {
            self.sales.len()
        } else {
            self.sales.partition_point(|s| s.last() <= cap)
        };
        self.sales
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let waitlist = (i + 1).saturating_sub(waiting_from) as u64;
                let p = if i < waiting_from {
                    Placement::Seated {
                        first: s.first,
                        last: s.last(),
                    }
                } else if s.first <= cap {
                    Placement::Partly {
                        first: s.first,
                        last: cap,
                        waitlist,
                    }
                } else {
                    Placement::Waitlisted { waitlist }
                };
                (s, p)
            })
            .collect()
    }

    /// Where the seats of the sale in event `id` are (its first sale op).
    pub fn placement_of(&self, id: &EventId) -> Option<Placement> {
        self.placements()
            .into_iter()
            .find(|(s, _)| s.id == *id)
            .map(|(_, p)| p)
    }
}

impl SeatOrderState {
    /// The counter `counter` of stream `stream`.
    pub fn counter(&self, stream: &str, counter: &str) -> Option<&SeatCounter> {
        self.counters
            .get(&(stream.to_string(), counter.to_string()))
    }
}

/// [`SeatOrder`]'s view: one entry per counter, by stream then counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeatOrderView {
    /// The counters.
    pub counters: Vec<SeatCounterView>,
}

/// One counter in [`SeatOrderView`]. Figures past `u64::MAX` saturate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeatCounterView {
    /// The stream.
    pub stream: String,
    /// The counter.
    pub counter: String,
    /// The capacity; `None` while no init is known.
    pub capacity: Option<u64>,
    /// Seats sold.
    pub sold: u64,
    /// Sales on the waitlist (wholly or partly).
    pub waitlisted: u64,
    /// The sales in canonical order.
    pub sales: Vec<SaleView>,
}

/// One sale in [`SeatCounterView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaleView {
    /// The event's id, 64 lowercase hex.
    pub id: String,
    /// The selling desk, 64 lowercase hex.
    pub author: String,
    /// The event's hlc (its integer form).
    pub hlc: u64,
    /// The acting user.
    pub user: Option<String>,
    /// Seats sold.
    pub seats: u64,
    /// Its first seat number.
    pub first_seat: u64,
    /// Its last seat number within capacity, if any is.
    pub last_seat: Option<u64>,
    /// Its place on the waitlist, if any seat is past capacity.
    pub waitlist: Option<u64>,
    /// Sold by an overdraft.
    pub overdraft: bool,
    /// What the desk says: "seat 37", "seats 9-10", "waitlist #2".
    pub label: String,
}

fn sat(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Projection for SeatOrder {
    type State = SeatOrderState;
    type View = SeatOrderView;

    fn name(&self) -> &str {
        "seat_order"
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, state: &mut SeatOrderState, event: &Event, id: &EventId) {
        let escrow = |op: &Op| {
            matches!(
                op,
                Op::EscrowInit { .. } | Op::EscrowConsume { .. } | Op::EscrowOverdraw { .. }
            )
        };
        if !event.ops.iter().any(escrow) {
            return;
        }
        if let Some(cmd) = &event.meta.command_id {
            // A retry of a command already carried out: the fold ignores it.
            if !state.commands.insert(command_key(&event.stream, cmd)) {
                return;
            }
        }
        for (i, op) in event.ops.iter().enumerate() {
            let (counter, seats, overdraft) = match op {
                Op::EscrowInit { counter, capacity } => {
                    let c = state
                        .counters
                        .entry((event.stream.clone(), counter.clone()))
                        .or_default();
                    c.capacity = c.capacity.saturating_add(*capacity as u128);
                    continue;
                }
                Op::EscrowConsume { counter, amount } => (counter, *amount, false),
                Op::EscrowOverdraw {
                    counter, amount, ..
                } => (counter, *amount, true),
                _ => continue,
            };
            if seats == 0 {
                // Refused by the fold; no seat to number.
                continue;
            }
            let c = state
                .counters
                .entry((event.stream.clone(), counter.clone()))
                .or_default();
            c.sales.push(Sale {
                id: *id,
                author: event.author,
                hlc: event.hlc,
                user: event.meta.user.clone(),
                op: i as u32,
                seats,
                first: c.sold + 1,
                overdraft,
            });
            c.sold += seats as u128;
        }
    }

    fn view(&self, state: &SeatOrderState) -> SeatOrderView {
        let counters = state
            .counters
            .iter()
            .map(|((stream, counter), c)| {
                let sales: Vec<SaleView> = c
                    .placements()
                    .into_iter()
                    .map(|(s, p)| {
                        let (last_seat, waitlist) = match p {
                            Placement::Seated { last, .. } => (Some(sat(last)), None),
                            Placement::Partly { last, waitlist, .. } => {
                                (Some(sat(last)), Some(waitlist))
                            }
                            Placement::Waitlisted { waitlist } => (None, Some(waitlist)),
                        };
                        SaleView {
                            id: s.id.to_string(),
                            author: s.author.to_string(),
                            hlc: s.hlc.0,
                            user: s.user.clone(),
                            seats: s.seats,
                            first_seat: sat(s.first),
                            last_seat,
                            waitlist,
                            overdraft: s.overdraft,
                            label: p.to_string(),
                        }
                    })
                    .collect();
                SeatCounterView {
                    stream: stream.clone(),
                    counter: counter.clone(),
                    capacity: (c.capacity > 0).then(|| sat(c.capacity)),
                    sold: sat(c.sold),
                    waitlisted: sales.iter().filter(|s| s.waitlist.is_some()).count() as u64,
                    sales,
                }
            })
            .collect();
        SeatOrderView { counters }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Meta;

    /// An event by author `a` at hlc `t` (ms), made directly: projections
    /// read events, they do not check them.
    fn ev(a: u8, seq: u64, t: u64, stream: &str, kind: &str, ops: Vec<Op>) -> (Event, EventId) {
        let e = Event {
            version: 2,
            author: NodeId([a; 32]),
            seq,
            prev: None,
            deps: vec![],
            hlc: Hlc::from_ms(t),
            stream: stream.into(),
            kind: kind.into(),
            ops,
            payload: vec![],
            meta: Meta::default(),
        };
        let (_, id) = e.seal();
        (e, id)
    }

    fn sale(counter: &str, amount: u64) -> Op {
        Op::EscrowConsume {
            counter: counter.into(),
            amount,
        }
    }

    fn init(counter: &str, capacity: u64) -> Op {
        Op::EscrowInit {
            counter: counter.into(),
            capacity,
        }
    }

    /// `n` events by two authors, hlcs interleaved, kinds cycling.
    fn events(n: u64) -> Vec<(Event, EventId)> {
        (0..n)
            .map(|i| {
                let kind = ["A", "B", "C"][(i % 3) as usize];
                let stream = if i % 2 == 0 { "x/1" } else { "y/2" };
                ev(
                    (i % 2) as u8 + 1,
                    i / 2 + 1,
                    1_000 + i,
                    stream,
                    kind,
                    vec![],
                )
            })
            .collect()
    }

    /// A projector given `order` of `all` (indexes), each with its position
    /// in a source that holds `all` in that order, then caught up.
    fn feed<P: Projection>(p: P, all: &[(Event, EventId)], order: &[usize]) -> Projector<P> {
        let mut src = MemorySource::new();
        let mut pr = Projector::new(p);
        for &i in order {
            let (e, id) = &all[i];
            let pos = src.push(e.clone());
            pr.insert(e, *id, pos);
        }
        pr.catch_up(&mut src).expect("the source holds every event");
        pr
    }

    fn canonical(all: &[(Event, EventId)]) -> Vec<usize> {
        let mut o: Vec<usize> = (0..all.len()).collect();
        o.sort_by_key(|&i| Key::of(&all[i].0, all[i].1));
        o
    }

    #[test]
    fn events_in_order_are_applied_at_once() {
        let all = events(10);
        let mut src = MemorySource::new();
        let mut pr = Projector::new(KindCounts);
        for (e, id) in &all {
            let pos = src.push(e.clone());
            assert_eq!(pr.insert(e, *id, pos), Inserted::Applied);
            assert_eq!(pr.insert(e, *id, pos), Inserted::Duplicate);
        }
        assert_eq!((pr.position(), pr.lag(), pr.replayed()), (10, 0, 0));
        let v = pr.view();
        assert_eq!(v["x"]["A"] + v["x"]["B"] + v["x"]["C"], 5);
        assert_eq!(v["y"].values().sum::<u64>(), 5);
    }

    #[test]
    fn a_late_event_rewinds_and_equals_the_replay() {
        // Enough events for several checkpoints; the late ones land with
        // 1, 100 and 4000 events after them.
        let all = events(5_000);
        let reference = feed(KindCounts, &all, &canonical(&all));
        assert_eq!(reference.checkpoints(), 4);
        for depth in [1usize, 100, 4_000] {
            let late = all.len() - 1 - depth;
            let mut order: Vec<usize> = (0..all.len()).filter(|&i| i != late).collect();
            order.push(late);
            let mut src = MemorySource::new();
            let mut pr = Projector::new(KindCounts);
            for &i in &order {
                let pos = src.push(all[i].0.clone());
                let r = pr.handle(&all[i].0, all[i].1, pos, &mut src).unwrap();
                assert_eq!(r == Inserted::Applied, i != late);
            }
            assert_eq!(pr.state_hash(), reference.state_hash(), "depth {depth}");
            assert_eq!(pr.view(), reference.view());
            assert_eq!((pr.position(), pr.lag(), pr.rewinds()), (5_000, 0, 1));
            // Replayed from the checkpoint before it: at most an interval
            // more than its depth.
            assert!(pr.replayed() <= depth as u64 + 1 + CHECKPOINT_EVERY);
            assert!(pr.replayed() > depth as u64);
        }
    }

    #[test]
    fn a_failed_read_leaves_lag_and_the_next_catch_up_goes_on() {
        let all = events(50);
        let mut order: Vec<usize> = (1..50).collect();
        order.push(0);
        let mut src = MemorySource::new();
        let mut pr = Projector::new(KindCounts);
        for &i in &order {
            let pos = src.push(all[i].0.clone());
            pr.insert(&all[i].0, all[i].1, pos);
        }
        assert_eq!((pr.position(), pr.lag()), (0, 50));
        let mut reads = 0;
        let mut flaky = |pos: u64, id: &EventId| {
            reads += 1;
            if reads == 10 {
                return Err(ReplayError::Unreadable {
                    pos,
                    id: *id,
                    reason: "disk".into(),
                });
            }
            src.event(pos, id)
        };
        assert!(matches!(
            pr.catch_up(&mut flaky),
            Err(ReplayError::Unreadable { .. })
        ));
        assert_eq!((pr.position(), pr.lag()), (9, 41));
        assert_eq!(pr.catch_up(&mut flaky), Ok(41));
        let reference = feed(KindCounts, &all, &canonical(&all));
        assert_eq!(pr.state_hash(), reference.state_hash());
        // A source that gives another event is caught.
        let mut pr = Projector::new(KindCounts);
        pr.insert(&all[1].0, all[1].1, 1);
        pr.insert(&all[0].0, all[0].1, 2);
        let mut wrong = |_: u64, _: &EventId| Ok(all[5].0.clone());
        assert!(matches!(
            pr.catch_up(&mut wrong),
            Err(ReplayError::Mismatch { pos: 2, .. })
        ));
    }

    #[test]
    fn checkpoints_are_bounded_and_thinned_by_age() {
        // Kept checkpoints after `newest` intervals, by the rule alone
        // (checkpoint 0 is the empty state, always there).
        let kept = |newest: u64| -> Vec<u64> {
            (1..=newest)
                .filter(|&i| keep_checkpoint(i, newest))
                .collect()
        };
        for newest in [1u64, 16, 17, 100, 1_000, 10_000, 100_000] {
            let k = kept(newest);
            let bound = CHECKPOINTS_RECENT as f64
                + CHECKPOINTS_RECENT as f64 / 2.0 * ((newest as f64 / 16.0).log2().max(0.0) + 1.0);
            assert!((k.len() as f64) <= bound, "{newest}: {} kept", k.len());
            // The newest RECENT are all there.
            for i in newest.saturating_sub(CHECKPOINTS_RECENT - 1).max(1)..=newest {
                assert!(k.contains(&i));
            }
            // Every depth finds one less than a quarter of its age (and
            // one interval) before it.
            let mut below = 0;
            for i in 0..=newest {
                if i == 0 || k.contains(&i) {
                    below = i;
                }
                let gap = i - below;
                assert!(
                    gap <= (newest - i) / 4 + 1,
                    "{newest}: {i} is {gap} past one"
                );
            }
        }
        // Monotone: once dropped, never kept again, so thinning can be
        // incremental.
        for i in 1..2_000 {
            let mut dropped = false;
            for newest in i..4_000 {
                let keep = keep_checkpoint(i, newest);
                assert!(!(dropped && keep), "{i} kept again at {newest}");
                dropped |= !keep;
            }
        }
        assert_eq!(kept(10_000).len(), 89);
    }

    #[test]
    fn the_hash_covers_name_version_and_state() {
        struct Named(&'static str, u32);
        impl Projection for Named {
            type State = u64;
            type View = u64;
            fn name(&self) -> &str {
                self.0
            }
            fn version(&self) -> u32 {
                self.1
            }
            fn apply(&self, state: &mut u64, _: &Event, _: &EventId) {
                *state += 1;
            }
            fn view(&self, state: &u64) -> u64 {
                *state
            }
        }
        let all = events(3);
        let o = canonical(&all);
        let h = |n, v| feed(Named(n, v), &all, &o).state_hash();
        assert_ne!(h("a", 1), h("b", 1));
        assert_ne!(h("a", 1), h("a", 2));
        assert_ne!(h("a", 1), feed(Named("a", 1), &all, &o[..2]).state_hash());
        // A new version rebuilds from the index.
        let mut pr = feed(Named("a", 1), &all, &o);
        assert!(!pr.upgrade(Named("a", 1)));
        assert!(pr.upgrade(Named("a", 2)));
        assert_eq!((pr.position(), pr.lag()), (0, 3));
        let mut src = MemorySource::new();
        for &i in &o {
            src.push(all[i].0.clone());
        }
        pr.catch_up(&mut src).unwrap();
        assert_eq!(pr.state_hash(), h("a", 2));
    }

    #[test]
    #[should_panic(expected = "projection name")]
    fn a_name_unfit_for_a_path_is_refused() {
        struct Bad;
        impl Projection for Bad {
            type State = ();
            type View = ();
            fn name(&self) -> &str {
                "Seat Order"
            }
            fn version(&self) -> u32 {
                1
            }
            fn apply(&self, _: &mut (), _: &Event, _: &EventId) {}
            fn view(&self, _: &()) {}
        }
        Projector::new(Bad);
    }

    #[test]
    fn seats_are_numbered_in_canonical_order_and_the_rest_waitlisted() {
        let s = "session/7";
        let all = vec![
            ev(1, 1, 100, s, "Opened", vec![init("seats", 3)]),
            ev(2, 1, 110, s, "Sold", vec![sale("seats", 1)]),
            ev(3, 1, 120, s, "Sold", vec![sale("seats", 1)]),
            ev(2, 2, 130, s, "Sold", vec![sale("seats", 2)]),
            ev(3, 2, 140, s, "Sold", vec![sale("seats", 1)]),
            ev(2, 3, 150, s, "Sold", vec![sale("seats", 1)]),
        ];
        // The sale at 120 arrives last: it takes seat 2 from the others.
        let pr = feed(SeatOrder, &all, &[0, 1, 3, 4, 5, 2]);
        assert_eq!(pr.rewinds(), 1);
        let c = pr.state().counter(s, "seats").unwrap();
        let labels: Vec<String> = c.placements().iter().map(|(_, p)| p.to_string()).collect();
        assert_eq!(
            labels,
            [
                "seat 1",
                "seat 2",
                "seat 3, the rest waitlist #1",
                "waitlist #2",
                "waitlist #3"
            ]
        );
        assert_eq!(
            c.placement_of(&all[2].1),
            Some(Placement::Seated { first: 2, last: 2 })
        );
        let v = pr.view();
        assert_eq!(v.counters[0].capacity, Some(3));
        assert_eq!((v.counters[0].sold, v.counters[0].waitlisted), (6, 3));
        assert_eq!(v.counters[0].sales[2].last_seat, Some(3));
        assert_eq!(v.counters[0].sales[2].waitlist, Some(1));
        // Seats added later, even late, seat the waitlist.
        let mut more = all.clone();
        more.push(ev(1, 2, 105, s, "Added", vec![init("seats", 3)]));
        let pr = feed(SeatOrder, &more, &[0, 1, 2, 3, 4, 5, 6]);
        let v = pr.view();
        assert_eq!(v.counters[0].waitlisted, 0);
        assert_eq!(v.counters[0].sales[4].label, "seat 6");
        assert_eq!(
            pr.state_hash(),
            feed(SeatOrder, &more, &canonical(&more)).state_hash()
        );
    }

    #[test]
    fn a_retried_command_sells_once_and_no_capacity_means_no_waitlist() {
        let mut a = ev(1, 1, 100, "s", "Sold", vec![sale("seats", 2)]);
        a.0.meta.command_id = Some("order-9".into());
        let (_, id) = a.0.seal();
        a.1 = id;
        let mut b = ev(2, 1, 90, "s", "Sold", vec![sale("seats", 2)]);
        b.0.meta.command_id = Some("order-9".into());
        let (_, id) = b.0.seal();
        b.1 = id;
        let all = vec![a, b];
        let pr = feed(SeatOrder, &all, &[0, 1]);
        let v = pr.view();
        assert_eq!(v.counters[0].capacity, None);
        assert_eq!(v.counters[0].sales.len(), 1);
        // The earlier in canonical order (hlc 90) is the one in effect.
        assert_eq!(v.counters[0].sales[0].id, all[1].1.to_string());
        assert_eq!(v.counters[0].sales[0].label, "seats 1-2");
    }

    #[test]
    fn chunked_clones_share_and_encode_as_a_vector() {
        let mut a: Chunked<u32> = Chunked::default();
        let mut v = Vec::new();
        for i in 0..(CHUNK_LEN as u32 * 3 + 5) {
            a.push(i * 2);
            v.push(i * 2);
        }
        let b = a.clone();
        a.push(7);
        assert_eq!((a.len(), b.len()), (v.len() + 1, v.len()));
        assert!(b.iter().eq(v.iter()));
        assert_eq!(
            postcard::to_stdvec(&b).unwrap(),
            postcard::to_stdvec(&v).unwrap()
        );
        for x in [0, 1, 2, 511, 512, 513, 1544, 1545, 10_000] {
            assert_eq!(b.partition_point(|&y| y < x), v.partition_point(|&y| y < x));
        }
        assert_eq!(b.get(300), Some(&600));
        assert_eq!(b.get(v.len()), None);
        assert_ne!(a, b);
        assert_eq!(b, b.clone());
    }

    #[test]
    fn kinds_are_counted_per_stream_prefix() {
        let all = vec![
            ev(1, 1, 1, "customer/1", "Registered", vec![]),
            ev(1, 2, 2, "customer/2", "Registered", vec![]),
            ev(1, 3, 3, "customer", "Merged", vec![]),
            ev(1, 4, 4, "badge/1/x", "Printed", vec![]),
            ev(1, 5, 5, "", "Odd", vec![]),
        ];
        let pr = feed(KindCounts, &all, &[4, 3, 2, 1, 0]);
        let v = pr.view();
        assert_eq!(v["customer"]["Registered"], 2);
        assert_eq!(v["customer"]["Merged"], 1);
        assert_eq!(v["badge"]["Printed"], 1);
        assert_eq!(v[""]["Odd"], 1);
    }
}
