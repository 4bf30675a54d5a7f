//! Applying a checked event: its lane, its command (which may put another
//! event out of effect, or this one), its ops on registers, counters,
//! escrow and text fields, and the seat rules that follow (`seats`
//! module). Nothing here can fail: [`State::insert`] and
//! [`State::prepare`] checked the event first.

use super::command::{
    apply_duplicate, escrow_delta, record_text, undo, undo_ops, At, Command, Member,
};
use super::lanes::{Lane, Loc, Place};
use super::model::{Account, Duplicated, Grave, Overdrawn, Stream, WriteId, Written};
use super::State;
use crate::event::{Event, Op};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::seats::{self, PolicyWrite};

/// What [`State::apply_seats`] needs of an event being applied.
pub(super) struct Seat {
    pub(super) at: At,
    /// Whether the event is in effect.
    pub(super) effect: bool,
    /// The event it put out of effect as its command's first.
    pub(super) replaced: Option<Replaced>,
}

/// An event put out of effect by one of its command that sorts first.
pub(super) struct Replaced {
    pub(super) key: seats::Key,
    pub(super) write: WriteId,
    /// Its escrow ops.
    pub(super) escrow: Vec<Op>,
}

impl State {
    /// Applies a checked event; `units` are its ops' overdraft units
    /// ([`State::check_ops`]).
    pub(super) fn apply(
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
    pub(super) fn apply_seats(
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

    /// Brings `author`'s entry in `counter`'s
    /// [`Escrow::overdrawn`](super::Escrow::overdrawn) up to date.
    pub(super) fn mark_overdrawn(&mut self, stream: &str, counter: &str, author: &NodeId) {
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
}

/// Applies one op of an event in effect; `removes` are the writes a `Set`
/// supersedes, resolved in the event's past. `undoable`: the event carries
/// a command id, so the writes it removes are kept as graves.
pub(super) fn apply_op(stream: &mut Stream, op: &Op, removes: &[WriteId], at: At, undoable: bool) {
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
