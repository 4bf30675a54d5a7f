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
//!   of the event and its causal past);
//! - seat policies, overdraft sales, oversell marks and compensation: a
//!   register, and read models recomputed from bookkeeping that is a
//!   function of the event set ([`crate::seats`]).
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
//! **Forks converge.** An author that signs two events with one seq (a
//! desk restored from a copy, a cloned machine) has two branches, and both
//! are valid history: an event is valid by its own chain (its `prev` is its
//! author's event at the seq before) and causal past, wherever other
//! branches stand. Every replica that holds both keeps both, and the fold
//! stays a function of the event set:
//! - register writes are keyed by [`WriteId`] (dot and event id), so two
//!   branches' writes to one field both stand, as a conflict; a `Set` names
//!   writes by dot, and a dot names every event at that `(author, seq)` in
//!   the writing event's causal past (both branches, once both are there);
//! - the canonical order ends with the event id (`(hlc, author, seq, id)`);
//! - an author's rights in a causal past count only its events in that
//!   past: each branch may spend the rights held at the fork. The read
//!   model then shows the account overdrawn ([`Escrow::overdrawn`]), with
//!   the author's spends past the fork, identically everywhere;
//! - [`State::forks`] lists each forked author, where it diverged, and its
//!   branch heads; [`State::frontier`] has one head per branch.
//!
//! The forked author keeps working with the same key on its own branch:
//! local events extend the chain this replica learned first, which for its
//! own author is the one its own log holds first (a restored desk's own
//! branch, whose events come before anything received from the other), and
//! depend on the other branches like on any other author's events, which
//! merges them in its past (and makes it repay an overdraft before it
//! spends again).
//!
//! Causal pasts are answered from vector clocks over *lanes*: a lane is a
//! run of one author's chain as this replica learned it (an author that
//! never forked has one; a fork adds one from the seq where it diverges,
//! whose earlier seqs are those of its parent lane). `hist[a][b]` lists
//! `(seq of lane a, highest seq of lane b seen)` each time `a`'s knowledge
//! of `b` grows, so "is `(b, t)` in the past of lane `a`'s event `s`" is one
//! binary search. It costs memory only when deps add knowledge. Lanes are
//! numbered in the order this replica learned them; nothing encoded or
//! hashed depends on that.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::event::{Event, EventError, Meta, Op, Policy, PolicyMode, MAX_DOTS};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{Dot, EventId, NodeId};
use crate::seats::{self, Book, Compensated, Oversold, PolicyWrite};
use crate::text::{self, Text, TextEdit};

/// An event's place in a [`State`]'s bookkeeping ([`State::slot_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    /// The lane: a run of one author's chain.
    pub lane: u32,
    /// The event's index in the lane.
    pub index: usize,
}

/// Where an event sits: its lane and seq.
#[derive(Clone, Copy, Debug)]
struct Loc {
    lane: u32,
    seq: u64,
    hlc: Hlc,
}

/// A run of one author's chain, as this replica learned it. An author that
/// never forked has one lane, seq 1 up to its head. A fork adds a lane: the
/// events of the new branch from the seq where it diverges, whose earlier
/// seqs are those of its `parent` lane up to `base` (none for a second
/// seq 1). Lanes are this replica's bookkeeping, numbered in the order it
/// learned them; nothing encoded or hashed depends on them.
#[derive(Clone, Debug)]
struct Lane {
    author: NodeId,
    /// Seqs `1..=base` are on `parent`.
    base: u64,
    parent: Option<u32>,
    /// `ids[i]` is the id of seq `base + i + 1`.
    ids: Vec<EventId>,
    head_hlc: Hlc,
    /// Vector clock of the head, dense by lane index (missing = 0): per
    /// lane, the highest seq of it in the head's causal past.
    vc: Vec<u64>,
    /// Per other lane: `(own seq, other's seq)` each time knowledge grew.
    hist: Vec<Vec<(u64, u64)>>,
}

impl Lane {
    /// The head's seq.
    fn seq(&self) -> u64 {
        self.base + self.ids.len() as u64
    }

    /// The id at `seq`, if this lane holds that seq itself.
    fn id_at(&self, seq: u64) -> Option<EventId> {
        let i = seq.checked_sub(self.base + 1)?;
        self.ids.get(usize::try_from(i).ok()?).copied()
    }
}

/// One author's lanes.
#[derive(Clone, Debug, Default)]
struct Lanes {
    /// In the order this replica learned them. Local events extend the
    /// first: the chain this replica learned first, which for its own
    /// author is the one in its own log (a restored desk's own branch).
    all: Vec<u32>,
}

/// Where a new event goes.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// It extends a lane's head.
    Extend(u32),
    /// It starts a lane: after `parent`'s seq `base`, or a new seq 1.
    Branch { parent: Option<u32>, base: u64 },
}

/// A register write: the event that made it, by dot and id. Sorted by
/// dot, then id: two branches of a forked author can hold one dot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WriteId {
    /// The writing event's author.
    pub author: NodeId,
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub event: EventId,
}

impl WriteId {
    /// The dot a `Set` names the write by.
    pub fn dot(&self) -> Dot {
        Dot {
            author: self.author,
            seq: self.seq,
        }
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
    /// Sum of all consumption; above `capacity` only when an account is
    /// [`Escrow::overdrawn`].
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
    /// Per author, what each of its events (duplicates included) did to
    /// its own rights: `(lane, seq, change, spent)`, `spent` if an op
    /// consumed or transferred rights (an init in the same event may make
    /// the change positive). For the rights of a forked author, whose other
    /// branches are not in an event's causal past, and its spends past the
    /// fork ([`Overdrawn::events`]).
    #[serde(skip)]
    own: BTreeMap<NodeId, Vec<(u32, u64, i128, bool)>>,
    /// Accounts that spent more rights than they hold: a forked author that
    /// spent the rights it held at the fork on two branches, a node that
    /// relied on an init or transfer that turned out to be a duplicate, or
    /// a node that sold beyond its rights under a `risk-window` policy
    /// ([`Op::EscrowOverdraw`]). While this is not empty the counter may be
    /// oversold (`consumed` can exceed `capacity`); it is a function of the
    /// events, so every replica holding them shows the same.
    pub overdrawn: BTreeMap<NodeId, Overdrawn>,
    /// The standing seat policies (a register: more than one is a
    /// conflict); the effective one is [`Escrow::policy`] (`seats` module).
    pub policies: BTreeMap<WriteId, Policy>,
    /// The oversold sales, by sale: the marks (`seats` module).
    pub oversold: BTreeMap<EventId, Oversold>,
    /// Compensations whose sale is not marked: void.
    pub void: BTreeMap<EventId, Compensated>,
    /// Marked units kept by an `honour` compensation: the effective
    /// capacity is `capacity + honoured`.
    pub honoured: u128,
    /// Marked units released by a `cancel` or `waitlist` compensation.
    pub released: u128,
    /// Sales compensated by `waitlist`, ascending in canonical order.
    pub waitlist: Vec<EventId>,
    /// Every policy write and the sales in effect, for the above.
    #[serde(skip)]
    pub(crate) book: Book,
}

/// An account that spent more rights than it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Overdrawn {
    /// Rights owed: minus [`Account::balance`].
    pub owed: u128,
    /// If the author forked: its events past the fork that spent rights on
    /// this counter (consumed or transferred them), ascending by id. Empty
    /// for a debt from a duplicate.
    pub events: Vec<EventId>,
}

/// One stream's read model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stream {
    /// Events in the stream.
    pub version: u64,
    /// Register fields: the writes left standing. More than one is a conflict.
    pub fields: BTreeMap<String, BTreeMap<WriteId, Written>>,
    /// PN counters.
    pub counters: BTreeMap<String, i128>,
    /// Bounded counters.
    pub escrow: BTreeMap<String, Escrow>,
    /// Command ids carried by more than one event of the stream: which
    /// event took effect, and which did not.
    pub duplicates: BTreeMap<String, Duplicated>,
    /// Per field, writes removed by an event that may yet be undone.
    #[serde(skip)]
    graves: BTreeMap<String, BTreeMap<WriteId, Grave>>,
    /// Text fields ([`crate::text`]): each one's changes, automerge
    /// document and read model. Encoded after the streams, not in them
    /// ([`State::canonical_read_model`]).
    #[serde(skip)]
    pub(crate) texts: BTreeMap<String, text::Field>,
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
    /// A text field's read model: the merged text and its heads. `None`
    /// if no event of the stream has a text op on the field.
    pub fn text(&self, field: &str) -> Option<&Text> {
        self.texts.get(field).map(text::Field::text)
    }

    /// Every text field's read model, ascending by field.
    pub fn texts(&self) -> impl Iterator<Item = (&str, &Text)> {
        self.texts.iter().map(|(f, t)| (f.as_str(), t.text()))
    }

    /// The displayed value of a field: the standing write with the greatest
    /// `(hlc, author, seq, id)`. `None` if the field was never written.
    pub fn shown(&self, field: &str) -> Option<(&WriteId, &Written)> {
        self.fields.get(field).and_then(shown)
    }
}

/// The standing write with the greatest `(hlc, author, seq, id)`.
pub fn shown(writes: &BTreeMap<WriteId, Written>) -> Option<(&WriteId, &Written)> {
    writes.iter().max_by_key(|(w, v)| (v.hlc, *w))
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
    /// The first member's ops: what to undo should an event that sorts
    /// before it arrive.
    undo: Vec<UndoOp>,
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

    fn write(&self) -> WriteId {
        WriteId {
            author: self.author,
            seq: self.seq,
            event: self.id,
        }
    }
}

/// What [`State::apply_seats`] needs of an event being applied.
struct Seat {
    at: At,
    /// Whether the event is in effect.
    effect: bool,
    /// The event it put out of effect as its command's first.
    replaced: Option<Replaced>,
}

/// An event put out of effect by one of its command that sorts first.
struct Replaced {
    key: seats::Key,
    write: WriteId,
    /// Its escrow ops.
    escrow: Vec<Op>,
}

/// An event being applied: its write, lane and hlc.
#[derive(Clone, Copy, Debug)]
struct At {
    me: WriteId,
    lane: u32,
    hlc: Hlc,
}

/// One op of a command's first event, as [`undo`] needs it: register
/// values are read back from the stream, so a `Set` keeps only its field
/// and the writes it removed.
#[derive(Clone, Debug)]
enum UndoOp {
    Set {
        field: String,
        removed: Vec<WriteId>,
    },
    Other(Op),
}

/// An author that signed two events with one seq: where its branches
/// diverge first ([`State::forks`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    /// The author.
    pub author: NodeId,
    /// The lowest seq held by more than one event.
    pub seq: u64,
    /// Every event at that seq, ascending.
    pub events: Vec<EventId>,
    /// The author's heads: one per branch, ascending by (seq, id).
    pub heads: Vec<(u64, EventId)>,
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
    /// The event's `prev` is not present.
    #[error("chain gap: author {author} is at seq {have}, this event has seq {got} and its prev is not present")]
    Gap {
        /// The author.
        author: NodeId,
        /// The author's highest seq present (on any branch).
        have: u64,
        /// The event's seq.
        got: u64,
    },
    /// `prev` is present but is not the author's event at the seq before.
    #[error("broken chain: prev {prev} is not an event of author {author} at seq {}", .seq - 1)]
    BrokenChain {
        /// The author.
        author: NodeId,
        /// The event's seq.
        seq: u64,
        /// The prev it names.
        prev: EventId,
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
    /// A text op's change breaks a rule of [`crate::text`].
    #[error("text field {field:?}: {why}")]
    BadText {
        /// The field.
        field: String,
        /// The broken rule.
        why: text::BadChange,
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
    /// An overdraft sale where the effective policy in the event's causal
    /// past is not `risk-window`.
    #[error("escrow {counter:?}: the seat policy in the event's causal past is {}, an overdraft needs risk-window", .mode.name())]
    OverdraftNotAllowed {
        /// The counter.
        counter: String,
        /// The effective policy's mode there.
        mode: PolicyMode,
    },
    /// An overdraft sale that leaves the author's rights below
    /// `-max_overdraft`.
    #[error("escrow {counter:?}: the author holds rights to {available} in its causal past; selling {wanted} would go below -{max_overdraft}")]
    OverdraftExceeded {
        /// The counter.
        counter: String,
        /// Rights held (negative: a debt).
        available: i128,
        /// Units sold.
        wanted: u128,
        /// The policy's bound.
        max_overdraft: u64,
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
    /// the writes to that field this replica currently shows, and that of
    /// each `EscrowPolicy` with the counter's standing policies.
    pub ops: Vec<Op>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Command id and user.
    pub meta: Meta,
    /// If set, the stream's version must equal it.
    pub expected_version: Option<u64>,
    /// Text edits, at most one per field: `prepare` turns each into one
    /// `Op::Text` after `ops` (positions in UTF-16 units, [`crate::text`]).
    pub texts: Vec<TextEdit>,
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

/// A checked event, the clock `causal_vc` computed for it, and its ops'
/// overdraft units.
// Made once per local command and unpacked at once: no size to save.
#[allow(clippy::large_enum_variant)]
enum Made {
    New(Event, Place, Option<Vec<u64>>, Vec<u64>),
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
    /// A text edit cannot be made (an unknown `base`, a splice out of range).
    #[error(transparent)]
    Text(#[from] text::EditError),
    /// More concurrent heads than one event may depend on.
    #[error("{0} unmerged authors exceed the {MAX_DOTS} deps one event may name")]
    TooManyDeps(usize),
}

/// A replica's folded state. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct State {
    lanes: Vec<Lane>,
    authors: BTreeMap<NodeId, Lanes>,
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

    /// Every branch head: `(author, seq, id)`, ascending. One per author,
    /// unless it forked: then one per branch.
    pub fn frontier(&self) -> Vec<(NodeId, u64, EventId)> {
        let mut out: Vec<(NodeId, u64, EventId)> = self
            .authors
            .values()
            .flat_map(|l| &l.all)
            .filter_map(|&x| {
                let l = &self.lanes[x as usize];
                Some((l.author, l.seq(), *l.ids.last()?))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// An author's highest seq, on any branch (0 if none).
    pub fn max_seq(&self, author: &NodeId) -> u64 {
        self.authors.get(author).map_or(0, |l| {
            l.all
                .iter()
                .map(|&x| self.lanes[x as usize].seq())
                .max()
                .unwrap_or(0)
        })
    }

    /// The id of an author's event by seq, on the chain this replica
    /// learned first, the one local events extend ([`State::append_local`]).
    /// Other branches: [`State::chain_id`].
    pub fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        let lane = self.local_lane(author)?;
        self.lane_chain_id(lane, seq)
    }

    /// The id of the event at `seq` in the chain that ends at `head` (its
    /// own seq included), if this replica holds `head`.
    pub fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId> {
        let loc = self.index.get(head)?;
        if seq > loc.seq {
            return None;
        }
        self.lane_chain_id(loc.lane, seq)
    }

    /// The id at `seq` on lane `x` or the lanes it branched from.
    fn lane_chain_id(&self, mut x: u32, seq: u64) -> Option<EventId> {
        loop {
            let l = &self.lanes[x as usize];
            if seq > l.base {
                return l.id_at(seq);
            }
            x = l.parent?;
        }
    }

    /// The highest seq at which the chains ending at `a` and `b` (both of
    /// one author, both held) hold the same event: every lower seq is
    /// shared too. 0 if they share nothing or either is not held.
    pub fn common_seq(&self, a: &EventId, b: &EventId) -> u64 {
        let (Some(la), Some(lb)) = (self.index.get(a), self.index.get(b)) else {
            return 0;
        };
        if self.lanes[la.lane as usize].author != self.lanes[lb.lane as usize].author {
            return 0;
        }
        // Chains agree on a prefix, so "same event at s" is monotone.
        let (mut lo, mut hi) = (0, la.seq.min(lb.seq));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.lane_chain_id(la.lane, mid) == self.lane_chain_id(lb.lane, mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// The `(author, seq)` of an event.
    pub fn dot_of(&self, id: &EventId) -> Option<Dot> {
        self.index.get(id).map(|l| Dot {
            author: self.lanes[l.lane as usize].author,
            seq: l.seq,
        })
    }

    /// The hlc of an event.
    pub fn hlc_of(&self, id: &EventId) -> Option<Hlc> {
        self.index.get(id).map(|l| l.hlc)
    }

    /// Every author that signed two events with one seq, ascending by
    /// author: a function of the events held, the same on every replica
    /// holding them.
    pub fn forks(&self) -> Vec<Fork> {
        self.authors
            .iter()
            .filter_map(|(author, lanes)| {
                let at = self.fork_seq(lanes)? + 1;
                let events: BTreeSet<EventId> = lanes
                    .all
                    .iter()
                    .filter_map(|&x| self.lanes[x as usize].id_at(at))
                    .collect();
                let mut heads: Vec<(u64, EventId)> = lanes
                    .all
                    .iter()
                    .filter_map(|&x| {
                        let l = &self.lanes[x as usize];
                        Some((l.seq(), *l.ids.last()?))
                    })
                    .collect();
                heads.sort_unstable();
                Some(Fork {
                    author: *author,
                    seq: at,
                    events: events.into_iter().collect(),
                    heads,
                })
            })
            .collect()
    }

    /// Whether an author forked.
    pub fn is_forked(&self, author: &NodeId) -> bool {
        self.authors.get(author).is_some_and(|l| l.all.len() > 1)
    }

    /// The highest seq all of an author's branches share, if it forked.
    /// Lanes start where branches diverge, in whatever order they were
    /// learned, so the least base is the lowest divergence.
    fn fork_seq(&self, lanes: &Lanes) -> Option<u64> {
        if lanes.all.len() < 2 {
            return None;
        }
        let mut roots = 0;
        let mut least = u64::MAX;
        for &x in &lanes.all {
            let l = &self.lanes[x as usize];
            match l.parent {
                None => roots += 1,
                Some(_) => least = least.min(l.base),
            }
        }
        Some(if roots > 1 { 0 } else { least })
    }

    /// Where an event sits in this replica's bookkeeping: its lane (a run
    /// of one author's chain, numbered in the order this state learned
    /// them) and its index in the lane. Stable for the life of the state;
    /// for indexes kept beside it (a replica's log positions), never for
    /// anything encoded or hashed.
    pub fn slot_of(&self, id: &EventId) -> Option<Slot> {
        let l = self.index.get(id)?;
        Some(Slot {
            lane: l.lane,
            index: (l.seq - self.lanes[l.lane as usize].base - 1) as usize,
        })
    }

    /// The event at a slot: `(author, seq, id)`.
    pub fn at_slot(&self, slot: Slot) -> Option<(NodeId, u64, EventId)> {
        let l = self.lanes.get(slot.lane as usize)?;
        let id = *l.ids.get(slot.index)?;
        Some((l.author, l.base + slot.index as u64 + 1, id))
    }

    /// The seq of the head local events of `author` extend (0 if none).
    pub fn local_seq(&self, author: &NodeId) -> u64 {
        self.local_lane(author)
            .map_or(0, |x| self.lanes[x as usize].seq())
    }

    /// The lane local events of `author` extend: the first it learned.
    fn local_lane(&self, author: &NodeId) -> Option<u32> {
        self.authors.get(author)?.all.first().copied()
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
    pub fn conflicts(&self) -> impl Iterator<Item = (&str, &str, &BTreeMap<WriteId, Written>)> {
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
        let mut out = postcard::to_stdvec(&self.streams).expect("encode read model");
        // Text fields follow, only if there are any: a state without them
        // keeps the bytes it had before text fields existed, and the
        // streams' encoding is self-delimiting, so the two never blur.
        let texts: BTreeMap<&str, BTreeMap<&str, &Text>> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.texts.is_empty())
            .map(|(n, s)| (n.as_str(), s.texts().collect()))
            .collect();
        if !texts.is_empty() {
            out.extend(postcard::to_stdvec(&texts).expect("encode texts"));
        }
        out
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
        let Some(h) = self.lanes[a as usize].hist.get(other as usize) else {
            return 0;
        };
        match h.partition_point(|&(s, _)| s <= seq) {
            0 => 0,
            i => h[i - 1].1,
        }
    }

    /// The vector clock of a new event on lane `own` (if it extends one)
    /// with `deps` (a new branch's `prev` among them), or `None` when the
    /// deps add nothing to the lane's own clock.
    fn causal_vc(&self, own: Option<u32>, deps: &[Loc]) -> Option<Vec<u64>> {
        let base: &[u64] = own.map_or(&[], |a| &self.lanes[a as usize].vc);
        let mut vc: Option<Vec<u64>> = None;
        for d in deps {
            let cur = vc.as_deref().unwrap_or(base);
            if Some(d.lane) != own && cur.get(d.lane as usize).is_some_and(|&v| v >= d.seq) {
                continue; // already implied
            }
            let vc = vc.get_or_insert_with(|| {
                let mut v = base.to_vec();
                v.resize(self.lanes.len(), 0);
                v
            });
            for (x, slot) in vc.iter_mut().enumerate() {
                let v = self.vc_at(d.lane, d.seq, x as u32);
                if v > *slot {
                    *slot = v;
                }
            }
        }
        vc
    }

    /// The clock `causal_vc` describes.
    fn vc_or_own<'a>(&'a self, own: Option<u32>, vc: &'a Option<Vec<u64>>) -> &'a [u64] {
        match vc {
            Some(v) => v,
            None => own.map_or(&[], |a| &self.lanes[a as usize].vc),
        }
    }

    /// Where `event` goes, if its chain is sound here.
    fn place(&self, event: &Event) -> Result<(Place, Option<Loc>), Invalid> {
        let lanes = self.authors.get(&event.author);
        let Some(prev) = event.prev else {
            // Seq 1 (`Event::check`). A second seq 1 is a fork too.
            return Ok((
                Place::Branch {
                    parent: None,
                    base: 0,
                },
                None,
            ));
        };
        let Some(&loc) = self.index.get(&prev) else {
            return Err(Invalid::Gap {
                author: event.author,
                have: self.max_seq(&event.author),
                got: event.seq,
            });
        };
        let lane = &self.lanes[loc.lane as usize];
        if lane.author != event.author || loc.seq + 1 != event.seq {
            return Err(Invalid::BrokenChain {
                author: event.author,
                seq: event.seq,
                prev,
            });
        }
        debug_assert!(lanes.is_some(), "an author's event is in the index");
        let place = if lane.seq() == loc.seq {
            Place::Extend(loc.lane)
        } else {
            // `prev` already has a successor: a fork.
            Place::Branch {
                parent: Some(loc.lane),
                base: loc.seq,
            }
        };
        Ok((place, Some(loc)))
    }

    /// Checks `event` (whose id is `id`) against this replica and applies it.
    /// On error nothing changes. An event at a seq its author already used
    /// (a fork) is valid history like any other: it starts a branch, and
    /// [`State::forks`] lists the author.
    pub fn insert(&mut self, event: &Event, id: EventId) -> Result<Inserted, Invalid> {
        if self.index.contains_key(&id) {
            return Ok(Inserted::Duplicate);
        }
        event.check()?;
        let (place, prev) = self.place(event)?;
        if let Some(prev) = prev {
            if event.hlc <= prev.hlc {
                return Err(Invalid::ClockNotAfter {
                    hlc: event.hlc,
                    of: "prev",
                    other: prev.hlc,
                });
            }
        }
        let mut deps = Vec::with_capacity(event.deps.len() + 1);
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
        let own = match place {
            Place::Extend(x) => Some(x),
            Place::Branch { .. } => {
                // A new lane's past starts with its prev's.
                deps.extend(prev);
                None
            }
        };
        let vc = self.causal_vc(own, &deps);
        let units = self.check_ops(event, self.vc_or_own(own, &vc))?;
        self.apply(event, id, place, vc, &units);
        Ok(Inserted::New)
    }

    /// Whether an event at `dot` is in the causal past `vc`. A dot with
    /// seq 0 names no event (`base < 0` never holds), whatever authors this
    /// replica knows.
    fn in_past(&self, dot: &Dot, vc: &[u64]) -> bool {
        self.authors.get(&dot.author).is_some_and(|l| {
            l.all.iter().any(|&x| {
                self.lanes[x as usize].base < dot.seq
                    && vc.get(x as usize).is_some_and(|&v| v >= dot.seq)
            })
        })
    }

    /// Whether the event `id` is in the causal past `vc`.
    fn id_in_past(&self, id: &EventId, vc: &[u64]) -> bool {
        self.index
            .get(id)
            .is_some_and(|l| vc.get(l.lane as usize).is_some_and(|&v| v >= l.seq))
    }

    /// The writes a `Set` naming `dots` removes, in the causal past `vc`:
    /// every event at each dot there (one, unless its author forked and
    /// both branches are in the past).
    fn resolve(&self, dots: &[Dot], vc: &[u64]) -> Vec<WriteId> {
        let mut out = Vec::with_capacity(dots.len());
        for dot in dots {
            let Some(l) = self.authors.get(&dot.author) else {
                continue;
            };
            for &x in &l.all {
                let lane = &self.lanes[x as usize];
                if vc.get(x as usize).is_some_and(|&v| v >= dot.seq) {
                    if let Some(event) = lane.id_at(dot.seq) {
                        out.push(WriteId {
                            author: dot.author,
                            seq: dot.seq,
                            event,
                        });
                    }
                }
            }
        }
        out
    }

    /// Checks the ops of `event` against its causal past `vc`; returns the
    /// overdraft units of each op (0 but for an overdraft sale's units
    /// beyond the rights held, `seats` module).
    fn check_ops(&self, event: &Event, vc: &[u64]) -> Result<Vec<u64>, Invalid> {
        // Net change of the author's rights made by earlier ops of this event.
        let mut delta: Vec<(&str, i128)> = Vec::new();
        let mut units = vec![0; event.ops.len()];
        for (i, op) in event.ops.iter().enumerate() {
            match op {
                Op::Set {
                    field, supersedes, ..
                } => {
                    for dot in supersedes {
                        if !self.in_past(dot, vc) {
                            return Err(Invalid::SupersedesUnseen {
                                field: field.clone(),
                                dot: *dot,
                            });
                        }
                    }
                }
                Op::Add { .. } => {}
                Op::Text { field, change } => {
                    let doc = self
                        .streams
                        .get(&event.stream)
                        .and_then(|s| s.texts.get(field.as_str()));
                    let actor = text::actor(&event.author, event.seq, event.hlc, i);
                    text::check(doc, change, actor, |id| self.id_in_past(id, vc)).map_err(
                        |why| Invalid::BadText {
                            field: field.clone(),
                            why,
                        },
                    )?;
                }
                Op::EscrowPolicy {
                    counter,
                    supersedes,
                    ..
                } => {
                    for dot in supersedes {
                        if !self.in_past(dot, vc) {
                            return Err(Invalid::SupersedesUnseen {
                                field: counter.clone(),
                                dot: *dot,
                            });
                        }
                    }
                }
                Op::EscrowOverdraw {
                    counter, amount, ..
                } => {
                    let stream = self.streams.get(&event.stream);
                    let policy = self.policy_in_past(&event.stream, stream, counter, vc);
                    if policy.mode != PolicyMode::RiskWindow {
                        return Err(Invalid::OverdraftNotAllowed {
                            counter: counter.clone(),
                            mode: policy.mode,
                        });
                    }
                    let held =
                        self.rights_in_past(&event.stream, stream, counter, &event.author, vc);
                    let slot = delta_slot(&mut delta, counter);
                    let available = held + *slot;
                    // An amount and a bound are u64: far inside i128.
                    if available - (*amount as i128) < -(policy.max_overdraft as i128) {
                        return Err(Invalid::OverdraftExceeded {
                            counter: counter.clone(),
                            available,
                            wanted: *amount as u128,
                            max_overdraft: policy.max_overdraft,
                        });
                    }
                    units[i] = (*amount as i128 - available.max(0)).max(0) as u64;
                    *slot -= *amount as i128;
                }
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
        Ok(units)
    }

    /// The effective seat policy of `counter` in the causal past `vc`
    /// (`seats` module): the strictest of the policy writes there that no
    /// policy write there names, each in effect as judged in that past.
    fn policy_in_past(
        &self,
        name: &str,
        stream: Option<&Stream>,
        counter: &str,
        vc: &[u64],
    ) -> Policy {
        let Some(esc) = stream.and_then(|s| s.escrow.get(counter)) else {
            return Policy::new(PolicyMode::Escrow);
        };
        esc.book.policy_in_past(
            |w| self.id_in_past(&w.event, vc),
            |w, cmd| {
                self.command_entry(name, cmd)
                    .and_then(|c| c.members().find(|m| self.id_in_past(&m.id, vc)))
                    .is_none_or(|m| m.id == w.event)
            },
        )
    }

    /// Rights `author` holds on `counter` in the causal past `vc`: its own
    /// inits, transfers and consumption in that past (its whole chain,
    /// unless it forked: then only the branches in the past) and the
    /// transfers to it in the past, leaving out the ops of events that are
    /// duplicates in that past (see the module docs). Negative when the
    /// author spent rights that it turned out not to hold (an event it
    /// relied on is a duplicate, or it spent them on two branches): a debt.
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
        let beyond = self.authors.get(author).is_some_and(|l| {
            l.all
                .iter()
                .any(|&x| vc.get(x as usize).copied().unwrap_or(0) < self.lanes[x as usize].seq())
        });
        if beyond {
            // It forked, and events of another branch are not in the past:
            // they do not count.
            for &(lane, seq, change, _) in esc.own.get(author).into_iter().flatten() {
                if vc.get(lane as usize).is_none_or(|&v| v < seq) {
                    held -= change;
                }
            }
        }
        for cmd in &esc.contested {
            let Some(c) = self.command_entry(name, cmd) else {
                continue;
            };
            let mut past = c.members().filter(|m| self.id_in_past(&m.id, vc));
            // The first in the past takes effect there; the rest do not.
            past.next();
            for m in past {
                held += escrow_delta(&m.escrow, counter, &m.author, author);
            }
        }
        held
    }

    /// Applies a checked event; `units` are its ops' overdraft units
    /// ([`State::check_ops`]).
    fn apply(
        &mut self,
        event: &Event,
        id: EventId,
        place: Place,
        vc: Option<Vec<u64>>,
        units: &[u64],
    ) {
        let forked =
            matches!(place, Place::Branch { .. }) && self.authors.contains_key(&event.author);
        let ix = match place {
            Place::Extend(x) => x,
            Place::Branch { parent, base } => {
                let ix = self.lanes.len() as u32;
                self.lanes.push(Lane {
                    author: event.author,
                    base,
                    parent,
                    ids: Vec::new(),
                    head_hlc: Hlc::ZERO,
                    vc: Vec::new(),
                    hist: Vec::new(),
                });
                self.authors.entry(event.author).or_default().all.push(ix);
                ix
            }
        };
        // The writes each `Set` (or policy) removes, resolved in the
        // event's past.
        let resolved: Vec<Vec<WriteId>> = {
            let past = self.vc_or_own(Some(ix), &vc);
            event
                .ops
                .iter()
                .map(|op| match op {
                    Op::Set { supersedes, .. } | Op::EscrowPolicy { supersedes, .. } => {
                        self.resolve(supersedes, past)
                    }
                    _ => Vec::new(),
                })
                .collect()
        };
        let lane = &mut self.lanes[ix as usize];
        if let Some(mut vc) = vc {
            // Record where knowledge of other lanes grew.
            for (x, &v) in vc.iter().enumerate() {
                if x as u32 != ix && v > lane.vc.get(x).copied().unwrap_or(0) {
                    if lane.hist.len() <= x {
                        lane.hist.resize_with(x + 1, Vec::new);
                    }
                    lane.hist[x].push((event.seq, v));
                }
            }
            if vc.len() < lane.vc.len() {
                vc.resize(lane.vc.len(), 0);
            }
            lane.vc = vc;
        }
        if lane.vc.len() <= ix as usize {
            lane.vc.resize(ix as usize + 1, 0);
        }
        lane.vc[ix as usize] = event.seq;
        lane.ids.push(id);
        lane.head_hlc = event.hlc;
        self.index.insert(
            id,
            Loc {
                lane: ix,
                seq: event.seq,
                hlc: event.hlc,
            },
        );
        self.max_hlc = self.max_hlc.max(event.hlc);
        let me = WriteId {
            author: event.author,
            seq: event.seq,
            event: id,
        };
        let at = At {
            me,
            lane: ix,
            hlc: event.hlc,
        };
        let stream = match self.streams.get_mut(&event.stream) {
            Some(s) => s,
            None => self.streams.entry(event.stream.clone()).or_default(),
        };
        stream.version += 1;
        // Accounts whose balance may have changed: `(counter, node)`.
        let mut touched: Vec<(&str, NodeId)> = Vec::new();
        let mut undone: Option<(NodeId, Vec<Op>)> = None;
        // Whether this event is in effect, and the event it put out of
        // effect (its key and write), for the seat rules.
        let mut effect = true;
        let mut replaced: Option<Replaced> = None;
        // The policy writes each `EscrowPolicy` removes, in op order.
        let policy_names: Vec<Vec<WriteId>> = event
            .ops
            .iter()
            .zip(&resolved)
            .filter(|(op, _)| matches!(op, Op::EscrowPolicy { .. }))
            .map(|(_, r)| r.clone())
            .collect();
        'fold: {
            let Some(cmd) = &event.meta.command_id else {
                for (op, r) in event.ops.iter().zip(&resolved) {
                    apply_op(stream, op, r, at, false);
                }
                break 'fold;
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
                for (op, r) in event.ops.iter().zip(&resolved) {
                    apply_op(stream, op, r, at, true);
                }
                entries.insert(
                    cmd.clone(),
                    Command {
                        first: member,
                        rest: Vec::new(),
                        undo: undo_ops(&event.ops, resolved),
                    },
                );
                break 'fold;
            };
            let key = member.key();
            if key < c.first.key() {
                // It sorts first: the event in effect until now becomes a
                // duplicate, and this one takes effect.
                undo(stream, &c.undo, c.first.write());
                for (op, r) in event.ops.iter().zip(&resolved) {
                    apply_op(stream, op, r, at, true);
                }
                c.undo = undo_ops(&event.ops, resolved);
                let old = std::mem::replace(&mut c.first, member);
                undone = Some((old.author, old.escrow.clone()));
                replaced = Some(Replaced {
                    key: old.key(),
                    write: old.write(),
                    escrow: old.escrow.clone(),
                });
                c.rest.insert(0, old);
            } else {
                effect = false;
                for op in &event.ops {
                    apply_duplicate(stream, op, at);
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
        // What the event did to its author's own rights, per counter: every
        // escrow op made its counter's entry above.
        for op in event.ops.iter().filter(|op| op.is_escrow()) {
            let counter = op.target();
            let change = -escrow_delta(
                std::slice::from_ref(op),
                counter,
                &event.author,
                &event.author,
            );
            if let Some(e) = stream.escrow.get_mut(counter) {
                let own = e.own.entry(event.author).or_default();
                let spent = change < 0;
                match own.last_mut() {
                    Some(last) if last.0 == ix && last.1 == event.seq => {
                        last.2 += change;
                        last.3 |= spent;
                    }
                    _ => own.push((ix, event.seq, change, spent)),
                }
            }
        }
        let undone = undone
            .iter()
            .flat_map(|(by, ops)| ops.iter().map(move |op| (*by, op)));
        let ops = event.ops.iter().map(|op| (event.author, op)).chain(undone);
        for (by, op) in ops.filter(|(_, op)| op.is_escrow()) {
            touched.push((op.target(), by));
            if let Op::EscrowTransfer { to, .. } = op {
                touched.push((op.target(), *to));
            }
        }
        let mut marks: Vec<(String, String, NodeId)> = touched
            .into_iter()
            .map(|(c, a)| (event.stream.clone(), c.to_string(), a))
            .collect();
        if forked {
            // The author's spends past the fork, on every counter it used.
            for (n, s) in &self.streams {
                for (c, e) in &s.escrow {
                    if e.own.contains_key(&event.author) {
                        marks.push((n.clone(), c.clone(), event.author));
                    }
                }
            }
        }
        marks.sort_unstable();
        marks.dedup();
        let mut counters: Vec<(String, String)> = Vec::with_capacity(marks.len());
        for (n, c, a) in marks {
            self.mark_overdrawn(&n, &c, &a);
            counters.push((n, c));
        }
        counters.dedup();
        let seat = Seat {
            at,
            effect,
            replaced,
        };
        self.apply_seats(event, policy_names, units, seat, counters);
    }

    /// The seat rules' part of [`State::apply`] (`seats` module): records
    /// the event's policy writes and sales in effect (and puts out of
    /// effect those of the event it replaced as a command's first), then
    /// recomputes the policies, marks and compensation of the counters
    /// whose events or accounts changed (`counters`, ascending), and the
    /// compensation of the event's stream if it wrote an `oversold/` field.
    fn apply_seats(
        &mut self,
        event: &Event,
        policy_names: Vec<Vec<WriteId>>,
        units: &[u64],
        seat: Seat,
        counters: Vec<(String, String)>,
    ) {
        let Some(stream) = self.streams.get_mut(&event.stream) else {
            return;
        };
        let me = seat.at.me;
        let mut policy_changed: Vec<&str> = Vec::new();
        let policies = event.ops.iter().filter_map(|op| match op {
            Op::EscrowPolicy {
                counter, policy, ..
            } => Some((counter, policy)),
            _ => None,
        });
        for ((counter, policy), names) in policies.zip(policy_names) {
            let Some(e) = stream.escrow.get_mut(counter.as_str()) else {
                continue;
            };
            // Two policy ops of one event on one counter: the later one
            // stands (ops apply in order), and both remove what they name.
            match e.book.policies.get_mut(&me) {
                Some(w) => {
                    w.policy = *policy;
                    w.names.extend(names);
                }
                None => {
                    e.book.policies.insert(
                        me,
                        PolicyWrite {
                            policy: *policy,
                            names,
                            effect: seat.effect,
                            command: event.meta.command_id.clone(),
                        },
                    );
                }
            }
            policy_changed.push(counter);
        }
        if seat.effect {
            let key = (seat.at.hlc, me.author, me.seq, me.event);
            for (counter, sale) in seats::sales_of(&event.ops, units) {
                if let Some(e) = stream.escrow.get_mut(counter) {
                    e.book.add_sale(key, sale);
                }
            }
        }
        if let Some(old) = &seat.replaced {
            for op in &old.escrow {
                let Some(e) = stream.escrow.get_mut(op.target()) else {
                    continue;
                };
                match op {
                    Op::EscrowPolicy { counter, .. } => {
                        if let Some(p) = e.book.policies.get_mut(&old.write) {
                            p.effect = false;
                        }
                        policy_changed.push(counter);
                    }
                    Op::EscrowConsume { .. } | Op::EscrowOverdraw { .. } => {
                        e.book.remove_sale(&old.key);
                    }
                    _ => {}
                }
            }
        }
        for c in policy_changed {
            if let Some(e) = stream.escrow.get_mut(c) {
                seats::refresh_policies(e);
            }
        }
        let mut streams: Vec<&str> = Vec::new();
        if seat.replaced.is_some()
            || event.ops.iter().any(|op| {
                matches!(op, Op::Set { field, .. } if field.starts_with(seats::COMPENSATION_PREFIX))
            })
        {
            streams.push(&event.stream);
        }
        for (n, c) in &counters {
            let Some(e) = self.streams.get(n).and_then(|s| s.escrow.get(c)) else {
                continue;
            };
            let forked: Vec<NodeId> = e
                .overdrawn
                .keys()
                .filter(|a| self.is_forked(a))
                .copied()
                .collect();
            if let Some(e) = self.streams.get_mut(n).and_then(|s| s.escrow.get_mut(c)) {
                seats::remark(e, &|a| forked.contains(a));
            }
            streams.push(n);
        }
        streams.sort_unstable();
        streams.dedup();
        for n in streams {
            if let Some(s) = self.streams.get_mut(n) {
                seats::compensate(s);
            }
        }
    }

    /// Brings `author`'s entry in `counter`'s [`Escrow::overdrawn`] up to date.
    fn mark_overdrawn(&mut self, stream: &str, counter: &str, author: &NodeId) {
        let Some(e) = self.streams.get(stream).and_then(|s| s.escrow.get(counter)) else {
            return;
        };
        let balance = e.accounts.get(author).map_or(0, Account::balance);
        let entry = (balance < 0).then(|| {
            let fork = self.authors.get(author).and_then(|l| self.fork_seq(l));
            let mut events: Vec<EventId> = match fork {
                None => Vec::new(),
                Some(f) => e
                    .own
                    .get(author)
                    .into_iter()
                    .flatten()
                    // Every event that spent, even if an init of its own
                    // left its change to the author's rights positive.
                    .filter(|&&(_, seq, _, spent)| seq > f && spent)
                    .filter_map(|&(lane, seq, _, _)| self.lanes[lane as usize].id_at(seq))
                    .collect(),
            };
            events.sort_unstable();
            Overdrawn {
                owed: balance.unsigned_abs(),
                events,
            }
        });
        // Looked up above.
        let e = self
            .streams
            .get_mut(stream)
            .and_then(|s| s.escrow.get_mut(counter))
            .expect("escrow present");
        match entry {
            Some(o) => {
                e.overdrawn.insert(*author, o);
            }
            None => {
                e.overdrawn.remove(author);
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
            Made::New(event, ..) => Prepared::New(event),
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
            Made::New(event, place, vc, units) => {
                let (bytes, id) = event.seal();
                // `make` checked the event against this very state; a new
                // event by this author after its local head cannot be present.
                debug_assert!(!self.index.contains_key(&id));
                self.apply(&event, id, place, vc, &units);
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
        let own = self.local_lane(&author);
        let (seq, prev, mut after, place) = match own {
            Some(x) => {
                let l = &self.lanes[x as usize];
                (
                    l.seq() + 1,
                    l.ids.last().copied(),
                    l.head_hlc,
                    Place::Extend(x),
                )
            }
            None => (
                1,
                None,
                Hlc::ZERO,
                Place::Branch {
                    parent: None,
                    base: 0,
                },
            ),
        };
        let deps = self.unmerged_heads(own, Hlc::horizon(now_ms));
        if deps.len() > MAX_DOTS {
            return Err(PrepareError::TooManyDeps(deps.len()));
        }
        let dep_locs: Vec<Loc> = deps.iter().map(|d| self.index[d]).collect();
        for d in &dep_locs {
            after = after.max(d.hlc);
        }
        let vc = self.causal_vc(own, &dep_locs);
        let past = self.vc_or_own(own, &vc);
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
                let mut dots: Vec<Dot> = stream
                    .and_then(|s| s.fields.get(field.as_str()))
                    .map_or_else(Vec::new, |w| {
                        w.keys()
                            .filter(|w| self.id_in_past(&w.event, past))
                            .map(WriteId::dot)
                            .collect()
                    });
                // Two branches of a forked author may share a dot.
                dots.dedup();
                *supersedes = dots;
            } else if let Op::EscrowPolicy {
                counter,
                supersedes,
                ..
            } = op
            {
                // Likewise, the standing policies in the causal past.
                let mut dots: Vec<Dot> = stream
                    .and_then(|s| s.escrow.get(counter.as_str()))
                    .map_or_else(Vec::new, |e| {
                        e.policies
                            .keys()
                            .filter(|w| self.id_in_past(&w.event, past))
                            .map(WriteId::dot)
                            .collect()
                    });
                dots.dedup();
                *supersedes = dots;
            }
        }
        let hlc = clock.tick(now_ms, after);
        let mut edited: Vec<&str> = Vec::new();
        for e in &draft.texts {
            if edited.contains(&e.field.as_str()) {
                return Err(text::EditError::Twice(e.field.clone()).into());
            }
            edited.push(&e.field);
            // The op's index in the event: the actor derives from it.
            let actor = text::actor(&author, seq, hlc, ops.len());
            let doc = stream.and_then(|s| s.texts.get(e.field.as_str()));
            let change = text::edit(doc, e, actor, |id| self.id_in_past(id, past))?;
            ops.push(Op::Text {
                field: e.field.clone(),
                change,
            });
        }
        let event = Event {
            version: Event::version_for(&ops),
            author,
            seq,
            prev,
            deps,
            hlc,
            stream: draft.stream,
            kind: draft.kind,
            ops,
            payload: draft.payload,
            meta: draft.meta,
        };
        event.check().map_err(Invalid::from)?;
        let units = self.check_ops(&event, self.vc_or_own(own, &vc))?;
        Ok(Made::New(event, place, vc, units))
    }

    /// The deps of a new event on lane `own`: each other lane's latest
    /// event with an hlc at most `horizon` that `own` does not imply, minus
    /// those implied by another such event; sorted by id. The author's own
    /// other branches are lanes like any other: depending on them merges
    /// the branches in its past.
    ///
    /// The events at or below `horizon` are causally closed (hlcs grow
    /// along `prev` and `deps`), so these are the heads of that closed set:
    /// an event beyond the horizon, and every event whose causal past holds
    /// one, is left out (its hlc is above it), and none within is lost.
    fn unmerged_heads(&self, own: Option<u32>, horizon: Hlc) -> Vec<EventId> {
        let seen = own.map(|a| &self.lanes[a as usize].vc);
        let cands: Vec<(u32, u64)> = (0..self.lanes.len() as u32)
            .filter(|&x| Some(x) != own)
            .filter_map(|x| {
                let seen = seen.and_then(|vc| vc.get(x as usize)).copied().unwrap_or(0);
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
            .filter_map(|&(c, cseq)| self.lanes[c as usize].id_at(cseq))
            .collect();
        deps.sort_unstable();
        deps
    }

    /// The seq of lane `x`'s latest event with an hlc at most `limit` (0
    /// if none of its own events is). A lane's hlcs grow along it, so it is
    /// a binary search over its events, made only when the head is beyond.
    fn latest_within(&self, x: u32, limit: Hlc) -> u64 {
        let l = &self.lanes[x as usize];
        if l.head_hlc <= limit {
            return l.seq();
        }
        // Every id of a lane is in the index.
        match l.ids.partition_point(|id| self.index[id].hlc <= limit) as u64 {
            0 => 0,
            n => l.base + n,
        }
    }

    /// The largest hlc of any event at most `limit` ([`Hlc::ZERO`] if
    /// none): what a clock opened at wall time `now_ms` is seeded from,
    /// with `limit` = [`Hlc::horizon`]`(now_ms)`.
    pub fn max_hlc_within(&self, limit: Hlc) -> Hlc {
        if self.max_hlc <= limit {
            return self.max_hlc;
        }
        (0..self.lanes.len() as u32)
            .filter_map(|x| {
                let seq = self.latest_within(x, limit);
                let id = self.lanes[x as usize].id_at(seq)?;
                Some(self.index[&id].hlc)
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
        // By author id, then lane, so that ties go the same way on every
        // replica that learned the branches in the same order.
        for lanes in self.authors.values() {
            for &x in &lanes.all {
                let l = &self.lanes[x as usize];
                if l.head_hlc <= horizon {
                    continue;
                }
                let within = self.latest_within(x, horizon).max(l.base);
                out.events += l.seq() - within;
                if out.furthest.as_ref().is_none_or(|f| l.head_hlc > f.hlc) {
                    out.furthest = Some(AheadEvent {
                        author: l.author,
                        seq: l.seq(),
                        // A lane has at least one event.
                        id: *l.ids.last().expect("lane with no events"),
                        hlc: l.head_hlc,
                        ahead_ms: l.head_hlc.ms().saturating_sub(now_ms),
                    });
                }
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
            Op::EscrowConsume { counter: c, amount }
            | Op::EscrowOverdraw {
                counter: c, amount, ..
            } if c == counter && by == author => {
                d -= *amount as i128;
            }
            _ => {}
        }
    }
    // The rights a duplicate's ops would have changed go back.
    -d
}

/// `ops` as [`undo`] needs them, with the writes each `Set` removed.
fn undo_ops(ops: &[Op], resolved: Vec<Vec<WriteId>>) -> Vec<UndoOp> {
    ops.iter()
        .zip(resolved)
        .map(|(op, removed)| match op {
            Op::Set { field, .. } => UndoOp::Set {
                field: field.clone(),
                removed,
            },
            op => UndoOp::Other(op.clone()),
        })
        .collect()
}

/// Applies one op of an event in effect; `removes` are the writes a `Set`
/// supersedes, resolved in the event's past. `undoable`: the event carries
/// a command id, so the writes it removes are kept as graves.
fn apply_op(stream: &mut Stream, op: &Op, removes: &[WriteId], at: At, undoable: bool) {
    let author = at.me.author;
    match op {
        Op::Text { field, change } => record_text(stream, field, change, at, false),
        // The register lives in the counter's book (`State::apply_seats`).
        Op::EscrowPolicy { counter, .. } => {
            stream.escrow.entry(counter.clone()).or_default();
        }
        Op::Set { field, value, .. } => {
            let writes = match stream.fields.get_mut(field.as_str()) {
                Some(w) => w,
                None => stream.fields.entry(field.clone()).or_default(),
            };
            for d in removes {
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
                at.me,
                Written {
                    hlc: at.hlc,
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
            e.accounts.entry(author).or_default().init += *capacity as u128;
        }
        Op::EscrowTransfer {
            counter,
            to,
            amount,
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(author).or_default().sent += *amount as u128;
            e.accounts.entry(*to).or_default().received += *amount as u128;
            e.incoming
                .entry(*to)
                .or_default()
                .push((at.lane, at.me.seq, *amount));
        }
        Op::EscrowConsume { counter, amount }
        | Op::EscrowOverdraw {
            counter, amount, ..
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(author).or_default().consumed += *amount as u128;
            e.consumed += *amount as u128;
        }
    }
}

/// Records a text op's change on its field; `dup`: the event is a command
/// duplicate. The field exists from its first text op on, a duplicate's
/// included, as counters do.
fn record_text(stream: &mut Stream, field: &str, change: &[u8], at: At, dup: bool) {
    let t = match stream.texts.get_mut(field) {
        Some(t) => t,
        None => stream.texts.entry(field.to_string()).or_default(),
    };
    t.record(change, at.hlc, at.me.author, at.me.seq, at.me.event, dup);
}

/// Records one op of a duplicate: no effect on values, but the entries it
/// touches exist (as a replay would make them), and its escrow ops count
/// for validity.
fn apply_duplicate(stream: &mut Stream, op: &Op, at: At) {
    let author = at.me.author;
    match op {
        // Recorded, with no effect: a later change may name it.
        Op::Text { field, change } => record_text(stream, field, change, at, true),
        Op::EscrowPolicy { counter, .. } => {
            stream.escrow.entry(counter.clone()).or_default();
        }
        Op::Set { .. } => {}
        Op::Add { counter, .. } => {
            stream.counters.entry(counter.clone()).or_default();
        }
        Op::EscrowInit { counter, capacity } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(author).or_default();
            e.dup.entry(author).or_default().init += *capacity as u128;
        }
        Op::EscrowTransfer {
            counter,
            to,
            amount,
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(author).or_default();
            e.accounts.entry(*to).or_default();
            e.dup.entry(author).or_default().sent += *amount as u128;
            e.incoming
                .entry(*to)
                .or_default()
                .push((at.lane, at.me.seq, *amount));
        }
        Op::EscrowConsume { counter, amount }
        | Op::EscrowOverdraw {
            counter, amount, ..
        } => {
            let e = stream.escrow.entry(counter.clone()).or_default();
            e.accounts.entry(author).or_default();
            e.dup.entry(author).or_default().consumed += *amount as u128;
        }
    }
}

/// Undoes the ops (from [`undo_ops`]) of the event that made `me`, which
/// took effect and is now a duplicate: the stream becomes what it would be
/// had the event been a duplicate from the start.
fn undo(stream: &mut Stream, ops: &[UndoOp], me: WriteId) {
    let author = me.author;
    for op in ops {
        match op {
            UndoOp::Other(Op::Text { field, .. }) => {
                if let Some(t) = stream.texts.get_mut(field.as_str()) {
                    t.undo(me.event);
                }
            }
            // Put out of effect in the counter's book (`State::apply_seats`).
            UndoOp::Other(Op::EscrowPolicy { .. }) => {}
            UndoOp::Set { field, removed } => {
                // An earlier op of the event may have emptied the field.
                if let Some(writes) = stream.fields.get_mut(field.as_str()) {
                    writes.remove(&me);
                }
                if let Some(graves) = stream.graves.get_mut(field.as_str()) {
                    // Its own write, if an undoable event removed it, never
                    // stands again.
                    graves.remove(&me);
                    for d in removed {
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
            UndoOp::Other(Op::Add { counter, delta }) => {
                if let Some(c) = stream.counters.get_mut(counter.as_str()) {
                    *c -= *delta as i128;
                }
            }
            UndoOp::Other(Op::EscrowInit { counter, capacity }) => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.capacity -= *capacity as u128;
                e.accounts.entry(author).or_default().init -= *capacity as u128;
                e.dup.entry(author).or_default().init += *capacity as u128;
            }
            UndoOp::Other(Op::EscrowTransfer {
                counter,
                to,
                amount,
            }) => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.accounts.entry(author).or_default().sent -= *amount as u128;
                e.accounts.entry(*to).or_default().received -= *amount as u128;
                e.dup.entry(author).or_default().sent += *amount as u128;
            }
            UndoOp::Other(
                Op::EscrowConsume { counter, amount }
                | Op::EscrowOverdraw {
                    counter, amount, ..
                },
            ) => {
                let e = stream.escrow.entry(counter.clone()).or_default();
                e.accounts.entry(author).or_default().consumed -= *amount as u128;
                e.consumed -= *amount as u128;
                e.dup.entry(author).or_default().consumed += *amount as u128;
            }
            // `undo_ops` keeps a `Set` as `UndoOp::Set`.
            UndoOp::Other(Op::Set { .. }) => {}
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

    fn op_draft(stream: &str, ops: Vec<Op>) -> Draft {
        Draft {
            stream: stream.into(),
            kind: "Edited".into(),
            ops,
            ..Draft::default()
        }
    }

    fn set(field: &str, v: &str) -> Op {
        Op::Set {
            field: field.into(),
            value: v.as_bytes().to_vec(),
            supersedes: vec![],
        }
    }

    /// Inserts `events` in order, each once; panics on a refusal.
    fn fold(events: &[&(Event, EventId)]) -> State {
        let mut s = State::new();
        for (e, id) in events {
            assert_eq!(s.insert(e, *id), Ok(Inserted::New), "{id:?}");
        }
        s
    }

    /// A desk restored from a copy signs a second event at seq 3: every
    /// replica holding both branches keeps both, whatever order it learned
    /// them in, shows the same hash, surfaces the two writes of one field
    /// as a conflict, marks the seat sold twice, and lists the fork.
    #[test]
    fn forked_branches_are_both_kept_and_fold_alike_in_any_order() {
        let key = Keypair::from_secret([7; 32]);
        let a = key.node_id();
        let mut clock = HlcClock::default();
        let mut base = State::new();
        let made = |s: &mut State, clock: &mut HlcClock, wall: u64, d: Draft| {
            let Appended::New { event, id, .. } = s.append_local(a, clock, wall, d).unwrap() else {
                panic!("new event expected");
            };
            (event, id)
        };
        let e1 = made(
            &mut base,
            &mut clock,
            T,
            op_draft(
                "session/1",
                vec![Op::EscrowInit {
                    counter: "seats".into(),
                    capacity: 1,
                }],
            ),
        );
        let e2 = made(
            &mut base,
            &mut clock,
            T + 1,
            op_draft("attendee/1", vec![set("name", "\"Ada\"")]),
        );
        // The copy, taken here, and the original go separate ways.
        let mut copy = base.clone();
        let mut copy_clock = clock.clone();
        let sell = |_branch: &str| {
            op_draft(
                "session/1",
                vec![Op::EscrowConsume {
                    counter: "seats".into(),
                    amount: 1,
                }],
            )
        };
        let x3 = made(
            &mut base,
            &mut clock,
            T + 10,
            op_draft("attendee/1", vec![set("name", "\"Ada L\"")]),
        );
        let x4 = made(&mut base, &mut clock, T + 11, sell("x"));
        let y3 = made(
            &mut copy,
            &mut copy_clock,
            T + 20,
            op_draft("attendee/1", vec![set("name", "\"Ada B\"")]),
        );
        let y4 = made(&mut copy, &mut copy_clock, T + 21, sell("y"));
        assert_eq!((x3.0.seq, y3.0.seq), (3, 3));
        let orders: [Vec<&(Event, EventId)>; 3] = [
            vec![&e1, &e2, &x3, &x4, &y3, &y4],
            vec![&e1, &e2, &y3, &y4, &x3, &x4],
            vec![&e1, &e2, &y3, &x3, &x4, &y4],
        ];
        let states: Vec<State> = orders.iter().map(|o| fold(o)).collect();
        for s in &states[1..] {
            assert_eq!(s.state_hash(), states[0].state_hash());
            assert_eq!(s.frontier(), states[0].frontier());
            assert_eq!(s.forks(), states[0].forks());
        }
        let s = &states[0];
        assert_eq!(s.len(), 6);
        let forks = s.forks();
        assert_eq!(forks.len(), 1);
        assert_eq!(forks[0].author, a);
        assert_eq!(forks[0].seq, 3);
        let mut at3 = vec![x3.1, y3.1];
        at3.sort();
        assert_eq!(forks[0].events, at3);
        assert_eq!(forks[0].heads.len(), 2);
        assert_eq!(s.frontier().len(), 2, "one head per branch");
        // Both names stand: a conflict, nothing dropped.
        let names = &s.stream("attendee/1").unwrap().fields["name"];
        let values: Vec<&[u8]> = names.values().map(|w| &w.value[..]).collect();
        assert_eq!(values.len(), 2, "{values:?}");
        // One seat, sold on both branches: marked the same everywhere.
        let seats = &s.stream("session/1").unwrap().escrow["seats"];
        assert_eq!((seats.capacity, seats.consumed), (1, 2));
        let mut spent = vec![x4.1, y4.1];
        spent.sort();
        assert_eq!(
            seats.overdrawn.get(&a),
            Some(&Overdrawn {
                owed: 1,
                events: spent
            })
        );
        // Each branch was valid in its own past: both sales passed.
        // A third node that saw both writes resolves the conflict with one
        // write naming the dot (a, 3), which names both events.
        let mut c = states[1].clone();
        let mut cc = HlcClock::default();
        let ck = Keypair::from_secret([8; 32]).node_id();
        let Appended::New {
            event: r, id: rid, ..
        } = c
            .append_local(
                ck,
                &mut cc,
                T + 100,
                op_draft("attendee/1", vec![set("name", "\"Ada King\"")]),
            )
            .unwrap()
        else {
            panic!("new event expected");
        };
        let Op::Set { supersedes, .. } = &r.ops[0] else {
            unreachable!()
        };
        assert_eq!(supersedes.len(), 1, "one dot for both branches' writes");
        let names = &c.stream("attendee/1").unwrap().fields["name"];
        assert_eq!(names.len(), 1);
        let mut d = states[2].clone();
        assert_eq!(d.insert(&r, rid), Ok(Inserted::New));
        assert_eq!(d.state_hash(), c.state_hash());
    }

    /// The forked author keeps working on its own branch: its next event
    /// extends the branch it made, depends on the other one (merging them
    /// in its past), and owes the seat it sold twice before it may sell.
    #[test]
    fn a_forked_author_extends_its_own_branch_and_repays_first() {
        let key = Keypair::from_secret([9; 32]);
        let a = key.node_id();
        let mut s0 = State::new();
        let mut clock = HlcClock::default();
        let init = op_draft(
            "session/1",
            vec![Op::EscrowInit {
                counter: "seats".into(),
                capacity: 2,
            }],
        );
        let sell = op_draft(
            "session/1",
            vec![Op::EscrowConsume {
                counter: "seats".into(),
                amount: 2,
            }],
        );
        let Appended::New {
            event: e1, id: i1, ..
        } = s0.append_local(a, &mut clock, T, init).unwrap()
        else {
            panic!()
        };
        let mut other = s0.clone();
        let mut oclock = clock.clone();
        let Appended::New {
            event: x2, id: ix2, ..
        } = other
            .append_local(a, &mut oclock, T + 5, sell.clone())
            .unwrap()
        else {
            panic!()
        };
        let Appended::New { id: iy2, .. } = s0.append_local(a, &mut clock, T + 6, sell).unwrap()
        else {
            panic!()
        };
        // The restored desk learns of the other branch.
        assert_eq!(s0.insert(&x2, ix2), Ok(Inserted::New));
        assert!(s0.is_forked(&a));
        assert_eq!(s0.event_id(&a, 2), Some(iy2), "its own branch");
        let Appended::New { event: y3, .. } = s0
            .append_local(
                a,
                &mut clock,
                T + 7,
                op_draft("attendee/1", vec![set("badge", "true")]),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!((y3.seq, y3.prev), (3, Some(iy2)));
        assert_eq!(y3.deps, vec![ix2], "merges the other branch");
        // Rights: 2 held at the fork, 4 sold: 2 owed, no more sales.
        let err = s0
            .append_local(
                a,
                &mut clock,
                T + 8,
                op_draft(
                    "session/1",
                    vec![Op::EscrowConsume {
                        counter: "seats".into(),
                        amount: 1,
                    }],
                ),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                PrepareError::Invalid(Invalid::InsufficientRights { .. })
            ),
            "{err}"
        );
        let seats = &s0.stream("session/1").unwrap().escrow["seats"];
        assert_eq!(seats.overdrawn[&a].owed, 2);
        let _ = (e1, i1);
    }
}
