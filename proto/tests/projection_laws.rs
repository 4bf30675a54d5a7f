//! Guards the law of ordered projections (`DESIGN.md` §3, issue 8): events
//! made the way a node makes them (`State::prepare`, `Event::seal`,
//! `State::insert`) by desks that sell seats offline and meet now and then,
//! delivered to a projector in random causal orders, in batches, with
//! duplicates and with one desk's events held back to the end (a desk
//! offline for long), give the same state hash and the same JSON view as a
//! replay in canonical order, for both shipped projections and at any
//! checkpoint interval.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use common::{config, Rng};
use proptest::prelude::*;
use weftlog_proto::event::{Policy, PolicyMode};
use weftlog_proto::projection::{
    Inserted, Key, KindCounts, MemorySource, Projection, Projector, SeatOrder, CHECKPOINT_EVERY,
};
use weftlog_proto::state::{Draft, Inserted as Folded, Prepared};
use weftlog_proto::{Event, EventId, HlcClock, Keypair, Meta, NodeId, Op, State};

/// Streams the scripts write to: two prefixes, one of them twice.
const STREAMS: [&str; 3] = ["session/7", "session/8", "badge/1"];
/// Kinds of the events.
const KINDS: [&str; 3] = ["SeatsSold", "Edited", "Printed"];
/// The escrow counter.
const SEATS: &str = "seats";
/// Most desks in a script.
const DESKS_MAX: usize = 4;
/// Most steps in a script.
const STEPS_MAX: usize = 120;

/// Keys derived once: ed25519 key derivation is slow in debug builds.
fn keys() -> &'static [Keypair] {
    static KEYS: OnceLock<Vec<Keypair>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..DESKS_MAX)
            .map(|i| Keypair::from_secret([i as u8 + 11; 32]))
            .collect()
    })
}

/// One desk: its author, replica, clock and the events it holds in the
/// order it inserted them (a causal order).
struct Desk {
    id: NodeId,
    state: State,
    clock: HlcClock,
    order: Vec<(Event, EventId)>,
}

impl Desk {
    fn new(i: usize) -> Desk {
        Desk {
            id: keys()[i].node_id(),
            state: State::new(),
            clock: HlcClock::default(),
            order: Vec::new(),
        }
    }

    /// Prepares, seals and inserts `draft`; a refused sale or a command
    /// already carried out here makes nothing.
    fn append(&mut self, now_ms: u64, draft: Draft) {
        if let Ok(Prepared::New(e)) = self.state.prepare(self.id, &mut self.clock, now_ms, draft) {
            let (_, id) = e.seal();
            assert_eq!(self.state.insert(&e, id), Ok(Folded::New));
            self.order.push((e, id));
        }
    }

    fn merge_from(&mut self, from: &[(Event, EventId)]) {
        for (e, id) in from {
            match self.state.insert(e, *id) {
                Ok(Folded::New) => {
                    self.clock.observe(e.hlc);
                    self.order.push((e.clone(), *id));
                }
                Ok(Folded::Duplicate) => {}
                Err(err) => panic!("merge refused {id:?}: {err}"),
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// A sale of `seats`, within the rights held or (`beyond`) an overdraft
    /// past them, maybe under a command id shared across desks.
    Sell {
        desk: usize,
        stream: usize,
        now_ms: u64,
        seats: u64,
        beyond: bool,
        command: Option<u8>,
    },
    /// Seats added to a counter.
    Add {
        desk: usize,
        stream: usize,
        now_ms: u64,
        seats: u64,
    },
    /// An event with no escrow op.
    Other {
        desk: usize,
        stream: usize,
        now_ms: u64,
        kind: usize,
    },
    Merge {
        to: usize,
        from: usize,
    },
}

/// Wall times close together, with steps backwards.
fn now_ms() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 1_000u64..1_030, 1 => 0u64..5]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..DESKS_MAX, 0..2usize, now_ms(), 1u64..=3, any::<bool>(), prop::option::weighted(0.2, 0u8..3))
            .prop_map(|(desk, stream, now_ms, seats, beyond, command)| Step::Sell {
                desk, stream, now_ms, seats, beyond, command,
            }),
        1 => (0..DESKS_MAX, 0..2usize, now_ms(), 1u64..=3)
            .prop_map(|(desk, stream, now_ms, seats)| Step::Add { desk, stream, now_ms, seats }),
        2 => (0..DESKS_MAX, 0..STREAMS.len(), now_ms(), 0..KINDS.len())
            .prop_map(|(desk, stream, now_ms, kind)| Step::Other { desk, stream, now_ms, kind }),
        3 => (0..DESKS_MAX, 0..DESKS_MAX).prop_map(|(to, from)| Step::Merge { to, from }),
    ]
}

/// `(desks, capacity, steps, seed)`.
fn script() -> impl Strategy<Value = (usize, u64, Vec<Step>, u64)> {
    (
        2..=DESKS_MAX,
        1u64..=8,
        prop::collection::vec(step(), 1..STEPS_MAX),
        any::<u64>(),
    )
}

fn draft(stream: &str, kind: &str, ops: Vec<Op>, command: Option<String>, user: &str) -> Draft {
    Draft {
        stream: stream.into(),
        kind: kind.into(),
        ops,
        payload: b"{}".to_vec(),
        meta: Meta {
            command_id: command,
            user: Some(user.into()),
        },
        expected_version: None,
        texts: Vec::new(),
    }
}

/// Runs a script: desk 0 opens both sessions' counters (`capacity` seats,
/// a risk window) and hands every desk a share; then the steps; at the
/// end desk 0 merges everyone. Returns every event, in desk 0's order.
fn run(k: usize, capacity: u64, steps: &[Step]) -> Vec<(Event, EventId)> {
    let mut desks: Vec<Desk> = (0..k).map(Desk::new).collect();
    for stream in &STREAMS[..2] {
        let mut policy = Policy::new(PolicyMode::RiskWindow);
        policy.max_overdraft = 2;
        let mut ops = vec![
            Op::EscrowInit {
                counter: SEATS.into(),
                capacity,
            },
            Op::EscrowPolicy {
                counter: SEATS.into(),
                policy,
                supersedes: vec![],
            },
        ];
        for to in 1..k {
            ops.push(Op::EscrowTransfer {
                counter: SEATS.into(),
                to: keys()[to].node_id(),
                amount: (capacity / k as u64).max(1).min(capacity / 2).max(1),
            });
        }
        desks[0].append(1_000, draft(stream, "Opened", ops, None, "staff"));
    }
    for to in 1..k {
        let theirs = desks[0].order.clone();
        desks[to].merge_from(&theirs);
    }
    for step in steps {
        match *step {
            Step::Sell {
                desk,
                stream,
                now_ms,
                seats,
                beyond,
                command,
            } => {
                let d = &mut desks[desk % k];
                let op = if beyond {
                    Op::EscrowOverdraw {
                        counter: SEATS.into(),
                        amount: seats,
                        synced_ms_ago: 5,
                        remaining_at_sync: 3,
                    }
                } else {
                    Op::EscrowConsume {
                        counter: SEATS.into(),
                        amount: seats,
                    }
                };
                let command = command.map(|c| format!("order-{c}"));
                let user = format!("desk-{}", desk % k);
                d.append(
                    now_ms,
                    draft(STREAMS[stream], KINDS[0], vec![op], command, &user),
                );
            }
            Step::Add {
                desk,
                stream,
                now_ms,
                seats,
            } => {
                let op = Op::EscrowInit {
                    counter: SEATS.into(),
                    capacity: seats,
                };
                desks[desk % k].append(
                    now_ms,
                    draft(STREAMS[stream], "SeatsAdded", vec![op], None, "staff"),
                );
            }
            Step::Other {
                desk,
                stream,
                now_ms,
                kind,
            } => {
                let op = Op::Add {
                    counter: "edits".into(),
                    delta: 1,
                };
                desks[desk % k].append(
                    now_ms,
                    draft(STREAMS[stream], KINDS[kind], vec![op], None, "staff"),
                );
            }
            Step::Merge { to, from } => {
                let (to, from) = (to % k, from % k);
                if to != from {
                    let theirs = desks[from].order.clone();
                    desks[to].merge_from(&theirs);
                }
            }
        }
    }
    for i in 1..k {
        let theirs = desks[i].order.clone();
        desks[0].merge_from(&theirs);
    }
    desks.swap_remove(0).order
}

/// A random causal order of `events` (causally closed): repeatedly a
/// random pick among the events whose prev and deps are placed, preferring
/// events not by `held` (a desk offline until the others are done) while
/// there are any.
fn causal_shuffle(events: &[(Event, EventId)], held: Option<NodeId>, rng: &mut Rng) -> Vec<usize> {
    let mut placed: HashSet<EventId> = HashSet::new();
    let mut pending: Vec<usize> = (0..events.len()).collect();
    let mut out = Vec::with_capacity(events.len());
    while !pending.is_empty() {
        let ready: Vec<usize> = (0..pending.len())
            .filter(|&p| {
                let e = &events[pending[p]].0;
                e.prev.iter().chain(&e.deps).all(|d| placed.contains(d))
            })
            .collect();
        assert!(!ready.is_empty(), "the event set is not causally closed");
        let free: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|&p| Some(events[pending[p]].0.author) != held)
            .collect();
        let from = if free.is_empty() { &ready } else { &free };
        let p = from[rng.below(from.len())];
        let i = pending.swap_remove(p);
        placed.insert(events[i].1);
        out.push(i);
    }
    out
}

/// Feeds `order` of `events` to a fresh projector as a node does: the
/// events land in a log (a source) in that order, are given in batches of
/// random size, each batch followed by a catch-up, with duplicates
/// (re-given at their own position, or appended again to the log as a
/// second record) sprinkled in.
fn deliver<P: Projection>(
    p: P,
    every: u64,
    events: &[(Event, EventId)],
    order: &[usize],
    rng: &mut Rng,
) -> Projector<P> {
    let mut log = MemorySource::new();
    let mut pr = Projector::with_checkpoint_every(p, every);
    let mut at: BTreeMap<EventId, u64> = BTreeMap::new();
    let mut batch = 0;
    for (n, &i) in order.iter().enumerate() {
        let (e, id) = &events[i];
        let pos = log.push(e.clone());
        at.insert(*id, pos);
        assert_ne!(pr.insert(e, *id, pos), Inserted::Duplicate);
        while rng.one_in(4) {
            // One delivered before, again.
            let (d, did) = &events[order[rng.below(n + 1)]];
            let pos = if rng.one_in(2) {
                at[did]
            } else {
                log.push(d.clone())
            };
            assert_eq!(pr.insert(d, *did, pos), Inserted::Duplicate);
        }
        batch += 1;
        if rng.one_in(3) || batch > 8 {
            batch = 0;
            pr.catch_up(&mut log).expect("the log holds every event");
            assert_eq!(pr.lag(), 0);
        }
    }
    pr.catch_up(&mut log).expect("the log holds every event");
    pr
}

/// The state hash and JSON view of a projector, with its figures.
fn observe<P: Projection>(pr: &Projector<P>) -> ([u8; 32], serde_json::Value, u64, u64) {
    let view = serde_json::to_value(pr.view()).expect("a view that is JSON");
    (pr.state_hash(), view, pr.position(), pr.lag())
}

/// Checks one projection: canonical replay vs shuffled deliveries.
fn check<P: Projection + Clone>(
    p: P,
    events: &[(Event, EventId)],
    held: Option<NodeId>,
    rng: &mut Rng,
) -> Result<(), TestCaseError> {
    let mut canonical: Vec<usize> = (0..events.len()).collect();
    canonical.sort_by_key(|&i| Key::of(&events[i].0, events[i].1));
    let mut log = MemorySource::new();
    let mut replay = Projector::new(p.clone());
    for &i in &canonical {
        let pos = log.push(events[i].0.clone());
        prop_assert_eq!(
            replay.insert(&events[i].0, events[i].1, pos),
            Inserted::Applied
        );
    }
    prop_assert_eq!(replay.replayed(), 0);
    let reference = observe(&replay);
    prop_assert_eq!(reference.2, events.len() as u64);
    for n in 0..3 {
        let order = causal_shuffle(events, if n == 0 { held } else { None }, rng);
        let every = [1, 1 + rng.below(8) as u64, CHECKPOINT_EVERY][n];
        let pr = deliver(p.clone(), every, events, &order, rng);
        let got = observe(&pr);
        prop_assert_eq!(&got.0, &reference.0, "order {} hash, every {}", n, every);
        prop_assert_eq!(&got.1, &reference.1, "order {} view", n);
        prop_assert_eq!((got.2, got.3), (reference.2, 0));
    }
    Ok(())
}

/// One counter of the seat model: capacity, seats sold, and each sale's
/// `(event, first seat, seats)` in canonical order.
#[derive(Default)]
struct CounterModel {
    capacity: u64,
    sold: u64,
    sales: Vec<(EventId, u64, u64)>,
}

/// Every event's key, for the model checks.
fn keys_of(events: &[(Event, EventId)]) -> Vec<(Key, &Event)> {
    let mut v: Vec<(Key, &Event)> = events.iter().map(|(e, id)| (Key::of(e, *id), e)).collect();
    v.sort_by_key(|(k, _)| *k);
    v
}

proptest! {
    #![proptest_config(config("proptest-regressions/projection_laws.txt", 300))]

    /// Both shipped projections equal their canonical replay in any
    /// causal delivery order, with duplicates and late arrivals.
    #[test]
    fn any_delivery_order_equals_the_canonical_replay((k, capacity, steps, seed) in script()) {
        let events = run(k, capacity, &steps);
        let mut rng = Rng(seed);
        let held = Some(keys()[1 + rng.below(k - 1)].node_id());
        check(KindCounts, &events, held, &mut rng)?;
        check(SeatOrder, &events, held, &mut rng)?;
    }

    /// The seat order is the model's: every sale, in canonical order,
    /// numbered by the seats before it, a retried command once; the
    /// waitlist is the sales past the final capacity.
    #[test]
    fn seat_numbers_follow_the_canonical_order((k, capacity, steps, seed) in script()) {
        let events = run(k, capacity, &steps);
        let mut rng = Rng(seed);
        let order = causal_shuffle(&events, None, &mut rng);
        let pr = deliver(SeatOrder, 2, &events, &order, &mut rng);
        let mut commands = HashSet::new();
        let mut model: BTreeMap<&str, CounterModel> = BTreeMap::new();
        for (key, e) in keys_of(&events) {
            let escrow = e.ops.iter().any(|op| matches!(op,
                Op::EscrowInit { .. } | Op::EscrowConsume { .. } | Op::EscrowOverdraw { .. }));
            if !escrow {
                continue;
            }
            if let Some(c) = &e.meta.command_id {
                if !commands.insert((e.stream.clone(), c.clone())) {
                    continue;
                }
            }
            let m = model.entry(e.stream.as_str()).or_default();
            for op in &e.ops {
                match op {
                    Op::EscrowInit { capacity, .. } => m.capacity += capacity,
                    Op::EscrowConsume { amount, .. } | Op::EscrowOverdraw { amount, .. } => {
                        m.sales.push((key.id, m.sold + 1, *amount));
                        m.sold += amount;
                    }
                    _ => {}
                }
            }
        }
        let view = pr.view();
        prop_assert_eq!(view.counters.len(), model.len());
        for c in &view.counters {
            let CounterModel { capacity: cap, sold, sales } = &model[c.stream.as_str()];
            prop_assert_eq!(c.capacity, Some(*cap));
            prop_assert_eq!(c.sold, *sold);
            prop_assert_eq!(c.sales.len(), sales.len());
            let mut waitlist = 0;
            for (s, (id, first, seats)) in c.sales.iter().zip(sales) {
                prop_assert_eq!(&s.id, &id.to_string());
                prop_assert_eq!((s.first_seat, s.seats), (*first, *seats));
                if first + seats - 1 > *cap {
                    waitlist += 1;
                    prop_assert_eq!(s.waitlist, Some(waitlist));
                } else {
                    prop_assert_eq!(s.waitlist, None);
                    prop_assert_eq!(s.last_seat, Some(first + seats - 1));
                }
            }
            prop_assert_eq!(c.waitlisted, waitlist);
        }
    }
}

/// The node's shape: a source that reads events back by id (the node
/// reads its log), here a map; given newest first, every event but the
/// first rewinds.
#[test]
fn a_closure_reads_events_by_id() {
    let events = run(3, 4, &[]);
    let by_id: BTreeMap<EventId, Event> = events.iter().map(|(e, id)| (*id, e.clone())).collect();
    let mut src = |pos: u64, id: &EventId| {
        by_id
            .get(id)
            .cloned()
            .ok_or(weftlog_proto::projection::ReplayError::Unreadable {
                pos,
                id: *id,
                reason: "not in the map".into(),
            })
    };
    let mut pr = Projector::new(SeatOrder);
    for (e, id) in events.iter().rev() {
        pr.insert(e, *id, 0);
    }
    assert_eq!(pr.rewinds(), events.len() as u64 - 1);
    pr.catch_up(&mut src).unwrap();
    assert_eq!(pr.position(), events.len() as u64);
    assert_eq!(pr.view().counters.len(), 2);
}
