//! Local events: a command ([`Draft`]) turned into an event of this node
//! ([`State::prepare`], [`State::append_local`]), with its deps taken
//! within the clock's horizon (the parent module's docs), and what lies
//! beyond that horizon ([`State::ahead`]).

use super::check::Invalid;
use super::lanes::{Loc, Place};
use super::model::{CommandRecord, WriteId};
use super::State;
use crate::event::{Event, Meta, Op, MAX_DOTS};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{Dot, EventId, NodeId};
use crate::text::{self, TextEdit};

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
pub(super) enum Made {
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

impl State {
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

    pub(super) fn make(
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
    pub(super) fn unmerged_heads(&self, own: Option<u32>, horizon: Hlc) -> Vec<EventId> {
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
    pub(super) fn latest_within(&self, x: u32, limit: Hlc) -> u64 {
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Keypair;
    use crate::hlc::MAX_CLOCK_AHEAD_MS;
    use crate::state::Inserted;

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
