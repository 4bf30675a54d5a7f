//! The read model: what a stream shows (registers, counters, escrow
//! accounts, duplicates, text fields), and the other records a state hands
//! out. The streams are what `State::canonical_read_model` encodes; the
//! fold that fills them is in `apply` and `command`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::event::Policy;
use crate::hlc::Hlc;
use crate::id::{Dot, EventId, NodeId};
use crate::seats::{Book, Compensated, Oversold};
use crate::text::{self, Text};

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
    pub(super) incoming: BTreeMap<NodeId, Vec<(u32, u64, u64)>>,
    /// The ops of events that are duplicates on this replica, by author
    /// (`received` unused): with `accounts`, the sums over every event.
    #[serde(skip)]
    pub(super) dup: BTreeMap<NodeId, Account>,
    /// Command ids of this stream carried by more than one event, one of
    /// which has an op on this counter: validity looks at them.
    #[serde(skip)]
    pub(super) contested: BTreeSet<String>,
    /// Per author, what each of its events (duplicates included) did to
    /// its own rights: `(lane, seq, change, spent)`, `spent` if an op
    /// consumed or transferred rights (an init in the same event may make
    /// the change positive). For the rights of a forked author, whose other
    /// branches are not in an event's causal past, and its spends past the
    /// fork ([`Overdrawn::events`]).
    #[serde(skip)]
    pub(super) own: BTreeMap<NodeId, Vec<(u32, u64, i128, bool)>>,
    /// Accounts that spent more rights than they hold: a forked author that
    /// spent the rights it held at the fork on two branches, a node that relied
    /// on an init or transfer that turned out to be a duplicate, or a node that
    /// sold beyond its rights under a `risk-window` policy
    /// ([`Op::EscrowOverdraw`](crate::event::Op::EscrowOverdraw)). While this
    /// is not empty the counter may be oversold (`consumed` can exceed
    /// `capacity`); it is a function of the events, so every replica holding
    /// them shows the same.
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
    pub(super) graves: BTreeMap<String, BTreeMap<WriteId, Grave>>,
    /// Text fields ([`crate::text`]): each one's changes, automerge
    /// document and read model. Encoded after the streams, not in them
    /// ([`State::canonical_read_model`](super::State::canonical_read_model)).
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
pub(super) struct Grave {
    pub(super) written: Written,
    /// Events in effect that name the write in `supersedes`; at zero it
    /// stands again.
    pub(super) namers: u32,
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

/// An author that signed two events with one seq: where its branches
/// diverge first ([`State::forks`](super::State::forks)).
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
