//! Chains and causal pasts: the lanes an author's events sit on, and the
//! vector clocks over them that answer "is this event in that one's past".
//!
//! A lane is a run of one author's chain as this replica learned it (the
//! parent module's docs describe the scheme). Everything here reads the
//! bookkeeping; `insert` and `apply` are what extend it.

use std::collections::BTreeSet;

use super::model::{Fork, WriteId};
use super::State;
use crate::hlc::Hlc;
use crate::id::{Dot, EventId, NodeId};

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
pub(super) struct Loc {
    pub(super) lane: u32,
    pub(super) seq: u64,
    pub(super) hlc: Hlc,
}

/// A run of one author's chain, as this replica learned it. An author that
/// never forked has one lane, seq 1 up to its head. A fork adds a lane: the
/// events of the new branch from the seq where it diverges, whose earlier
/// seqs are those of its `parent` lane up to `base` (none for a second
/// seq 1). Lanes are this replica's bookkeeping, numbered in the order it
/// learned them; nothing encoded or hashed depends on them.
#[derive(Clone, Debug)]
pub(super) struct Lane {
    pub(super) author: NodeId,
    /// Seqs `1..=base` are on `parent`.
    pub(super) base: u64,
    pub(super) parent: Option<u32>,
    /// `ids[i]` is the id of seq `base + i + 1`.
    pub(super) ids: Vec<EventId>,
    pub(super) head_hlc: Hlc,
    /// Vector clock of the head, dense by lane index (missing = 0): per
    /// lane, the highest seq of it in the head's causal past.
    pub(super) vc: Vec<u64>,
    /// Per other lane: `(own seq, other's seq)` each time knowledge grew.
    pub(super) hist: Vec<Vec<(u64, u64)>>,
}

impl Lane {
    /// The head's seq.
    pub(super) fn seq(&self) -> u64 {
        self.base + self.ids.len() as u64
    }

    /// The id at `seq`, if this lane holds that seq itself.
    pub(super) fn id_at(&self, seq: u64) -> Option<EventId> {
        let i = seq.checked_sub(self.base + 1)?;
        self.ids.get(usize::try_from(i).ok()?).copied()
    }
}

/// One author's lanes.
#[derive(Clone, Debug, Default)]
pub(super) struct Lanes {
    /// In the order this replica learned them. Local events extend the
    /// first: the chain this replica learned first, which for its own
    /// author is the one in its own log (a restored desk's own branch).
    pub(super) all: Vec<u32>,
}

/// Where a new event goes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Place {
    /// It extends a lane's head.
    Extend(u32),
    /// It starts a lane: after `parent`'s seq `base`, or a new seq 1.
    Branch { parent: Option<u32>, base: u64 },
}

impl State {
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
    pub(super) fn lane_chain_id(&self, mut x: u32, seq: u64) -> Option<EventId> {
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
    pub(super) fn fork_seq(&self, lanes: &Lanes) -> Option<u64> {
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
    pub(super) fn local_lane(&self, author: &NodeId) -> Option<u32> {
        self.authors.get(author)?.all.first().copied()
    }

    pub(super) fn vc_at(&self, a: u32, seq: u64, other: u32) -> u64 {
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
    pub(super) fn causal_vc(&self, own: Option<u32>, deps: &[Loc]) -> Option<Vec<u64>> {
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
    pub(super) fn vc_or_own<'a>(&'a self, own: Option<u32>, vc: &'a Option<Vec<u64>>) -> &'a [u64] {
        match vc {
            Some(v) => v,
            None => own.map_or(&[], |a| &self.lanes[a as usize].vc),
        }
    }

    /// Whether an event at `dot` is in the causal past `vc`. A dot with
    /// seq 0 names no event (`base < 0` never holds), whatever authors this
    /// replica knows.
    pub(super) fn in_past(&self, dot: &Dot, vc: &[u64]) -> bool {
        self.authors.get(&dot.author).is_some_and(|l| {
            l.all.iter().any(|&x| {
                self.lanes[x as usize].base < dot.seq
                    && vc.get(x as usize).is_some_and(|&v| v >= dot.seq)
            })
        })
    }

    /// Whether the event `id` is in the causal past `vc`.
    pub(super) fn id_in_past(&self, id: &EventId, vc: &[u64]) -> bool {
        self.index
            .get(id)
            .is_some_and(|l| vc.get(l.lane as usize).is_some_and(|&v| v >= l.seq))
    }

    /// The writes a `Set` naming `dots` removes, in the causal past `vc`:
    /// every event at each dot there (one, unless its author forked and
    /// both branches are in the past).
    pub(super) fn resolve(&self, dots: &[Dot], vc: &[u64]) -> Vec<WriteId> {
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
}
