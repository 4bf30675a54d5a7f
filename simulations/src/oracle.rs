//! Oracles: what must hold after a run's final heal and quiescence.
//!
//! Each is a plain function of what the nodes hold, so that tests can hand
//! them broken inputs and see them fail. They do not trust the code they
//! check: causal order is checked on the log as written, the standing
//! writes of each field are recomputed from the events' causal pasts
//! (vector clocks built here from `prev` and `deps`), and escrow totals are
//! recounted from the ops in the log.
//!
//! Commands take effect once: of the events of one stream that carry one
//! command id, only the first in canonical order `(hlc, author, seq, id)`
//! counts ([`in_effect`], computed here from the log); the oracles leave the
//! others out, and [`commands`] checks that the state agrees.

use std::collections::{BTreeMap, BTreeSet};

use weftlog_proto::hlc::MAX_CLOCK_AHEAD_MS;
use weftlog_proto::state::{Escrow, State, Stream};
use weftlog_proto::sync::{frontier_digest, Head};
use weftlog_proto::{Dot, Event, EventId, NodeId, Op};

/// What one node ends with.
pub struct NodeFinal<'a> {
    /// Its index.
    pub ix: usize,
    /// Its state.
    pub state: &'a State,
    /// The frontier it advertises (durable, signed heads).
    pub advertised: Vec<Head>,
}

/// One node's log, reopened after the run.
pub struct Reloaded<'a> {
    /// The node's index.
    pub ix: usize,
    /// The state it runs with.
    pub state: &'a State,
    /// Its log reopened and folded again, and every record in log order;
    /// or why recovery failed.
    pub log: Result<(State, Vec<(Event, EventId)>), String>,
}

/// Per event of `events`, whether it takes effect: it carries no command
/// id, or it is the first in canonical order of its stream's events with
/// that command id.
pub fn in_effect(events: &[(Event, EventId)]) -> Vec<bool> {
    let first = first_of_commands(events);
    events
        .iter()
        .enumerate()
        .map(|(i, (e, _))| {
            e.meta
                .command_id
                .as_deref()
                .is_none_or(|c| first[&(e.stream.as_str(), c)].0 == i)
        })
        .collect()
}

/// Per (stream, command id): the index of the first event in canonical
/// order, and how many events carry it.
fn first_of_commands(events: &[(Event, EventId)]) -> BTreeMap<(&str, &str), (usize, usize)> {
    let key = |i: usize| {
        let (e, id) = &events[i];
        (e.hlc, e.author, e.seq, *id)
    };
    let mut first: BTreeMap<(&str, &str), (usize, usize)> = BTreeMap::new();
    for (i, (e, _)) in events.iter().enumerate() {
        if let Some(c) = e.meta.command_id.as_deref() {
            let f = first.entry((e.stream.as_str(), c)).or_insert((i, 0));
            f.1 += 1;
            if key(i) < key(f.0) {
                f.0 = i;
            }
        }
    }
    first
}

/// What the command oracle counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandStats {
    /// (stream, command id) pairs in the log.
    pub commands: u64,
    /// Of those, carried by more than one event.
    pub carried_twice: u64,
    /// Events that took no effect (duplicates).
    pub duplicates: u64,
}

/// Commands take effect once: for every (stream, command id) in the log,
/// the state's record names the first event in canonical order, and the
/// stream lists the others as ignored.
pub fn commands(events: &[(Event, EventId)], state: &State) -> Result<CommandStats, Vec<String>> {
    let mut out = Vec::new();
    let mut stats = CommandStats::default();
    let mut members: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, (e, _)) in events.iter().enumerate() {
        if let Some(c) = e.meta.command_id.as_deref() {
            members.entry((e.stream.as_str(), c)).or_default().push(i);
        }
    }
    for ((stream, cmd), mut m) in members {
        stats.commands += 1;
        m.sort_by_key(|&i| {
            let (e, id) = &events[i];
            (e.hlc, e.author, e.seq, *id)
        });
        let first = events[m[0]].1;
        match state.command(stream, cmd) {
            Some(rec) if rec.id == first => {}
            Some(rec) => out.push(format!(
                "{stream} command {cmd}: event {} took effect, but {} sorts first",
                rec.id.short(),
                first.short()
            )),
            None => out.push(format!("{stream} command {cmd}: no record")),
        }
        let listed = state.stream(stream).and_then(|s| s.duplicates.get(cmd));
        if m.len() > 1 {
            stats.carried_twice += 1;
            stats.duplicates += m.len() as u64 - 1;
            let ignored: Vec<EventId> = m[1..].iter().map(|&i| events[i].1).collect();
            if listed.is_none_or(|d| d.took_effect != first || d.ignored != ignored) {
                out.push(format!(
                    "{stream} command {cmd}: {} events carry it, the stream lists {listed:?}",
                    m.len()
                ));
            }
        } else if listed.is_some() {
            out.push(format!(
                "{stream} command {cmd}: one event carries it, but it is listed as duplicated"
            ));
        }
    }
    if out.is_empty() {
        Ok(stats)
    } else {
        Err(out)
    }
}

fn hex8(b: &[u8; 32]) -> String {
    b[..4].iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal frontiers, state hashes and advertised digests on every node.
pub fn convergence(nodes: &[NodeFinal<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(first) = nodes.first() else {
        return out;
    };
    let f0 = first.state.frontier();
    let h0 = first.state.state_hash();
    let d0 = frontier_digest(&first.advertised);
    for n in &nodes[1..] {
        let f = n.state.frontier();
        if f != f0 {
            let top = |f: &[(NodeId, u64, EventId)]| -> BTreeMap<NodeId, u64> {
                let mut m = BTreeMap::new();
                for &(a, s, _) in f {
                    let e = m.entry(a).or_insert(0);
                    *e = s.max(*e);
                }
                m
            };
            let (t0, t) = (top(&f0), top(&f));
            let missing: u64 = t0
                .iter()
                .map(|(a, s)| s.saturating_sub(t.get(a).copied().unwrap_or(0)))
                .sum();
            let extra: u64 = t
                .iter()
                .map(|(a, s)| s.saturating_sub(t0.get(a).copied().unwrap_or(0)))
                .sum();
            // Each head one side lacks, and whether the other holds the
            // event at all (a head on one side but an inner event on the
            // other means the two disagree on the chain, not the events).
            let only = |a: &[(NodeId, u64, EventId)],
                        b: &[(NodeId, u64, EventId)],
                        other: &State|
             -> Vec<String> {
                a.iter()
                    .filter(|h| !b.contains(h))
                    .map(|(au, s, id)| {
                        let held = if other.contains(id) { " (held)" } else { "" };
                        format!("{}:{s}={}{held}", au.short(), id.short())
                    })
                    .collect()
            };
            out.push(format!(
                "node {} and node {} hold different events: node {} lacks {missing} of node {}'s, node {} lacks {extra} (heads only on node {}: {:?}; only on node {}: {:?})",
                first.ix, n.ix, n.ix, first.ix, first.ix,
                first.ix, only(&f0, &f, n.state), n.ix, only(&f, &f0, first.state)
            ));
            continue;
        }
        let h = n.state.state_hash();
        if h != h0 {
            out.push(format!(
                "node {} and node {} hold the same events but state hashes {}… and {}…",
                first.ix,
                n.ix,
                hex8(&h0),
                hex8(&h)
            ));
        }
        let d = frontier_digest(&n.advertised);
        if d != d0 {
            out.push(format!(
                "node {} and node {} hold the same events but advertise different frontiers",
                first.ix, n.ix
            ));
        }
    }
    out
}

/// Every acknowledged event is in the node's state and log.
pub fn acknowledged(acked: &BTreeMap<EventId, (usize, u64)>, n: &Reloaded<'_>) -> Vec<String> {
    let mut out = Vec::new();
    {
        let logged: Option<BTreeSet<EventId>> = n
            .log
            .as_ref()
            .ok()
            .map(|(_, evs)| evs.iter().map(|(_, id)| *id).collect());
        let mut missing = 0u64;
        let mut first = None;
        for (id, (by, at_ms)) in acked {
            let in_state = n.state.contains(id);
            let in_log = logged.as_ref().is_none_or(|l| l.contains(id));
            if !(in_state && in_log) {
                missing += 1;
                first.get_or_insert((*id, *by, *at_ms, in_state));
            }
        }
        if let Some((id, by, at_ms, in_state)) = first {
            out.push(format!(
                "node {} lacks {missing} acknowledged events, first {} (acknowledged by node {by} at {at_ms} ms; {})",
                n.ix,
                id.short(),
                if in_state { "in its state but not its log" } else { "not in its state" }
            ));
        }
    }
    out
}

/// Nothing acknowledged is lost, in a run where authors may fork (a node
/// restored from an old copy of its storage): an acknowledged event counts
/// as kept if its id is held anywhere, on whichever branch. `held` is every
/// id in any node's state or log. (That every node holds the same events is
/// the convergence oracle's question.)
pub fn acknowledged_anywhere(
    acked: &BTreeMap<EventId, (usize, u64)>,
    held: &BTreeSet<EventId>,
) -> Vec<String> {
    let lost: Vec<(&EventId, &(usize, u64))> =
        acked.iter().filter(|(id, _)| !held.contains(id)).collect();
    match lost.first() {
        None => Vec::new(),
        Some((id, (by, at_ms))) => vec![format!(
            "{} acknowledged events are held by no node, first {} (acknowledged by node {by} at {at_ms} ms)",
            lost.len(),
            id.short()
        )],
    }
}

/// The forks a log holds both branches of: per author, the seqs that more
/// than one event of the log carries.
pub fn forks_held(events: &[(Event, EventId)]) -> BTreeMap<NodeId, BTreeSet<u64>> {
    let mut ids: BTreeMap<(NodeId, u64), BTreeSet<EventId>> = BTreeMap::new();
    for (e, id) in events {
        ids.entry((e.author, e.seq)).or_default().insert(*id);
    }
    let mut out: BTreeMap<NodeId, BTreeSet<u64>> = BTreeMap::new();
    for ((author, seq), set) in ids {
        if set.len() > 1 {
            out.entry(author).or_default().insert(seq);
        }
    }
    out
}

/// Forks are reported on every node: the authors whose two branches node
/// `ix` holds (`held`, from [`forks_held`] over its log) are exactly the
/// authors its replica lists as forked (`listed`: author → the lowest seq
/// held twice, as status shows them), at the same seq.
pub fn forks_reported(
    ix: usize,
    held: &BTreeMap<NodeId, BTreeSet<u64>>,
    listed: &BTreeMap<NodeId, u64>,
) -> Vec<String> {
    let mut out: Vec<String> = held
        .iter()
        .filter(|(a, seqs)| listed.get(*a) != seqs.first())
        .map(|(a, seqs)| {
            format!(
                "node {ix} holds both branches of author {} at {} seqs (first {}) but lists {:?}",
                a.short(),
                seqs.len(),
                seqs.first().copied().unwrap_or(0),
                listed.get(a)
            )
        })
        .collect();
    for a in listed.keys().filter(|a| !held.contains_key(*a)) {
        out.push(format!(
            "node {ix} lists author {} as forked, but its log holds one branch",
            a.short()
        ));
    }
    out
}

/// Escrow oversell is marked identically: every node's escrow read model
/// (capacity, consumption, each account) is the same. Convergence of state
/// hashes implies it; this names the counter that differs.
// Once the read model marks a forked author's double spends (an oversell
// mark on `Escrow`), that mark is part of `Escrow` and compared here too;
// a check that each double spend is marked belongs beside this one then.
pub fn escrow_identical(nodes: &[(usize, &State)]) -> Vec<String> {
    let mut out = Vec::new();
    let Some((ix0, first)) = nodes.first() else {
        return out;
    };
    // The read model as served (its serialized form): the private
    // bookkeeping is replica-local.
    let model = |st: &State| -> BTreeMap<(String, String), String> {
        st.streams()
            .iter()
            .flat_map(|(name, s)| {
                s.escrow.iter().map(move |(c, e)| {
                    let shown = serde_json::to_string(e).unwrap_or_else(|e| e.to_string());
                    ((name.clone(), c.clone()), shown)
                })
            })
            .collect()
    };
    let m0 = model(first);
    for (ix, st) in &nodes[1..] {
        let m = model(st);
        if m != m0 {
            let which = m0
                .iter()
                .find(|(k, v)| m.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .or_else(|| m.keys().find(|k| !m0.contains_key(*k)).cloned())
                .unwrap_or_default();
            out.push(format!(
                "node {ix0} and node {ix} mark escrow differently: {} {} differs",
                which.0, which.1
            ));
        }
    }
    out
}

/// What the clock oracle looks at for one node.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClockView {
    /// The node.
    pub ix: usize,
    /// Whether its own wall clock ever jumped.
    pub jumped: bool,
    /// The hlc of its latest local event, ms.
    pub last_hlc_ms: Option<u64>,
    /// Its wall time at the end, ms.
    pub wall_ms: u64,
    /// The first local event whose hlc was more than
    /// [`MAX_CLOCK_AHEAD_MS`] past the highest wall time the node's clock
    /// had shown: (hlc ms, that wall time ms).
    pub first_ahead: Option<(u64, u64)>,
}

/// A clock that jumps ahead drags no other: no node ever made an event
/// more than [`MAX_CLOCK_AHEAD_MS`] past the highest wall time its clock had
/// shown, and after the final heal no node whose clock never jumped has a
/// latest local event more than that past its wall time.
pub fn clock(nodes: &[ClockView]) -> Vec<String> {
    let mut out = Vec::new();
    for n in nodes {
        if let Some((hlc, wall)) = n.first_ahead {
            out.push(format!(
                "node {} made an event at hlc {hlc} ms, {} ms past the highest wall time its clock had shown",
                n.ix,
                hlc - wall
            ));
        }
        match n.last_hlc_ms {
            Some(hlc) if !n.jumped && hlc > n.wall_ms.saturating_add(MAX_CLOCK_AHEAD_MS) => out
                .push(format!(
                    "node {}'s latest local event is at hlc {hlc} ms, {} ms past its wall time",
                    n.ix,
                    hlc - n.wall_ms
                )),
            _ => {}
        }
    }
    out
}

/// The node's log, reopened, folds to the state the node runs with.
pub fn durability(n: &Reloaded<'_>) -> Vec<String> {
    let mut out = Vec::new();
    {
        match &n.log {
            Err(e) => out.push(format!("node {}: its log does not reopen: {e}", n.ix)),
            Ok((state, events)) => {
                if events.len() as u64 != n.state.len() {
                    out.push(format!(
                        "node {}: its log holds {} events, its state {}",
                        n.ix,
                        events.len(),
                        n.state.len()
                    ));
                } else if state.state_hash() != n.state.state_hash() {
                    out.push(format!(
                        "node {}: its log folds to another state than the one it runs with",
                        n.ix
                    ));
                }
            }
        }
    }
    out
}

/// Every record's `prev` and deps come before it in the log, and each
/// author's records follow its chain: a record's seq is one more than its
/// `prev`'s. A forked author (two events with one seq, each following its
/// own `prev`) has two chains; each is checked as a chain, so a log that
/// holds both branches passes.
pub fn causal_order(events: &[(Event, EventId)]) -> Result<(), String> {
    let mut seen: BTreeMap<EventId, u64> = BTreeMap::new();
    for (i, (e, id)) in events.iter().enumerate() {
        if let Some(p) = e.prev.filter(|p| !seen.contains_key(p)) {
            return Err(format!(
                "record {i} ({}) comes before its prev {}",
                id.short(),
                p.short()
            ));
        }
        let after = e.prev.map_or(0, |p| seen[&p]);
        if e.seq != after + 1 {
            return Err(format!(
                "record {i} ({}) is seq {} of its author, but its prev is seq {after}",
                id.short(),
                e.seq
            ));
        }
        if let Some(d) = e.deps.iter().find(|d| !seen.contains_key(d)) {
            return Err(format!(
                "record {i} ({}) comes before its dependency {}",
                id.short(),
                d.short()
            ));
        }
        seen.insert(*id, e.seq);
    }
    Ok(())
}

/// Escrow: on every counter, consumption never exceeds capacity plus what
/// overdrawn accounts owe (a forked author's double spend, or overdraft
/// sales under a risk window, within what they recorded beyond the
/// author's rights), no account gives away or uses more than it got
/// otherwise, the totals match a recount of the ops in the log (of the
/// events in effect), and every sale the read model marks oversold has a
/// compensation standing. Returns the figures summed over counters.
pub fn escrow(
    streams: &BTreeMap<String, Stream>,
    events: &[(Event, EventId)],
) -> Result<EscrowFigures, Vec<String>> {
    let mut out = Vec::new();
    let mut recount: BTreeMap<(&str, &str), (u128, u128)> = BTreeMap::new();
    // Overdraft sales in effect, per counter and author.
    let mut overdraws: BTreeMap<(&str, &str), Vec<(NodeId, EventId)>> = BTreeMap::new();
    let effective = in_effect(events);
    for (i, (e, id)) in events.iter().enumerate() {
        if !effective[i] {
            continue;
        }
        for op in &e.ops {
            match op {
                Op::EscrowInit { counter, capacity } => {
                    recount.entry((&e.stream, counter)).or_default().0 += *capacity as u128;
                }
                Op::EscrowConsume { counter, amount } => {
                    recount.entry((&e.stream, counter)).or_default().1 += *amount as u128;
                }
                Op::EscrowOverdraw {
                    counter, amount, ..
                } => {
                    recount.entry((&e.stream, counter)).or_default().1 += *amount as u128;
                    overdraws
                        .entry((&e.stream, counter))
                        .or_default()
                        .push((e.author, *id));
                }
                _ => {}
            }
        }
    }
    let mut figures = EscrowFigures::default();
    for (name, st) in streams {
        for (counter, esc) in &st.escrow {
            // What each account's overdraft sales recorded beyond its rights.
            let mut overdrafts: BTreeMap<NodeId, u128> = BTreeMap::new();
            for (author, id) in overdraws
                .get(&(name.as_str(), counter.as_str()))
                .into_iter()
                .flatten()
            {
                *overdrafts.entry(*author).or_default() += u128::from(esc.overdraft_of(id));
            }
            check_escrow(name, counter, esc, &overdrafts, &mut out);
            for (sale, m) in &esc.oversold {
                figures.oversold += u128::from(m.units);
                match m.compensation {
                    Some(_) => figures.compensated += u128::from(m.units),
                    None => out.push(format!(
                        "{name} {counter}: sale {} is marked oversold ({} units) and has no compensation",
                        sale.short(),
                        m.units
                    )),
                }
            }
            figures.released += esc.released;
            figures.honoured += esc.honoured;
            let (cap, used) = recount
                .get(&(name.as_str(), counter.as_str()))
                .copied()
                .unwrap_or_default();
            if cap != esc.capacity || used != esc.consumed {
                out.push(format!(
                    "{name} {counter}: the log's ops add up to capacity {cap}, consumed {used}; the state says {} and {}",
                    esc.capacity, esc.consumed
                ));
            }
            figures.consumed += esc.consumed;
            figures.capacity += esc.capacity;
        }
    }
    if out.is_empty() {
        Ok(figures)
    } else {
        Err(out)
    }
}

/// What [`escrow`] sums over every counter of one node's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EscrowFigures {
    /// Rights consumed (seats sold).
    pub consumed: u128,
    /// Capacity.
    pub capacity: u128,
    /// Units of the sales marked oversold.
    pub oversold: u128,
    /// Of those, the units with a compensation standing.
    pub compensated: u128,
    /// Units released by `cancel` and `waitlist` compensations.
    pub released: u128,
    /// Units kept by `honour` compensations (capacity raised).
    pub honoured: u128,
}

fn check_escrow(
    stream: &str,
    counter: &str,
    esc: &Escrow,
    overdrafts: &BTreeMap<NodeId, u128>,
    out: &mut Vec<String>,
) {
    // An account may spend more than it got only as a forked author that
    // spent on two branches the rights it held at the fork (the read model
    // must then mark it, with what it owes and its spends past the fork),
    // or by overdraft sales under a risk window, owing at most what they
    // recorded beyond its rights.
    let (mut init, mut used, mut owed) = (0u128, 0u128, 0u128);
    for (node, a) in &esc.accounts {
        init += a.init;
        used += a.consumed;
        let (spent, got) = (a.sent + a.consumed, a.init + a.received);
        match esc.overdrawn.get(node) {
            Some(o) if spent > got && o.owed == spent - got && !o.events.is_empty() => {
                owed += o.owed;
            }
            Some(o)
                if spent > got
                    && o.owed == spent - got
                    && o.owed <= overdrafts.get(node).copied().unwrap_or(0) =>
            {
                owed += o.owed;
            }
            Some(o) => out.push(format!(
                "{stream} {counter}: node {} is marked overdrawn by {} ({} events), but gave away {} and used {} of the {} it got",
                node.short(),
                o.owed,
                o.events.len(),
                a.sent,
                a.consumed,
                got
            )),
            None if spent > got => out.push(format!(
                "{stream} {counter}: node {} gave away {} and used {} of the {} it got",
                node.short(),
                a.sent,
                a.consumed,
                got
            )),
            None => {}
        }
    }
    if esc.overdrawn.keys().any(|n| !esc.accounts.contains_key(n)) {
        out.push(format!(
            "{stream} {counter}: an account is marked overdrawn that does not exist"
        ));
    }
    if esc.consumed > esc.capacity + owed {
        out.push(format!(
            "{stream} {counter}: consumed {} over capacity {} (overdrawn accounts owe {owed})",
            esc.consumed, esc.capacity
        ));
    }
    if init != esc.capacity || used != esc.consumed {
        out.push(format!(
            "{stream} {counter}: accounts add up to capacity {init}, consumed {used}; the counter says {} and {}",
            esc.capacity, esc.consumed
        ));
    }
}

/// A write the conflict oracle follows: its dot, its event, the event's
/// lane, and the index of the event's vector clock.
type W = (Dot, EventId, usize, usize);

/// What the conflict oracle counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConflictStats {
    /// Fields with more than one standing write.
    pub conflicts: u64,
    /// Pairs of concurrent writes to one field.
    pub concurrent_pairs: u64,
}

/// Register fields: the writes left standing on `streams` must be exactly
/// the writes to that field that no other write to it has in its causal
/// past. So every pair of concurrent same-field writes that no later write
/// superseded shows as a conflict, and nothing else does. Causal pasts are
/// computed here from the events' `prev` and `deps` (`events` in a causal
/// order, as a log holds them). In a stream where a command was carried out
/// twice, the duplicate's write never stood, and a write it superseded
/// stands unless an event in effect supersedes it too: there the standing
/// writes are those in effect that no event in effect names.
pub fn conflicts(
    events: &[(Event, EventId)],
    streams: &BTreeMap<String, Stream>,
) -> Result<ConflictStats, Vec<String>> {
    // Vector clocks over lanes (runs of one author's chain: one per
    // author, plus one per branch of a forked author), of every event.
    let mut lane_of: BTreeMap<EventId, usize> = BTreeMap::new();
    // Per lane, its last event.
    let mut tails: Vec<EventId> = Vec::new();
    let mut vc_of: BTreeMap<EventId, usize> = BTreeMap::new();
    let mut vcs: Vec<Vec<u64>> = Vec::with_capacity(events.len());
    // (stream, field) -> writes: (dot, event, lane, index of its vc)
    let mut writes: BTreeMap<(&str, &str), Vec<W>> = BTreeMap::new();
    // (stream, field) -> dots named by events in effect.
    let mut named: BTreeMap<(&str, &str), BTreeSet<Dot>> = BTreeMap::new();
    let effective = in_effect(events);
    let duplicated: BTreeSet<&str> = events
        .iter()
        .zip(&effective)
        .filter(|(_, &eff)| !eff)
        .map(|((e, _), _)| e.stream.as_str())
        .collect();
    let mut out = Vec::new();
    for ((e, id), &eff) in events.iter().zip(&effective) {
        // Its lane: its prev's, if prev is that lane's last; else a new one.
        let lane = match e.prev.and_then(|p| lane_of.get(&p).map(|&l| (p, l))) {
            Some((p, l)) if tails[l] == p => l,
            _ => {
                tails.push(*id);
                tails.len() - 1
            }
        };
        tails[lane] = *id;
        lane_of.insert(*id, lane);
        let mut vc = vec![0u64; tails.len()];
        for p in e.prev.iter().chain(e.deps.iter()) {
            let Some(&i) = vc_of.get(p) else {
                out.push(format!(
                    "{} names {} which is not before it",
                    id.short(),
                    p.short()
                ));
                continue;
            };
            for (x, y) in vc.iter_mut().zip(&vcs[i]) {
                *x = (*x).max(*y);
            }
        }
        vc[lane] = e.seq;
        let i = vcs.len();
        vcs.push(vc);
        vc_of.insert(*id, i);
        if !eff {
            continue;
        }
        for op in &e.ops {
            if let Op::Set {
                field, supersedes, ..
            } = op
            {
                named
                    .entry((&e.stream, field))
                    .or_default()
                    .extend(supersedes.iter().copied());
                writes.entry((&e.stream, field)).or_default().push((
                    Dot {
                        author: e.author,
                        seq: e.seq,
                    },
                    *id,
                    lane,
                    i,
                ));
            }
        }
    }
    if !out.is_empty() {
        return Err(out);
    }
    let mut stats = ConflictStats::default();
    let in_past = |w: &W, of: &W| -> bool { vcs[of.3].get(w.2).is_some_and(|&v| v >= w.0.seq) };
    for ((stream, field), ws) in &writes {
        let mut standing: BTreeSet<(Dot, EventId)> = BTreeSet::new();
        let by_name = duplicated.contains(stream);
        let names = named.get(&(*stream, *field));
        for (i, w) in ws.iter().enumerate() {
            let stands = if by_name {
                names.is_none_or(|n| !n.contains(&w.0))
            } else {
                !ws.iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.1 != w.1 && in_past(w, o))
            };
            if stands {
                standing.insert((w.0, w.1));
            }
            for o in &ws[i + 1..] {
                if o.1 != w.1 && !in_past(w, o) && !in_past(o, w) {
                    stats.concurrent_pairs += 1;
                }
            }
        }
        if standing.len() > 1 {
            stats.conflicts += 1;
        }
        let shown: BTreeSet<(Dot, EventId)> = streams
            .get(*stream)
            .and_then(|s| s.fields.get(*field))
            .map(|w| w.keys().map(|k| (k.dot(), k.event)).collect())
            .unwrap_or_default();
        if shown != standing {
            out.push(format!(
                "{stream} {field}: {} writes stand, but {} are concurrent and unsuperseded{}",
                shown.len(),
                standing.len(),
                if standing.len() > 1 && shown.len() <= 1 {
                    " (a conflict is not surfaced)"
                } else {
                    ""
                }
            ));
        }
    }
    if out.is_empty() {
        Ok(stats)
    } else {
        Err(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weftlog_proto::sync::MemStore;
    use weftlog_proto::{Draft, HlcClock, Keypair};

    fn rename(v: &str) -> Draft {
        Draft {
            stream: "c/1".into(),
            kind: "Renamed".into(),
            ops: vec![Op::Set {
                field: "name".into(),
                value: v.as_bytes().to_vec(),
                supersedes: vec![],
            }],
            ..Draft::default()
        }
    }

    fn events_of(store: &MemStore, keys: &[&Keypair]) -> Vec<(Event, EventId)> {
        let mut out = Vec::new();
        for k in keys {
            let mut seq = 1;
            while let Some(s) = store.get(&k.node_id(), seq) {
                out.push((Event::decode_trusted(&s.bytes).unwrap(), s.id));
                seq += 1;
            }
        }
        out
    }

    #[test]
    fn concurrent_writes_must_stand_together() {
        let (ka, kb) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
        let mut a = MemStore::new();
        let mut b = MemStore::new();
        a.commit(&ka, &mut HlcClock::default(), 1_000, [rename("a")])
            .unwrap();
        b.commit(&kb, &mut HlcClock::default(), 1_000, [rename("b")])
            .unwrap();
        // Merge b's event into a by insert (both are heads, concurrent).
        let s = b.get(&kb.node_id(), 1).unwrap().clone();
        let e = Event::decode_trusted(&s.bytes).unwrap();
        weftlog_proto::sync::Store::insert(&mut a, &e, s.id, &s.bytes, s.sig).unwrap();
        let events = events_of(&a, &[&ka, &kb]);
        let stats = conflicts(&events, a.state().streams()).unwrap();
        assert_eq!(stats.conflicts, 1);
        assert_eq!(stats.concurrent_pairs, 1);
        // A state showing only one of them hides the conflict.
        let mut hidden = a.state().streams().clone();
        let f = hidden
            .get_mut("c/1")
            .unwrap()
            .fields
            .get_mut("name")
            .unwrap();
        let first = *f.keys().next().unwrap();
        f.remove(&first);
        let e = conflicts(&events, &hidden).unwrap_err();
        assert!(e[0].contains("not surfaced"), "{e:?}");
    }

    #[test]
    fn a_log_out_of_causal_order_is_caught() {
        let ka = Keypair::from_secret([1; 32]);
        let mut a = MemStore::new();
        a.commit(
            &ka,
            &mut HlcClock::default(),
            1_000,
            [rename("1"), rename("2")],
        )
        .unwrap();
        let mut events = events_of(&a, &[&ka]);
        assert!(causal_order(&events).is_ok());
        events.reverse();
        assert!(causal_order(&events).is_err());
    }

    #[test]
    fn escrow_over_capacity_is_caught() {
        let mut esc = Escrow::default();
        esc.capacity = 10;
        esc.consumed = 11;
        let mut st = Stream::default();
        st.escrow.insert("seats".into(), esc);
        let streams = BTreeMap::from([("event/x".to_string(), st)]);
        let e = escrow(&streams, &[]).unwrap_err();
        assert!(e.iter().any(|v| v.contains("over capacity")), "{e:?}");
    }

    #[test]
    fn a_command_that_counted_twice_is_caught() {
        let (ka, kb) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
        let order = |who: &str| {
            let mut d = rename(who);
            d.meta.command_id = Some("order-1".into());
            d
        };
        let mut a = MemStore::new();
        let mut b = MemStore::new();
        a.commit(&ka, &mut HlcClock::default(), 1_000, [order("a")])
            .unwrap();
        b.commit(&kb, &mut HlcClock::default(), 2_000, [order("b")])
            .unwrap();
        // `b` holds a's event too: it took effect (it sorts first).
        let s = a.get(&ka.node_id(), 1).unwrap().clone();
        let e = Event::decode_trusted(&s.bytes).unwrap();
        weftlog_proto::sync::Store::insert(&mut b, &e, s.id, &s.bytes, s.sig).unwrap();
        let events = events_of(&b, &[&ka, &kb]);
        let stats = commands(&events, b.state()).unwrap();
        assert_eq!(
            (stats.commands, stats.carried_twice, stats.duplicates),
            (1, 1, 1)
        );
        // A state that kept the event it saw first (its own) is caught, as
        // is one that does not list the duplicate.
        let e = commands(&events, a.state()).unwrap_err();
        assert!(e.iter().any(|v| v.contains("the stream lists")), "{e:?}");
        let mut own = MemStore::new();
        own.commit(&kb, &mut HlcClock::default(), 2_000, [order("b")])
            .unwrap();
        let e = commands(&events, own.state()).unwrap_err();
        assert!(e.iter().any(|v| v.contains("sorts first")), "{e:?}");
        assert!(e.iter().any(|v| v.contains("the stream lists")), "{e:?}");
    }
}

#[cfg(test)]
mod adversary_tests {
    use super::*;
    use weftlog_proto::sync::MemStore;
    use weftlog_proto::{Draft, HlcClock, Keypair};

    fn edit(v: &str) -> Draft {
        Draft {
            stream: "c/1".into(),
            kind: "Renamed".into(),
            ops: vec![Op::Set {
                field: "name".into(),
                value: v.as_bytes().to_vec(),
                supersedes: vec![],
            }],
            ..Draft::default()
        }
    }

    /// Two branches of one author: seqs 1-2 shared, then seq 3 twice (as a
    /// node restored from a copy taken at seq 2 makes), in one log.
    fn forked_log() -> (NodeId, Vec<(Event, EventId)>) {
        let k = Keypair::from_secret([7; 32]);
        let mut a = MemStore::new();
        let mut clock = HlcClock::default();
        for (i, v) in ["x", "y"].iter().enumerate() {
            a.append(&k, &mut clock, 1_000 + i as u64, edit(v)).unwrap();
        }
        let mut b = a.clone();
        let mut clock_b = clock.clone();
        a.append(&k, &mut clock, 2_000, edit("a")).unwrap();
        b.append(&k, &mut clock_b, 2_001, edit("b")).unwrap();
        let mut log = Vec::new();
        for seq in 1..=3 {
            let s = a.get(&k.node_id(), seq).unwrap();
            log.push((Event::decode_trusted(&s.bytes).unwrap(), s.id));
        }
        let s = b.get(&k.node_id(), 3).unwrap();
        log.push((Event::decode_trusted(&s.bytes).unwrap(), s.id));
        (k.node_id(), log)
    }

    #[test]
    fn a_log_holding_both_branches_of_a_fork_is_in_causal_order() {
        let (_, log) = forked_log();
        causal_order(&log).unwrap();
        // A branch's event before the event it follows is still caught.
        let mut bad = log.clone();
        bad.swap(1, 3);
        assert!(causal_order(&bad).is_err());
    }

    #[test]
    fn a_node_holding_both_branches_must_report_the_fork() {
        let (author, log) = forked_log();
        let held = forks_held(&log);
        assert_eq!(held[&author], BTreeSet::from([3]));
        let v = forks_reported(2, &held, &BTreeMap::new());
        assert!(v[0].contains("but lists None"), "{v:?}");
        assert!(forks_reported(2, &held, &BTreeMap::from([(author, 3)])).is_empty());
        // At another seq, or an author whose log holds one branch: caught.
        assert!(!forks_reported(2, &held, &BTreeMap::from([(author, 2)])).is_empty());
        let other = NodeId([9; 32]);
        assert!(!forks_reported(2, &BTreeMap::new(), &BTreeMap::from([(other, 1)])).is_empty());
        assert!(forks_held(&log[..3]).is_empty());
    }

    #[test]
    fn an_acknowledged_event_counts_as_kept_on_either_branch() {
        let (_, log) = forked_log();
        let acked: BTreeMap<EventId, (usize, u64)> =
            log.iter().map(|(_, id)| (*id, (0, 5))).collect();
        let held: BTreeSet<EventId> = log.iter().map(|(_, id)| *id).collect();
        assert!(acknowledged_anywhere(&acked, &held).is_empty());
        let mut one_branch = held.clone();
        one_branch.remove(&log[3].1);
        let v = acknowledged_anywhere(&acked, &one_branch);
        assert!(
            v[0].starts_with("1 acknowledged events are held by no node"),
            "{v:?}"
        );
    }

    #[test]
    fn a_clock_dragged_past_the_bound_is_caught() {
        let wall = 1_000_000;
        let ok = ClockView {
            ix: 0,
            last_hlc_ms: Some(wall + MAX_CLOCK_AHEAD_MS),
            wall_ms: wall,
            ..ClockView::default()
        };
        assert!(clock(&[ok]).is_empty());
        let dragged = ClockView {
            last_hlc_ms: Some(wall + MAX_CLOCK_AHEAD_MS + 1),
            ..ok
        };
        assert_eq!(clock(&[dragged]).len(), 1);
        // The node whose own clock jumped may be ahead of its wall time
        // after the jump back, but never past what its clock had shown.
        let jumped = ClockView {
            jumped: true,
            ..dragged
        };
        assert!(clock(&[jumped]).is_empty());
        let ahead = ClockView {
            first_ahead: Some((wall + 600_000, wall)),
            ..jumped
        };
        assert!(clock(&[ahead])[0].contains("600000 ms past"));
    }

    #[test]
    fn escrow_marked_differently_is_caught() {
        let mut a = MemStore::new();
        let k = Keypair::from_secret([8; 32]);
        let init = Draft {
            stream: "event/keynote".into(),
            kind: "Opened".into(),
            ops: vec![Op::EscrowInit {
                counter: "seats".into(),
                capacity: 10,
            }],
            ..Draft::default()
        };
        let b = a.clone();
        a.append(&k, &mut HlcClock::default(), 1_000, init).unwrap();
        assert!(escrow_identical(&[(0, a.state()), (1, a.state())]).is_empty());
        let v = escrow_identical(&[(0, a.state()), (1, b.state())]);
        assert!(v[0].contains("event/keynote seats"), "{v:?}");
    }
}
