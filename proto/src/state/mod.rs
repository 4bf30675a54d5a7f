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
//! effects are kept in a form that can be undone (`Command::undo`), and
//! every register write that a command's event removed is kept, with the
//! number of events in effect that name it (`Grave`), until no event can
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
//!
//! # Layout
//!
//! The fold's parts, each in its own file; none imports one that imports
//! it back:
//!
//! - `model`: the read model a stream shows, and the records a state hands
//!   out ([`Stream`], [`Escrow`], [`WriteId`], [`CommandRecord`], [`Fork`]);
//! - `lanes`: chains and causal pasts (lanes, vector clocks, branch heads);
//! - `command`: commands that take effect once: duplicates and undo;
//! - `check`: validity against the causal past ([`Invalid`]);
//! - `apply`: applying a checked event, the seat rules included;
//! - `local`: local events ([`Draft`], [`State::prepare`]) and the
//!   clock's horizon.
//!
//! [`State::insert`], the one door, is here: it checks, then applies.

use std::collections::{BTreeMap, HashMap};

use crate::event::Event;
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::text::Text;

use command::Command;
use lanes::{Lane, Lanes, Loc, Place};

mod apply;
mod check;
mod command;
mod lanes;
mod local;
mod model;

pub use check::{Inserted, Invalid};
pub use lanes::Slot;
pub use local::{Ahead, AheadEvent, Appended, Draft, PrepareError, Prepared};
pub use model::{
    shown, Account, CommandRecord, Duplicated, Escrow, Fork, Overdrawn, Stream, WriteId, Written,
};

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Keypair, Op};
    use crate::hlc::HlcClock;

    /// A wall time: 2023-11-14.
    const T: u64 = 1_700_000_000_000;

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
