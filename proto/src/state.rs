//! The fold: a replica's event set folded into CRDT state and read models.
//!
//! [`State::insert`] is the one door through which an event enters a
//! replica. It checks the event against its causal past (chain, deps, clock,
//! supersedes, escrow rights) and applies it. Replicas only insert an event
//! after its `prev` and `deps`, so the inserted set is causally closed, and
//! the fold is a function of that set alone: any causal delivery order, with
//! any duplicates, gives byte-identical state ([`State::state_hash`]).
//!
//! Why the result does not depend on the order:
//! - registers: a write removes exactly the dots it names, all of which are
//!   in its causal past and so already applied; the standing set is the
//!   writes no inserted write names, whatever the order;
//! - counters: sums;
//! - escrow: sums, and validity uses only the event's causal past, which is
//!   the same on every replica (`DESIGN.md` §2: validity is a pure function
//!   of the event and its causal past).
//!
//! **Commands take effect once.** Events of one stream that carry the same
//! command id (a client's retry that reached two nodes) take effect once:
//! the first in canonical order (ascending `(hlc, author, seq, id)`) does,
//! the others are kept, counted in the stream's version and listed under
//! the stream's `duplicates`, with no other effect: their register writes
//! supersede nothing and show nowhere, their counter deltas and escrow ops
//! count nowhere in the read model. A late event can become the first. So
//! that the result is still a function of the event set, the first event's
//! effects are kept in a form that can be undone ([`Command::undo`]), and
//! every register write that a command's event removed is kept, with the
//! number of events in effect that name it ([`Grave`]), until no event can
//! bring it back. Undoing a write restores the writes it removed that no
//! other event in effect names; that is what a replay in canonical order
//! shows, where the undone event never removed them. Counters, escrow
//! counters and accounts exist once any event of the stream touches them,
//! a duplicate included, so that undoing never leaves an entry that a replay
//! would not have made, or drops one it would.
//!
//! Escrow validity follows the same rule within the event's causal past: the
//! rights an author holds there leave out the ops of every event that is a
//! duplicate *in that past* (an event of the same stream and command id that
//! sorts first is in it too). A desk that sold seats for a command another
//! desk had already carried out gets those rights back once it learns of the
//! other sale.
//!
//! **The clock's horizon.** A local event ([`State::prepare`]) depends on
//! the events of its replica at most [`crate::hlc::MAX_CLOCK_AHEAD_MS`]
//! past the wall time it is made at ([`Hlc::horizon`], `hlc` module docs):
//! per other author, its latest such event, and its `Set`s supersede only
//! the writes in that causal past. So a peer whose clock runs far ahead
//! does not drag this replica's hlcs with it; its events are inserted,
//! folded and listed ([`State::ahead`]) like any other, and become deps
//! once the wall time catches up. Validity ([`State::insert`]) knows
//! nothing of the horizon.
//!
//! Causal pasts are answered from a per-author history of vector-clock
//! changes: `hist[a][b]` lists `(seq of a, highest seq of b seen)` each time
//! `a`'s knowledge of `b` grows, so "is `(b, t)` in the past of `a`'s event
//! `s`" is one binary search. It costs memory only when deps add knowledge.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::event::{Event, EventError, Meta, Op, FORMAT_VERSION, MAX_DOTS};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{Dot, EventId, NodeId};

/// Where an event sits in its author's chain.
#[derive(Clone, Copy, Debug)]
struct Loc {
    author: u32,
    seq: u64,
    hlc: Hlc,
}

#[derive(Clone, Debug)]
struct Author {
    id: NodeId,
    /// `ids[i]` is the id of seq `i + 1`.
    ids: Vec<EventId>,
    head_hlc: Hlc,
    /// Vector clock of the head, dense by author index (missing = 0).
    vc: Vec<u64>,
    /// Per other author: `(own seq, other's seq)` each time knowledge grew.
    hist: Vec<Vec<(u64, u64)>>,
}

impl Author {
    fn seq(&self) -> u64 {
        self.ids.len() as u64
    }
}

/// A value written to a register field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Written {
    /// The hlc of the event that wrote it.
    pub hlc: Hlc,
    /// The value bytes.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One node's share of a bounded counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Account {
    /// Capacity this node added.
    pub init: u128,
    /// Rights moved to it.
    pub received: u128,
    /// Rights it moved away.
    pub sent: u128,
    /// Rights it used.
    pub consumed: u128,
}

impl Account {
    /// Rights the node holds now, by everything this replica knows.
    pub fn rights(&self) -> u128 {
        self.balance().max(0) as u128
    }

    /// Rights held minus rights owed. Negative only when the node spent
    /// rights that an event turned out to be a duplicate no longer gives it
    /// (see the module docs); the debt is repaid before it may spend again.
    pub fn balance(&self) -> i128 {
        // Each sum is at most a few times 2^64 per event: far inside i128.
        (self.init + self.received) as i128 - (self.sent + self.consumed) as i128
    }
}

/// A bounded counter (escrow).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Escrow {
    /// Sum of all inits.
    pub capacity: u128,
    /// Sum of all consumption; never above `capacity`.
    pub consumed: u128,
    /// Each node's account.
    pub accounts: BTreeMap<NodeId, Account>,
    /// Transfers by recipient: `(sender index, sender seq, amount)`, the
    /// duplicates' included; for validity checks only (indices are
    /// replica-local, so not encoded).
    #[serde(skip)]
    incoming: BTreeMap<NodeId, Vec<(u32, u64, u64)>>,
    /// The ops of events that are duplicates on this replica, by author
    /// (`received` unused): with `accounts`, the sums over every event.
    #[serde(skip)]
    dup: BTreeMap<NodeId, Account>,
    /// Command ids of this stream carried by more than one event, one of
    /// which has an op on this counter: validity looks at them.
    #[serde(skip)]
    contested: BTreeSet<String>,
}

/// One stream's read model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stream {
    /// Events in the stream.
    pub version: u64,
    /// Register fields: the writes left standing, by dot. More than one is a conflict.
    pub fields: BTreeMap<String, BTreeMap<Dot, Written>>,
    /// PN counters.
    pub counters: BTreeMap<String, i128>,
    /// Bounded counters.
    pub escrow: BTreeMap<String, Escrow>,
    /// Command ids carried by more than one event of the stream: which
    /// event took effect, and which did not.
    pub duplicates: BTreeMap<String, Duplicated>,
    /// Per field, writes removed by an event that may yet be undone.
    #[serde(skip)]
    graves: BTreeMap<String, BTreeMap<Dot, Grave>>,
}

/// The events of one stream that carry one command id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Duplicated {
    /// The first in canonical order: the one that took effect.
    pub took_effect: EventId,
    /// The others, ascending in canonical order: kept, with no effect.
    pub ignored: Vec<EventId>,
}

/// A register write removed by an event that may be undone.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grave {
    written: Written,
    /// Events in effect that name the write in `supersedes`; at zero it
    /// stands again.
    namers: u32,
}

impl Stream {
    /// The displayed value of a field: the standing write with the greatest
    /// `(hlc, author)`. `None` if the field was never written.
    pub fn shown(&self, field: &str) -> Option<(&Dot, &Written)> {
        self.fields.get(field).and_then(shown)
    }
}

/// The standing write with the greatest `(hlc, author)`.
pub fn shown(writes: &BTreeMap<Dot, Written>) -> Option<(&Dot, &Written)> {
    writes.iter().max_by_key(|(d, w)| (w.hlc, d.author))
}

/// The idempotency record of a command: the event that took effect (the
/// first in canonical order of the stream's events with its command id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    /// The event's id.
    pub id: EventId,
    /// Its author.
    pub author: NodeId,
    /// Its seq.
    pub seq: u64,
    /// Its hlc.
    pub hlc: Hlc,
    /// Its stream.
    pub stream: String,
    /// The stream's version right after this replica inserted it.
    pub version: u64,
}

/// The events beyond the local clock's horizon ([`State::ahead`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ahead {
    /// How many events have an hlc beyond the horizon.
    pub events: u64,
    /// The one furthest ahead: the head of its author's chain.
    pub furthest: Option<AheadEvent>,
}

/// One event beyond the local clock's horizon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AheadEvent {
    /// Its author.
    pub author: NodeId,
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub id: EventId,
    /// Its hlc.
    pub hlc: Hlc,
    /// How far its hlc's milliseconds are ahead of the wall time asked about.
    pub ahead_ms: u64,
}

/// The events of one stream carrying one command id, as this replica holds
/// them.
#[derive(Clone, Debug)]
struct Command {
    /// The event that took effect: the first in canonical order.
    first: Member,
    /// The others, ascending in canonical order (almost always none).
    rest: Vec<Member>,
    /// The first member's ops, `Set` values left empty: what to undo should
    /// an event that sorts before it arrive.
    undo: Vec<Op>,
}

impl Command {
    /// Every member, ascending in canonical order.
    fn members(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// One event of a [`Command`].
#[derive(Clone, Debug)]
struct Member {
    hlc: Hlc,
    author: NodeId,
    seq: u64,
    id: EventId,
    /// The stream's version right after this replica inserted it.
    version: u64,
    /// Its escrow ops, for rights in a causal past.
    escrow: Vec<Op>,
}

impl Member {
    /// The canonical order's key.
    fn key(&self) -> (Hlc, NodeId, u64, EventId) {
        (self.hlc, self.author, self.seq, self.id)
    }

    fn dot(&self) -> Dot {
        Dot {
            author: self.author,
            seq: self.seq,
        }
    }
}

/// Result of [`State::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// The event was new and is now applied.
    New,
    /// The event was already there; nothing changed.
    Duplicate,
}

/// Why an event cannot be inserted into this replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// The event is malformed on its own.
    #[error(transparent)]
    Malformed(#[from] EventError),
    /// Another event already holds this author's seq: a fork.
    #[error("equivocation: seq {seq} of author {author} is already event {existing}")]
    Equivocation {
        /// The author.
        author: NodeId,
        /// The seq held twice.
        seq: u64,
        /// The event already there.
        existing: EventId,
    },
    /// The author's chain is not contiguous here.
    #[error("chain gap: author {author} is at seq {have}, this event has seq {got}")]
    Gap {
        /// The author.
        author: NodeId,
        /// The last seq present.
        have: u64,
        /// The event's seq.
        got: u64,
    },
    /// `prev` is not the author's previous event.
    #[error("broken chain: prev is not the id of seq {} of its author", .seq - 1)]
    BrokenChain {
        /// The event's seq.
        seq: u64,
    },
    /// A dep is not present.
    #[error("missing dependency {0}")]
    MissingDep(EventId),
    /// The hlc is not above that of prev or a dep.
    #[error("hlc {hlc} is not above {of}'s hlc {other}")]
    ClockNotAfter {
        /// The event's hlc.
        hlc: Hlc,
        /// "prev" or "a dep".
        of: &'static str,
        /// The hlc it must exceed.
        other: Hlc,
    },
    /// A `Set` supersedes a write outside its causal past.
    #[error("field {field:?} supersedes {dot}, which is not in the event's causal past")]
    SupersedesUnseen {
        /// The field.
        field: String,
        /// The dot.
        dot: Dot,
    },
    /// An escrow op uses more rights than the author holds in its causal past.
    #[error("escrow {counter:?}: the author holds rights to {held} in its causal past, the op needs {wanted}")]
    InsufficientRights {
        /// The counter.
        counter: String,
        /// Rights held.
        held: u128,
        /// Rights needed.
        wanted: u128,
    },
}

/// What a local command asks for; [`State::prepare`] turns it into an event.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    /// Stream.
    pub stream: String,
    /// Kind.
    pub kind: String,
    /// Ops. The `supersedes` of each `Set` is filled in by `prepare` with
    /// the writes to that field this replica currently shows.
    pub ops: Vec<Op>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Command id and user.
    pub meta: Meta,
    /// If set, the stream's version must equal it.
    pub expected_version: Option<u64>,
}

/// Result of [`State::prepare`].
#[derive(Clone, Debug)]
pub enum Prepared {
    /// A new event, ready to seal, log and insert.
    New(Event),
    /// The command id is already in the log: this is its event.
    Existing(CommandRecord),
}

/// Result of [`State::append_local`].
#[derive(Clone, Debug)]
pub enum Appended {
    /// A new event, now applied: the event, its encoding and its id.
    New {
        /// The event.
        event: Event,
        /// Its canonical encoding.
        bytes: Vec<u8>,
        /// Its id.
        id: EventId,
    },
    /// The command id is already in the log: this is its event.
    Existing(CommandRecord),
}

/// A checked event and the clock `causal_vc` computed for it.
enum Made {
    New(Event, Option<Vec<u64>>),
    Existing(CommandRecord),
}

/// Why a local command was refused. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    /// The stream is not at the expected version.
    #[error("expected version {expected} of stream {stream:?}, but it is at version {actual}")]
    VersionMismatch {
        /// The stream.
        stream: String,
        /// The version the command expected.
        expected: u64,
        /// The stream's version.
        actual: u64,
    },
    /// The event would be invalid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// More concurrent heads than one event may depend on.
    #[error("{0} unmerged authors exceed the {MAX_DOTS} deps one event may name")]
    TooManyDeps(usize),
}

/// A replica's folded state. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct State {
    authors: Vec<Author>,
    author_ix: BTreeMap<NodeId, u32>,
    index: HashMap<EventId, Loc, IdHasher>,
    streams: BTreeMap<String, Stream>,
    /// By stream, then command id.
    commands: HashMap<String, HashMap<String, Command, IdHasher>, IdHasher>,
    max_hlc: Hlc,
}

/// Hasher for the in-memory indexes: keyed per process (ids come from
/// peers, so an unkeyed hash could be steered into collisions), and never
/// iterated, so its order reaches no output.
type IdHasher = foldhash::fast::RandomState;

impl State {
    /// An empty replica.
    pub fn new() -> State {
        State::default()
    }

    /// Number of events inserted.
    pub fn len(&self) -> u64 {
        self.index.len() as u64
    }

    /// Whether no event was inserted.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The largest hlc of any event.
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }

    /// Whether the event is present.
    pub fn contains(&self, id: &EventId) -> bool {
        self.index.contains_key(id)
    }

    /// Author → (highest seq, id of that event), ascending by author.
    pub fn frontier(&self) -> BTreeMap<NodeId, (u64, EventId)> {
        self.author_ix
            .iter()
            .map(|(id, &ix)| {
                let a = &self.authors[ix as usize];
                // Every author in the index has inserted at least seq 1.
                (
                    *id,
                    (a.seq(), *a.ids.last().expect("author with no events")),
                )
            })
            .collect()
    }

    /// The id of an author's event by seq.
    pub fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        let a = &self.authors[*self.author_ix.get(author)? as usize];
        a.ids.get(seq.checked_sub(1)? as usize).copied()
    }

    /// The `(author, seq)` of an event.
    pub fn dot_of(&self, id: &EventId) -> Option<Dot> {
        self.index.get(id).map(|l| Dot {
            author: self.authors[l.author as usize].id,
            seq: l.seq,
        })
    }

    /// A stream's read model.
    pub fn stream(&self, name: &str) -> Option<&Stream> {
        self.streams.get(name)
    }

    /// All streams, ascending by name.
    pub fn streams(&self) -> &BTreeMap<String, Stream> {
        &self.streams
    }

    /// A stream's version (0 for a stream with no events).
    pub fn version(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.version)
    }

    /// The event that took effect for a command id in a stream, if this
    /// replica holds one (see the module docs).
    pub fn command(&self, stream: &str, command_id: &str) -> Option<CommandRecord> {
        let m = &self.command_entry(stream, command_id)?.first;
        Some(CommandRecord {
            id: m.id,
            author: m.author,
            seq: m.seq,
            hlc: m.hlc,
            stream: stream.to_string(),
            version: m.version,
        })
    }

    fn command_entry(&self, stream: &str, command_id: &str) -> Option<&Command> {
        self.commands.get(stream)?.get(command_id)
    }

    /// Every field with more than one standing write: `(stream, field, writes)`,
    /// ascending by stream then field.
    pub fn conflicts(&self) -> impl Iterator<Item = (&str, &str, &BTreeMap<Dot, Written>)> {
        self.streams.iter().flat_map(|(s, st)| {
            st.fields
                .iter()
                .filter(|(_, w)| w.len() > 1)
                .map(move |(f, w)| (s.as_str(), f.as_str(), w))
        })
    }

    /// The canonical encoding of the read model: postcard of the streams map
    /// (see `PROTOCOL.md`, "State hash").
    pub fn canonical_read_model(&self) -> Vec<u8> {
        // Encoding BTreeMaps of plain data into a Vec cannot fail.
        postcard::to_stdvec(&self.streams).expect("encode read model")
    }

    /// blake3 of [`State::canonical_read_model`]: equal on every replica
    /// holding the same events.
    pub fn state_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.canonical_read_model()).as_bytes()
    }

    fn vc_at(&self, a: u32, seq: u64, other: u32) -> u64 {
        if a == other {
            return seq;
        }
        let Some(h) = self.authors[a as usize].hist.get(other as usize) else {
            return 0;
        };
        match h.partition_point(|&(s, _)| s <= seq) {
            0 => 0,
            i => h[i - 1].1,
        }
    }

    /// The vector clock of a new event by `author` (if known) with `deps`,
    /// or `None` when the deps add nothing to the author's own clock.
    fn causal_vc(&self, author: Option<u32>, deps: &[Loc]) -> Option<Vec<u64>> {
        let own: &[u64] = author.map_or(&[], |a| &self.authors[a as usize].vc);
        let mut vc: Option<Vec<u64>> = None;
        for d in deps {
            let cur = vc.as_deref().unwrap_or(own);
            if Some(d.author) != author && cur.get(d.author as usize).is_some_and(|&v| v >= d.seq) {
                continue; // already implied
            }
            let vc = vc.get_or_insert_with(|| {
                let mut v = own.to_vec();
                v.resize(self.authors.len(), 0);
                v
            });
            for (x, slot) in vc.iter_mut().enumerate() {
                let v = self.vc_at(d.author, d.seq, x as u32);
                if v > *slot {
                    *slot = v;
                }
            }
        }
        vc
    }

    /// The clock `causal_vc` describes.
    fn vc_or_own<'a>(&'a self, author: Option<u32>, vc: &'a Option<Vec<u64>>) -> &'a [u64] {
        match vc {
            Some(v) => v,
            None => author.map_or(&[], |a| &self.authors[a as usize].vc),
        }
    }

    /// Checks `event` (whose id is `id`) against this replica and applies it.
    /// On error nothing changes.
    pub fn insert(&mut self, event: &Event, id: EventId) -> Result<Inserted, Invalid> {
        if self.index.contains_key(&id) {
            return Ok(Inserted::Duplicate);
        }
        event.check()?;
        let ix = self.author_ix.get(&event.author).copied();
        let (have, head_hlc) = match ix {
            Some(ix) => {
                let a = &self.authors[ix as usize];
                (a.seq(), a.head_hlc)
            }
            None => (0, Hlc::ZERO),
        };
        if event.seq <= have {
            let a = &self.authors[ix.expect("have > 0 implies known") as usize];
            return Err(Invalid::Equivocation {
                author: event.author,
                seq: event.seq,
                existing: a.ids[(event.seq - 1) as usize],
            });
        }
        if event.seq != have + 1 {
            return Err(Invalid::Gap {
                author: event.author,
                have,
                got: event.seq,
            });
        }
        if let Some(ix) = ix {
            if event.prev != self.authors[ix as usize].ids.last().copied() {
                return Err(Invalid::BrokenChain { seq: event.seq });
            }
            if event.hlc <= head_hlc {
                return Err(Invalid::ClockNotAfter {
                    hlc: event.hlc,
                    of: "prev",
                    other: head_hlc,
                });
            }
        }
        let mut deps = Vec::with_capacity(event.deps.len());
        for d in &event.deps {
            let loc = *self.index.get(d).ok_or(Invalid::MissingDep(*d))?;
            if event.hlc <= loc.hlc {
                return Err(Invalid::ClockNotAfter {
                    hlc: event.hlc,
                    of: "a dep",
                    other: loc.hlc,
                });
            }
            deps.push(loc);
        }
        let vc = self.causal_vc(ix, &deps);
        self.check_ops(event, self.vc_or_own(ix, &vc))?;
        self.apply(event, id, ix, vc);
        Ok(Inserted::New)
    }

    /// Whether `dot` is in the causal past of a new event by `author` with
    /// vector clock `vc` (which excludes the event itself).
    fn in_past(&self, dot: &Dot, author: &NodeId, vc: &[u64]) -> bool {
        if dot.seq == 0 {
            // Names no event. (Below, 0 <= anything would make the answer
            // depend on which authors this replica happens to know.)
            return false;
        }
        if dot.author == *author {
            // Own earlier events; `vc` may lack the new author's slot.
            return self
                .author_ix
                .get(author)
                .is_some_and(|&a| dot.seq <= self.authors[a as usize].seq());
        }
        self.author_ix
            .get(&dot.author)
            .is_some_and(|&b| vc.get(b as usize).is_some_and(|&v| v >= dot.seq))
    }

    fn check_ops(&self, event: &Event, vc: &[u64]) -> Result<(), Invalid> {
        // Net change of the author's rights made by earlier ops of this event.
        let mut delta: Vec<(&str, i128)> = Vec::new();
        for op in &event.ops {
            match op {
                Op::Set {
                    field, supersedes, ..
                } => {
                    for dot in supersedes {
                        if !self.in_past(dot, &event.author, vc) {
                            return Err(Invalid::SupersedesUnseen {
                                field: field.clone(),
                                dot: *dot,
                            });
                        }
                    }
                }
                Op::Add { .. } => {}
                Op::EscrowInit { counter, capacity } => {
                    *delta_slot(&mut delta, counter) += *capacity as i128;
                }
                Op::EscrowTransfer {
                    counter, amount, ..
                }
                | Op::EscrowConsume { counter, amount } => {
                    let stream = self.streams.get(&event.stream);
                    let held =
                        self.rights_in_past(&event.stream, stream, counter, &event.author, vc);
                    let slot = delta_slot(&mut delta, counter);
                    // Negative when the author owes rights (see
                    // `rights_in_past`): the debt is repaid first.
                    let available = held + *slot;
                    if *amount as i128 > available {
                        return Err(Invalid::InsufficientRights {
                            counter: counter.clone(),
                            held: available.max(0) as u128,
                            wanted: *amount as u128,
                        });
                    }
                    *slot -= *amount as i128;
                }
            }
        }
        Ok(())
    }

    /// Rights `author` holds on `counter` in the causal past `vc`: its own
    /// inits, transfers and consumption (its whole chain is in the past)
    /// and the transfers to it in the past, leaving out the ops of events
    /// that are duplicates in that past (see the module docs). Negative
    /// when the author spent rights that an event it relied on no longer
    /// gives it (that event turned out to be a duplicate): a debt.
    fn rights_in_past(
        &self,
        name: &str,
        stream: Option<&Stream>,
        counter: &str,
        author: &NodeId,
        vc: &[u64],
    ) -> i128 {
        let Some(esc) = stream.and_then(|s| s.escrow.get(counter)) else {
            return 0;
        };
        let none = Account::default();
        let acct = esc.accounts.get(author).unwrap_or(&none);
        let dup = esc.dup.get(author).unwrap_or(&none);
        let received: u128 = esc.incoming.get(author).map_or(0, |v| {
            v.iter()
                .filter(|(from, seq, _)| vc.get(*from as usize).is_some_and(|&s| s >= *seq))
                .map(|&(_, _, amt)| amt as u128)
                .sum()
        });
        // Sums over every event, duplicates included: at most a few times
        // 2^64 per event count, far inside i128.
        let mut held = (acct.init + dup.init + received) as i128
            - (acct.sent + dup.sent + acct.consumed + dup.consumed) as i128;
        for cmd in &esc.contested {
            let Some(c) = self.command_entry(name, cmd) else {
                continue;
            };
            let mut past = c.members().filter(|m| self.in_past(&m.dot(), author, vc));
            // The first in the past takes effect there; the rest do not.
            past.next();
            for m in past {
                held += escrow_delta(&m.escrow, counter, &m.author, author);
            }
        }
        held
    }

    fn apply(&mut self, event: &Event, id: EventId, ix: Option<u32>, vc: Option<Vec<u64>>) {
        let ix = match ix {
            Some(ix) => ix,
            None => {
                let ix = self.authors.len() as u32;
                self.authors.push(Author {
                    id: event.author,
                    ids: Vec::new(),
                    head_hlc: Hlc::ZERO,
                    vc: Vec::new(),
                    hist: Vec::new(),
                });
                self.author_ix.insert(event.author, ix);
                ix
            }
        };
        let author = &mut self.authors[ix as usize];
        if let Some(mut vc) = vc {
            // Record where knowledge of other authors grew.
            for (x, &v) in vc.iter().enumerate() {
                if x as u32 != ix && v > author.vc.get(x).copied().unwrap_or(0) {
                    if author.hist.len() <= x {
                        author.hist.resize_with(x + 1, Vec::new);
                    }
                    author.hist[x].push((event.seq, v));
                }
            }
            if vc.len() < author.vc.len() {
                vc.resize(author.vc.len(), 0);
            }
            author.vc = vc;
        }
        if author.vc.len() <= ix as usize {
            author.vc.resize(ix as usize + 1, 0);
        }
        author.vc[ix as usize] = event.seq;
        author.ids.push(id);
        author.head_hlc = event.hlc;
        self.index.insert(
            id,
            Loc {
                author: ix,
                seq: event.seq,
                hlc: event.hlc,
            },
        );
        self.max_hlc = self.max_hlc.max(event.hlc);
        let dot = Dot {
            author: event.author,
            seq: event.seq,
        };
        let stream = match self.streams.get_mut(&event.stream) {
            Some(s) => s,
            None => self.streams.entry(event.stream.clone()).or_default(),
        };
        stream.version += 1;
        let Some(cmd) = &event.meta.command_id else {
            for op in &event.ops {
                apply_op(stream, op, dot, ix, event.hlc, false);
            }
            return;
        };
        let member = Member {
            hlc: event.hlc,
            author: event.author,
            seq: event.seq,
            id,
            version: stream.version,
            escrow: event
                .ops
                .iter()
                .filter(|op| op.is_escrow())
                .cloned()
                .collect(),
        };
        let entries = match self.commands.get_mut(event.stream.as_str()) {
            Some(e) => e,
            None => self.commands.entry(event.stream.clone()).or_default(),
        };
        let Some(c) = entries.get_mut(cmd.as_str()) else {
            for op in &event.ops {
                apply_op(stream, op, dot, ix, event.hlc, true);
            }
            entries.insert(
                cmd.clone(),
                Command {
                    first: member,
                    rest: Vec::new(),
                    undo: undo_ops(&event.ops),
                },
            );
            return;
        };
        let key = member.key();
        if key < c.first.key() {
            // It sorts first: the event in effect until now becomes a
            // duplicate, and this one takes effect.
            undo(stream, &c.undo, c.first.dot());
            for op in &event.ops {
                apply_op(stream, op, dot, ix, event.hlc, true);
            }
            c.undo = undo_ops(&event.ops);
            let old = std::mem::replace(&mut c.first, member);
            c.rest.insert(0, old);
        } else {
            for op in &event.ops {
                apply_duplicate(stream, op, dot, ix);
            }
            let pos = c.rest.partition_point(|m| m.key() < key);
            c.rest.insert(pos, member);
        }
        stream.duplicates.insert(
            cmd.clone(),
            Duplicated {
                took_effect: c.first.id,
                ignored: c.rest.iter().map(|m| m.id).collect(),
            },
        );
        for m in c.members() {
            for op in &m.escrow {
                if let Some(e) = stream.escrow.get_mut(op.target()) {
                    if !e.contested.contains(cmd.as_str()) {
                        e.contested.insert(cmd.clone());
                    }
                }
            }
        }
    }

    /// Turns a local command into an event by `author`, stamped by `clock`.
    /// The event is checked as [`State::insert`] would; it is not inserted.
    pub fn prepare(
        &self,
        author: NodeId,
        clock: &mut HlcClock,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Prepared, PrepareError> {
        Ok(match self.make(author, clock, now_ms, draft)? {
            Made::Existing(rec) => Prepared::Existing(rec),
            Made::New(event, _) => Prepared::New(event),
        })
    }

    /// [`State::prepare`], then seals the new event and applies it to this
    /// state without checking it a second time. Returns the event with its
    /// encoding and id, or the existing command's record.
    pub fn append_local(
        &mut self,
        author: NodeId,
        clock: &mut HlcClock,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Appended, PrepareError> {
        match self.make(author, clock, now_ms, draft)? {
            Made::Existing(rec) => Ok(Appended::Existing(rec)),
            Made::New(event, vc) => {
                let (bytes, id) = event.seal();
                // `make` checked the event against this very state; a new
                // event by this author at the next seq cannot be present.
                debug_assert!(!self.index.contains_key(&id));
                let ix = self.author_ix.get(&author).copied();
                self.apply(&event, id, ix, vc);
                Ok(Appended::New { event, bytes, id })
            }
        }
    }

    fn make(
        &self,
        author: NodeId,
        clock: &mut HlcClock,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Made, PrepareError> {
        if let Some(cmd) = draft
            .meta
            .command_id
            .as_deref()
            .and_then(|c| self.command(&draft.stream, c))
        {
            return Ok(Made::Existing(cmd));
        }
        let actual = self.version(&draft.stream);
        if let Some(expected) = draft.expected_version {
            if expected != actual {
                return Err(PrepareError::VersionMismatch {
                    stream: draft.stream,
                    expected,
                    actual,
                });
            }
        }
        let ix = self.author_ix.get(&author).copied();
        let (seq, prev, mut after) = match ix {
            Some(ix) => {
                let a = &self.authors[ix as usize];
                (a.seq() + 1, a.ids.last().copied(), a.head_hlc)
            }
            None => (1, None, Hlc::ZERO),
        };
        let deps = self.unmerged_heads(ix, Hlc::horizon(now_ms));
        if deps.len() > MAX_DOTS {
            return Err(PrepareError::TooManyDeps(deps.len()));
        }
        let dep_locs: Vec<Loc> = deps.iter().map(|d| self.index[d]).collect();
        for d in &dep_locs {
            after = after.max(d.hlc);
        }
        let vc = self.causal_vc(ix, &dep_locs);
        let past = self.vc_or_own(ix, &vc);
        let stream = self.streams.get(&draft.stream);
        let mut ops = draft.ops;
        for op in &mut ops {
            if let Op::Set {
                field, supersedes, ..
            } = op
            {
                // The standing writes in the event's causal past: all of
                // them, unless one is beyond the clock's horizon (not a dep
                // yet); that one stays, concurrent with this write.
                *supersedes = stream
                    .and_then(|s| s.fields.get(field.as_str()))
                    .map_or_else(Vec::new, |w| {
                        w.keys()
                            .filter(|d| self.in_past(d, &author, past))
                            .copied()
                            .collect()
                    });
            }
        }
        let event = Event {
            version: FORMAT_VERSION,
            author,
            seq,
            prev,
            deps,
            hlc: clock.tick(now_ms, after),
            stream: draft.stream,
            kind: draft.kind,
            ops,
            payload: draft.payload,
            meta: draft.meta,
        };
        event.check().map_err(Invalid::from)?;
        self.check_ops(&event, self.vc_or_own(ix, &vc))?;
        Ok(Made::New(event, vc))
    }

    /// The deps of a new event by `author`: each other author's latest
    /// event with an hlc at most `horizon` that `author`'s chain does not
    /// imply, minus those implied by another such event; sorted by id.
    ///
    /// The events at or below `horizon` are causally closed (hlcs grow
    /// along `prev` and `deps`), so these are the heads of that closed set:
    /// an event beyond the horizon, and every event whose causal past holds
    /// one, is left out (its hlc is above it), and none within is lost.
    fn unmerged_heads(&self, author: Option<u32>, horizon: Hlc) -> Vec<EventId> {
        let own = author.map(|a| &self.authors[a as usize].vc);
        let cands: Vec<(u32, u64)> = (0..self.authors.len() as u32)
            .filter(|&x| Some(x) != author)
            .filter_map(|x| {
                let seen = own.and_then(|vc| vc.get(x as usize)).copied().unwrap_or(0);
                let seq = self.latest_within(x, horizon);
                (seq > seen).then_some((x, seq))
            })
            .collect();
        let mut deps: Vec<EventId> = cands
            .iter()
            .filter(|&&(c, cseq)| {
                !cands
                    .iter()
                    .any(|&(b, bseq)| b != c && self.vc_at(b, bseq, c) >= cseq)
            })
            .map(|&(c, cseq)| self.authors[c as usize].ids[(cseq - 1) as usize])
            .collect();
        deps.sort_unstable();
        deps
    }

    /// The seq of author `x`'s latest event with an hlc at most `limit`
    /// (0 if none). An author's hlcs grow along its chain, so it is a
    /// binary search over its events, made only when the head is beyond.
    fn latest_within(&self, x: u32, limit: Hlc) -> u64 {
        let a = &self.authors[x as usize];
        if a.head_hlc <= limit {
            return a.seq();
        }
        // Every id of an author's chain is in the index.
        a.ids.partition_point(|id| self.index[id].hlc <= limit) as u64
    }

    /// The largest hlc of any event at most `limit` ([`Hlc::ZERO`] if
    /// none): what a clock opened at wall time `now_ms` is seeded from,
    /// with `limit` = [`Hlc::horizon`]`(now_ms)`.
    pub fn max_hlc_within(&self, limit: Hlc) -> Hlc {
        if self.max_hlc <= limit {
            return self.max_hlc;
        }
        (0..self.authors.len() as u32)
            .filter_map(|x| {
                let seq = self.latest_within(x, limit);
                let id = self.authors[x as usize]
                    .ids
                    .get(seq.checked_sub(1)? as usize)?;
                Some(self.index[id].hlc)
            })
            .max()
            .unwrap_or(Hlc::ZERO)
    }

    /// The events beyond the clock's horizon at wall time `now_ms`
    /// ([`Hlc::horizon`]): stored and folded, but neither observed by the
    /// local clock nor taken as deps until the wall time catches up.
    pub fn ahead(&self, now_ms: u64) -> Ahead {
        let horizon = Hlc::horizon(now_ms);
        let mut out = Ahead::default();
        if self.max_hlc <= horizon {
            return out;
        }
        // By author id, so that ties go the same way on every replica.
        for &x in self.author_ix.values() {
            let a = &self.authors[x as usize];
            if a.head_hlc <= horizon {
                continue;
            }
            out.events += a.seq() - self.latest_within(x, horizon);
            if out.furthest.as_ref().is_none_or(|f| a.head_hlc > f.hlc) {
                out.furthest = Some(AheadEvent {
                    author: a.id,
                    seq: a.seq(),
                    // An author in the index has at least one event.
                    id: *a.ids.last().expect("author with no events"),
                    hlc: a.head_hlc,
                    ahead_ms: a.head_hlc.ms().saturating_sub(now_ms),
                });
            }
        }
        out
    }
}

fn delta_slot<'a, 'b>(delta: &'b mut Vec<(&'a str, i128)>, counter: &'a str) -> &'b mut i128 {
    let i = match delta.iter().position(|(c, _)| *c == counter) {
        Some(i) => i,
        None => {
            delta.push((counter, 0));
            delta.len() - 1
        }
    };
    &mut delta[i].1
}

/// The change `ops` (escrow ops of one event by `by`) make to the rights
/// of `author` on `counter`.
fn escrow_delta(ops: &[Op], counter: &str, by: &NodeId, author: &NodeId) -> i128 {
    let mut d = 0i128;
    for op in ops {
        match op {
            Op::EscrowInit {
                counter: c,
                capacity,
            } if c == counter && by == author => {
                d += *capacity as i128;
            }
            Op::EscrowTransfer {
                counter: c,
                to,
                amount,
            } if c == counter => {
                if by == author {
                    d -= *amount as i128;
                }
                if to == author {
                    d += *amount as i128;
                }
            }
            Op::EscrowConsume { counter: c, amount } if c == counter && by == author => {
                d -= *amount as i128;
            }
            _ => {}
        }
    }
    // The rights a duplicate's ops would have changed go back.
    -d
}

/// `ops` as [`undo`] needs them: register values are read back from the
/// stream, so they are not kept twice.
fn undo_ops(ops: &[Op]) -> Vec<Op> {
    ops.iter()
        .map(|op| match op {
            Op::Set {
                field, supersedes, ..
            } => Op::Set {
                field: field.clone(),
                value: Vec::new(),
                supersedes: supersedes.clone(),
            },
            op => op.clone(),
        })
        .collect()
}

/// Applies one op of an event in effect. `undoable`: the event carries a
/// command id, so the writes it removes are kept as graves.
fn apply_op(stream: &mut Stream, op: &Op, dot: Dot, ix: u32, hlc: Hlc, undoable: bool) {
    match op {
        Op::Set {
            field,
            value,
            supersedes,
        } => {
            let writes = match stream.fields.get_mut(field.as_str()) {
                Some(w) => w,
                None => stream.fields.entry(field.clone()).or_default(),
            };
            for d in supersedes {
                match writes.remove(d) {
                    Some(written) if undoable => {
                        let graves = match stream.graves.get_mut(field.as_str()) {
                            Some(g) => g,
                            None => stream.graves.entry(field.clone()).or_default(),
                        };
                        graves.insert(*d, Grave { written, namers: 1 });
                    }
                    Some(_) => {}
                    None => {
                        // Removed already; if an undoable event did it, one
                        // more event in effect now names it.
                        if let Some(g) = stream
                            .graves
                            .get_mut(field.as_str())
                            .and_then(|g| g.get_mut(d))
                        {
                            g.namers += 1;
                        }
                    }
                }
            }
            writes.insert(
                dot,
                Written {
                    hlc,
                    value: value.clone(),
                },
            );
        }
        Op::Add { counter, delta } => {
            let c = match stream.counters.get_mut(counter.as_str()) {
                Some(c) => c,
                None => stream.counters.entry(counter.clone()).or_default(),
            };
            *c += *delta as i128;
        }
        Op::EscrowInit { counter, capacity } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.capacity += *capacity as u128;
            e.accounts.entry(dot.author).or_default().init += *capacity as u128;
        }
        Op::EscrowTransfer {
            counter,
            to,
            amount,
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(dot.author).or_default().sent += *amount as u128;
            e.accounts.entry(*to).or_default().received += *amount as u128;
            e.incoming
                .entry(*to)
                .or_default()
                .push((ix, dot.seq, *amount));
        }
        Op::EscrowConsume { counter, amount } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(dot.author).or_default().consumed += *amount as u128;
            e.consumed += *amount as u128;
        }
    }
}

/// Records one op of a duplicate: no effect on values, but the entries it
/// touches exist (as a replay would make them), and its escrow ops count
/// for validity.
fn apply_duplicate(stream: &mut Stream, op: &Op, dot: Dot, ix: u32) {
    match op {
        Op::Set { .. } => {}
        Op::Add { counter, .. } => {
            stream.counters.entry(counter.clone()).or_default();
        }
        Op::EscrowInit { counter, capacity } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(dot.author).or_default();
            e.dup.entry(dot.author).or_default().init += *capacity as u128;
        }
        Op::EscrowTransfer {
            counter,
            to,
            amount,
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(dot.author).or_default();
            e.accounts.entry(*to).or_default();
            e.dup.entry(dot.author).or_default().sent += *amount as u128;
            e.incoming
                .entry(*to)
                .or_default()
                .push((ix, dot.seq, *amount));
        }
        Op::EscrowConsume { counter, amount } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(dot.author).or_default();
            e.dup.entry(dot.author).or_default().consumed += *amount as u128;
        }
    }
}

/// Undoes the ops (from [`undo_ops`]) of the event at `dot`, which took
/// effect and is now a duplicate: the stream becomes what it would be had
/// the event been a duplicate from the start.
fn undo(stream: &mut Stream, ops: &[Op], dot: Dot) {
    for op in ops {
        match op {
            Op::Set {
                field, supersedes, ..
            } => {
                // An earlier op of the event may have emptied the field.
                if let Some(writes) = stream.fields.get_mut(field.as_str()) {
                    writes.remove(&dot);
                }
                if let Some(graves) = stream.graves.get_mut(field.as_str()) {
                    // Its own write, if an undoable event removed it, never
                    // stands again.
                    graves.remove(&dot);
                    for d in supersedes {
                        let Some(g) = graves.get_mut(d) else {
                            continue;
                        };
                        g.namers -= 1;
                        if g.namers == 0 {
                            // Just seen in the map.
                            let g = graves.remove(d).expect("grave present");
                            stream
                                .fields
                                .entry(field.clone())
                                .or_default()
                                .insert(*d, g.written);
                        }
                    }
                    if graves.is_empty() {
                        stream.graves.remove(field.as_str());
                    }
                }
                if stream
                    .fields
                    .get(field.as_str())
                    .is_some_and(BTreeMap::is_empty)
                {
                    stream.fields.remove(field.as_str());
                }
            }
            Op::Add { counter, delta } => {
                if let Some(c) = stream.counters.get_mut(counter.as_str()) {
                    *c -= *delta as i128;
                }
            }
            Op::EscrowInit { counter, capacity } => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.capacity -= *capacity as u128;
                e.accounts.entry(dot.author).or_default().init -= *capacity as u128;
                e.dup.entry(dot.author).or_default().init += *capacity as u128;
            }
            Op::EscrowTransfer {
                counter,
                to,
                amount,
            } => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.accounts.entry(dot.author).or_default().sent -= *amount as u128;
                e.accounts.entry(*to).or_default().received -= *amount as u128;
                e.dup.entry(dot.author).or_default().sent += *amount as u128;
            }
            Op::EscrowConsume { counter, amount } => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.accounts.entry(dot.author).or_default().consumed -= *amount as u128;
                e.consumed -= *amount as u128;
                e.dup.entry(dot.author).or_default().consumed += *amount as u128;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Keypair;
    use crate::hlc::MAX_CLOCK_AHEAD_MS;

    /// A wall time: 2023-11-14.
    const T: u64 = 1_700_000_000_000;

    /// One author with its own replica and clock, `skew_ms` ahead of `T`.
    struct Node {
        id: NodeId,
        state: State,
        clock: HlcClock,
        skew_ms: u64,
        /// Events in the order this replica inserted them (a causal order).
        order: Vec<(Event, EventId)>,
    }

    impl Node {
        /// Makes and inserts a local event at the node's wall time `wall`.
        fn make(&mut self, wall: u64, draft: Draft) -> Event {
            let e = match self.state.prepare(self.id, &mut self.clock, wall, draft) {
                Ok(Prepared::New(e)) => e,
                other => panic!("prepare refused a valid draft: {other:?}"),
            };
            let (_, id) = e.seal();
            assert_eq!(self.state.insert(&e, id), Ok(Inserted::New));
            self.order.push((e.clone(), id));
            e
        }

        /// Inserts everything `from` holds, in `from`'s order, at `wall`.
        fn merge(&mut self, from: &[(Event, EventId)], wall: u64) {
            for (e, id) in from {
                match self.state.insert(e, *id) {
                    Ok(Inserted::New) => {
                        self.clock.observe_at(e.hlc, wall);
                        self.order.push((e.clone(), *id));
                    }
                    Ok(Inserted::Duplicate) => {}
                    Err(err) => panic!("a replica refused {id:?}: {err}"),
                }
            }
        }
    }

    fn draft(stream: u64, v: u64) -> Draft {
        Draft {
            stream: format!("s/{stream}"),
            kind: "Edited".into(),
            ops: vec![
                Op::Set {
                    field: "f".into(),
                    value: v.to_string().into_bytes(),
                    supersedes: vec![],
                },
                Op::Add {
                    counter: "n".into(),
                    delta: 1,
                },
            ],
            ..Draft::default()
        }
    }

    /// Three honest nodes and one whose clock runs ten minutes ahead, over
    /// twenty minutes of writes and random exchanges: the honest nodes'
    /// events stay within the bound of their wall time, they depend on the
    /// fast node's events once their wall time catches up, and every
    /// replica folds to the same state hash.
    #[test]
    fn replicas_converge_whatever_clock_a_peer_runs_on() {
        let skews = [0, 0, 0, 600_000];
        let fast = Keypair::from_secret([4; 32]).node_id();
        let mut nodes: Vec<Node> = skews
            .iter()
            .enumerate()
            .map(|(i, &skew_ms)| Node {
                id: Keypair::from_secret([i as u8 + 1; 32]).node_id(),
                state: State::new(),
                clock: HlcClock::default(),
                skew_ms,
                order: Vec::new(),
            })
            .collect();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut held_back, mut caught_up) = (0, 0);
        for round in 0..120u64 {
            let now = T + round * 10_000;
            for n in &mut nodes {
                let wall = now + n.skew_ms;
                if next() % 3 == 0 {
                    continue;
                }
                let ahead = n.state.ahead(wall).events;
                let e = n.make(wall, draft(next() % 3, round));
                if n.skew_ms == 0 {
                    assert!(
                        e.hlc.ms() <= wall + MAX_CLOCK_AHEAD_MS,
                        "round {round}: an honest hlc {:?} runs ahead of wall time {wall}",
                        e.hlc
                    );
                    held_back += u64::from(ahead > 0);
                    caught_up += e
                        .deps
                        .iter()
                        .filter(|d| n.state.dot_of(d).is_some_and(|d| d.author == fast))
                        .count();
                }
            }
            let a = (next() % 4) as usize;
            let b = (next() % 4) as usize;
            if a != b {
                let from = nodes[b].order.clone();
                let wall = now + nodes[a].skew_ms;
                nodes[a].merge(&from, wall);
            }
        }
        assert!(held_back > 0, "the fast node's events were never ahead");
        assert!(caught_up > 0, "the fast node's events never became deps");
        for _ in 0..2 {
            for a in 0..nodes.len() {
                for b in 0..nodes.len() {
                    let from = nodes[b].order.clone();
                    nodes[a].merge(&from, T);
                }
            }
        }
        let hash = nodes[0].state.state_hash();
        for n in &nodes {
            assert_eq!(n.state.len(), nodes[0].state.len());
            assert_eq!(n.state.state_hash(), hash);
        }
    }
}
