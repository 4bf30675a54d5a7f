//! Seat admission: the rules a selling node judges by its own clock and its
//! own connectivity, before a sale becomes an event.
//!
//! Validity ([`State::insert`]) is what every replica checks, and reads only
//! the event's causal past: the effective seat policy there
//! ([`State::policy_of`]) and, for an [`Op::EscrowOverdraw`], that the
//! author's rights after it are no lower than minus the policy's
//! `max_overdraft`. Whether the node *should* have sold depends on things no
//! other replica can judge the same way: how long ago its last successful
//! sync round was, by its own clock, and how much of the capacity was unsold
//! at that round. Judged by another clock, replicas would split; so these are
//! the seller's own admission rules, applied here, and the figures it judged
//! by go into the overdraft event for audit (`synced_ms_ago`,
//! `remaining_at_sync`), read by people and by nobody's validity.
//!
//! Per policy mode, for a sale (`EscrowConsume`) of `n` seats by this node
//! at wall time `now`, with `held` its rights on the counter now:
//! - `escrow`: the sale goes to validity as it is; it needs `held >= n`.
//! - `strict`: refused while no sync round ended within `window_s` of `now`
//!   (or none ever did since start); otherwise as `escrow`.
//! - `risk-window`: if `held >= n`, as `escrow`. Otherwise the sale becomes
//!   an overdraft sale when all three hold: the last successful round ended
//!   within `window_s`; at that round at least `min_remaining_pct` % of the
//!   capacity was unsold; and `held - n >= -max_overdraft`. If one fails,
//!   the sale is refused naming it.
//!
//! Transfers, inits and policy changes are not sales: admission leaves them
//! to validity.
//!
//! **Remaining at the last round**, cheaply. At each round the capacity left
//! unsold is snapshotted only for the counters an event touched since the
//! round before; and the first event after a round to touch a counter never
//! snapshotted snapshots it just before it applies ([`Connectivity::touched`]
//! is called before the state changes), since until then the counter had
//! what it had at the round. A counter with no snapshot was untouched since
//! before the last round, so its remaining now is its remaining then. A
//! round costs the counters that moved, not every counter of the replica.

use std::collections::{BTreeMap, BTreeSet};

use crate::event::{Compensation, Meta, Op, Policy, PolicyMode};
use crate::id::{EventId, NodeId};
use crate::seats::{self, By, Compensated};
use crate::state::{Draft, State};

/// What a node knows of its own connectivity: when its last sync round
/// ended, and what each escrow counter had left unsold then.
#[derive(Clone, Debug, Default)]
pub struct Connectivity {
    last_round_ms: Option<u64>,
    /// Capacity unsold at the last round that found the counter touched.
    at_round: BTreeMap<(String, String), u64>,
    /// Counters an event touched since the last round.
    touched: BTreeSet<(String, String)>,
}

impl Connectivity {
    /// A node that has not synced yet.
    pub fn new() -> Connectivity {
        Connectivity::default()
    }

    /// Notes the escrow counters an event of `stream` with `ops` touches,
    /// BEFORE it is applied to `state`: a counter untouched since the last
    /// round keeps, as its remaining at that round, what it has now.
    pub fn touched(&mut self, state: &State, stream: &str, ops: &[Op]) {
        for op in ops.iter().filter(|op| op.is_escrow()) {
            let key = (stream.to_string(), op.target().to_string());
            if self.touched.contains(&key) {
                continue;
            }
            if self.last_round_ms.is_some() && !self.at_round.contains_key(&key) {
                let left = remaining(state, stream, op.target());
                self.at_round.insert(key.clone(), left);
            }
            self.touched.insert(key);
        }
    }

    /// A sync round ended in sync (or done) at wall time `now_ms`
    /// ([`crate::peers::PeerEvent::Synced`]): snapshots what the counters
    /// touched since the last round have left.
    pub fn handle_synced(&mut self, state: &State, now_ms: u64) {
        for (stream, counter) in std::mem::take(&mut self.touched) {
            let left = remaining(state, &stream, &counter);
            self.at_round.insert((stream, counter), left);
        }
        self.last_round_ms = Some(self.last_round_ms.map_or(now_ms, |l| l.max(now_ms)));
    }

    /// When the last sync round ended, by this node's wall clock.
    pub fn last_round_ms(&self) -> Option<u64> {
        self.last_round_ms
    }

    /// Capacity of `counter` in `stream` unsold at the last round (module
    /// docs), or `None` before the first round.
    pub fn remaining_at_round(&self, state: &State, stream: &str, counter: &str) -> Option<u64> {
        self.last_round_ms?;
        let key = (stream.to_string(), counter.to_string());
        Some(match self.at_round.get(&key) {
            Some(&left) => left,
            // Untouched since before the last round.
            None => remaining(state, stream, counter),
        })
    }

    /// Milliseconds since the last round at `now_ms` (0 if the clock
    /// stepped back past it), `None` before the first.
    fn since_ms(&self, now_ms: u64) -> Option<u64> {
        self.last_round_ms.map(|at| now_ms.saturating_sub(at))
    }
}

/// Capacity of an escrow counter not consumed, saturating at 0 and at
/// `u64::MAX`.
pub fn remaining(state: &State, stream: &str, counter: &str) -> u64 {
    state
        .stream(stream)
        .and_then(|s| s.escrow.get(counter))
        .map_or(0, |e| {
            u64::try_from(e.capacity.saturating_sub(e.consumed)).unwrap_or(u64::MAX)
        })
}

/// Rights `node` holds on `counter` now (negative: a debt).
pub fn held(state: &State, stream: &str, counter: &str, node: &NodeId) -> i128 {
    state
        .stream(stream)
        .and_then(|s| s.escrow.get(counter))
        .and_then(|e| e.accounts.get(node))
        .map_or(0, |a| a.balance())
}

/// Why a sale was refused before it became an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// `strict`: no sync round ended within the window.
    #[error(
        "escrow {counter:?} of {stream:?} is strict: no sale while no peer was reached in the \
         last {window_s} s ({})",
        since(*.since_ms)
    )]
    Disconnected {
        /// The stream.
        stream: String,
        /// The counter.
        counter: String,
        /// The policy's window, seconds.
        window_s: u32,
        /// Milliseconds since the last round, `None` if none yet.
        since_ms: Option<u64>,
    },
    /// A staff decision names a sale that is not marked oversold here.
    #[error("sale {sale} is not marked oversold on this node")]
    NotOversold {
        /// The sale.
        sale: EventId,
    },
    /// A staff decision came after the policy's override window.
    #[error(
        "sale {sale}: the automatic compensation ({}) can be overridden for {override_s} s \
         after it, and that time has passed",
        auto.name()
    )]
    OverrideClosed {
        /// The sale.
        sale: EventId,
        /// The policy's override window, seconds.
        override_s: u32,
        /// The automatic compensation standing.
        auto: Compensation,
    },
    /// `risk-window`: the rights held do not cover the sale, and an
    /// overdraft is not admitted now.
    #[error(
        "escrow {counter:?} of {stream:?}: this node holds rights to {held}, the sale needs \
         {wanted}, and it may not overdraw: {why}"
    )]
    NoOverdraft {
        /// The stream.
        stream: String,
        /// The counter.
        counter: String,
        /// Rights held (negative: owed).
        held: i128,
        /// Seats wanted.
        wanted: u64,
        /// Which condition failed.
        why: String,
    },
}

fn since(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("last round {} s ago", ms / 1000),
        None => "no round since this node started".into(),
    }
}

/// Applies the admission rules (module docs) to the sales of `draft`,
/// made by `me` at wall time `now_ms`: refuses it, or turns each sale that
/// a risk window admits beyond the rights held into an
/// [`Op::EscrowOverdraw`] with its audit figures.
pub fn admit(
    state: &State,
    me: &NodeId,
    conn: &Connectivity,
    draft: &mut Draft,
    now_ms: u64,
) -> Result<(), Refused> {
    // Rights used by earlier sales of this draft, per counter.
    let mut used: BTreeMap<String, i128> = BTreeMap::new();
    let stream = draft.stream.clone();
    for op in &mut draft.ops {
        let Op::EscrowConsume { counter, amount } = op else {
            continue;
        };
        let (counter, amount) = (counter.clone(), *amount);
        let policy = state.policy_of(&stream, &counter);
        let since_ms = conn.since_ms(now_ms);
        let within = |window_s: u32| since_ms.is_some_and(|ms| ms <= u64::from(window_s) * 1000);
        let slot = used.entry(counter.clone()).or_default();
        let held = held(state, &stream, &counter, me) - *slot;
        *slot += i128::from(amount);
        match policy.mode {
            PolicyMode::Escrow => {}
            PolicyMode::Strict => {
                if !within(policy.window_s) {
                    return Err(Refused::Disconnected {
                        stream,
                        counter,
                        window_s: policy.window_s,
                        since_ms,
                    });
                }
            }
            PolicyMode::RiskWindow => {
                if held >= i128::from(amount) {
                    continue;
                }
                let refuse = |why: String| Refused::NoOverdraft {
                    stream: stream.clone(),
                    counter: counter.clone(),
                    held,
                    wanted: amount,
                    why,
                };
                if !within(policy.window_s) {
                    return Err(refuse(format!(
                        "the risk window is {} s and the {}",
                        policy.window_s,
                        since(since_ms)
                    )));
                }
                let capacity = state
                    .stream(&stream)
                    .and_then(|s| s.escrow.get(&counter))
                    .map_or(0, |e| e.capacity);
                let left = conn
                    .remaining_at_round(state, &stream, &counter)
                    .unwrap_or(0);
                if u128::from(left) * 100 < capacity * u128::from(policy.min_remaining_pct) {
                    return Err(refuse(format!(
                        "{left} of {capacity} seats were unsold at the last sync, below the \
                         policy's {} %",
                        policy.min_remaining_pct
                    )));
                }
                let after = held - i128::from(amount);
                if after < -i128::from(policy.max_overdraft) {
                    return Err(refuse(format!(
                        "it would owe {}, the policy allows {}",
                        -after, policy.max_overdraft
                    )));
                }
                *op = Op::EscrowOverdraw {
                    counter,
                    amount,
                    synced_ms_ago: since_ms.unwrap_or(0),
                    remaining_at_sync: left,
                };
            }
        }
    }
    Ok(())
}

/// The automatic compensation of every oversold sale of `counter` in
/// `stream` that has none yet: one `Set` of its `oversold/<sale id>` field
/// to the effective policy's `on_oversell`, under the command id
/// `oversold/<sale id>`. Every node that detects the mark writes it; the
/// command id makes the writes of several nodes take effect once
/// ([`State`] module docs, "Commands take effect once").
pub fn compensations(state: &State, stream: &str, counter: &str) -> Vec<Draft> {
    let Some(e) = state.stream(stream).and_then(|s| s.escrow.get(counter)) else {
        return Vec::new();
    };
    let action = e.policy().on_oversell;
    e.oversold
        .iter()
        .filter(|(_, m)| m.compensation.is_none())
        .map(|(sale, _)| {
            let field = seats::compensation_field(sale);
            Draft {
                stream: stream.to_string(),
                kind: COMPENSATED_KIND.into(),
                ops: vec![Op::Set {
                    field: field.clone(),
                    value: seats::compensation_value(action, By::Auto),
                    supersedes: Vec::new(),
                }],
                meta: Meta {
                    command_id: Some(field),
                    user: None,
                },
                ..Draft::default()
            }
        })
        .collect()
}

/// The kind of the events that write a compensation.
pub const COMPENSATED_KIND: &str = "OversoldCompensated";

/// The last moment (wall ms, by the hlc of the compensation's event) at
/// which staff may override the automatic compensation `c` under
/// `policy`: the policy's `override_s` after it was written.
pub fn override_until(state: &State, policy: &Policy, c: &Compensated) -> u64 {
    let at = state.hlc_of(&c.write.event).map_or(0, |h| h.ms());
    at.saturating_add(u64::from(policy.override_s) * 1000)
}

/// A staff decision on an oversold sale: the draft that writes it,
/// superseding the compensation standing (the automatic one, or an earlier
/// decision). Refused when the sale is not marked oversold on this node,
/// or when the policy's `override_s` has passed since the automatic
/// compensation, measured in hlc against `now_ms`.
pub fn staff_decision(
    state: &State,
    sale: &EventId,
    action: Compensation,
    user: Option<String>,
    now_ms: u64,
) -> Result<Draft, Refused> {
    let mark = state
        .oversold()
        .into_iter()
        .find(|(_, _, id, _)| id == sale);
    let Some((stream, counter, _, mark)) = mark else {
        return Err(Refused::NotOversold { sale: *sale });
    };
    let policy = state.policy_of(&stream, &counter);
    if let Some(c) = mark.compensation.filter(|c| c.by == By::Auto) {
        let until = override_until(state, &policy, &c);
        if now_ms > until {
            return Err(Refused::OverrideClosed {
                sale: *sale,
                override_s: policy.override_s,
                auto: c.action,
            });
        }
    }
    let field = seats::compensation_field(sale);
    Ok(Draft {
        stream,
        kind: COMPENSATED_KIND.into(),
        ops: vec![Op::Set {
            field,
            value: seats::compensation_value(action, By::Staff),
            supersedes: Vec::new(),
        }],
        meta: Meta {
            command_id: None,
            user,
        },
        ..Draft::default()
    })
}

/// The rule that applies now to a sale of one seat by `me` on `counter` of
/// `stream`, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleNow {
    /// The effective policy.
    pub policy: Policy,
    /// Rights held now (negative: owed).
    pub held: i128,
    /// Seats this node may sell now: its rights, plus the overdraft a risk
    /// window admits now; 0 while refusing.
    pub may_sell: u128,
    /// Why sales beyond the rights held are refused (or all sales, under
    /// `strict`), if they are.
    pub limited_by: Option<String>,
}

/// What [`admit`] would allow now on one counter (see [`RuleNow`]).
pub fn rule_now(
    state: &State,
    me: &NodeId,
    conn: &Connectivity,
    stream: &str,
    counter: &str,
    now_ms: u64,
) -> RuleNow {
    let policy = state.policy_of(stream, counter);
    let held = held(state, stream, counter, me);
    let own = held.max(0) as u128;
    let probe = |amount: u64| {
        let mut d = Draft {
            stream: stream.to_string(),
            ops: vec![Op::EscrowConsume {
                counter: counter.to_string(),
                amount,
            }],
            ..Draft::default()
        };
        admit(state, me, conn, &mut d, now_ms)
    };
    let (may_sell, limited_by) = match policy.mode {
        PolicyMode::Escrow => (own, None),
        PolicyMode::Strict => match probe(1) {
            Ok(()) => (own, None),
            Err(e) => (0, Some(e.to_string())),
        },
        PolicyMode::RiskWindow => {
            let most = held + i128::from(policy.max_overdraft);
            match u64::try_from(most) {
                Ok(n) if n > 0 && held < most => match probe(n) {
                    Ok(()) => (u128::from(n), None),
                    Err(e) => (own, Some(e.to_string())),
                },
                _ => (own, None),
            }
        }
    };
    RuleNow {
        policy,
        held,
        may_sell,
        limited_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Keypair, Policy, PolicyMode};
    use crate::replica::{AppendError, Replica};

    const T0: u64 = 1_700_000_000_000;

    fn replica() -> Replica {
        Replica::new(Keypair::from_secret([7; 32]))
    }

    fn draft(ops: Vec<Op>) -> Draft {
        Draft {
            stream: "session/7".into(),
            kind: "Seats".into(),
            ops,
            ..Draft::default()
        }
    }

    fn sell(n: u64) -> Draft {
        draft(vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: n,
        }])
    }

    /// A counter of `capacity` seats, all rights with the replica, under
    /// `policy`.
    fn setup(r: &mut Replica, capacity: u64, policy: Policy) {
        r.handle_append(
            draft(vec![
                Op::EscrowInit {
                    counter: "seats".into(),
                    capacity,
                },
                Op::EscrowPolicy {
                    counter: "seats".into(),
                    policy,
                    supersedes: vec![],
                },
            ]),
            T0,
        )
        .unwrap();
    }

    #[test]
    fn escrow_sells_only_rights_held() {
        let mut r = replica();
        setup(&mut r, 2, Policy::new(PolicyMode::Escrow));
        r.handle_append(sell(2), T0 + 1).unwrap();
        let e = r.handle_append(sell(1), T0 + 2).unwrap_err();
        assert!(matches!(e, AppendError::Refused(_)), "{e}");
    }

    #[test]
    fn strict_refuses_while_no_peer_was_reached_within_the_window() {
        let mut r = replica();
        setup(&mut r, 10, Policy::new(PolicyMode::Strict));
        let e = r.handle_append(sell(1), T0 + 1).unwrap_err();
        assert!(
            matches!(
                e,
                AppendError::Seats(Refused::Disconnected { since_ms: None, .. })
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("no round since this node started"),
            "{e}"
        );
        r.handle_synced(T0 + 1_000);
        r.handle_append(sell(1), T0 + 31_000).unwrap();
        let e = r.handle_append(sell(1), T0 + 31_001).unwrap_err();
        assert!(e.to_string().contains("last round 30 s ago"), "{e}");
        assert_eq!(r.rule_now("session/7", "seats", T0 + 31_001).may_sell, 0);
        r.handle_synced(T0 + 40_000);
        assert_eq!(r.rule_now("session/7", "seats", T0 + 40_001).may_sell, 9);
    }

    #[test]
    fn a_risk_window_overdraws_with_its_audit_figures_and_within_its_bounds() {
        let mut r = replica();
        let mut p = Policy::new(PolicyMode::RiskWindow);
        p.max_overdraft = 3;
        p.window_s = 60;
        setup(&mut r, 10, p);
        // Offline from the start: no round, no overdraft.
        r.handle_append(sell(8), T0 + 1).unwrap();
        let e = r.handle_append(sell(3), T0 + 2).unwrap_err();
        assert!(
            e.to_string().contains("no round since this node started"),
            "{e}"
        );
        // Synced with 2 of 10 left: 20 % >= 10 %.
        r.handle_synced(T0 + 1_000);
        // Sold while offline after that round; the remaining at the round
        // stays what it was then.
        r.handle_append(sell(1), T0 + 2_000).unwrap();
        let rule = r.rule_now("session/7", "seats", T0 + 2_000);
        assert_eq!((rule.held, rule.may_sell), (1, 4));
        let a = r.handle_append(sell(3), T0 + 5_000).unwrap();
        let ops = overdraws(&r);
        assert_eq!(
            ops,
            vec![(3, 4_000, 2)],
            "one overdraft sale, 4 s after the round, 2 seats left then ({a:?})"
        );
        // Owes 2 now; one more makes 3, the bound; two more are refused.
        let e = r.handle_append(sell(2), T0 + 6_000).unwrap_err();
        assert!(
            e.to_string()
                .contains("it would owe 4, the policy allows 3"),
            "{e}"
        );
        r.handle_append(sell(1), T0 + 6_000).unwrap();
        // Past the window: refused, naming it.
        let e = r.handle_append(sell(1), T0 + 61_001).unwrap_err();
        assert!(e.to_string().contains("the risk window is 60 s"), "{e}");
    }

    #[test]
    fn a_risk_window_needs_enough_seats_left_at_the_last_round() {
        let mut r = replica();
        let mut p = Policy::new(PolicyMode::RiskWindow);
        p.min_remaining_pct = 50;
        setup(&mut r, 10, p);
        r.handle_append(sell(6), T0 + 1).unwrap();
        r.handle_synced(T0 + 1_000);
        r.handle_append(sell(4), T0 + 2_000).unwrap();
        let e = r.handle_append(sell(1), T0 + 3_000).unwrap_err();
        assert!(
            e.to_string()
                .contains("4 of 10 seats were unsold at the last sync, below the policy's 50 %"),
            "{e}"
        );
    }

    #[test]
    fn remaining_at_round_is_snapshotted_for_the_counters_that_moved() {
        let mut r = replica();
        setup(&mut r, 10, Policy::new(PolicyMode::RiskWindow));
        let s = |r: &Replica| r.state().clone();
        let mut c = Connectivity::new();
        assert_eq!(c.remaining_at_round(&s(&r), "session/7", "seats"), None);
        c.handle_synced(&s(&r), T0);
        assert_eq!(c.remaining_at_round(&s(&r), "session/7", "seats"), Some(10));
        c.touched(&s(&r), "session/7", &sell(3).ops);
        r.handle_append(sell(3), T0 + 1).unwrap();
        // Touched since the round: what it had then.
        assert_eq!(c.remaining_at_round(&s(&r), "session/7", "seats"), Some(10));
        c.handle_synced(&s(&r), T0 + 2);
        c.touched(&s(&r), "session/7", &sell(2).ops);
        r.handle_append(sell(2), T0 + 3).unwrap();
        assert_eq!(c.remaining_at_round(&s(&r), "session/7", "seats"), Some(7));
        c.handle_synced(&s(&r), T0 + 4);
        assert_eq!(c.remaining_at_round(&s(&r), "session/7", "seats"), Some(5));
    }

    /// `(amount, synced_ms_ago, remaining_at_sync)` of every overdraft sale
    /// in the replica's pending records.
    fn overdraws(r: &Replica) -> Vec<(u64, u64, u64)> {
        r.pending_events()
            .flat_map(|e| e.ops)
            .filter_map(|op| match op {
                Op::EscrowOverdraw {
                    amount,
                    synced_ms_ago,
                    remaining_at_sync,
                    ..
                } => Some((amount, synced_ms_ago, remaining_at_sync)),
                _ => None,
            })
            .collect()
    }

    /// Gives `to` every event `from` has queued that `to` lacks, in order,
    /// as sync would.
    fn give(from: &Replica, to: &mut Replica) {
        give_events(from.pending_events().collect(), to);
    }

    fn give_events(events: Vec<crate::Event>, to: &mut Replica) {
        for e in events {
            let (bytes, id) = e.seal();
            to.handle_received(&e, id, &bytes, None).unwrap();
        }
        to.handle_received_end();
    }

    /// Two desks oversell while cut off; once they exchange, both detect
    /// the same marks, both write the automatic compensation, and each
    /// sale is compensated once, identically on both.
    #[test]
    fn oversold_sales_are_compensated_once_by_every_desk_that_sees_them() {
        let (mut a, mut b) = (replica(), Replica::new(Keypair::from_secret([8; 32])));
        let mut p = Policy::new(PolicyMode::RiskWindow);
        p.max_overdraft = 3;
        setup(&mut a, 4, p);
        a.handle_append(
            draft(vec![Op::EscrowTransfer {
                counter: "seats".into(),
                to: b.id(),
                amount: 2,
            }]),
            T0 + 1,
        )
        .unwrap();
        give(&a, &mut b);
        a.handle_synced(T0 + 1_000);
        b.handle_synced(T0 + 1_000);
        // Cut off: A sells its 2 and overdraws 2, B its 2 and overdraws 1.
        a.handle_append(sell(4), T0 + 2_000).unwrap();
        b.handle_append(sell(3), T0 + 3_000).unwrap();
        assert!(
            a.state().oversold().is_empty(),
            "no desk sees an oversell alone"
        );
        // Each learns of the other's sales at once: both detect the marks.
        let (from_a, from_b) = (a.pending_events().collect(), b.pending_events().collect());
        give_events(from_a, &mut b);
        give_events(from_b, &mut a);
        give(&a, &mut b);
        give(&b, &mut a);
        assert_eq!(a.state().state_hash(), b.state().state_hash());
        let marks = a.state().oversold();
        assert_eq!(
            marks.iter().map(|m| m.3.units).collect::<Vec<_>>(),
            vec![2, 1],
            "7 sold of 4: the overdraft units are marked"
        );
        for (_, _, sale, m) in &marks {
            let c = m.compensation.expect("compensated");
            assert_eq!(
                (c.action, c.by),
                (Compensation::Waitlist, By::Auto),
                "{sale}"
            );
        }
        let e = &a.state().stream("session/7").unwrap().escrow["seats"];
        assert_eq!((e.released, e.honoured), (3, 0));
        assert_eq!(e.waitlist.len(), 2);
        // Both wrote each: the second of each pair took no effect.
        let dups = &a.state().stream("session/7").unwrap().duplicates;
        assert_eq!(dups.len(), 2, "{dups:?}");
        // Nothing more to write.
        assert_eq!(a.compensate(T0 + 9_000) + b.compensate(T0 + 9_000), 0);

        // Staff honour one sale within the override window, and not after.
        let (_, _, sale, _) = &marks[0];
        let d = staff_decision(a.state(), sale, Compensation::Honour, None, T0 + 10_000).unwrap();
        a.handle_append(d, T0 + 10_000).unwrap();
        let e = &a.state().stream("session/7").unwrap().escrow["seats"];
        assert_eq!((e.released, e.honoured), (1, 2));
        let late = T0 + 3_000 + 3_600_000 + 1;
        let refused = staff_decision(a.state(), &marks[1].2, Compensation::Cancel, None, late);
        assert!(
            matches!(refused, Err(Refused::OverrideClosed { .. })),
            "{refused:?}"
        );
        let unknown = staff_decision(
            a.state(),
            &EventId([1; 32]),
            Compensation::Cancel,
            None,
            late,
        );
        assert!(matches!(unknown, Err(Refused::NotOversold { .. })));
    }
}
