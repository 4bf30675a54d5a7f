//! Commands take effect once (the parent module's docs): the events of a
//! stream that carry one command id, which of them took effect, and how an
//! event's effects are recorded without effect (a duplicate) or undone
//! (when an event that sorts before it arrives).

use std::collections::BTreeMap;

use super::model::{Stream, WriteId};
use crate::event::Op;
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};

/// The events of one stream carrying one command id, as this replica holds
/// them.
#[derive(Clone, Debug)]
pub(super) struct Command {
    /// The event that took effect: the first in canonical order.
    pub(super) first: Member,
    /// The others, ascending in canonical order (almost always none).
    pub(super) rest: Vec<Member>,
    /// The first member's ops: what to undo should an event that sorts
    /// before it arrive.
    pub(super) undo: Vec<UndoOp>,
}

impl Command {
    /// Every member, ascending in canonical order.
    pub(super) fn members(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// One event of a [`Command`].
#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) hlc: Hlc,
    pub(super) author: NodeId,
    pub(super) seq: u64,
    pub(super) id: EventId,
    /// The stream's version right after this replica inserted it.
    pub(super) version: u64,
    /// Its escrow ops, for rights in a causal past.
    pub(super) escrow: Vec<Op>,
}

impl Member {
    /// The canonical order's key.
    pub(super) fn key(&self) -> (Hlc, NodeId, u64, EventId) {
        (self.hlc, self.author, self.seq, self.id)
    }

    pub(super) fn write(&self) -> WriteId {
        WriteId {
            author: self.author,
            seq: self.seq,
            event: self.id,
        }
    }
}

/// An event being applied: its write, lane and hlc.
#[derive(Clone, Copy, Debug)]
pub(super) struct At {
    pub(super) me: WriteId,
    pub(super) lane: u32,
    pub(super) hlc: Hlc,
}

/// One op of a command's first event, as [`undo`] needs it: register
/// values are read back from the stream, so a `Set` keeps only its field
/// and the writes it removed.
#[derive(Clone, Debug)]
pub(super) enum UndoOp {
    Set {
        field: String,
        removed: Vec<WriteId>,
    },
    Other(Op),
}

/// The change `ops` (escrow ops of one event by `by`) make to the rights
/// of `author` on `counter`.
pub(super) fn escrow_delta(ops: &[Op], counter: &str, by: &NodeId, author: &NodeId) -> i128 {
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
pub(super) fn undo_ops(ops: &[Op], resolved: Vec<Vec<WriteId>>) -> Vec<UndoOp> {
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

/// Records a text op's change on its field; `dup`: the event is a command
/// duplicate. The field exists from its first text op on, a duplicate's
/// included, as counters do.
pub(super) fn record_text(stream: &mut Stream, field: &str, change: &[u8], at: At, dup: bool) {
    let t = match stream.texts.get_mut(field) {
        Some(t) => t,
        None => stream.texts.entry(field.to_string()).or_default(),
    };
    t.record(change, at.hlc, at.me.author, at.me.seq, at.me.event, dup);
}

/// Records one op of a duplicate: no effect on values, but the entries it
/// touches exist (as a replay would make them), and its escrow ops count
/// for validity.
pub(super) fn apply_duplicate(stream: &mut Stream, op: &Op, at: At) {
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
pub(super) fn undo(stream: &mut Stream, ops: &[UndoOp], me: WriteId) {
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
