//! The venue's seat rules in the fold: policies, overdraft sales, oversell
//! marks and their compensation (`DESIGN.md` §1, the venue).
//!
//! Everything here is a read model of one escrow counter ([`Escrow`]),
//! recomputed by the fold ([`crate::state`]) from bookkeeping that is itself
//! a function of the event set. So every replica holding the same events
//! shows the same policies, marks and compensations, byte for byte, in any
//! delivery order and with any duplicates; a late event moves marks, and
//! the compensation derived from them follows.
//!
//! **Policies** ([`Escrow::policies`]). The policies of one counter are a
//! multi-value register, like a field: an [`Op::EscrowPolicy`] removes
//! exactly the policy writes it names (dots in its causal past). The
//! standing writes are those of events in effect that no event in effect
//! names (a command duplicate's write neither stands nor removes, as for a
//! `Set`). More than one standing is a conflict, and the *effective* policy
//! is the strictest ([`strictest`]): by mode (strict, then escrow, then
//! risk-window), then the smaller `max_overdraft`, the smaller `window_s`,
//! the larger `min_remaining_pct`, then the larger [`WriteId`]. With none,
//! `escrow`. Validity of an overdraft sale reads the effective policy *in
//! the event's causal past*: the same rule over the policy writes of that
//! past, each in effect or not as judged in that past.
//!
//! **Overdraft** ([`Op::EscrowOverdraw`]). Valid only if the effective
//! policy in the causal past is `risk-window` and, after the op, the
//! author's rights in that past (with the event's earlier ops) are at least
//! `-max_overdraft`. It consumes like a consume. Its *overdraft units* are
//! the units beyond the rights the author held before it:
//! `amount - max(0, available)`, a function of the event and its past.
//!
//! **Marks** ([`Escrow::oversold`]). The deficit of a counter is
//! `max(0, consumed - capacity)`, capacity being the sum of the inits (not
//! raised by honoured sales: the marks do not depend on compensation, so
//! nothing here is circular). The *candidates* are the overdraft units of
//! the overdraft sales in effect, and the rest of the sales (consume or
//! overdraw) in effect whose author's account is listed in
//! [`Escrow::overdrawn`] with a debt (`owed`) above the overdraft units its
//! sales in effect recorded (a debt an overdraft does not explain): for an
//! author that forked, its sales past the fork
//! ([`crate::state::Overdrawn::events`]); otherwise all its sales on the
//! counter (a debt from a duplicate). The walk goes from the last
//! candidate in canonical order `(hlc, author, seq, id)` back, marking units
//! until the deficit is covered; the earliest marked sale may be marked
//! partly. A sale that a late event pushes out of the walk is no longer
//! marked.
//!
//! **Compensation**. A register field of the same stream,
//! `oversold/<sale id, 64 lowercase hex>` ([`compensation_field`]), written
//! by ordinary `Set`s whose value is the JSON text
//! `{"action":"cancel|waitlist|honour|notify","by":"auto|staff"}`
//! ([`compensation_value`]). Its effect is derived from the values left
//! standing, never by adding events up: among the standing values that
//! parse, `staff` beats `auto`, then the latest in canonical order wins. A
//! value that does not parse is shown as written (it is a field) and has no
//! effect. On a marked sale, `cancel` and `waitlist` release its marked
//! units ([`Escrow::released`]; `waitlist` also lists the sale in
//! [`Escrow::waitlist`], in canonical order), `honour` keeps them and
//! raises the counter's effective capacity by them once
//! ([`Escrow::honoured`]), `notify` does nothing until staff decide. A
//! compensation whose sale is marked on no counter of the stream is *void*
//! ([`Escrow::void`]): shown on the counter the sale sold on, or, for an
//! id that is no sale of the stream, on every counter of the stream.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::event::{Compensation, Op, Policy, PolicyMode};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::state::{Escrow, State, Stream, WriteId, Written};

/// The field prefix of compensation registers.
pub const COMPENSATION_PREFIX: &str = "oversold/";

/// An event's place in the canonical order: `(hlc, author, seq, id)`.
pub(crate) type Key = (Hlc, NodeId, u64, EventId);

/// A marked (oversold) sale of one counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Oversold {
    /// Units of the sale marked as oversold: at most what it sold.
    pub units: u64,
    /// The sale's author.
    pub author: NodeId,
    /// The sale's hlc.
    pub hlc: Hlc,
    /// The compensation standing for it, if any.
    pub compensation: Option<Compensated>,
}

/// The effective compensation of a sale: the value left standing in its
/// `oversold/<sale id>` field that wins (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Compensated {
    /// What is done.
    pub action: Compensation,
    /// Who decided it.
    pub by: By,
    /// The write it stands as.
    pub write: WriteId,
}

/// Who wrote a compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum By {
    /// The node that detected the mark, by the policy's `on_oversell`.
    Auto,
    /// Staff, superseding the automatic one.
    Staff,
}

impl By {
    /// The name the JSON value uses.
    pub fn name(self) -> &'static str {
        match self {
            By::Auto => "auto",
            By::Staff => "staff",
        }
    }
}

impl std::str::FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> Result<By, String> {
        match s {
            "auto" => Ok(By::Auto),
            "staff" => Ok(By::Staff),
            _ => Err(format!(
                "unknown compensation author {s:?} (known: auto, staff)"
            )),
        }
    }
}

/// The register field holding the compensation of `sale`:
/// `oversold/<64 lowercase hex>`.
pub fn compensation_field(sale: &EventId) -> String {
    format!("{COMPENSATION_PREFIX}{sale}")
}

/// The sale a compensation field names, if `field` is one in its canonical
/// spelling (lowercase hex).
pub fn compensation_sale(field: &str) -> Option<EventId> {
    let hex = field.strip_prefix(COMPENSATION_PREFIX)?;
    let id: EventId = hex.parse().ok()?;
    (id.to_string() == hex).then_some(id)
}

/// The value of a compensation field: the JSON text
/// `{"action":"<action>","by":"<by>"}`.
pub fn compensation_value(action: Compensation, by: By) -> Vec<u8> {
    format!(
        "{{\"action\":\"{}\",\"by\":\"{}\"}}",
        action.name(),
        by.name()
    )
    .into_bytes()
}

/// Reads a compensation value: a JSON object with exactly the string
/// members `action` and `by` (in any order, with any JSON whitespace).
/// Anything else is `None`: the value is shown, and has no effect.
pub fn parse_compensation(value: &[u8]) -> Option<(Compensation, By)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut rest = text.trim_matches(is_json_space).strip_prefix('{')?;
    rest = rest.strip_suffix('}')?;
    let (mut action, mut by) = (None, None);
    for member in rest.split(',') {
        let (k, v) = member.split_once(':')?;
        let (k, v) = (json_string(k)?, json_string(v)?);
        match k {
            "action" if action.is_none() => action = Some(v.parse().ok()?),
            "by" if by.is_none() => by = Some(v.parse().ok()?),
            _ => return None,
        }
    }
    Some((action?, by?))
}

fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// A JSON string with no escapes, between optional whitespace.
fn json_string(s: &str) -> Option<&str> {
    let inner = s
        .trim_matches(is_json_space)
        .strip_prefix('"')?
        .strip_suffix('"')?;
    (!inner.contains(['"', '\\'])).then_some(inner)
}

/// How strict a policy is: the greater, the stricter (the module docs).
fn strictness(p: &Policy) -> (u8, std::cmp::Reverse<u64>, std::cmp::Reverse<u32>, u8) {
    let mode = match p.mode {
        PolicyMode::RiskWindow => 0,
        PolicyMode::Escrow => 1,
        PolicyMode::Strict => 2,
    };
    (
        mode,
        std::cmp::Reverse(p.max_overdraft),
        std::cmp::Reverse(p.window_s),
        p.min_remaining_pct,
    )
}

/// The effective policy among standing ones: the strictest, ties to the
/// larger write; `escrow` with its defaults when there is none.
pub fn strictest<'a>(policies: impl IntoIterator<Item = (&'a WriteId, &'a Policy)>) -> Policy {
    policies
        .into_iter()
        .max_by_key(|(w, p)| (strictness(p), **w))
        .map_or(Policy::new(PolicyMode::Escrow), |(_, p)| *p)
}

/// One policy write, kept whether or not it stands, for the policy in a
/// causal past.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PolicyWrite {
    pub(crate) policy: Policy,
    /// The policy writes it removes, resolved in its causal past.
    pub(crate) names: Vec<WriteId>,
    /// Whether its event is in effect on this replica.
    pub(crate) effect: bool,
    /// Its event's command id.
    pub(crate) command: Option<String>,
}

/// One sale in effect on one counter: what an event consumed on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sale {
    /// Units consumed (consume and overdraw ops).
    pub(crate) amount: u128,
    /// Of which overdraft units.
    pub(crate) overdraft: u128,
}

/// A counter's private bookkeeping for the seat rules: every policy write,
/// and the sales in effect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Book {
    pub(crate) policies: BTreeMap<WriteId, PolicyWrite>,
    /// Sales in effect with overdraft units, by canonical key.
    overdraws: BTreeMap<Key, Sale>,
    /// Sales in effect, by author then canonical key.
    sales: BTreeMap<NodeId, BTreeMap<Key, Sale>>,
    /// The canonical key of each sale in `sales`.
    ids: BTreeMap<EventId, Key>,
    /// The marked sales, ascending in canonical order.
    marks: Vec<Key>,
}

impl Book {
    /// Records an event in effect that sold on this counter.
    pub(crate) fn add_sale(&mut self, key: Key, sale: Sale) {
        if sale.overdraft > 0 {
            self.overdraws.insert(key, sale);
        }
        self.sales.entry(key.1).or_default().insert(key, sale);
        self.ids.insert(key.3, key);
    }

    /// Forgets a sale whose event is no longer in effect.
    pub(crate) fn remove_sale(&mut self, key: &Key) {
        self.overdraws.remove(key);
        if let Some(s) = self.sales.get_mut(&key.1) {
            s.remove(key);
            if s.is_empty() {
                self.sales.remove(&key.1);
            }
        }
        self.ids.remove(&key.3);
    }

    /// The overdraft units each sale in effect recorded, by sale id.
    pub(crate) fn overdraft_of(&self, sale: &EventId) -> u64 {
        self.ids
            .get(sale)
            .and_then(|k| self.overdraws.get(k))
            .map_or(0, |s| clamp(s.overdraft))
    }

    /// The standing policy writes: in effect, named by no write in effect.
    fn standing(&self) -> BTreeMap<WriteId, Policy> {
        let named: BTreeSet<&WriteId> = self
            .policies
            .values()
            .filter(|p| p.effect)
            .flat_map(|p| &p.names)
            .collect();
        self.policies
            .iter()
            .filter(|(w, p)| p.effect && !named.contains(w))
            .map(|(w, p)| (*w, p.policy))
            .collect()
    }

    /// The effective policy in a causal past: `in_past` says whether a write
    /// is in it, `first_in_past` whether a write of a command is the first
    /// of that command's events in it (in effect there).
    pub(crate) fn policy_in_past(
        &self,
        in_past: impl Fn(&WriteId) -> bool,
        first_in_past: impl Fn(&WriteId, &str) -> bool,
    ) -> Policy {
        let live: Vec<(&WriteId, &PolicyWrite)> = self
            .policies
            .iter()
            .filter(|(w, p)| in_past(w) && p.command.as_deref().is_none_or(|c| first_in_past(w, c)))
            .collect();
        let named: BTreeSet<&WriteId> = live.iter().flat_map(|(_, p)| &p.names).collect();
        strictest(
            live.iter()
                .filter(|(w, _)| !named.contains(w))
                .map(|(w, p)| (*w, &p.policy)),
        )
    }
}

/// A u128 figure as a u64, saturating (a sale's units are sums of u64
/// amounts of one event's ops).
fn clamp(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Escrow {
    /// The effective policy now: the strictest standing one (`escrow` when
    /// none stands).
    pub fn policy(&self) -> Policy {
        strictest(&self.policies)
    }

    /// The overdraft units a sale in effect on this counter recorded (0 for
    /// a plain consume, or a sale that is not in effect).
    pub fn overdraft_of(&self, sale: &EventId) -> u64 {
        self.book.overdraft_of(sale)
    }
}

impl State {
    /// The effective policy of a counter now ([`Escrow::policy`]); `escrow`
    /// for a counter that does not exist.
    pub fn policy_of(&self, stream: &str, counter: &str) -> Policy {
        self.stream(stream)
            .and_then(|s| s.escrow.get(counter))
            .map_or(Policy::new(PolicyMode::Escrow), Escrow::policy)
    }

    /// Every oversold mark: `(stream, counter, sale, mark)`, ascending by
    /// stream, then counter, then the sale's `(hlc, author, id)`.
    pub fn oversold(&self) -> Vec<(String, String, EventId, Oversold)> {
        let mut out = Vec::new();
        for (name, s) in self.streams() {
            for (counter, e) in &s.escrow {
                let mut marks: Vec<(&EventId, &Oversold)> = e.oversold.iter().collect();
                marks.sort_by_key(|(id, m)| (m.hlc, m.author, **id));
                out.extend(
                    marks
                        .into_iter()
                        .map(|(id, m)| (name.clone(), counter.clone(), *id, m.clone())),
                );
            }
        }
        out
    }
}

/// The sales an event's escrow ops make on each counter, in op order:
/// `(counter, amount)` for consumes and overdraws, with the overdraft
/// units `units[i]` of op `i`.
pub(crate) fn sales_of<'a>(ops: &'a [Op], units: &[u64]) -> Vec<(&'a str, Sale)> {
    let mut out: Vec<(&str, Sale)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let (counter, amount) = match op {
            Op::EscrowConsume { counter, amount }
            | Op::EscrowOverdraw {
                counter, amount, ..
            } => (counter.as_str(), *amount),
            _ => continue,
        };
        let over = units.get(i).copied().unwrap_or(0);
        let slot = match out.iter().position(|(c, _)| *c == counter) {
            Some(p) => &mut out[p].1,
            None => {
                out.push((counter, Sale::default()));
                // Just pushed.
                &mut out.last_mut().expect("pushed").1
            }
        };
        slot.amount += amount as u128;
        slot.overdraft += over as u128;
    }
    out
}

/// Brings a counter's standing policies up to date from its book.
pub(crate) fn refresh_policies(e: &mut Escrow) {
    e.policies = e.book.standing();
}

/// Recomputes the marks of `counter` (see the module docs); `forked` says
/// whether an author forked.
pub(crate) fn remark(e: &mut Escrow, forked: &dyn Fn(&NodeId) -> bool) {
    let mut left = e.consumed.saturating_sub(e.capacity);
    let mut marks: BTreeMap<EventId, (Key, u64)> = BTreeMap::new();
    if left > 0 {
        let mut cands: BTreeMap<Key, u128> = BTreeMap::new();
        for (k, s) in &e.book.overdraws {
            *cands.entry(*k).or_default() += s.overdraft;
        }
        for (author, o) in &e.overdrawn {
            let Some(sales) = e.book.sales.get(author) else {
                continue;
            };
            // A debt its overdraft sales explain is theirs alone.
            let overdraft: u128 = sales.values().map(|s| s.overdraft).sum();
            if o.owed <= overdraft {
                continue;
            }
            let fork = forked(author);
            for (k, s) in sales {
                if fork && o.events.binary_search(&k.3).is_err() {
                    continue;
                }
                let rest = s.amount.saturating_sub(s.overdraft);
                if rest > 0 {
                    *cands.entry(*k).or_default() += rest;
                }
            }
        }
        for (k, units) in cands.iter().rev() {
            if left == 0 {
                break;
            }
            let m = (*units).min(left);
            left -= m;
            marks.insert(k.3, (*k, clamp(m)));
        }
    }
    let mut keys: Vec<Key> = marks.values().map(|(k, _)| *k).collect();
    keys.sort_unstable();
    e.book.marks = keys;
    // Compensation is derived next ([`compensate`]).
    e.oversold = marks
        .into_iter()
        .map(|(id, (k, units))| {
            (
                id,
                Oversold {
                    units,
                    author: k.1,
                    hlc: k.0,
                    compensation: None,
                },
            )
        })
        .collect();
}

/// The winning parseable value among a compensation field's standing
/// writes: staff over auto, then the latest in canonical order.
fn winner(writes: &BTreeMap<WriteId, Written>) -> Option<Compensated> {
    writes
        .iter()
        .filter_map(|(w, v)| {
            let (action, by) = parse_compensation(&v.value)?;
            Some((
                (by, v.hlc, *w),
                Compensated {
                    action,
                    by,
                    write: *w,
                },
            ))
        })
        .max_by_key(|(k, _)| *k)
        .map(|(_, c)| c)
}

/// Derives every counter's compensation of `stream` from its marks and its
/// `oversold/` fields: [`Oversold::compensation`], `void`, `honoured`,
/// `released`, `waitlist`.
pub(crate) fn compensate(stream: &mut Stream) {
    let Stream { fields, escrow, .. } = stream;
    for e in escrow.values_mut() {
        e.void.clear();
        for m in e.oversold.values_mut() {
            m.compensation = None;
        }
    }
    let comps: Vec<(EventId, Compensated)> = fields
        .range::<str, _>((
            std::ops::Bound::Included(COMPENSATION_PREFIX),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(f, _)| f.starts_with(COMPENSATION_PREFIX))
        .filter_map(|(f, w)| Some((compensation_sale(f)?, winner(w)?)))
        .collect();
    for (sale, c) in comps {
        let marked = escrow.values().any(|e| e.oversold.contains_key(&sale));
        if marked {
            for e in escrow.values_mut() {
                if let Some(m) = e.oversold.get_mut(&sale) {
                    m.compensation = Some(c);
                }
            }
            continue;
        }
        let known = escrow.values().any(|e| e.book.ids.contains_key(&sale));
        for e in escrow.values_mut() {
            if !known || e.book.ids.contains_key(&sale) {
                e.void.insert(sale, c);
            }
        }
    }
    for e in escrow.values_mut() {
        let (mut honoured, mut released) = (0u128, 0u128);
        let mut waitlist = Vec::new();
        for k in &e.book.marks {
            let Some(m) = e.oversold.get(&k.3) else {
                continue;
            };
            match m.compensation.map(|c| c.action) {
                Some(Compensation::Honour) => honoured += m.units as u128,
                Some(Compensation::Cancel) => released += m.units as u128,
                Some(Compensation::Waitlist) => {
                    released += m.units as u128;
                    waitlist.push(k.3);
                }
                Some(Compensation::Notify) | None => {}
            }
        }
        e.honoured = honoured;
        e.released = released;
        e.waitlist = waitlist;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Meta};
    use crate::state::{Draft, Invalid, PrepareError};
    use crate::testkit::Desk;

    /// A wall time: 2023-11-14.
    const T: u64 = 1_700_000_000_000;
    const S: &str = "session/1";

    /// The seat rules' view of a desk: sales on stream `S`.
    trait Seller {
        fn try_make(
            &mut self,
            wall: u64,
            ops: Vec<Op>,
            command: Option<&str>,
        ) -> Result<EventId, PrepareError>;
        fn make(&mut self, wall: u64, ops: Vec<Op>) -> EventId;
        fn seats(&self) -> &Escrow;
    }

    impl Seller for Desk {
        fn try_make(
            &mut self,
            wall: u64,
            ops: Vec<Op>,
            command: Option<&str>,
        ) -> Result<EventId, PrepareError> {
            let draft = Draft {
                stream: S.into(),
                kind: "Sold".into(),
                ops,
                meta: Meta {
                    command_id: command.map(str::to_string),
                    user: None,
                },
                ..Draft::default()
            };
            let len = self.log.len();
            let id = self.append(wall, draft)?;
            assert_eq!(self.log.len(), len + 1, "command already carried out");
            Ok(id)
        }

        fn make(&mut self, wall: u64, ops: Vec<Op>) -> EventId {
            self.try_make(wall, ops, None).expect("a valid draft")
        }

        fn seats(&self) -> &Escrow {
            &self.state.stream(S).expect("stream").escrow["seats"]
        }
    }

    fn policy(spec: &str) -> Op {
        Op::EscrowPolicy {
            counter: "seats".into(),
            policy: Policy::parse_spec(spec).expect("a policy"),
            supersedes: vec![],
        }
    }

    fn init(capacity: u64) -> Op {
        Op::EscrowInit {
            counter: "seats".into(),
            capacity,
        }
    }

    fn consume(amount: u64) -> Op {
        Op::EscrowConsume {
            counter: "seats".into(),
            amount,
        }
    }

    fn overdraw(amount: u64) -> Op {
        Op::EscrowOverdraw {
            counter: "seats".into(),
            amount,
            synced_ms_ago: 1_000,
            remaining_at_sync: 5,
        }
    }

    fn compensate(sale: &EventId, action: Compensation, by: By) -> Op {
        Op::Set {
            field: compensation_field(sale),
            value: compensation_value(action, by),
            supersedes: vec![],
        }
    }

    /// Every causal order of two desks' logs that this test tries: each
    /// desk's own order, and one merged into the other both ways.
    fn same_everywhere(desks: &[&Desk]) -> State {
        let mut all: Vec<(Event, EventId)> = Vec::new();
        for d in desks {
            for (e, id) in &d.log {
                if !all.iter().any(|(_, x)| x == id) {
                    all.push((e.clone(), *id));
                }
            }
        }
        let mut states = Vec::new();
        for first in 0..desks.len() {
            let mut s = State::new();
            let mut pending: Vec<&(Event, EventId)> = desks[first]
                .log
                .iter()
                .chain(desks.iter().flat_map(|d| &d.log))
                .collect();
            // Insert whatever is deliverable until all are in.
            while !pending.is_empty() {
                let before = pending.len();
                pending.retain(|(e, id)| s.insert(e, *id).is_err());
                assert!(pending.len() < before, "not causally closed");
            }
            states.push(s);
        }
        for s in &states[1..] {
            assert_eq!(s.canonical_read_model(), states[0].canonical_read_model());
        }
        states.swap_remove(0)
    }

    #[test]
    fn compensation_values_round_trip_and_malformed_ones_are_none() {
        for action in Compensation::ALL {
            for by in [By::Auto, By::Staff] {
                let v = compensation_value(action, by);
                assert_eq!(parse_compensation(&v), Some((action, by)));
            }
        }
        assert_eq!(
            compensation_value(Compensation::Honour, By::Staff),
            br#"{"action":"honour","by":"staff"}"#.to_vec()
        );
        assert_eq!(
            parse_compensation(b" { \"by\" : \"auto\" ,\n\"action\":\"cancel\" } "),
            Some((Compensation::Cancel, By::Auto))
        );
        for bad in [
            &b""[..],
            b"{}",
            b"null",
            b"\"cancel\"",
            br#"{"action":"cancel"}"#,
            br#"{"action":"refund","by":"auto"}"#,
            br#"{"action":"cancel","by":"auto","x":"y"}"#,
            br#"{"action":"cancel","action":"honour","by":"auto"}"#,
            br#"{"action":"can\"cel","by":"auto"}"#,
            br#"{"action":1,"by":"auto"}"#,
            b"\xff\xfe",
            br#"{"action":"cancel","by":"auto"}}"#,
        ] {
            assert_eq!(
                parse_compensation(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn compensation_fields_name_a_sale_in_lowercase_hex_only() {
        let id = EventId([0xab; 32]);
        let f = compensation_field(&id);
        assert_eq!(f, format!("oversold/{}", "ab".repeat(32)));
        assert_eq!(compensation_sale(&f), Some(id));
        assert_eq!(
            compensation_sale(&f.to_uppercase().replace("OVERSOLD", "oversold")),
            None
        );
        assert_eq!(compensation_sale("oversold/ab"), None);
        assert_eq!(compensation_sale("title"), None);
    }

    #[test]
    fn the_strictest_policy_applies_and_escrow_when_none() {
        let w = |n: u8| WriteId {
            author: NodeId([n; 32]),
            seq: 1,
            event: EventId([n; 32]),
        };
        assert_eq!(strictest([]), Policy::new(PolicyMode::Escrow));
        let risk = Policy::new(PolicyMode::RiskWindow);
        let escrow = Policy::new(PolicyMode::Escrow);
        let strict = Policy::new(PolicyMode::Strict);
        let (w1, w2, w3) = (w(1), w(2), w(3));
        assert_eq!(strictest([(&w1, &risk), (&w2, &escrow)]), escrow);
        assert_eq!(
            strictest([(&w3, &escrow), (&w1, &strict), (&w2, &risk)]),
            strict
        );
        let mut small = risk;
        small.max_overdraft = 2;
        assert_eq!(strictest([(&w1, &small), (&w2, &risk)]), small);
        let mut short = risk;
        short.window_s = 60;
        assert_eq!(strictest([(&w2, &short), (&w1, &risk)]), short);
        let mut more = risk;
        more.min_remaining_pct = 20;
        assert_eq!(strictest([(&w1, &more), (&w2, &risk)]), more);
        // Equal in every ordered setting: the larger write.
        let mut notify = risk;
        notify.on_oversell = Compensation::Notify;
        assert_eq!(strictest([(&w2, &notify), (&w1, &risk)]), notify);
        assert_eq!(strictest([(&w1, &notify), (&w2, &risk)]), risk);
    }

    #[test]
    fn policies_are_a_register_and_the_strictest_applies() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        assert_eq!(
            a.state.policy_of(S, "seats"),
            Policy::new(PolicyMode::Escrow)
        );
        a.make(T, vec![init(10), policy("risk-window,max_overdraft=3")]);
        b.make(T + 1, vec![policy("strict")]);
        a.merge(&b);
        assert_eq!(a.seats().policies.len(), 2, "concurrent policies conflict");
        assert_eq!(a.state.policy_of(S, "seats").mode, PolicyMode::Strict);
        // A later write names both standing policies and resolves the conflict.
        a.make(T + 2, vec![policy("risk-window,max_overdraft=2")]);
        let p = a.seats().policies.values().copied().collect::<Vec<_>>();
        assert_eq!(
            p,
            vec![Policy::parse_spec("risk-window,max_overdraft=2").unwrap()]
        );
        assert_eq!(a.seats().policy(), p[0]);
        b.merge(&a);
        assert_eq!(b.state.state_hash(), a.state.state_hash());
        same_everywhere(&[&a, &b]);
    }

    #[test]
    fn a_duplicate_policy_write_neither_stands_nor_removes_and_is_undone() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        a.make(T, vec![init(10), policy("escrow")]);
        b.merge(&a);
        // One command carried out on both desks: b's sorts first (earlier hlc).
        b.try_make(T + 1, vec![policy("risk-window")], Some("pol"))
            .unwrap();
        a.try_make(T + 5, vec![policy("strict")], Some("pol"))
            .unwrap();
        // On its own, a's write stands and removed the escrow policy.
        assert_eq!(a.seats().policy().mode, PolicyMode::Strict);
        assert_eq!(a.seats().policies.len(), 1);
        a.merge(&b);
        b.merge(&a);
        // b's write took effect; a's is a duplicate and removes nothing.
        for d in [&a, &b] {
            let modes: Vec<PolicyMode> = d.seats().policies.values().map(|p| p.mode).collect();
            assert_eq!(modes, vec![PolicyMode::RiskWindow]);
        }
        assert_eq!(a.state.state_hash(), b.state.state_hash());
        same_everywhere(&[&a, &b]);
    }

    #[test]
    fn an_overdraft_needs_risk_window_in_the_causal_past_and_stays_within_it() {
        let mut a = Desk::new(1);
        a.make(T, vec![init(2)]);
        let refused = a.try_make(T + 1, vec![overdraw(1)], None);
        assert!(matches!(
            refused,
            Err(PrepareError::Invalid(Invalid::OverdraftNotAllowed {
                mode: PolicyMode::Escrow,
                ..
            }))
        ));
        // The policy of the same event is not in its causal past.
        let refused = a.try_make(T + 1, vec![policy("risk-window"), overdraw(1)], None);
        assert!(matches!(
            refused,
            Err(PrepareError::Invalid(Invalid::OverdraftNotAllowed { .. }))
        ));
        a.make(T + 2, vec![policy("risk-window,max_overdraft=3")]);
        // 2 held: 5 goes to -3, the bound.
        let sale = a.make(T + 3, vec![consume(1), overdraw(4)]);
        assert_eq!(a.seats().overdraft_of(&sale), 3);
        let refused = a.try_make(T + 4, vec![overdraw(1)], None);
        assert!(matches!(
            refused,
            Err(PrepareError::Invalid(Invalid::OverdraftExceeded {
                available: -3,
                max_overdraft: 3,
                ..
            }))
        ));
        // A plain consume never overdraws.
        let refused = a.try_make(T + 4, vec![consume(1)], None);
        assert!(matches!(
            refused,
            Err(PrepareError::Invalid(Invalid::InsufficientRights { .. }))
        ));
        let seats = a.seats();
        assert_eq!((seats.capacity, seats.consumed), (2, 5));
        assert_eq!(seats.overdrawn[&a.id].owed, 3);
        let marks: Vec<(EventId, u64)> =
            seats.oversold.iter().map(|(k, m)| (*k, m.units)).collect();
        assert_eq!(marks, vec![(sale, 3)]);
        // Stricter again: no more overdraft, and the debt is repaid first.
        a.make(T + 5, vec![policy("escrow")]);
        assert!(a.try_make(T + 6, vec![overdraw(1)], None).is_err());
        a.make(T + 7, vec![init(4)]);
        assert!(a.try_make(T + 8, vec![consume(2)], None).is_err());
        a.make(T + 9, vec![consume(1)]);
        assert!(a.seats().oversold.is_empty(), "capacity caught up");
    }

    #[test]
    fn marks_cover_the_deficit_from_the_last_sale_back_and_compensation_follows() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        a.make(T, vec![init(4), policy("risk-window,max_overdraft=5")]);
        a.make(
            T + 1,
            vec![Op::EscrowTransfer {
                counter: "seats".into(),
                to: b.id,
                amount: 2,
            }],
        );
        b.merge(&a);
        // Partitioned: each sells its 2 and 2 beyond.
        let sa = a.make(T + 10, vec![overdraw(4)]);
        let sb = b.make(T + 20, vec![overdraw(3)]);
        assert!(a.seats().oversold.is_empty(), "a alone: b's seats unsold");
        // A compensation for a sale that is not marked is void...
        a.make(
            T + 30,
            vec![compensate(&sa, Compensation::Waitlist, By::Auto)],
        );
        assert_eq!(a.seats().void.keys().copied().collect::<Vec<_>>(), vec![sa]);
        assert_eq!(a.seats().released, 0);
        // ... until the sale is marked.
        a.merge(&b);
        assert!(a.seats().void.is_empty());
        assert_eq!(a.seats().waitlist, vec![sa]);
        assert_eq!(a.seats().released, 2);
        b.merge(&a);
        let s = same_everywhere(&[&a, &b]);
        let e = &s.stream(S).unwrap().escrow["seats"];
        // Deficit 3 = 7 - 4: b's sale is the last (1 unit beyond), then a's 2.
        assert_eq!(e.consumed - e.capacity, 3);
        assert_eq!(e.oversold[&sb].units, 1);
        assert_eq!(e.oversold[&sa].units, 2);
        assert_eq!(
            e.oversold[&sa].compensation.map(|c| c.action),
            Some(Compensation::Waitlist)
        );
        assert_eq!(e.oversold[&sb].compensation, None);
        // Staff override the automatic one: staff beats auto.
        let auto = e.oversold[&sa].compensation.unwrap().write;
        b.make(
            T + 40,
            vec![compensate(&sa, Compensation::Honour, By::Staff)],
        );
        let e = b.seats();
        let c = e.oversold[&sa].compensation.unwrap();
        assert_eq!((c.action, c.by), (Compensation::Honour, By::Staff));
        assert_ne!(c.write, auto);
        assert_eq!((e.honoured, e.released), (2, 0));
        assert!(e.waitlist.is_empty());
        let list = b.state.oversold();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].2, list[1].2), (sa, sb), "canonical order");
    }

    /// A forked author's sale past the fork is a candidate even when an
    /// init in the same event leaves its change to the author's rights at
    /// zero: it still spent rights.
    #[test]
    fn a_sale_past_a_fork_with_its_own_init_is_a_candidate() {
        let mut a = Desk::new(1);
        a.make(T, vec![init(2)]);
        // A copy of the desk, restored: the next events fork the author.
        let mut copy = Desk {
            id: a.id,
            state: a.state.clone(),
            clock: a.clock.clone(),
            log: a.log.clone(),
        };
        a.make(T + 1, vec![consume(2)]);
        let s2 = copy.make(T + 2, vec![consume(2)]);
        let s3 = copy.make(T + 3, vec![init(1), consume(1)]);
        a.merge(&copy);
        let e = a.seats();
        // 3 seats, 5 sold: owes 2; the last two sales past the fork in
        // canonical order carry the deficit, one unit each.
        assert_eq!(e.overdrawn[&a.id].owed, 2);
        assert!(e.overdrawn[&a.id].events.contains(&s3));
        let marks: Vec<(EventId, u64)> = e.oversold.iter().map(|(k, m)| (*k, m.units)).collect();
        let mut want = vec![(s2, 1), (s3, 1)];
        want.sort();
        assert_eq!(marks, want);
        copy.merge(&a);
        assert_eq!(copy.state.state_hash(), a.state.state_hash());
    }

    #[test]
    fn a_late_event_moves_a_mark_and_voids_its_compensation() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        a.make(T, vec![init(2), policy("risk-window,max_overdraft=2")]);
        a.make(
            T + 1,
            vec![Op::EscrowTransfer {
                counter: "seats".into(),
                to: b.id,
                amount: 1,
            }],
        );
        let sa = a.make(T + 10, vec![consume(1), overdraw(1)]);
        b.merge(&a);
        let sb = b.make(T + 20, vec![consume(1), overdraw(1)]);
        // b sees a deficit of 2 = 4 - 2, candidates 1 + 1: both marked;
        // it cancels a's sale.
        assert_eq!(b.seats().oversold.len(), 2);
        b.make(
            T + 30,
            vec![compensate(&sa, Compensation::Cancel, By::Auto)],
        );
        assert_eq!(
            b.seats().oversold[&sa].compensation.map(|c| c.action),
            Some(Compensation::Cancel)
        );
        assert_eq!(b.seats().released, 1);
        // Meanwhile a adds a seat, which b learns late: the deficit is 1,
        // only the last sale (b's) stays marked, and the cancel is void.
        a.make(T + 25, vec![init(1)]);
        b.merge(&a);
        let e = b.seats();
        assert_eq!(e.oversold.keys().copied().collect::<Vec<_>>(), vec![sb]);
        assert_eq!(e.oversold[&sb].units, 1);
        assert_eq!(e.void.keys().copied().collect::<Vec<_>>(), vec![sa]);
        assert_eq!(e.void[&sa].action, Compensation::Cancel);
        assert_eq!(e.released, 0);
        a.merge(&b);
        assert_eq!(b.state.state_hash(), a.state.state_hash());
        same_everywhere(&[&a, &b]);
    }

    #[test]
    fn a_malformed_compensation_is_shown_and_has_no_effect() {
        let mut a = Desk::new(1);
        a.make(T, vec![init(1), policy("risk-window")]);
        let sale = a.make(T + 1, vec![overdraw(2)]);
        a.make(
            T + 2,
            vec![
                Op::Set {
                    field: compensation_field(&sale),
                    value: b"{\"action\":\"refund\"}".to_vec(),
                    supersedes: vec![],
                },
                Op::Set {
                    field: format!("oversold/{}", "zz".repeat(32)),
                    value: compensation_value(Compensation::Honour, By::Staff),
                    supersedes: vec![],
                },
            ],
        );
        let e = a.seats();
        assert_eq!(e.oversold[&sale].compensation, None);
        assert!(e.void.is_empty());
        assert_eq!((e.honoured, e.released), (0, 0));
        let shown = a.state.stream(S).unwrap().shown(&compensation_field(&sale));
        assert_eq!(shown.unwrap().1.value, b"{\"action\":\"refund\"}");
    }
}
