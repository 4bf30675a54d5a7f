//! Validity: whether an event may enter this replica, judged from the
//! event and its causal past alone (`DESIGN.md` §2), so that every replica
//! judges it alike. Its chain (`place`), then its ops: supersedes,
//! text changes, escrow rights and the seat policy in that past.

use super::command::escrow_delta;
use super::lanes::{Loc, Place};
use super::model::{Account, Stream};
use super::State;
use crate::event::{Event, EventError, Op, Policy, PolicyMode};
use crate::hlc::Hlc;
use crate::id::{Dot, EventId, NodeId};
use crate::text;

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

impl State {
    /// Where `event` goes, if its chain is sound here.
    pub(super) fn place(&self, event: &Event) -> Result<(Place, Option<Loc>), Invalid> {
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

    /// Checks the ops of `event` against its causal past `vc`; returns the
    /// overdraft units of each op (0 but for an overdraft sale's units
    /// beyond the rights held, `seats` module).
    pub(super) fn check_ops(&self, event: &Event, vc: &[u64]) -> Result<Vec<u64>, Invalid> {
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
    pub(super) fn policy_in_past(
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
    pub(super) fn rights_in_past(
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
}

pub(super) fn delta_slot<'a, 'b>(
    delta: &'b mut Vec<(&'a str, i128)>,
    counter: &'a str,
) -> &'b mut i128 {
    let i = match delta.iter().position(|(c, _)| *c == counter) {
        Some(i) => i,
        None => {
            delta.push((counter, 0));
            delta.len() - 1
        }
    };
    &mut delta[i].1
}
