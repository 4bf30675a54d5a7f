//! Rebalancing escrow rights while connected: who asks, how much, who
//! answers, and how much.
//!
//! An escrow counter's rights are spread over the nodes (`state` module
//! docs); a node sells only the rights it holds. Where sales land unevenly,
//! one desk runs out while another holds seats nobody buys there. While
//! nodes are connected, the rule here moves rights to where the sales are,
//! with ordinary [`Op::EscrowTransfer`] events: nothing in validity
//! changes, and every replica folds a rebalancing transfer like any other.
//! The rule applies under every seat policy (a transfer is a transfer).
//!
//! # The model
//!
//! Every figure is judged by one node from its own state (an [`Outlook`]
//! of the counter, as far as it knows):
//!
//! - **The share**: the unsold capacity (`capacity - consumed`) split
//!   evenly over the counter's accounts, rounded up. It shrinks as seats
//!   sell, so a desk that sells little holds more than its share and a
//!   desk that sells much, less.
//! - **The low-water mark**: [`LOW_WATER_PCT`] % of the share, rounded up.
//!   A node whose rights fall below it asks. A node whose sale was refused
//!   for want of rights asks at once, whatever its rights.
//! - **The reserve**: the share. A node answering keeps it for its own
//!   sales, and no peer can take it away, however often it asks. It is at
//!   least the low-water mark, so an answer never makes the answerer ask
//!   in turn: rights do not bounce between nodes. Rebalancing thus evens
//!   the rights out: what a node holds beyond an even split of the unsold
//!   seats goes to nodes below three quarters of it.
//! - **The ask** ([`Ask`]) names the counter and a *target*: the rights the
//!   asker wants to hold, its share (or, after a refused sale, enough for
//!   that sale on top of what it holds, if that is more). It goes, as a sync
//!   message (`PROTOCOL.md` §9.1, `Ask`), to the connected peer with the
//!   most spare rights as the asker sees them, and also to the next one
//!   when the first's spare does not cover the need; at most
//!   [`MAX_ASK_FANOUT`] peers per ask, those asked last time to no avail
//!   after the others (one may be out of reach while its connection has
//!   not yet timed out). Asks of one counter go at most every
//!   [`ASK_INTERVAL_MS`], doubling up to [`MAX_ASK_INTERVAL_MS`] while
//!   they bring nothing and no peer is seen with spare rights; but at once
//!   after a refused sale, and when a peer is seen with more spare rights
//!   than when the node last asked (news that live push brings).
//! - **The answer** ([`answer`]) transfers `min(spare, target - theirs)`,
//!   where `spare` is the answerer's rights beyond its reserve and `theirs`
//!   the asker's rights as the answerer sees them (its own earlier answers
//!   included, as soon as it made them). So a peer that asks many times is
//!   given at most up to its target, once, and never any of the reserve.
//!   Nothing is transferred when either figure is zero.
//! - **Open asks**: an ask that gets nothing now stays open at the
//!   answerer for [`ASK_OPEN_MS`] (the latest per asker and counter, at
//!   most [`MAX_OPEN_ASKS`]); if the answerer's spare rights grow
//!   meanwhile (the share shrank as others sold, or rights arrived), it
//!   answers then, without waiting for the asker to learn of them.
//! - **Once per ask**: the transfer carries the command id
//!   [`command_id`]`(asker, nonce, answerer, counter)`. An ask that arrives
//!   twice, or is answered again after a restart, finds the command in the
//!   log and makes nothing (the `state` module's rule: a command id takes
//!   effect once). The answerer is part of the id, since two answerers'
//!   transfers to one ask are two commands.
//!
//! - **A refused sale waits for the answer**: a sale refused for want of
//!   rights ([`crate::state::Invalid::InsufficientRights`], or a risk
//!   window's [`crate::admission::Refused::NoOverdraft`]) asks at once, and
//!   when the connected peers, as this node sees them, hold spare rights
//!   covering what it lacks ([`Rebalancer::worth_waiting`]), the sale is
//!   held for up to [`RIGHTS_WAIT_MS`] instead of refused: the shell gives
//!   it again as rights arrive ([`crate::replica::Replica::handle_held_sale`]),
//!   and it is refused only if none came by then. An ask and its answer
//!   take a round trip and a group commit; refusing at once would turn
//!   every sale made between a desk running dry and the answer into a
//!   refusal that the rights spare elsewhere covered. A retried sale does
//!   not ask again while its last ask, for at least as much, is younger
//!   than [`ASK_INTERVAL_MS`].
//!
//! The rule reads nothing but the state and the inputs (`now_ms`, the
//! connected peers), iterates [`BTreeMap`]s, and makes ordinary events; the
//! node (`src/daemon.rs`) and the simulator drive the same
//! [`crate::replica::Replica::poll_asks`] and
//! [`crate::replica::Replica::handle_ask`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Meta, Op, MAX_NAME_BYTES, MAX_STREAM_BYTES};
use crate::state::{self, Draft, Invalid, PrepareError, State};
use crate::NodeId;

/// A node asks when its rights fall below this share (per cent, rounded
/// up) of the even split of the unsold capacity.
pub const LOW_WATER_PCT: u64 = 75;
/// Asks of one counter go at most this often (ms), but for the first after
/// a refused sale: an ask is answered within a round trip and a group
/// commit, or not at all.
pub const ASK_INTERVAL_MS: u64 = 250;
/// While asks bring nothing (every peer is at or below its share), the
/// interval doubles up to this (ms); rights that arrive reset it.
pub const MAX_ASK_INTERVAL_MS: u64 = 4_000;
/// Peers asked at once for one counter, at most.
pub const MAX_ASK_FANOUT: usize = 4;
/// Counters a node watches (those it sold from or was refused on); more
/// are not watched.
pub const MAX_WATCHED: usize = 1024;
/// How long an ask this node could not answer stays open (ms): if its
/// spare rights grow meanwhile, it answers then
/// ([`Rebalancer::poll_answers`]). Longer than [`MAX_ASK_INTERVAL_MS`],
/// so an asker's ask stays open until its next one.
pub const ASK_OPEN_MS: u64 = 5_000;
/// Open asks kept at most (one per asker and counter).
pub const MAX_OPEN_ASKS: usize = 256;
/// How long a sale refused for want of rights waits for a connected
/// peer's transfer, at most (ms; module docs): a round trip and a group
/// commit on a venue's Wi-Fi, with room for a lost packet.
pub const RIGHTS_WAIT_MS: u64 = 1_000;
/// The kind of a rebalancing transfer event.
pub const ANSWER_KIND: &str = "RightsRebalanced";

/// A request for escrow rights, sent to a connected peer (a sync message,
/// `PROTOCOL.md` §9.1). Untrusted input: [`Ask::check`] bounds it, and
/// [`answer`] gives at most up to `target` and never the reserve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// The stream of the escrow counter.
    pub stream: String,
    /// The counter.
    pub counter: String,
    /// The rights the asker wants to hold.
    pub target: u64,
    /// Names this ask among the asker's (the asker's clock, ms, made
    /// strictly increasing per counter): part of the answer's command id.
    pub nonce: u64,
}

/// Why an [`Ask`] is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AskError {
    /// The stream name is empty or longer than [`MAX_STREAM_BYTES`].
    #[error("stream name of {len} bytes (1..={MAX_STREAM_BYTES})")]
    Stream {
        /// Its length.
        len: usize,
    },
    /// The counter name is empty or longer than [`MAX_NAME_BYTES`].
    #[error("counter name of {len} bytes (1..={MAX_NAME_BYTES})")]
    Counter {
        /// Its length.
        len: usize,
    },
    /// The target is zero: nothing is asked.
    #[error("a target of zero rights")]
    ZeroTarget,
}

impl Ask {
    /// Checks the names' lengths (as an event's) and that something is
    /// asked for.
    pub fn check(&self) -> Result<(), AskError> {
        if self.stream.is_empty() || self.stream.len() > MAX_STREAM_BYTES {
            return Err(AskError::Stream {
                len: self.stream.len(),
            });
        }
        if self.counter.is_empty() || self.counter.len() > MAX_NAME_BYTES {
            return Err(AskError::Counter {
                len: self.counter.len(),
            });
        }
        if self.target == 0 {
            return Err(AskError::ZeroTarget);
        }
        Ok(())
    }
}

/// One node's view of an escrow counter: the figures the rule reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlook {
    /// Sum of the inits.
    pub capacity: u128,
    /// Sum of the consumption.
    pub consumed: u128,
    /// Accounts on the counter (at least 1).
    pub members: u64,
}

impl Outlook {
    /// The counter `counter` of `stream` as `state` shows it; `None` if it
    /// does not exist there.
    pub fn of(state: &State, stream: &str, counter: &str) -> Option<Outlook> {
        let e = state.stream(stream)?.escrow.get(counter)?;
        Some(Outlook {
            capacity: e.capacity,
            consumed: e.consumed,
            members: (e.accounts.len() as u64).max(1),
        })
    }

    /// Capacity not consumed.
    pub fn unsold(&self) -> u128 {
        self.capacity.saturating_sub(self.consumed)
    }

    /// The unsold capacity split evenly over the accounts, rounded up.
    pub fn share(&self) -> u64 {
        let m = self.members as u128;
        clamp(self.unsold().div_ceil(m))
    }

    /// Below this a node asks: [`LOW_WATER_PCT`] % of the share, rounded up.
    pub fn low_water(&self) -> u64 {
        clamp((self.share() as u128 * LOW_WATER_PCT as u128).div_ceil(100))
    }

    /// What an answering node keeps for its own sales: the share (at
    /// least the low-water mark).
    pub fn reserve(&self) -> u64 {
        self.share()
    }
}

fn clamp(x: u128) -> u64 {
    x.min(u64::MAX as u128) as u64
}

/// Rights `node` holds on the counter as `state` shows them (0 for a
/// debt, or no account).
pub fn rights(state: &State, stream: &str, counter: &str, node: &NodeId) -> u64 {
    state
        .stream(stream)
        .and_then(|s| s.escrow.get(counter))
        .and_then(|e| e.accounts.get(node))
        .map_or(0, |a| clamp(a.rights()))
}

/// Rights `node` owes on the counter as `state` shows them (an overdraft's
/// debt; 0 when it owes nothing): rights it receives repay this first.
pub fn owed(state: &State, stream: &str, counter: &str, node: &NodeId) -> u64 {
    state
        .stream(stream)
        .and_then(|s| s.escrow.get(counter))
        .and_then(|e| e.accounts.get(node))
        .map_or(0, |a| clamp(a.balance().min(0).unsigned_abs()))
}

/// Rights `node` holds beyond its reserve, and at most the unsold seats,
/// as `state` shows them: what it would give if asked. The simulator's measure of avoidable refusals
/// reads this too.
pub fn spare(state: &State, stream: &str, counter: &str, node: &NodeId) -> u64 {
    let Some(o) = Outlook::of(state, stream, counter) else {
        return 0;
    };
    // Rights beyond the unsold seats stand for other nodes' overdraft
    // debts (a risk window's, or a fork's): moving them sells nothing.
    rights(state, stream, counter, node)
        .saturating_sub(o.reserve())
        .min(clamp(o.unsold()))
}

/// The command id of `answerer`'s transfer for `asker`'s ask `nonce` on
/// `counter`: `rebalance/<asker, 16 hex>.<nonce>/<answerer, 16 hex>/<counter>`,
/// at most 193 bytes (a meta string may have 256).
pub fn command_id(asker: &NodeId, nonce: u64, answerer: &NodeId, counter: &str) -> String {
    let a = asker.to_string();
    let b = answerer.to_string();
    format!("rebalance/{}.{nonce}/{}/{counter}", &a[..16], &b[..16])
}

/// The transfer `me` makes for `asker`'s `ask`, as a draft for
/// [`crate::replica::Replica::handle_append`]: `min(spare, target -
/// theirs)` (module docs), with the ask's command id. `None` when nothing
/// is given: a malformed ask, an ask of oneself, no such counter, no spare,
/// or the asker holds its target already.
pub fn answer(state: &State, me: &NodeId, asker: &NodeId, ask: &Ask) -> Option<Draft> {
    if asker == me || ask.check().is_err() || asker.check_encoding().is_err() {
        return None;
    }
    let spare = spare(state, &ask.stream, &ask.counter, me);
    let theirs = rights(state, &ask.stream, &ask.counter, asker);
    let give = spare.min(ask.target.saturating_sub(theirs));
    if give == 0 {
        return None;
    }
    Some(Draft {
        stream: ask.stream.clone(),
        kind: ANSWER_KIND.into(),
        ops: vec![Op::EscrowTransfer {
            counter: ask.counter.clone(),
            to: *asker,
            amount: give,
        }],
        payload: Vec::new(),
        meta: Meta {
            command_id: Some(command_id(asker, ask.nonce, me, &ask.counter)),
            user: None,
        },
        expected_version: None,
        texts: Vec::new(),
    })
}

/// The escrow counters a command sells from (consumes or overdraws):
/// its stream and their names, for [`Rebalancer::note`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sales {
    stream: String,
    /// Each counter and the rights the command takes from it.
    counters: Vec<(String, u64)>,
}

/// What `draft` sells from (nothing for a command without sales).
pub fn sales(draft: &Draft) -> Sales {
    let counters: Vec<(String, u64)> = draft
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::EscrowConsume { counter, amount }
            | Op::EscrowOverdraw {
                counter, amount, ..
            } => Some((counter.clone(), *amount)),
            _ => None,
        })
        .collect();
    Sales {
        stream: if counters.is_empty() {
            String::new()
        } else {
            draft.stream.clone()
        },
        counters,
    }
}

/// A counter the node watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Watch {
    /// Rights a refused sale lacked, not yet asked for.
    shortfall: u64,
    /// When the last ask went.
    asked_ms: Option<u64>,
    /// The last ask's nonce.
    nonce: u64,
    /// The node's rights when it last asked.
    rights_at_ask: u64,
    /// The wait before the next ask, ms: doubles while asks bring nothing.
    interval_ms: u64,
    /// The most spare rights a connected peer had, as this node saw it,
    /// when it last asked: a peer seen with more is asked at once.
    seen_spare: u64,
    /// The peers the last ask went to: the next ask, if rights are still
    /// short, tries the others first (one of them may be out of reach).
    asked: Vec<NodeId>,
    /// The rights the last ask wanted the node to hold.
    target: u64,
}

/// The asking side of one node: the counters it watches and when it last
/// asked. A [`crate::replica::Replica`] keeps one; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Rebalancer {
    watched: BTreeMap<(String, String), Watch>,
    /// Asks not answered yet, by asker, stream and counter: the ask and
    /// when it arrived.
    open: BTreeMap<(NodeId, String, String), (Ask, u64)>,
    /// The connected peers as of the last [`Rebalancer::poll`].
    connected: Vec<NodeId>,
}

impl Rebalancer {
    /// Nothing watched.
    pub fn new() -> Rebalancer {
        Rebalancer::default()
    }

    /// The node sold from `counter` of `stream` (or means to): watch it.
    pub fn note_sale(&mut self, stream: &str, counter: &str) {
        self.watch(stream, counter);
    }

    /// A sale on `counter` of `stream` was refused, lacking `shortfall`
    /// rights: the next [`Rebalancer::poll`] asks at once.
    pub fn note_refused(&mut self, stream: &str, counter: &str, shortfall: u64) {
        if let Some(w) = self.watch(stream, counter) {
            w.shortfall = w.shortfall.max(shortfall.max(1));
        }
    }

    /// Whether a sale on `counter` of `stream` that `me` refused, lacking
    /// `shortfall` rights, should wait for an answer rather than be refused
    /// now: the peers connected at the last [`Rebalancer::poll`] hold spare
    /// rights covering the shortfall, as `state` shows them. (Nothing waits
    /// on a node that never polls: rebalancing is off, or no peer is up.)
    pub fn worth_waiting(
        &self,
        state: &State,
        me: &NodeId,
        stream: &str,
        counter: &str,
        shortfall: u64,
    ) -> bool {
        let spare: u64 = self
            .connected
            .iter()
            .filter(|p| *p != me)
            .map(|p| spare(state, stream, counter, p))
            .fold(0, u64::saturating_add);
        shortfall > 0 && spare >= shortfall
    }

    /// `asker`'s ask, at wall time `now_ms`: the transfer to make now
    /// ([`answer`]; the shell appends it as a command), or `None`. An ask
    /// that gets nothing now but is well-formed and still lacking stays
    /// open for [`ASK_OPEN_MS`] ([`Rebalancer::poll_answers`]).
    pub fn handle_ask(
        &mut self,
        state: &State,
        me: &NodeId,
        asker: &NodeId,
        ask: &Ask,
        now_ms: u64,
    ) -> Option<Draft> {
        let key = (*asker, ask.stream.clone(), ask.counter.clone());
        if let Some(d) = answer(state, me, asker, ask) {
            self.open.remove(&key);
            return Some(d);
        }
        let lacking = rights(state, &ask.stream, &ask.counter, asker) < ask.target;
        let room = self.open.len() < MAX_OPEN_ASKS || self.open.contains_key(&key);
        if asker != me && ask.check().is_ok() && lacking && room {
            self.open.insert(key, (ask.clone(), now_ms));
        }
        None
    }

    /// The open asks this node can answer now (its spare rights grew),
    /// as transfers to append; asks open longer than [`ASK_OPEN_MS`] are
    /// dropped.
    pub fn poll_answers(&mut self, state: &State, me: &NodeId, now_ms: u64) -> Vec<Draft> {
        self.open
            .retain(|_, (_, at)| now_ms < at.saturating_add(ASK_OPEN_MS));
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (key, (ask, _)) in &self.open {
            if let Some(d) = answer(state, me, &key.0, ask) {
                out.push(d);
                done.push(key.clone());
            }
        }
        for k in done {
            self.open.remove(&k);
        }
        out
    }

    /// A command that sells from `sales` was made (or refused) with
    /// `made`: its counters are watched, and a refusal for want of rights
    /// is asked for at once.
    pub fn note(&mut self, sales: &Sales, made: &Result<state::Appended, PrepareError>) {
        for (c, _) in &sales.counters {
            match made {
                Err(PrepareError::Invalid(Invalid::InsufficientRights {
                    counter,
                    held,
                    wanted,
                })) if counter == c => {
                    self.note_refused(&sales.stream, c, clamp(wanted.saturating_sub(*held)));
                }
                _ => self.note_sale(&sales.stream, c),
            }
        }
    }

    fn watch(&mut self, stream: &str, counter: &str) -> Option<&mut Watch> {
        let key = (stream.to_string(), counter.to_string());
        if !self.watched.contains_key(&key) && self.watched.len() >= MAX_WATCHED {
            return None;
        }
        Some(self.watched.entry(key).or_default())
    }

    /// The asks due at `now_ms` for node `me` with state `state`, to the
    /// peers in `connected` (established connections): `(peer, ask)`, in
    /// order. Nothing is asked, or recorded as asked, while no peer is
    /// connected; a refused sale is asked for once one is.
    pub fn poll(
        &mut self,
        state: &State,
        me: &NodeId,
        now_ms: u64,
        connected: &[NodeId],
    ) -> Vec<(NodeId, Ask)> {
        let mut out = Vec::new();
        self.connected.clear();
        self.connected.extend(connected.iter().filter(|p| *p != me));
        if self.connected.is_empty() {
            return out;
        }
        for ((stream, counter), w) in self.watched.iter_mut() {
            let Some(o) = Outlook::of(state, stream, counter) else {
                continue;
            };
            let mine = rights(state, stream, counter, me);
            if w.shortfall > 0
                && w.asked_ms
                    .is_some_and(|t| now_ms < t.saturating_add(ASK_INTERVAL_MS))
                && mine.saturating_add(w.shortfall) <= w.target
            {
                // A sale given again while it waits: its ask, for as much,
                // is on its way.
                w.shortfall = 0;
            }
            let refused = w.shortfall > 0;
            if mine > w.rights_at_ask {
                // Rights arrived: asks work again.
                w.interval_ms = ASK_INTERVAL_MS;
            }
            if !refused && mine >= o.low_water() {
                w.rights_at_ask = mine;
                continue;
            }
            let target = o
                .share()
                .max(mine.saturating_add(w.shortfall))
                .min(clamp(o.unsold()));
            if target <= mine || o.unsold() == 0 {
                w.shortfall = 0;
                continue;
            }
            // The richest connected peers first, as this node sees them,
            // those asked last time (to no avail: rights are still short)
            // after the others.
            let mut peers: Vec<(bool, u64, NodeId)> = connected
                .iter()
                .filter(|p| *p != me)
                .map(|p| (w.asked.contains(p), spare(state, stream, counter, p), *p))
                .collect();
            let most = peers.iter().map(|p| p.1).max().unwrap_or(0);
            if most > 0 {
                // A peer has spare rights, as far as this node knows: no
                // reason to wait longer than the base interval.
                w.interval_ms = ASK_INTERVAL_MS;
            }
            let due = w
                .asked_ms
                .is_none_or(|t| now_ms >= t.saturating_add(w.interval_ms.max(ASK_INTERVAL_MS)));
            // News: a peer seen with more spare than at the last ask.
            let news = most > w.seen_spare;
            if !refused && !due && !news {
                w.seen_spare = w.seen_spare.min(most);
                continue;
            }
            if !refused
                && w.asked_ms.is_some()
                && mine <= w.rights_at_ask
                && peers.iter().all(|p| p.1 == 0)
            {
                // The last ask brought nothing: wait longer next time.
                w.interval_ms = (w.interval_ms * 2).clamp(ASK_INTERVAL_MS, MAX_ASK_INTERVAL_MS);
            }
            peers.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
            peers.dedup_by_key(|p| p.2);
            let nonce = now_ms.max(w.nonce.saturating_add(1));
            let mut need = target - mine;
            w.asked.clear();
            for (_, spare, peer) in peers.into_iter().take(MAX_ASK_FANOUT) {
                if need == 0 {
                    break;
                }
                w.asked.push(peer);
                out.push((
                    peer,
                    Ask {
                        stream: stream.clone(),
                        counter: counter.clone(),
                        target,
                        nonce,
                    },
                ));
                // A peer seen with spare covers that much; one seen with
                // none may know better, and the next is asked too (every
                // one, up to the fanout, once views show no spare).
                need = need.saturating_sub(spare);
            }
            w.shortfall = 0;
            w.asked_ms = Some(now_ms);
            w.target = target;
            w.nonce = nonce;
            w.rights_at_ask = mine;
            w.seen_spare = most;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HlcClock, Keypair};

    fn key(i: u8) -> Keypair {
        Keypair::from_secret([i; 32])
    }

    /// A state where node 1 opened `capacity` seats and gave `shares[i]`
    /// to node `i + 2`.
    fn venue(capacity: u64, shares: &[u64]) -> (State, Vec<NodeId>) {
        let k1 = key(1);
        let mut ids = vec![k1.node_id()];
        let mut ops = vec![Op::EscrowInit {
            counter: "seats".into(),
            capacity,
        }];
        for (i, &s) in shares.iter().enumerate() {
            let id = key(i as u8 + 2).node_id();
            ids.push(id);
            ops.push(Op::EscrowTransfer {
                counter: "seats".into(),
                to: id,
                amount: s,
            });
        }
        let mut st = State::new();
        st.append_local(
            k1.node_id(),
            &mut HlcClock::default(),
            1_000,
            Draft {
                stream: "event/1".into(),
                kind: "Opened".into(),
                ops,
                ..Draft::default()
            },
        )
        .unwrap();
        (st, ids)
    }

    fn apply(st: &mut State, by: u8, draft: Draft) {
        st.append_local(key(by).node_id(), &mut HlcClock::default(), 2_000, draft)
            .unwrap();
    }

    fn ask(target: u64, nonce: u64) -> Ask {
        Ask {
            stream: "event/1".into(),
            counter: "seats".into(),
            target,
            nonce,
        }
    }

    #[test]
    fn share_low_water_and_reserve_follow_the_unsold_capacity() {
        let o = Outlook {
            capacity: 125,
            consumed: 0,
            members: 5,
        };
        assert_eq!((o.share(), o.low_water(), o.reserve()), (25, 19, 25));
        let o = Outlook { consumed: 122, ..o };
        assert_eq!((o.share(), o.low_water()), (1, 1));
        let o = Outlook { consumed: 125, ..o };
        assert_eq!((o.share(), o.low_water()), (0, 0));
        let o = Outlook { consumed: 200, ..o };
        assert_eq!(o.unsold(), 0, "an oversold counter has nothing unsold");
    }

    #[test]
    fn an_answer_gives_the_lack_and_keeps_the_reserve() {
        // Node 1 holds 90, node 2 holds 10: share 50, the reserve too.
        let (mut st, ids) = venue(100, &[10]);
        let (me, asker) = (ids[0], ids[1]);
        let d = answer(&st, &me, &asker, &ask(50, 7)).unwrap();
        assert_eq!(
            d.ops,
            vec![Op::EscrowTransfer {
                counter: "seats".into(),
                to: asker,
                amount: 40
            }]
        );
        assert_eq!(
            d.meta.command_id.as_deref(),
            Some(command_id(&asker, 7, &me, "seats").as_str())
        );
        // A target beyond the spare gets the spare only.
        let d = answer(&st, &me, &asker, &ask(1_000, 8)).unwrap();
        assert!(matches!(d.ops[0], Op::EscrowTransfer { amount: 40, .. }));
        // Once given, asking again with new nonces gets nothing more: the
        // reserve is kept.
        apply(&mut st, 1, d);
        assert_eq!(rights(&st, "event/1", "seats", &asker), 50);
        let d = answer(&st, &me, &asker, &ask(1_000, 9));
        assert!(d.is_none(), "the reserve is kept: {d:?}");
        assert_eq!(rights(&st, "event/1", "seats", &me), 50);
    }

    #[test]
    fn hostile_and_malformed_asks_give_nothing() {
        let (st, ids) = venue(100, &[10]);
        let me = ids[0];
        assert!(answer(&st, &me, &me, &ask(50, 1)).is_none(), "itself");
        assert!(answer(&st, &me, &ids[1], &ask(0, 1)).is_none());
        let long = Ask {
            counter: "c".repeat(MAX_NAME_BYTES + 1),
            ..ask(50, 1)
        };
        assert_eq!(long.check(), Err(AskError::Counter { len: 129 }));
        assert!(answer(&st, &me, &ids[1], &long).is_none());
        let other = Ask {
            stream: "nowhere".into(),
            ..ask(50, 1)
        };
        assert!(answer(&st, &me, &ids[1], &other).is_none());
        // A node without rights gives nothing.
        assert!(answer(&st, &ids[1], &me, &ask(100, 1)).is_none());
    }

    #[test]
    fn a_retried_ask_takes_effect_once() {
        // Node 1 holds 80, nodes 2 and 3 hold 10: share and reserve 34.
        let (mut st, ids) = venue(100, &[10, 10]);
        let (me, asker) = (ids[0], ids[1]);
        let d = answer(&st, &me, &asker, &ask(20, 3)).unwrap();
        apply(&mut st, 1, d.clone());
        // The same ask again: the same command, which exists.
        let again = answer(&st, &me, &asker, &ask(30, 3)).unwrap();
        assert_eq!(again.meta.command_id, d.meta.command_id);
        let before = st.len();
        st.append_local(me, &mut HlcClock::default(), 3_000, again)
            .unwrap();
        assert_eq!(st.len(), before, "the command is in the log already");
        assert_eq!(rights(&st, "event/1", "seats", &asker), 20);
    }

    #[test]
    fn a_node_asks_below_low_water_and_at_once_after_a_refusal() {
        // 100 seats: node 1 holds 60, node 2 holds 35, node 3 holds 5.
        let (mut st, ids) = venue(100, &[35, 5]);
        let (a, b, c) = (ids[0], ids[1], ids[2]);
        let mut r = Rebalancer::new();
        r.note_sale("event/1", "seats");
        // Share 34, low water 26: node 3 asks for 34, the richest first;
        // node 1's spare (60 - 34) does not cover the 29 it lacks, so
        // node 2 is asked too.
        assert!(r.poll(&st, &c, 1_000, &[]).is_empty(), "nobody connected");
        let asks = r.poll(&st, &c, 1_000, &[b, a]);
        assert_eq!(asks, vec![(a, ask(34, 1_000)), (b, ask(34, 1_000))]);
        // Not again before the interval.
        assert!(r.poll(&st, &c, 1_100, &[a, b]).is_empty());
        let again = r.poll(&st, &c, 1_000 + ASK_INTERVAL_MS, &[a, b]);
        assert_eq!(again.len(), 2);
        assert!(again[0].1.nonce > 1_000);
        // Node 2 holds more than its low water: no ask.
        let mut rb = Rebalancer::new();
        rb.note_sale("event/1", "seats");
        assert!(rb.poll(&st, &b, 5_000, &[a, c]).is_empty());
        // A refused sale of 30 at node 2 asks at once, for enough.
        rb.note_refused("event/1", "seats", 30);
        let asks = rb.poll(&st, &b, 5_001, &[a, c]);
        assert_eq!(asks[0].0, a);
        assert_eq!(asks[0].1.target, 65);
        // Answered, node 3 holds more than its low water and asks no more.
        let d = answer(&st, &a, &c, &ask(34, 1_000)).unwrap();
        apply(&mut st, 1, d);
        assert_eq!(rights(&st, "event/1", "seats", &c), 31);
        assert!(r.poll(&st, &c, 9_000, &[a, b]).is_empty());
    }

    #[test]
    fn an_ask_is_answered_later_when_spare_rights_appear() {
        // Node 1 holds 39, node 2 20, node 3 1: share and reserve 20.
        let (mut st, ids) = venue(60, &[20, 1]);
        let (one, two, three) = (ids[0], ids[1], ids[2]);
        let mut r = Rebalancer::new();
        // Node 2 has nothing spare: nothing now, the ask stays open.
        assert!(r
            .handle_ask(&st, &two, &three, &ask(20, 1), 1_000)
            .is_none());
        assert!(r.poll_answers(&st, &two, 1_100).is_empty());
        // Node 1 sells 15: the share falls to 15, node 2 has 5 spare.
        let sold = Draft {
            stream: "event/1".into(),
            kind: "Sold".into(),
            ops: vec![Op::EscrowConsume {
                counter: "seats".into(),
                amount: 15,
            }],
            ..Draft::default()
        };
        apply(&mut st, 1, sold);
        let answers = r.poll_answers(&st, &two, 1_200);
        assert_eq!(answers.len(), 1);
        assert!(
            matches!(answers[0].ops[0], Op::EscrowTransfer { amount: 5, to, .. } if to == three)
        );
        assert!(r.poll_answers(&st, &two, 1_300).is_empty(), "answered once");
        // An open ask expires.
        assert!(r
            .handle_ask(&st, &three, &one, &ask(50, 2), 2_000)
            .is_none());
        let d = r.poll_answers(&st, &three, 2_000 + ASK_OPEN_MS);
        assert!(d.is_empty());
        assert!(r.open.is_empty());
    }

    #[test]
    fn a_need_beyond_the_richest_spare_brings_in_the_next() {
        // Node 1 holds 34, node 2 25, node 3 1: share and reserve 20.
        let (st, ids) = venue(60, &[25, 1]);
        let mut r = Rebalancer::new();
        r.note_refused("event/1", "seats", 30);
        let asks = r.poll(&st, &ids[2], 1_000, &[ids[1], ids[0]]);
        let to: Vec<NodeId> = asks.iter().map(|(p, _)| *p).collect();
        assert_eq!(to, vec![ids[0], ids[1]], "14 and 5 spare, 30 needed");
        assert!(asks.iter().all(|(_, a)| a.target == 31));
    }
}
