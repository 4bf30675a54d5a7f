//! Guards the laws of the fold (`DESIGN.md` §3): events made the way a node
//! makes them (`State::prepare`, `Event::seal`, `State::insert`) fold to
//! byte-identical state in any causal delivery order, with duplicates; escrow
//! never lets consumption exceed capacity; every hlc cut is causally closed;
//! concurrent writes to one field are a conflict until a later write
//! supersedes them; command ids and expected versions behave like an event
//! store's; the venue's seat rules (policies, overdraft sales, oversell
//! marks and their compensation, automatic and by staff, and the debts of
//! an author forked by a restored desk) are the same in every delivery
//! order and equal a model of the event set.
//!
//! The random tests check the real `State` against an independent model
//! computed from the event set alone (causal pasts by explicit reachability),
//! not only against itself.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use common::{config, Rng};
use proptest::prelude::*;
use weftlog_proto::admission::{compensations, staff_decision, Refused};
use weftlog_proto::event::{Compensation, Policy, PolicyMode, MIN_FORMAT_VERSION};
use weftlog_proto::seats::{
    compensation_field, compensation_sale, compensation_value, parse_compensation, strictest, By,
    COMPENSATION_PREFIX,
};
use weftlog_proto::state::{
    Account, Draft, Inserted, Invalid, PrepareError, Prepared, State, WriteId, Written,
};
use weftlog_proto::{Dot, Event, EventId, Hlc, HlcClock, Keypair, Meta, NodeId, Op};

/// Streams the random scripts write to.
const STREAMS: [&str; 2] = ["seat-block/1", "customer/7"];
/// Register fields.
const FIELDS: [&str; 3] = ["name", "email", "phone"];
/// PN counters.
const COUNTERS: [&str; 2] = ["checkins", "badges"];
/// The bounded counter.
const SEATS: &str = "seats";
/// Most authors in a script.
const AUTHORS_MAX: usize = 4;
/// Most replicas in a script: an author's restored copies fork it.
const NODES_MAX: usize = AUTHORS_MAX + 2;
/// Most steps in a script; about 3 in 5 are appends, some of them refused,
/// so a script makes up to about 40 events (at most 128: see `Bits`).
const STEPS_MAX: usize = 96;

/// Keys derived once: ed25519 key derivation is slow in debug builds.
fn keys() -> &'static [Keypair] {
    static KEYS: OnceLock<Vec<Keypair>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..AUTHORS_MAX)
            .map(|i| Keypair::from_secret([i as u8 + 1; 32]))
            .collect()
    })
}

// ---------------------------------------------------------------------------
// Replicas driven by a script.

/// One author with its own replica, clock and insertion order. Two nodes
/// may share an author: a desk restored from a copy of another
/// ([`Step::Fork`]), whose events fork the author's chain.
#[derive(Clone)]
struct Node {
    /// The author's index in [`keys`].
    author: usize,
    key: &'static Keypair,
    id: NodeId,
    state: State,
    clock: HlcClock,
    /// Events in the order this replica inserted them (a causal order).
    order: Vec<(Event, EventId)>,
}

impl Node {
    fn new(i: usize) -> Node {
        let key = &keys()[i];
        Node {
            author: i,
            key,
            id: key.node_id(),
            state: State::new(),
            clock: HlcClock::default(),
            order: Vec::new(),
        }
    }

    /// Prepares, seals and inserts a draft as a node does; returns the event.
    fn commit(&mut self, now_ms: u64, draft: Draft) -> (Event, EventId) {
        let e = match self.state.prepare(self.id, &mut self.clock, now_ms, draft) {
            Ok(Prepared::New(e)) => e,
            other => panic!("prepare refused a valid draft: {other:?}"),
        };
        self.insert_own(e)
    }

    fn insert_own(&mut self, e: Event) -> (Event, EventId) {
        assert_eq!(e.author, self.key.node_id());
        let (_, id) = e.seal();
        assert_eq!(self.state.insert(&e, id), Ok(Inserted::New));
        self.order.push((e.clone(), id));
        (e, id)
    }

    /// Inserts every event `from` holds, in `from`'s order.
    fn merge_from(&mut self, from: &[(Event, EventId)]) {
        for (e, id) in from {
            match self.state.insert(e, *id) {
                Ok(Inserted::New) => {
                    self.clock.observe(e.hlc);
                    self.order.push((e.clone(), *id));
                }
                Ok(Inserted::Duplicate) => {}
                Err(err) => panic!("merge refused event {id:?} of a replica: {err}"),
            }
        }
    }
}

#[derive(Clone, Debug)]
enum OpSpec {
    Set {
        field: usize,
        value: u8,
    },
    Add {
        counter: usize,
        delta: i64,
    },
    Init {
        capacity: u64,
    },
    /// `to` is an offset to another author, never the author itself.
    Transfer {
        to: usize,
        share: Share,
    },
    Consume {
        share: Share,
    },
    /// A seat policy: `mode` 0 and 1 risk-window, 2 escrow, 3 strict.
    Policy {
        mode: u8,
        max_overdraft: u64,
    },
    /// A sale of `beyond` seats more than the rights the replica shows
    /// (refused unless risk-window allows it).
    Overdraw {
        beyond: u64,
    },
    /// A compensation for the sale `pick` of those the replica holds:
    /// `action` indexes [`Compensation::ALL`], 4 writes a malformed value.
    Compensate {
        pick: usize,
        action: usize,
        staff: bool,
    },
}

/// How much a spend asks for: a desk mostly sells what it holds, and
/// sometimes tries more (which `prepare` must refuse).
#[derive(Clone, Copy, Debug)]
enum Share {
    /// A fixed amount.
    Fixed(u64),
    /// `ceil(held * n / 4)` of the rights the replica shows (no op when it
    /// shows none); `n == 5` always asks for more than is held.
    Quarters(u64),
}

impl Share {
    fn amount(self, held: u128) -> Option<u64> {
        match self {
            Share::Fixed(n) => Some(n),
            Share::Quarters(_) if held == 0 => None,
            Share::Quarters(n) => Some((held * n as u128).div_ceil(4) as u64),
        }
    }
}

fn share(fixed_max: u64) -> impl Strategy<Value = Share> {
    prop_oneof![
        1 => (1..=fixed_max).prop_map(Share::Fixed),
        3 => (1u64..=5).prop_map(Share::Quarters),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Append {
        author: usize,
        stream: usize,
        now_ms: u64,
        ops: Vec<OpSpec>,
        command: Option<u8>,
        user: bool,
    },
    Merge {
        to: usize,
        from: usize,
    },
    /// A desk restored from a copy of node `from`: a new node with its
    /// author, replica and clock, whose next event forks the author's chain
    /// (no more than [`NODES_MAX`] nodes).
    Fork {
        from: usize,
    },
    /// Node `node` writes the automatic compensation of every mark it shows
    /// without one, as the replica does (`admission::compensations`).
    Compensate {
        node: usize,
        now_ms: u64,
    },
    /// Staff on node `node` decide on the mark `pick` it shows
    /// (`admission::staff_decision`); `action` indexes
    /// [`Compensation::ALL`].
    Staff {
        node: usize,
        pick: usize,
        action: usize,
        now_ms: u64,
    },
    /// Node 0 merges every node but `except` (all with `None`).
    Heal {
        except: Option<usize>,
    },
}

/// Wall times close together, with frequent steps backwards and a few far
/// into the past.
fn now_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1_000u64..1_020,
        1 => 2_000u64..2_005,
        1 => 0u64..3,
    ]
}

/// Ops of every kind, escrow ones rarer.
fn mixed_op() -> BoxedStrategy<OpSpec> {
    prop_oneof![
        3 => (0..FIELDS.len(), 0u8..4).prop_map(|(field, value)| OpSpec::Set { field, value }),
        2 => (0..COUNTERS.len(), -3i64..=3).prop_map(|(counter, delta)| OpSpec::Add { counter, delta }),
        1 => (1u64..=10).prop_map(|capacity| OpSpec::Init { capacity }),
        1 => (0..AUTHORS_MAX, share(6)).prop_map(|(to, share)| OpSpec::Transfer { to, share }),
        2 => share(4).prop_map(|share| OpSpec::Consume { share }),
    ]
    .boxed()
}

/// Mostly escrow, with small capacities, so that sales press against the
/// bound and rights move often.
fn escrow_op() -> BoxedStrategy<OpSpec> {
    prop_oneof![
        1 => (0..FIELDS.len(), 0u8..4).prop_map(|(field, value)| OpSpec::Set { field, value }),
        2 => (1u64..=6).prop_map(|capacity| OpSpec::Init { capacity }),
        3 => (0..AUTHORS_MAX, share(4)).prop_map(|(to, share)| OpSpec::Transfer { to, share }),
        5 => share(3).prop_map(|share| OpSpec::Consume { share }),
    ]
    .boxed()
}

/// The venue's seat rules: sales pressing against small capacities (most
/// beyond the rights held, which a risk window admits), late seats added
/// (which un-mark sales), some transfers, policy changes and hand-written
/// compensations.
fn venue_op() -> BoxedStrategy<OpSpec> {
    prop_oneof![
        1 => (0..FIELDS.len(), 0u8..4).prop_map(|(field, value)| OpSpec::Set { field, value }),
        3 => Just(OpSpec::Init { capacity: 1 }),
        1 => (0..AUTHORS_MAX, share(3)).prop_map(|(to, share)| OpSpec::Transfer { to, share }),
        4 => share(3).prop_map(|share| OpSpec::Consume { share }),
        1 => (0u8..4, 0u64..=3).prop_map(|(mode, max_overdraft)| OpSpec::Policy { mode, max_overdraft }),
        5 => (1u64..=3).prop_map(|beyond| OpSpec::Overdraw { beyond }),
        1 => (any::<usize>(), 0usize..5, any::<bool>())
            .prop_map(|(pick, action, staff)| OpSpec::Compensate { pick, action, staff }),
    ]
    .boxed()
}

/// One step of a venue script between its opening and its end: sales,
/// merges, automatic compensations and staff decisions.
fn venue_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (
            0..NODES_MAX,
            now_ms(),
            prop::collection::vec(venue_op(), 1..3),
            prop::option::weighted(0.1, 0u8..4),
            any::<bool>(),
        )
            .prop_map(|(author, now_ms, ops, command, user)| Step::Append {
                author,
                stream: 0,
                now_ms,
                ops,
                command,
                user,
            }),
        3 => (0..NODES_MAX, 0..NODES_MAX).prop_map(|(to, from)| Step::Merge { to, from }),
        1 => (0..NODES_MAX, now_ms()).prop_map(|(node, now_ms)| Step::Compensate { node, now_ms }),
        1 => (0..NODES_MAX, any::<usize>(), 0..Compensation::ALL.len(), now_ms())
            .prop_map(|(node, pick, action, now_ms)| Step::Staff { node, pick, action, now_ms }),
    ]
}

/// A venue: node 0 opens a counter of `capacity` seats under a risk window
/// of `max_overdraft`, hands a share of its rights to each other desk, and
/// every desk learns that; then random steps. Most of the time, in the
/// first half of them, a desk is restored from a copy: the copy and the
/// original both sell the rights held at the copy, which forks the author
/// and spends those rights twice. At the end node 0 merges every desk but
/// one, compensates the marks it shows, staff may decide on one, and the
/// last desk's events arrive late (moving marks and voiding compensations),
/// after which node 0 compensates again. `(authors, steps, seed)`.
fn venue_script() -> impl Strategy<Value = (usize, Vec<Step>, u64)> {
    (
        (2..=AUTHORS_MAX, 1u64..=6, 1u64..=3),
        prop::collection::vec(venue_step(), 8..STEPS_MAX / 2),
        prop::option::weighted(0.7, (0..AUTHORS_MAX, any::<usize>(), 1u64..=2)),
        (
            any::<usize>(),
            prop::bool::weighted(0.75),
            any::<usize>(),
            0..Compensation::ALL.len(),
        ),
        any::<u64>(),
    )
        .prop_map(
            |((k, capacity, max_overdraft), body, fork, (late, staff, pick, action), seed)| {
                let open = |ops: Vec<OpSpec>| Step::Append {
                    author: 0,
                    stream: 0,
                    now_ms: 1_000,
                    ops,
                    command: None,
                    user: false,
                };
                let mut steps = vec![open(vec![
                    OpSpec::Init { capacity },
                    OpSpec::Policy {
                        mode: 0,
                        max_overdraft,
                    },
                ])];
                for to in 0..k - 1 {
                    steps.push(open(vec![OpSpec::Transfer {
                        to,
                        share: Share::Quarters(1),
                    }]));
                }
                steps.extend((1..k).map(|to| Step::Merge { to, from: 0 }));
                let body_at = steps.len();
                steps.extend(body);
                if let Some((from, at, beyond)) = fork {
                    let from = from % k;
                    let at = body_at + at % ((steps.len() - body_at) / 2 + 1);
                    // The copy's events name a user, so that they differ from
                    // the original's even where the ops and clocks agree.
                    let sell = |author: usize, op: OpSpec| Step::Append {
                        author,
                        stream: 0,
                        now_ms: 1_010,
                        ops: vec![op],
                        command: None,
                        user: author == k,
                    };
                    let all = || OpSpec::Consume {
                        share: Share::Quarters(4),
                    };
                    // The copy is node `k`: the script's only fork.
                    steps.splice(
                        at..at,
                        [
                            Step::Fork { from },
                            sell(k, all()),
                            sell(from, all()),
                            sell(k, OpSpec::Overdraw { beyond }),
                        ],
                    );
                }
                steps.push(Step::Heal { except: Some(late) });
                steps.push(Step::Compensate {
                    node: 0,
                    now_ms: 1_500,
                });
                if staff {
                    steps.push(Step::Staff {
                        node: 0,
                        pick,
                        action,
                        now_ms: 1_600,
                    });
                }
                steps.push(Step::Heal { except: None });
                steps.push(Step::Compensate {
                    node: 0,
                    now_ms: 1_700,
                });
                (k, steps, seed)
            },
        )
}

/// `commands`: how often an append carries a command id (one of four, so
/// that ids repeat across replicas).
fn step(op: BoxedStrategy<OpSpec>, streams: usize, commands: f64) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (
            0..AUTHORS_MAX,
            0..streams,
            now_ms(),
            prop::collection::vec(op, 1..4),
            prop::option::weighted(commands, 0u8..4),
            any::<bool>(),
        )
            .prop_map(|(author, stream, now_ms, ops, command, user)| Step::Append {
                author,
                stream,
                now_ms,
                ops,
                command,
                user,
            }),
        2 => (0..AUTHORS_MAX, 0..AUTHORS_MAX).prop_map(|(to, from)| Step::Merge { to, from }),
    ]
}

/// `(authors, steps, seed for delivery orders)`.
fn script(
    op: BoxedStrategy<OpSpec>,
    streams: usize,
    commands: f64,
) -> impl Strategy<Value = (usize, Vec<Step>, u64)> {
    (
        2..=AUTHORS_MAX,
        prop::collection::vec(step(op, streams, commands), 1..STEPS_MAX),
        any::<u64>(),
    )
}

/// The outcome of a script: the replicas, and every event in a causal order.
struct World {
    nodes: Vec<Node>,
    /// The union of all events, as node 0 inserted it after merging all.
    all: Vec<(Event, EventId)>,
}

/// The op for `spec` by author `author` of `k`; `held` tracks the rights
/// the replica shows for the author, through the draft's earlier ops;
/// `sales` are the sales of the stream the replica holds, `marked` those
/// it shows oversold.
fn to_op(
    spec: &OpSpec,
    k: usize,
    author: usize,
    held: &mut u128,
    (sales, marked): (&[EventId], &[EventId]),
) -> Option<Op> {
    let mut spend = |share: Share| {
        let amount = share.amount(*held)?;
        *held = held.saturating_sub(amount as u128);
        Some(amount)
    };
    Some(match *spec {
        OpSpec::Set { field, value } => Op::Set {
            field: FIELDS[field].into(),
            value: format!("\"v{value}\"").into_bytes(),
            supersedes: vec![],
        },
        OpSpec::Add { counter, delta } => Op::Add {
            counter: COUNTERS[counter].into(),
            delta,
        },
        OpSpec::Init { capacity } => {
            *held += capacity as u128;
            Op::EscrowInit {
                counter: SEATS.into(),
                capacity,
            }
        }
        OpSpec::Transfer { to, share } => Op::EscrowTransfer {
            counter: SEATS.into(),
            to: keys()[(author + 1 + to % (k - 1)) % k].node_id(),
            amount: spend(share)?,
        },
        OpSpec::Consume { share } => Op::EscrowConsume {
            counter: SEATS.into(),
            amount: spend(share)?,
        },
        OpSpec::Policy {
            mode,
            max_overdraft,
        } => {
            let mode = [
                PolicyMode::RiskWindow,
                PolicyMode::RiskWindow,
                PolicyMode::Escrow,
                PolicyMode::Strict,
            ][mode as usize % 4];
            let mut policy = Policy::new(mode);
            policy.max_overdraft = max_overdraft;
            Op::EscrowPolicy {
                counter: SEATS.into(),
                policy,
                supersedes: vec![],
            }
        }
        OpSpec::Overdraw { beyond } => {
            let amount = (*held as u64).saturating_add(beyond);
            *held = 0;
            Op::EscrowOverdraw {
                counter: SEATS.into(),
                amount,
                synced_ms_ago: 10,
                remaining_at_sync: 3,
            }
        }
        OpSpec::Compensate {
            pick,
            action,
            staff,
        } => {
            // Mostly a marked sale, as a node compensates; else any sale.
            let sale = match (pick % 3, marked.is_empty(), sales.is_empty()) {
                (0 | 1, false, _) => marked[pick / 3 % marked.len()],
                (_, _, false) => sales[pick / 3 % sales.len()],
                _ => return None,
            };
            let by = if staff { By::Staff } else { By::Auto };
            Op::Set {
                field: compensation_field(&sale),
                value: match Compensation::ALL.get(action) {
                    Some(a) => compensation_value(*a, by),
                    None => br#"{"action":"refund"}"#.to_vec(),
                },
                supersedes: vec![],
            }
        }
    })
}

/// The refusal `prepare` must give for a draft of `ops` by `node` on
/// `stream`, if any: its whole state is the new event's causal past, so
/// the author's rights there are its account's balance, and the policy
/// there is the counter's effective policy.
fn expected_refusal(node: &Node, stream: &str, ops: &[Op]) -> Option<Invalid> {
    let mut available = node
        .state
        .stream(stream)
        .and_then(|s| s.escrow.get(SEATS))
        .and_then(|e| e.accounts.get(&node.id))
        .map_or(0, Account::balance);
    let policy = node.state.policy_of(stream, SEATS);
    for op in ops {
        match op {
            Op::EscrowInit { capacity, .. } => available += *capacity as i128,
            Op::EscrowTransfer { amount, .. } | Op::EscrowConsume { amount, .. } => {
                if *amount as i128 > available {
                    return Some(Invalid::InsufficientRights {
                        counter: SEATS.into(),
                        held: available.max(0) as u128,
                        wanted: *amount as u128,
                    });
                }
                available -= *amount as i128;
            }
            Op::EscrowOverdraw { amount, .. } => {
                if policy.mode != PolicyMode::RiskWindow {
                    return Some(Invalid::OverdraftNotAllowed {
                        counter: SEATS.into(),
                        mode: policy.mode,
                    });
                }
                if available - (*amount as i128) < -(policy.max_overdraft as i128) {
                    return Some(Invalid::OverdraftExceeded {
                        counter: SEATS.into(),
                        available,
                        wanted: *amount as u128,
                        max_overdraft: policy.max_overdraft,
                    });
                }
                available -= *amount as i128;
            }
            _ => {}
        }
    }
    None
}

/// Runs a script; `after_step` sees the replicas after every step.
fn run(k: usize, steps: &[Step], mut after_step: impl FnMut(&[Node])) -> World {
    let mut nodes: Vec<Node> = (0..k).map(Node::new).collect();
    for step in steps {
        match step {
            Step::Append {
                author,
                stream,
                now_ms,
                ops,
                command,
                user,
            } => {
                let n = author % nodes.len();
                let node = &mut nodes[n];
                let a = node.author;
                let stream = STREAMS[*stream];
                let rights = |node: &Node| {
                    node.state
                        .stream(stream)
                        .and_then(|s| s.escrow.get(SEATS))
                        .and_then(|e| e.accounts.get(&node.id))
                        .map_or(0, Account::rights)
                };
                let mut held = rights(node);
                let sales: Vec<EventId> = node
                    .order
                    .iter()
                    .filter(|(e, _)| {
                        e.stream == stream
                            && e.ops.iter().any(|op| {
                                matches!(op, Op::EscrowConsume { .. } | Op::EscrowOverdraw { .. })
                            })
                    })
                    .map(|(_, id)| *id)
                    .collect();
                let marked: Vec<EventId> = node
                    .state
                    .oversold()
                    .into_iter()
                    .map(|(_, _, id, _)| id)
                    .collect();
                // Possibly no ops at all: an event may carry only a payload.
                let ops: Vec<Op> = ops
                    .iter()
                    .filter_map(|s| to_op(s, k, a, &mut held, (&sales, &marked)))
                    .collect();
                let command_id = command.map(|c| format!("cmd-{c}"));
                let draft = Draft {
                    stream: stream.into(),
                    kind: "Step".into(),
                    ops: ops.clone(),
                    payload: format!("{{\"n\":{}}}", node.order.len()).into_bytes(),
                    meta: Meta {
                        command_id: command_id.clone(),
                        user: user.then(|| format!("desk-{a}")),
                    },
                    expected_version: None,
                    texts: Vec::new(),
                };
                match node.state.prepare(node.id, &mut node.clock, *now_ms, draft) {
                    Ok(Prepared::New(e)) => {
                        assert_eq!(e.meta.command_id, command_id);
                        node.insert_own(e);
                    }
                    Ok(Prepared::Existing(rec)) => {
                        // The command is in this replica: the record names
                        // one of its events that carries that command id.
                        let (e, _) = node
                            .order
                            .iter()
                            .find(|(_, id)| *id == rec.id)
                            .expect("Existing names an event the replica holds");
                        assert_eq!(e.meta.command_id, command_id);
                        assert_eq!((e.author, e.seq, e.hlc), (rec.author, rec.seq, rec.hlc));
                        assert_eq!(e.stream, rec.stream);
                    }
                    Err(PrepareError::Invalid(
                        err @ (Invalid::InsufficientRights { .. }
                        | Invalid::OverdraftNotAllowed { .. }
                        | Invalid::OverdraftExceeded { .. }),
                    )) => {
                        // The refusal is right (see `expected_refusal`).
                        assert_eq!(
                            Some(err),
                            expected_refusal(node, stream, &ops),
                            "wrongly refused {ops:?}"
                        );
                    }
                    Err(e) => panic!("prepare failed: {e}"),
                }
            }
            Step::Merge { to, from } => {
                let (to, from) = (to % nodes.len(), from % nodes.len());
                if to != from {
                    let theirs = nodes[from].order.clone();
                    nodes[to].merge_from(&theirs);
                }
            }
            Step::Fork { from } => {
                if nodes.len() < NODES_MAX {
                    let copy = nodes[from % nodes.len()].clone();
                    nodes.push(copy);
                }
            }
            Step::Compensate { node, now_ms } => {
                let len = nodes.len();
                let node = &mut nodes[node % len];
                for draft in compensations(&node.state, STREAMS[0], SEATS) {
                    match node.state.prepare(node.id, &mut node.clock, *now_ms, draft) {
                        Ok(Prepared::New(e)) => {
                            node.insert_own(e);
                        }
                        // Its command (`oversold/<sale>`) is in the
                        // replica, under a value that is not standing.
                        Ok(Prepared::Existing(_)) => {}
                        Err(e) => panic!("a compensation refused: {e}"),
                    }
                }
            }
            Step::Staff {
                node,
                pick,
                action,
                now_ms,
            } => {
                let len = nodes.len();
                let node = &mut nodes[node % len];
                let marks = node.state.oversold();
                let action = Compensation::ALL[action % Compensation::ALL.len()];
                let user = Some(format!("staff-{}", node.author));
                match marks.get(pick % marks.len().max(1)) {
                    None => {
                        let none = EventId([0; 32]);
                        let refused = staff_decision(&node.state, &none, action, user, *now_ms);
                        assert!(matches!(refused, Err(Refused::NotOversold { .. })));
                    }
                    Some((_, _, sale, _)) => {
                        // Wall times stay far inside the override window.
                        let draft = staff_decision(&node.state, sale, action, user, *now_ms)
                            .expect("a staff decision on a marked sale");
                        node.commit(*now_ms, draft);
                    }
                }
            }
            Step::Heal { except } => {
                let except = except.map(|x| x % nodes.len());
                for i in 1..nodes.len() {
                    if Some(i) != except {
                        let theirs = nodes[i].order.clone();
                        nodes[0].merge_from(&theirs);
                    }
                }
            }
        }
        after_step(&nodes);
    }
    // Node 0 merges everyone, so one author replica holds every event.
    for i in 1..nodes.len() {
        let theirs = nodes[i].order.clone();
        nodes[0].merge_from(&theirs);
    }
    after_step(&nodes);
    let all = nodes[0].order.clone();
    let mut ids = HashSet::new();
    for n in &nodes {
        for (_, id) in &n.order {
            ids.insert(*id);
        }
    }
    assert_eq!(ids.len(), all.len(), "node 0 holds the union");
    World { nodes, all }
}

// ---------------------------------------------------------------------------
// Delivery.

/// A random causal order of `events` (whose prev and deps must lie in
/// `events`): repeatedly a random pick among the events whose prev and deps
/// are placed.
fn causal_shuffle(events: &[(Event, EventId)], rng: &mut Rng) -> Vec<usize> {
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
        assert!(
            !ready.is_empty(),
            "the event set is not causally closed: {} events wait for one outside it",
            pending.len()
        );
        let p = ready[rng.below(ready.len())];
        let i = pending.swap_remove(p);
        placed.insert(events[i].1);
        out.push(i);
    }
    out
}

/// An event's place in the canonical order.
type CanonicalKey = (Hlc, NodeId, u64, EventId);

/// The canonical order: ascending `(hlc, author, seq, id)`.
fn canonical_order(events: &[(Event, EventId)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&i| {
        let (e, id) = &events[i];
        (e.hlc, e.author, e.seq, *id)
    });
    order
}

/// Inserts `events` into a fresh replica in `order`. Every insert must be
/// new; along the way, already inserted events are re-inserted (must be
/// duplicates) and events not yet deliverable are tried (must be refused
/// without changing anything).
fn deliver(events: &[(Event, EventId)], order: &[usize], rng: &mut Rng) -> State {
    let mut s = State::new();
    let mut done: Vec<usize> = Vec::with_capacity(order.len());
    for (pos, &i) in order.iter().enumerate() {
        let (e, id) = &events[i];
        if rng.one_in(8) && pos + 1 < order.len() {
            // An event later in the order whose prev or a dep is missing.
            let later = order[pos + 1 + rng.below(order.len() - pos - 1)];
            let (le, lid) = &events[later];
            let present: HashSet<EventId> = done.iter().map(|&d| events[d].1).collect();
            if !le.prev.iter().chain(&le.deps).all(|d| present.contains(d)) {
                let before = s.state_hash();
                let frontier = s.frontier();
                match s.insert(le, *lid) {
                    Err(Invalid::Gap { .. } | Invalid::MissingDep(_)) => {}
                    other => panic!("undeliverable event gave {other:?}"),
                }
                assert_eq!(s.state_hash(), before, "a refused insert changed state");
                assert_eq!(s.frontier(), frontier);
            }
        }
        assert_eq!(s.insert(e, *id), Ok(Inserted::New), "event {i} at {pos}");
        done.push(i);
        while rng.one_in(4) {
            let (de, did) = &events[done[rng.below(done.len())]];
            assert_eq!(s.insert(de, *did), Ok(Inserted::Duplicate));
        }
    }
    assert_eq!(s.len(), events.len() as u64);
    s
}

/// Delivers `events` to fresh replicas ([`deliver`]) in the canonical
/// order and three causal shuffles, checks each equal to `reference`, and
/// returns them for further checks.
fn deliver_in_four_orders(
    events: &[(Event, EventId)],
    reference: &State,
    rng: &mut Rng,
) -> Vec<State> {
    let mut orders = vec![canonical_order(events)];
    for _ in 0..3 {
        orders.push(causal_shuffle(events, rng));
    }
    orders
        .iter()
        .enumerate()
        .map(|(n, order)| {
            let s = deliver(events, order, rng);
            assert_same(&s, reference, &format!("order {n}"));
            s
        })
        .collect()
}

/// Everything observable about a replica's fold.
fn assert_same(a: &State, b: &State, what: &str) {
    assert_eq!(
        a.canonical_read_model(),
        b.canonical_read_model(),
        "{what}: read model"
    );
    assert_eq!(a.state_hash(), b.state_hash(), "{what}: state hash");
    assert_eq!(a.frontier(), b.frontier(), "{what}: frontier");
    assert_eq!(a.len(), b.len(), "{what}: len");
    assert_eq!(a.max_hlc(), b.max_hlc(), "{what}: max hlc");
    let ca: Vec<_> = a.conflicts().collect();
    let cb: Vec<_> = b.conflicts().collect();
    assert_eq!(ca, cb, "{what}: conflicts");
}

// ---------------------------------------------------------------------------
// The model: the read model as a function of the event set alone.

type Bits = u128;

/// Causal pasts (strict) of events given in a causal order, as bit sets
/// over positions.
fn pasts(events: &[(Event, EventId)]) -> Vec<Bits> {
    assert!(events.len() <= Bits::BITS as usize);
    let pos: HashMap<EventId, usize> = events
        .iter()
        .enumerate()
        .map(|(i, (_, id))| (*id, i))
        .collect();
    let mut past: Vec<Bits> = Vec::with_capacity(events.len());
    for (i, (e, _)) in events.iter().enumerate() {
        let mut p: Bits = 0;
        for parent in e.prev.iter().chain(&e.deps) {
            let j = pos[parent];
            assert!(j < i, "not a causal order");
            p |= past[j] | (1 << j);
        }
        past.push(p);
    }
    past
}

#[derive(Debug, Default, PartialEq)]
struct ModelEscrow {
    capacity: u128,
    consumed: u128,
    accounts: BTreeMap<NodeId, Account>,
}

/// A field's writes: event position → (dot, hlc, value).
type Writes = BTreeMap<usize, (Dot, Hlc, Vec<u8>)>;

#[derive(Debug, Default)]
struct ModelStream {
    version: u64,
    /// Every write per field by an event in effect.
    writes: BTreeMap<String, Writes>,
    /// Per field, the dots events in effect supersede.
    named: BTreeMap<String, HashSet<Dot>>,
    /// Whether a command id of the stream is carried by two events.
    duplicated: bool,
    counters: BTreeMap<String, i128>,
    escrow: BTreeMap<String, ModelEscrow>,
}

/// Whether each event takes effect: it carries no command id, or it is the
/// first in canonical order `(hlc, author, seq, id)` of the events of its
/// stream with its command id. `within` limits the events considered (a
/// causal past); events outside it are `false`.
fn effective(events: &[(Event, EventId)], within: impl Fn(usize) -> bool) -> Vec<bool> {
    let mut first: HashMap<(&str, &str), usize> = HashMap::new();
    let key = |i: usize| {
        let (e, id) = &events[i];
        (e.hlc, e.author, e.seq, *id)
    };
    for (i, (e, _)) in events.iter().enumerate() {
        let Some(cmd) = e.meta.command_id.as_deref() else {
            continue;
        };
        if !within(i) {
            continue;
        }
        let f = first.entry((e.stream.as_str(), cmd)).or_insert(i);
        if key(i) < key(*f) {
            *f = i;
        }
    }
    events
        .iter()
        .enumerate()
        .map(|(i, (e, _))| {
            within(i)
                && e.meta
                    .command_id
                    .as_deref()
                    .is_none_or(|c| first[&(e.stream.as_str(), c)] == i)
        })
        .collect()
}

/// Whether some command id of a stream is carried by two events of which
/// one has an escrow op: then a duplicate's rights may have been used
/// before it was known to be one, and consumption may exceed capacity.
fn escrow_contested(events: &[(Event, EventId)]) -> bool {
    let mut seen: HashMap<(&str, &str), (usize, bool)> = HashMap::new();
    for (e, _) in events {
        if let Some(cmd) = e.meta.command_id.as_deref() {
            let slot = seen.entry((e.stream.as_str(), cmd)).or_default();
            slot.0 += 1;
            slot.1 |= e.ops.iter().any(Op::is_escrow);
        }
    }
    seen.values().any(|&(n, escrow)| n > 1 && escrow)
}

fn model(events: &[(Event, EventId)]) -> (BTreeMap<String, ModelStream>, Vec<Bits>) {
    let past = pasts(events);
    let effective = effective(events, |_| true);
    let mut streams: BTreeMap<String, ModelStream> = BTreeMap::new();
    for (i, (e, _)) in events.iter().enumerate() {
        let s = streams.entry(e.stream.clone()).or_default();
        s.version += 1;
        let dot = Dot {
            author: e.author,
            seq: e.seq,
        };
        if e.meta.command_id.is_some() && !effective[i] {
            // A duplicate: counted in the version, and the counters and
            // accounts it touches exist; nothing else.
            s.duplicated = true;
            for op in &e.ops {
                match op {
                    Op::Set { .. } => {}
                    Op::Text { .. } => unreachable!("the generator makes no text ops"),
                    Op::EscrowPolicy { counter, .. } => {
                        s.escrow.entry(counter.clone()).or_default();
                    }
                    Op::Add { counter, .. } => {
                        s.counters.entry(counter.clone()).or_default();
                    }
                    Op::EscrowInit { counter, .. }
                    | Op::EscrowConsume { counter, .. }
                    | Op::EscrowOverdraw { counter, .. } => {
                        let m = s.escrow.entry(counter.clone()).or_default();
                        m.accounts.entry(e.author).or_default();
                    }
                    Op::EscrowTransfer { counter, to, .. } => {
                        let m = s.escrow.entry(counter.clone()).or_default();
                        m.accounts.entry(e.author).or_default();
                        m.accounts.entry(*to).or_default();
                    }
                }
            }
            continue;
        }
        for op in &e.ops {
            match op {
                Op::Set {
                    field,
                    value,
                    supersedes,
                } => {
                    // A later op of the same event overwrites the earlier.
                    s.writes
                        .entry(field.clone())
                        .or_default()
                        .insert(i, (dot, e.hlc, value.clone()));
                    s.named
                        .entry(field.clone())
                        .or_default()
                        .extend(supersedes.iter().copied());
                }
                Op::Add { counter, delta } => {
                    *s.counters.entry(counter.clone()).or_default() += *delta as i128;
                }
                Op::EscrowInit { counter, capacity } => {
                    let m = s.escrow.entry(counter.clone()).or_default();
                    m.capacity += *capacity as u128;
                    m.accounts.entry(e.author).or_default().init += *capacity as u128;
                }
                Op::EscrowTransfer {
                    counter,
                    to,
                    amount,
                } => {
                    let m = s.escrow.entry(counter.clone()).or_default();
                    m.accounts.entry(e.author).or_default().sent += *amount as u128;
                    m.accounts.entry(*to).or_default().received += *amount as u128;
                }
                Op::EscrowConsume { counter, amount }
                | Op::EscrowOverdraw {
                    counter, amount, ..
                } => {
                    let m = s.escrow.entry(counter.clone()).or_default();
                    m.accounts.entry(e.author).or_default().consumed += *amount as u128;
                    m.consumed += *amount as u128;
                }
                Op::EscrowPolicy { counter, .. } => {
                    s.escrow.entry(counter.clone()).or_default();
                }
                Op::Text { .. } => unreachable!("the generator makes no text ops"),
            }
        }
    }
    (streams, past)
}

/// The multi-value register law: the writes left standing are exactly those
/// in no other write's causal past. It holds while every event takes
/// effect; with duplicates, see [`standing_named`].
fn standing(writes: &Writes, past: &[Bits]) -> BTreeMap<Dot, Written> {
    writes
        .iter()
        .filter(|(&i, _)| !writes.keys().any(|&j| j != i && past[j] & (1 << i) != 0))
        .map(|(_, (dot, hlc, value))| {
            (
                *dot,
                Written {
                    hlc: *hlc,
                    value: value.clone(),
                },
            )
        })
        .collect()
}

/// The writes in effect that no event in effect supersedes: a duplicate's
/// write never stood, and what it superseded stands unless another event
/// supersedes it too (what a replay in canonical order gives).
fn standing_named(writes: &Writes, named: Option<&HashSet<Dot>>) -> BTreeMap<Dot, Written> {
    writes
        .values()
        .filter(|(dot, _, _)| named.is_none_or(|n| !n.contains(dot)))
        .map(|(dot, hlc, value)| {
            (
                *dot,
                Written {
                    hlc: *hlc,
                    value: value.clone(),
                },
            )
        })
        .collect()
}

/// Checks a replica's read model against the model of `events` (in a
/// causal order), which must be exactly the replica's event set.
fn assert_matches_model(state: &State, events: &[(Event, EventId)]) {
    let (model, past) = model(events);
    let names: Vec<&String> = state.streams().keys().collect();
    let model_names: Vec<&String> = model.keys().collect();
    assert_eq!(names, model_names, "streams");
    let mut conflicts = Vec::new();
    for (name, m) in &model {
        let s = state.stream(name).expect("stream present");
        assert_eq!(s.version, m.version, "{name}: version");
        assert_eq!(s.counters, m.counters, "{name}: counters");
        let fields: Vec<&String> = s.fields.keys().collect();
        let model_fields: Vec<&String> = m.writes.keys().collect();
        assert_eq!(fields, model_fields, "{name}: fields");
        for (field, writes) in &m.writes {
            let expect = standing_named(writes, m.named.get(field));
            if !m.duplicated {
                assert_eq!(
                    expect,
                    standing(writes, &past),
                    "{name}.{field}: the two laws"
                );
            }
            assert_eq!(
                by_dot(&s.fields[field]),
                expect,
                "{name}.{field}: standing writes"
            );
            if expect.len() > 1 {
                conflicts.push((name.clone(), field.clone(), expect.clone()));
            }
            // Displayed value: the standing write with the greatest (hlc, author).
            let shown = expect
                .iter()
                .max_by_key(|(d, w)| (w.hlc, d.author))
                .map(|(d, _)| *d);
            assert_eq!(
                s.shown(field).map(|(d, _)| d.dot()),
                shown,
                "{name}.{field}: shown"
            );
        }
        assert_eq!(s.escrow.len(), m.escrow.len(), "{name}: escrow counters");
        for (counter, me) in &m.escrow {
            let e = &s.escrow[counter];
            assert_eq!(e.capacity, me.capacity, "{name}.{counter}: capacity");
            assert_eq!(e.consumed, me.consumed, "{name}.{counter}: consumed");
            assert_eq!(e.accounts, me.accounts, "{name}.{counter}: accounts");
        }
    }
    let got: Vec<(String, String, BTreeMap<Dot, Written>)> = state
        .conflicts()
        .map(|(s, f, w)| (s.to_string(), f.to_string(), by_dot(w)))
        .collect();
    assert_eq!(got, conflicts, "conflicts");
    // Frontier: each author's chain is 1..=n and the head is its last event.
    let mut frontier: BTreeMap<NodeId, (u64, EventId)> = BTreeMap::new();
    for (e, id) in events {
        let slot = frontier.entry(e.author).or_insert((0, *id));
        assert_eq!(e.seq, slot.0 + 1, "chain order");
        *slot = (e.seq, *id);
    }
    let frontier: Vec<(NodeId, u64, EventId)> = frontier
        .into_iter()
        .map(|(a, (s, id))| (a, s, id))
        .collect();
    assert_eq!(state.frontier(), frontier, "frontier");
}

/// Standing writes by dot: one event per dot where no author forked.
fn by_dot(writes: &BTreeMap<WriteId, Written>) -> BTreeMap<Dot, Written> {
    writes.iter().map(|(w, v)| (w.dot(), v.clone())).collect()
}

/// Escrow bookkeeping on one replica, whose events are `events`: the sums
/// balance; and unless a command id is carried by two events with escrow
/// ops ([`escrow_contested`]), consumption is within capacity, every
/// account's rights are non-negative without saturation, and rights +
/// consumed == capacity.
fn assert_escrow_invariants(state: &State, events: &[(Event, EventId)]) {
    let exact = !escrow_contested(events);
    for (name, s) in state.streams() {
        for (counter, e) in &s.escrow {
            let what = format!("{name}.{counter}");
            assert!(
                !exact || e.consumed <= e.capacity,
                "{what}: consumed {} > capacity {}",
                e.consumed,
                e.capacity
            );
            let mut rights = 0u128;
            let (mut init, mut sent, mut received, mut consumed) = (0, 0, 0, 0);
            for (node, a) in &e.accounts {
                assert!(
                    !exact || a.init + a.received >= a.sent + a.consumed,
                    "{what}: account {node:?} overdrawn: {a:?}"
                );
                rights += a.rights();
                init += a.init;
                sent += a.sent;
                received += a.received;
                consumed += a.consumed;
            }
            assert_eq!(init, e.capacity, "{what}: inits sum to capacity");
            assert_eq!(consumed, e.consumed, "{what}: consumption sums");
            assert_eq!(sent, received, "{what}: transfers balance");
            if exact {
                assert_eq!(rights + e.consumed, e.capacity, "{what}: rights + consumed");
            }
        }
    }
}

/// The rights the author of `events[i]` holds in the event's causal past,
/// per counter of its stream: its inits, transfers and sales, and the
/// transfers to it, of the events `in_past` marks (those in effect in that
/// past). An author that forked counts only the branches in that past,
/// which reachability gives. Negative: a debt.
fn rights_in_past<'a>(
    events: &'a [(Event, EventId)],
    in_past: &[bool],
    i: usize,
) -> BTreeMap<&'a str, i128> {
    let e = &events[i].0;
    let mut held: BTreeMap<&str, i128> = BTreeMap::new();
    for (j, (p, _)) in events.iter().enumerate() {
        if !in_past[j] || p.stream != e.stream {
            continue;
        }
        for op in &p.ops {
            match op {
                Op::EscrowInit { counter, capacity } if p.author == e.author => {
                    *held.entry(counter).or_default() += *capacity as i128;
                }
                Op::EscrowTransfer {
                    counter,
                    to,
                    amount,
                } => {
                    if p.author == e.author {
                        *held.entry(counter).or_default() -= *amount as i128;
                    }
                    if *to == e.author {
                        *held.entry(counter).or_default() += *amount as i128;
                    }
                }
                Op::EscrowConsume { counter, amount }
                | Op::EscrowOverdraw {
                    counter, amount, ..
                } if p.author == e.author => {
                    *held.entry(counter).or_default() -= *amount as i128;
                }
                _ => {}
            }
        }
    }
    held
}

/// The escrow rule checked from first principles: every transfer and
/// consumption in `events` is covered by rights its author held in the
/// event's causal past (plus the event's own earlier ops), where the ops of
/// events that are duplicates within that past count for nothing.
fn assert_rights_from_causal_past(events: &[(Event, EventId)]) {
    let past = pasts(events);
    for (i, (e, id)) in events.iter().enumerate() {
        let in_past = effective(events, |j| past[i] & (1 << j) != 0);
        let mut held = rights_in_past(events, &in_past, i);
        for op in &e.ops {
            match op {
                Op::EscrowInit { counter, capacity } => {
                    *held.entry(counter).or_default() += *capacity as i128;
                }
                Op::EscrowTransfer {
                    counter, amount, ..
                }
                | Op::EscrowConsume { counter, amount } => {
                    let h = held.entry(counter).or_default();
                    assert!(
                        *amount as i128 <= *h,
                        "event {id:?} spends {amount} of {counter:?} but its author held {h} in its causal past"
                    );
                    *h -= *amount as i128;
                }
                _ => {}
            }
        }
    }
}

/// The writes a `Set` or policy op of `events[j]` names by `dots`: every
/// event at one of those dots in its causal past (both branches of a
/// forked author, once both are there).
fn resolve(events: &[(Event, EventId)], past: &[Bits], j: usize, dots: &[Dot]) -> Vec<WriteId> {
    events
        .iter()
        .enumerate()
        .filter(|(x, (p, _))| {
            past[j] & (1 << x) != 0 && dots.iter().any(|d| (d.author, d.seq) == (p.author, p.seq))
        })
        .map(|(_, (p, id))| WriteId {
            author: p.author,
            seq: p.seq,
            event: *id,
        })
        .collect()
}

/// A policy write in the model: the write, its policy, the writes it names.
type PolicyW = (WriteId, Policy, Vec<WriteId>);

/// The sales of one counter in effect: canonical key, (units sold,
/// overdraft units).
type ModelSales = BTreeMap<CanonicalKey, (u128, u128)>;

/// The standing policies among `writes`: those no write names.
fn standing_policies(writes: &[PolicyW]) -> BTreeMap<WriteId, Policy> {
    let named: HashSet<WriteId> = writes
        .iter()
        .flat_map(|(_, _, d)| d.iter().copied())
        .collect();
    writes
        .iter()
        .filter(|(w, _, _)| !named.contains(w))
        .map(|(w, p, _)| (*w, *p))
        .collect()
}

/// The policy writes of `events[j]` per counter: the later op of an event
/// on one counter stands, and the event names what all its ops name.
fn policy_writes<'a>(
    events: &'a [(Event, EventId)],
    past: &[Bits],
    j: usize,
) -> BTreeMap<&'a str, PolicyW> {
    let (e, id) = &events[j];
    let w = WriteId {
        author: e.author,
        seq: e.seq,
        event: *id,
    };
    let mut out: BTreeMap<&str, PolicyW> = BTreeMap::new();
    for op in &e.ops {
        if let Op::EscrowPolicy {
            counter,
            policy,
            supersedes,
        } = op
        {
            let slot = out
                .entry(counter.as_str())
                .or_insert((w, *policy, Vec::new()));
            slot.1 = *policy;
            slot.2.extend(resolve(events, past, j, supersedes));
        }
    }
    out
}

/// Each forked author and the highest seq all its branches share: two
/// events with one `(author, seq)` prove a fork.
fn fork_seqs(events: &[(Event, EventId)]) -> BTreeMap<NodeId, u64> {
    let mut at: BTreeMap<(NodeId, u64), usize> = BTreeMap::new();
    for (e, _) in events {
        *at.entry((e.author, e.seq)).or_default() += 1;
    }
    let mut out = BTreeMap::new();
    // Ascending by seq within an author: the first is the lowest.
    for ((author, seq), n) in at {
        if n > 1 {
            out.entry(author).or_insert(seq - 1);
        }
    }
    out
}

/// The standing writes of the compensation fields (`oversold/…`) of
/// `stream` by the register rule: the writes of events in effect (an
/// event's later op on a field overwrites its earlier one) that no event in
/// effect names, a dot naming the events at it in the writer's causal past.
fn compensation_writes(
    events: &[(Event, EventId)],
    past: &[Bits],
    in_effect: &[bool],
    stream: &str,
) -> BTreeMap<String, BTreeMap<WriteId, Written>> {
    let mut writes: BTreeMap<String, BTreeMap<WriteId, Written>> = BTreeMap::new();
    let mut named: HashSet<(String, WriteId)> = HashSet::new();
    for (j, (e, id)) in events.iter().enumerate() {
        if !in_effect[j] || e.stream != stream {
            continue;
        }
        for op in &e.ops {
            let Op::Set {
                field,
                value,
                supersedes,
            } = op
            else {
                continue;
            };
            if !field.starts_with(COMPENSATION_PREFIX) {
                continue;
            }
            let w = WriteId {
                author: e.author,
                seq: e.seq,
                event: *id,
            };
            let written = Written {
                hlc: e.hlc,
                value: value.clone(),
            };
            writes.entry(field.clone()).or_default().insert(w, written);
            for n in resolve(events, past, j, supersedes) {
                named.insert((field.clone(), n));
            }
        }
    }
    for (field, w) in &mut writes {
        w.retain(|id, _| !named.contains(&(field.clone(), *id)));
    }
    writes
}

/// Checks a replica's policies, debts, overdraft sales, marks and
/// compensation against a model computed from `events` (in a causal order,
/// exactly the replica's event set; authors may have forked): validity and
/// overdraft units from each event's causal past by reachability, then the
/// marks and compensation rules of the `seats` module docs.
fn assert_seats_match_model(state: &State, events: &[(Event, EventId)]) {
    let past = pasts(events);
    let in_effect = effective(events, |_| true);
    let (streams, _) = model(events);
    let forks = fork_seqs(events);
    let got_forks: BTreeMap<NodeId, u64> = state
        .forks()
        .iter()
        .map(|f| (f.author, f.seq - 1))
        .collect();
    assert_eq!(got_forks, forks, "forks");
    let key = |i: usize| -> CanonicalKey {
        let (e, id) = &events[i];
        (e.hlc, e.author, e.seq, *id)
    };
    // Per (stream, counter): policy writes and sales in effect.
    let mut counters: BTreeMap<(String, String), (Vec<PolicyW>, ModelSales)> = BTreeMap::new();
    for (i, (e, _)) in events.iter().enumerate() {
        // The event's causal past, as the rules see it.
        let effect_past = effective(events, |j| past[i] & (1 << j) != 0);
        let mut held = rights_in_past(events, &effect_past, i);
        let mut policy_past: BTreeMap<&str, Vec<PolicyW>> = BTreeMap::new();
        for (j, (p, _)) in events.iter().enumerate() {
            if effect_past[j] && p.stream == e.stream {
                for (c, w) in policy_writes(events, &past, j) {
                    policy_past.entry(c).or_default().push(w);
                }
            }
        }
        let mut sold: BTreeMap<&str, (u128, u128)> = BTreeMap::new();
        for op in &e.ops {
            match op {
                Op::EscrowInit { counter, capacity } => {
                    *held.entry(counter).or_default() += *capacity as i128;
                }
                Op::EscrowTransfer {
                    counter, amount, ..
                } => {
                    *held.entry(counter).or_default() -= *amount as i128;
                }
                Op::EscrowConsume { counter, amount } => {
                    *held.entry(counter).or_default() -= *amount as i128;
                    sold.entry(counter).or_default().0 += *amount as u128;
                }
                Op::EscrowOverdraw {
                    counter, amount, ..
                } => {
                    let writes = policy_past.get(counter.as_str()).map_or(&[][..], |v| v);
                    let policy = strictest(&standing_policies(writes));
                    assert_eq!(
                        policy.mode,
                        PolicyMode::RiskWindow,
                        "an overdraft under {policy:?}"
                    );
                    let h = held.entry(counter).or_default();
                    assert!(
                        *h - *amount as i128 >= -(policy.max_overdraft as i128),
                        "an overdraft beyond the bound"
                    );
                    let slot = sold.entry(counter).or_default();
                    slot.0 += *amount as u128;
                    slot.1 += (*amount as i128 - (*h).max(0)).max(0) as u128;
                    *h -= *amount as i128;
                }
                _ => {}
            }
        }
        if !in_effect[i] {
            continue;
        }
        for (c, w) in policy_writes(events, &past, i) {
            let m = counters
                .entry((e.stream.clone(), c.to_string()))
                .or_default();
            m.0.push(w);
        }
        for (c, s) in sold {
            let m = counters
                .entry((e.stream.clone(), c.to_string()))
                .or_default();
            m.1.insert(key(i), s);
        }
    }
    for (name, ms) in &streams {
        let comp_fields = compensation_writes(events, &past, &in_effect, name);
        let s = state.stream(name).expect("stream");
        for (field, w) in &s.fields {
            if field.starts_with(COMPENSATION_PREFIX) {
                let want = comp_fields.get(field).cloned().unwrap_or_default();
                assert_eq!(w, &want, "{name}.{field}: standing writes");
            }
        }
        let comps: BTreeMap<EventId, (Compensation, By, WriteId)> = comp_fields
            .iter()
            .filter_map(|(field, writes)| {
                let sale = compensation_sale(field)?;
                let best = writes
                    .iter()
                    .filter_map(|(w, v)| {
                        let (action, by) = parse_compensation(&v.value)?;
                        Some(((by, v.hlc, *w), action))
                    })
                    .max_by_key(|(k, _)| *k)?;
                let ((by, _, write), action) = best;
                Some((sale, (action, by, write)))
            })
            .collect();
        for (counter, me) in &ms.escrow {
            let what = format!("{name}.{counter}");
            let e = &s.escrow[counter];
            let none = Default::default();
            let (policies, sales) = counters
                .get(&(name.clone(), counter.clone()))
                .unwrap_or(&none);
            let standing = standing_policies(policies);
            assert_eq!(e.policies, standing, "{what}: policies");
            assert_eq!(e.policy(), strictest(&standing), "{what}: effective policy");
            // Debts.
            let balance: BTreeMap<NodeId, i128> = me
                .accounts
                .iter()
                .map(|(a, acct)| (*a, acct.balance()))
                .collect();
            let owed: BTreeMap<NodeId, u128> = balance
                .iter()
                .filter(|(_, b)| **b < 0)
                .map(|(a, b)| (*a, b.unsigned_abs()))
                .collect();
            let got: BTreeMap<NodeId, u128> =
                e.overdrawn.iter().map(|(a, o)| (*a, o.owed)).collect();
            assert_eq!(got, owed, "{what}: debts");
            // Marks: the candidates, walked from the last back.
            let mut left = me.consumed.saturating_sub(me.capacity);
            let mut cands: BTreeMap<CanonicalKey, u128> = BTreeMap::new();
            for (k, (_, over)) in sales {
                if *over > 0 {
                    *cands.entry(*k).or_default() += over;
                }
            }
            for (author, owed) in &owed {
                let mine = sales.iter().filter(|(k, _)| k.1 == *author);
                let over: u128 = mine.clone().map(|(_, s)| s.1).sum();
                if *owed <= over {
                    continue;
                }
                // A forked author's sales past its fork; else all of them.
                let past_fork = forks.get(author);
                for (k, (amount, over)) in mine {
                    if amount > over && past_fork.is_none_or(|f| k.2 > *f) {
                        *cands.entry(*k).or_default() += amount - over;
                    }
                }
            }
            let mut marks: BTreeMap<EventId, (CanonicalKey, u64)> = BTreeMap::new();
            for (k, units) in cands.iter().rev() {
                if left == 0 {
                    break;
                }
                let u = (*units).min(left);
                left -= u;
                marks.insert(k.3, (*k, u as u64));
            }
            let got: BTreeMap<EventId, u64> =
                e.oversold.iter().map(|(id, o)| (*id, o.units)).collect();
            let want: BTreeMap<EventId, u64> = marks.iter().map(|(id, (_, u))| (*id, *u)).collect();
            assert_eq!(got, want, "{what}: marks of sales {sales:?}");
            for (id, o) in &e.oversold {
                let (k, _) = marks[id];
                assert_eq!((o.hlc, o.author), (k.0, k.1), "{what}: mark of {id:?}");
            }
            // Compensation: the winning standing value of each field.
            let (mut honoured, mut released, mut waitlist) = (0u128, 0u128, Vec::new());
            let mut void = BTreeMap::new();
            for (sale, (action, by, write)) in &comps {
                match marks.get(sale) {
                    Some((k, units)) => {
                        let c = e.oversold[sale]
                            .compensation
                            .expect("a marked sale's compensation");
                        assert_eq!((c.action, c.by, c.write), (*action, *by, *write), "{what}");
                        match action {
                            Compensation::Honour => honoured += *units as u128,
                            Compensation::Cancel => released += *units as u128,
                            Compensation::Waitlist => {
                                released += *units as u128;
                                waitlist.push((*k, *sale));
                            }
                            Compensation::Notify => {}
                        }
                    }
                    None => {
                        void.insert(*sale, (*action, *by, *write));
                    }
                }
            }
            let uncompensated = e
                .oversold
                .iter()
                .filter(|(id, _)| !comps.contains_key(id))
                .all(|(_, o)| o.compensation.is_none());
            assert!(uncompensated, "{what}: a compensation out of nowhere");
            let got_void: BTreeMap<EventId, (Compensation, By, WriteId)> = e
                .void
                .iter()
                .map(|(id, c)| (*id, (c.action, c.by, c.write)))
                .collect();
            assert_eq!(got_void, void, "{what}: void");
            waitlist.sort();
            let waitlist: Vec<EventId> = waitlist.into_iter().map(|(_, id)| id).collect();
            assert_eq!(e.waitlist, waitlist, "{what}: waitlist");
            assert_eq!((e.honoured, e.released), (honoured, released), "{what}");
        }
    }
}

// ---------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config("proptest-regressions/fold_laws.txt", 1000))]

    /// Laws 1–2: the union of events made by real replicas, delivered to
    /// fresh replicas in random causal orders with duplicates, folds to the
    /// same bytes as the author replica that holds it all, and to the model.
    /// Each author's own (causally closed) subset folds the same from any
    /// order too.
    #[test]
    fn any_causal_order_with_duplicates_folds_to_the_same_state(
        (k, steps, seed) in script(mixed_op(), STREAMS.len(), 0.15)
    ) {
        let world = run(k, &steps, |_| {});
        let all = &world.all;
        let mut rng = Rng(seed);
        let reference = &world.nodes[0].state;
        assert_matches_model(reference, all);
        deliver_in_four_orders(all, reference, &mut rng);
        for (n, node) in world.nodes.iter().enumerate() {
            // Any replica holding every event equals the reference.
            if node.state.len() == all.len() as u64 {
                assert_same(&node.state, reference, &format!("node {n}"));
            }
            assert_matches_model(&node.state, &node.order);
            let order = causal_shuffle(&node.order, &mut rng);
            let s = deliver(&node.order, &order, &mut rng);
            assert_same(&s, &node.state, &format!("node {n}'s events reordered"));
        }
    }

    /// Law 3: with escrow-heavy scripts on one stream, no replica at any
    /// point, and no delivery order of the union, has consumption above
    /// capacity; every accepted spend is covered by rights in its causal
    /// past; every refusal by `prepare` was right (checked inside `run`).
    #[test]
    fn escrow_never_exceeds_capacity((k, steps, seed) in script(escrow_op(), 1, 0.03)) {
        let world = run(k, &steps, |nodes| {
            for n in nodes {
                assert_escrow_invariants(&n.state, &n.order);
            }
        });
        assert_rights_from_causal_past(&world.all);
        let mut rng = Rng(seed);
        let order = causal_shuffle(&world.all, &mut rng);
        let s = deliver(&world.all, &order, &mut rng);
        assert_escrow_invariants(&s, &world.all);
        assert_same(&s, &world.nodes[0].state, "escrow union");
        assert_matches_model(&s, &world.all);
    }

    /// Law 5: commands retried on other replicas take effect once. Scripts
    /// where half the appends carry one of four command ids, so that
    /// replicas out of touch often carry out one command each: in any
    /// causal delivery order (the duplicate that sorts first often arriving
    /// last), the state equals the replay in canonical order and the model,
    /// every (stream, command id) has exactly one event in effect, the first
    /// in canonical order, and the others are listed as ignored.
    #[test]
    fn commands_retried_on_other_replicas_take_effect_once(
        (k, steps, seed) in script(mixed_op(), STREAMS.len(), 0.5)
    ) {
        let world = run(k, &steps, |_| {});
        let all = &world.all;
        let mut rng = Rng(seed);
        let replay = deliver(all, &canonical_order(all), &mut rng);
        assert_matches_model(&replay, all);
        assert_rights_from_causal_past(all);
        for n in 0..4 {
            let order = causal_shuffle(all, &mut rng);
            let s = deliver(all, &order, &mut rng);
            assert_same(&s, &replay, &format!("order {n}"));
        }
        let in_effect = effective(all, |_| true);
        let mut members: BTreeMap<(String, String), Vec<CanonicalKey>> = BTreeMap::new();
        for (i, (e, id)) in all.iter().enumerate() {
            if let Some(cmd) = &e.meta.command_id {
                members
                    .entry((e.stream.clone(), cmd.clone()))
                    .or_default()
                    .push((e.hlc, e.author, e.seq, *id));
                let rec = replay.command(&e.stream, cmd).expect("a command record");
                prop_assert_eq!(rec.id == *id, in_effect[i]);
            }
        }
        for ((stream, cmd), mut m) in members {
            m.sort();
            let listed = replay.stream(&stream).unwrap().duplicates.get(&cmd);
            if m.len() == 1 {
                prop_assert!(listed.is_none());
            } else {
                let d = listed.expect("a command carried twice is listed");
                prop_assert_eq!(d.took_effect, m[0].3);
                let ignored: Vec<EventId> = m[1..].iter().map(|x| x.3).collect();
                prop_assert_eq!(&d.ignored, &ignored);
            }
        }
    }

    /// The venue's seat rules: venue scripts (a risk window, sales past
    /// the rights held, seats added late, forks by a restored desk,
    /// automatic compensations, staff decisions, retried commands) give,
    /// in every delivery order with duplicates and late events, the same
    /// policies, debts, marks, compensations (pending, compensated, void),
    /// released and honoured seats and state hash, equal to the model's, on
    /// every replica and at every step (where an event's arrival moves
    /// marks and voids compensations); every refusal by `prepare` was right.
    #[test]
    fn oversell_marks_and_compensation_are_a_function_of_the_event_set(
        (k, steps, seed) in venue_script()
    ) {
        let mut checked = 0;
        let world = run(k, &steps, |nodes| {
            // Every few steps, each replica against the model of its events.
            checked += 1;
            if checked % 8 == 0 {
                for n in nodes {
                    assert_seats_match_model(&n.state, &n.order);
                }
            }
        });
        let all = &world.all;
        let mut rng = Rng(seed);
        let reference = &world.nodes[0].state;
        if reference.forks().is_empty() {
            // The general model knows one event per dot.
            assert_matches_model(reference, all);
        }
        assert_seats_match_model(reference, all);
        for s in deliver_in_four_orders(all, reference, &mut rng) {
            prop_assert_eq!(s.oversold(), reference.oversold());
            prop_assert_eq!(s.forks(), reference.forks());
        }
        for node in &world.nodes {
            assert_seats_match_model(&node.state, &node.order);
        }
    }

    /// Law 4: for any x, `{e : e.hlc <= x}` is causally closed (every event
    /// inserts in a random causal order of the cut alone) and folds the same
    /// in every order, to the model of that set.
    #[test]
    fn every_hlc_cut_is_causally_closed_and_order_independent(
        (k, steps, seed) in script(mixed_op(), STREAMS.len(), 0.15)
    ) {
        let world = run(k, &steps, |_| {});
        let all = &world.all;
        let mut rng = Rng(seed);
        let mut hlcs: Vec<Hlc> = all.iter().map(|(e, _)| e.hlc).collect();
        hlcs.sort();
        if hlcs.is_empty() {
            // Every append was refused: the empty cut is trivially closed.
            hlcs.push(Hlc::ZERO);
        }
        for _ in 0..4 {
            let x = match rng.below(4) {
                0 => Hlc(hlcs[rng.below(hlcs.len())].0.saturating_sub(1)),
                1 => Hlc::ZERO,
                _ => hlcs[rng.below(hlcs.len())],
            };
            let cut: Vec<(Event, EventId)> =
                all.iter().filter(|(e, _)| e.hlc <= x).cloned().collect();
            let ids: HashSet<EventId> = cut.iter().map(|(_, id)| *id).collect();
            for (e, _) in &cut {
                for d in e.prev.iter().chain(&e.deps) {
                    prop_assert!(ids.contains(d), "the cut at {x:?} misses a parent");
                }
            }
            let first = deliver(&cut, &canonical_order(&cut), &mut rng);
            for _ in 0..2 {
                let order = causal_shuffle(&cut, &mut rng);
                let s = deliver(&cut, &order, &mut rng);
                assert_same(&s, &first, &format!("cut at {x:?}"));
            }
            assert_matches_model(&first, &cut);
            prop_assert!(first.max_hlc() <= x);
        }
    }
}

// ---------------------------------------------------------------------------
// Escrow by hand.

fn draft(stream: &str, kind: &str, ops: Vec<Op>) -> Draft {
    Draft {
        stream: stream.into(),
        kind: kind.into(),
        ops,
        payload: b"{}".to_vec(),
        meta: Meta::default(),
        expected_version: None,
        texts: Vec::new(),
    }
}

fn consume(amount: u64) -> Op {
    Op::EscrowConsume {
        counter: SEATS.into(),
        amount,
    }
}

/// An event consuming rights its author holds only through a transfer
/// outside its causal past is refused, on every replica, even on one that
/// knows of the transfer.
#[test]
fn consuming_rights_not_in_the_causal_past_is_refused() {
    let stream = "seat-block/1";
    let mut a = Node::new(0);
    let mut b = Node::new(1);
    let a1 = a.commit(
        1_000,
        draft(
            stream,
            "SeatsOpened",
            vec![Op::EscrowInit {
                counter: SEATS.into(),
                capacity: 10,
            }],
        ),
    );
    b.merge_from(&a.order); // B has A:1 only.
    let a2 = a.commit(
        1_001,
        draft(
            stream,
            "RightsMoved",
            vec![Op::EscrowTransfer {
                counter: SEATS.into(),
                to: b.id,
                amount: 5,
            }],
        ),
    );
    assert_eq!(a2.0.seq, 2);

    // B has not seen A:2: its prepare refuses.
    let refused = b.state.prepare(
        b.id,
        &mut b.clock,
        1_002,
        draft(stream, "SeatsPurchased", vec![consume(1)]),
    );
    assert_eq!(
        refused.unwrap_err(),
        PrepareError::Invalid(Invalid::InsufficientRights {
            counter: SEATS.into(),
            held: 0,
            wanted: 1
        })
    );

    // A replica that has A:1 and A:2 (so knows B holds 5 by then).
    let mut r = State::new();
    r.insert(&a1.0, a1.1).unwrap();
    r.insert(&a2.0, a2.1).unwrap();
    let rights = r.stream(stream).unwrap().escrow[SEATS].accounts[&b.id].rights();
    assert_eq!(rights, 5, "the replica knows of the transfer");
    let before = r.state_hash();

    let by_b = |deps: Vec<EventId>, hlc: Hlc| Event {
        version: MIN_FORMAT_VERSION,
        author: b.id,
        seq: 1,
        prev: None,
        deps,
        hlc,
        stream: stream.into(),
        kind: "SeatsPurchased".into(),
        ops: vec![consume(1)],
        payload: b"{}".to_vec(),
        meta: Meta::default(),
    };
    let insufficient = Err(Invalid::InsufficientRights {
        counter: SEATS.into(),
        held: 0,
        wanted: 1,
    });
    // No deps at all, and with only A:1 in its past: both refused.
    for (deps, hlc) in [
        (vec![], Hlc::from_ms(5_000)),
        (vec![a1.1], Hlc(a2.0.hlc.0 + 7)),
    ] {
        let e = by_b(deps, hlc);
        let (_, id) = e.seal();
        assert_eq!(r.insert(&e, id), insufficient);
        assert_eq!(r.state_hash(), before, "a refused event changed nothing");
        assert!(!r.contains(&id));
    }
    // With A:2 in its past the same consumption is valid.
    let e = by_b(vec![a2.1], Hlc(a2.0.hlc.0 + 1));
    let (_, id) = e.seal();
    assert_eq!(r.insert(&e, id), Ok(Inserted::New));
    assert_escrow_invariants(&r, &[]);
}

/// Two holders selling their whole shares concurrently reach capacity and no
/// further; the next sale is refused on every replica.
#[test]
fn concurrent_sales_within_shares_never_oversell() {
    let stream = "seat-block/1";
    let mut a = Node::new(0);
    let mut b = Node::new(1);
    a.commit(
        1_000,
        draft(
            stream,
            "SeatsOpened",
            vec![Op::EscrowInit {
                counter: SEATS.into(),
                capacity: 10,
            }],
        ),
    );
    a.commit(
        1_001,
        draft(
            stream,
            "RightsMoved",
            vec![Op::EscrowTransfer {
                counter: SEATS.into(),
                to: b.id,
                amount: 4,
            }],
        ),
    );
    b.merge_from(&a.order);
    // Offline from each other: each sells its whole share.
    a.commit(1_010, draft(stream, "SeatsPurchased", vec![consume(6)]));
    b.commit(
        1_010,
        draft(stream, "SeatsPurchased", vec![consume(3), consume(1)]),
    );
    for n in [&mut a, &mut b] {
        let r = n.state.prepare(
            n.id,
            &mut n.clock,
            1_020,
            draft(stream, "SeatsPurchased", vec![consume(1)]),
        );
        assert!(
            matches!(
                r,
                Err(PrepareError::Invalid(Invalid::InsufficientRights {
                    held: 0,
                    ..
                }))
            ),
            "{r:?}"
        );
    }
    let (ao, bo) = (a.order.clone(), b.order.clone());
    a.merge_from(&bo);
    b.merge_from(&ao);
    assert_same(&a.state, &b.state, "after exchange");
    let e = &a.state.stream(stream).unwrap().escrow[SEATS];
    assert_eq!((e.capacity, e.consumed), (10, 10));
    assert_escrow_invariants(&a.state, &a.order);
    assert_rights_from_causal_past(&a.order);
}

// ---------------------------------------------------------------------------
// Conflicts.

fn set(field: &str, value: &str) -> Op {
    Op::Set {
        field: field.into(),
        value: value.as_bytes().to_vec(),
        supersedes: vec![],
    }
}

/// Same field edited concurrently: both values kept on every replica as a
/// conflict, with the same displayed value, until a write that saw both
/// supersedes them. Different fields edited concurrently: both merge.
#[test]
fn concurrent_writes_to_one_field_conflict_until_superseded() {
    let stream = "customer/123";
    let mut a = Node::new(0);
    let mut b = Node::new(1);
    let mut c = Node::new(2);
    a.commit(
        1_000,
        draft(
            stream,
            "CustomerRegistered",
            vec![set("name", "\"Ada\""), set("email", "\"ada@x\"")],
        ),
    );
    b.merge_from(&a.order);
    c.merge_from(&a.order);

    // Offline: A and B rename concurrently; B's wall clock is behind.
    let (ea, _) = a.commit(
        1_100,
        draft(stream, "Renamed", vec![set("name", "\"Ada L\"")]),
    );
    let (eb, _) = b.commit(
        1_050,
        draft(stream, "Renamed", vec![set("name", "\"Ada B\"")]),
    );
    // Concurrently they also edit different fields.
    a.commit(
        1_101,
        draft(stream, "EmailChanged", vec![set("email", "\"ada@l\"")]),
    );
    b.commit(
        1_051,
        draft(stream, "PhoneAdded", vec![set("phone", "\"555\"")]),
    );

    let (ao, bo) = (a.order.clone(), b.order.clone());
    a.merge_from(&bo);
    b.merge_from(&ao);
    c.merge_from(&bo); // C gets them in the other order.
    c.merge_from(&ao);

    let dot_a = Dot {
        author: a.id,
        seq: ea.seq,
    };
    let dot_b = Dot {
        author: b.id,
        seq: eb.seq,
    };
    let shown_name = [&ea, &eb]
        .iter()
        .max_by_key(|e| (e.hlc, e.author))
        .map(|e| Dot {
            author: e.author,
            seq: e.seq,
        })
        .unwrap();
    for (who, n) in [("A", &a), ("B", &b), ("C", &c)] {
        let conflicts: Vec<_> = n.state.conflicts().collect();
        assert_eq!(conflicts.len(), 1, "{who}: {conflicts:?}");
        let (s, f, writes) = conflicts[0];
        assert_eq!((s, f), (stream, "name"), "{who}");
        let values: BTreeMap<Dot, &[u8]> = writes
            .iter()
            .map(|(d, w)| (d.dot(), &w.value[..]))
            .collect();
        assert_eq!(
            values,
            BTreeMap::from([(dot_a, &b"\"Ada L\""[..]), (dot_b, &b"\"Ada B\""[..])]),
            "{who}: both values kept"
        );
        let st = n.state.stream(stream).unwrap();
        assert_eq!(
            st.shown("name").unwrap().0.dot(),
            shown_name,
            "{who}: display value"
        );
        // Different fields: both merged, no conflict.
        assert_eq!(st.shown("email").unwrap().1.value, b"\"ada@l\"", "{who}");
        assert_eq!(st.shown("phone").unwrap().1.value, b"\"555\"", "{who}");
        assert_eq!(st.fields["email"].len(), 1, "{who}");
        assert_eq!(st.fields["phone"].len(), 1, "{who}");
    }
    assert_same(&a.state, &b.state, "A and B");
    assert_same(&a.state, &c.state, "A and C");

    // C saw both names: its write supersedes both and resolves the conflict.
    let (ec, _) = c.commit(
        900,
        draft(stream, "Renamed", vec![set("name", "\"Ada Lovelace\"")]),
    );
    match &ec.ops[0] {
        Op::Set { supersedes, .. } => {
            let mut both = vec![dot_a, dot_b];
            both.sort();
            assert_eq!(supersedes, &both);
        }
        op => panic!("{op:?}"),
    }
    let co = c.order.clone();
    a.merge_from(&co);
    b.merge_from(&co);
    for (who, n) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(n.state.conflicts().count(), 0, "{who}: resolved");
        let st = n.state.stream(stream).unwrap();
        assert_eq!(st.fields["name"].len(), 1, "{who}");
        let (dot, w) = st.shown("name").unwrap();
        assert_eq!(
            (dot.author, &w.value[..]),
            (c.id, &b"\"Ada Lovelace\""[..]),
            "{who}"
        );
    }
    assert_same(&a.state, &c.state, "after resolution");
}

/// A write may only supersede writes in its causal past: naming a
/// concurrent write is refused.
#[test]
fn superseding_an_unseen_write_is_refused() {
    let stream = "customer/123";
    let mut a = Node::new(0);
    let mut b = Node::new(1);
    let (ea, ida) = a.commit(1_000, draft(stream, "Renamed", vec![set("name", "\"A\"")]));
    let mut eb = match b.state.prepare(
        b.id,
        &mut b.clock,
        1_000,
        draft(stream, "Renamed", vec![set("name", "\"B\"")]),
    ) {
        Ok(Prepared::New(e)) => e,
        other => panic!("{other:?}"),
    };
    let unseen = Dot {
        author: ea.author,
        seq: 1,
    };
    eb.ops = vec![Op::Set {
        field: "name".into(),
        value: b"\"B\"".to_vec(),
        supersedes: vec![unseen],
    }];
    let (_, idb) = eb.seal();
    let mut r = State::new();
    r.insert(&ea, ida).unwrap();
    assert_eq!(
        r.insert(&eb, idb),
        Err(Invalid::SupersedesUnseen {
            field: "name".into(),
            dot: unseen
        })
    );
}

/// The clock rule that makes every hlc cut causally closed: an event whose
/// hlc is not above its prev's or a dep's is refused.
#[test]
fn an_event_not_after_its_prev_or_deps_is_refused() {
    let stream = "customer/123";
    let mut a = Node::new(0);
    let (e1, id1) = a.commit(5_000, draft(stream, "Renamed", vec![set("name", "\"A\"")]));
    let mut r = State::new();
    r.insert(&e1, id1).unwrap();
    let b = keys()[1].node_id();
    let mut eb = Event {
        version: MIN_FORMAT_VERSION,
        author: b,
        seq: 1,
        prev: None,
        deps: vec![id1],
        hlc: e1.hlc,
        stream: stream.into(),
        kind: "Noted".into(),
        ops: vec![],
        payload: vec![],
        meta: Meta::default(),
    };
    let (_, idb) = eb.seal();
    assert_eq!(
        r.insert(&eb, idb),
        Err(Invalid::ClockNotAfter {
            hlc: e1.hlc,
            of: "a dep",
            other: e1.hlc
        })
    );
    eb.hlc = Hlc(e1.hlc.0 + 1);
    let (_, idb) = eb.seal();
    assert_eq!(r.insert(&eb, idb), Ok(Inserted::New));
    // The author's next event with a clock that did not move.
    let mut e2 = e1.clone();
    e2.seq = 2;
    e2.prev = Some(id1);
    let (_, id2) = e2.seal();
    assert_eq!(
        r.insert(&e2, id2),
        Err(Invalid::ClockNotAfter {
            hlc: e1.hlc,
            of: "prev",
            other: e1.hlc
        })
    );
}

// ---------------------------------------------------------------------------
// Idempotency and optimistic concurrency.

/// A command id already in the log yields its first event, on any replica
/// holding it, whatever the retry asks; a stale expected version names both
/// versions.
#[test]
fn command_ids_are_idempotent_and_versions_are_checked() {
    let stream = "customer/7";
    let mut a = Node::new(0);
    let mut b = Node::new(1);
    let mut d = draft(stream, "CustomerRegistered", vec![set("name", "\"Ada\"")]);
    d.meta.command_id = Some("cmd-42".into());
    d.expected_version = Some(0);
    let (e1, id1) = a.commit(1_000, d.clone());
    assert_eq!(a.state.version(stream), 1);

    // The retry (even a different one, with a now-stale expected version).
    let mut retry = draft(stream, "Other", vec![set("name", "\"Bob\"")]);
    retry.meta.command_id = Some("cmd-42".into());
    retry.expected_version = Some(0);
    b.merge_from(&a.order);
    for (who, n) in [("A", &mut a), ("B", &mut b)] {
        let len = n.state.len();
        match n.state.prepare(n.id, &mut n.clock, 2_000, retry.clone()) {
            Ok(Prepared::Existing(rec)) => {
                assert_eq!(rec.id, id1, "{who}");
                assert_eq!(
                    (rec.author, rec.seq, rec.hlc),
                    (e1.author, e1.seq, e1.hlc),
                    "{who}"
                );
                assert_eq!((rec.stream.as_str(), rec.version), (stream, 1), "{who}");
            }
            other => panic!("{who}: {other:?}"),
        }
        assert_eq!(n.state.len(), len, "{who}: nothing written");
        assert_eq!(
            n.state.command(stream, "cmd-42").map(|r| r.id),
            Some(id1),
            "{who}"
        );
    }
    // The key is (stream, command id): the same id in another stream is
    // another command.
    let mut other = retry.clone();
    other.stream = "customer/8".into();
    other.expected_version = None;
    let (_, id_other) = b.commit(2_000, other);
    assert_eq!(
        b.state.command("customer/8", "cmd-42").map(|r| r.id),
        Some(id_other)
    );
    assert_eq!(b.state.command(stream, "cmd-42").map(|r| r.id), Some(id1));

    // Expected version mismatch names both versions.
    let mut stale = draft(stream, "Renamed", vec![set("name", "\"Ada L\"")]);
    stale.expected_version = Some(0);
    let err = a
        .state
        .prepare(a.id, &mut a.clock, 2_001, stale.clone())
        .unwrap_err();
    assert_eq!(
        err,
        PrepareError::VersionMismatch {
            stream: stream.into(),
            expected: 0,
            actual: 1
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("expected version 0") && msg.contains("at version 1"),
        "{msg}"
    );
    stale.expected_version = Some(3);
    assert!(matches!(
        a.state.prepare(a.id, &mut a.clock, 2_002, stale.clone()),
        Err(PrepareError::VersionMismatch {
            expected: 3,
            actual: 1,
            ..
        })
    ));
    stale.expected_version = Some(1);
    let (e2, _) = a.commit(2_003, stale);
    assert_eq!((e2.seq, a.state.version(stream)), (2, 2));
    // A stream with no events is at version 0.
    let mut fresh = draft(
        "customer/9",
        "CustomerRegistered",
        vec![set("name", "\"Cy\"")],
    );
    fresh.expected_version = Some(0);
    a.commit(2_004, fresh);
    assert_eq!(a.state.version("customer/9"), 1);

    // Two offline replicas take one command concurrently (a client retried
    // on another desk; neither can see the other's). After they exchange,
    // both agree that the first in canonical order took effect and the
    // other is a duplicate with no effect; a retry on either gives the one
    // that took effect.
    let mut c = Node::new(2);
    let mut dup = draft(stream, "CustomerRenamed", vec![set("name", "\"Ada C\"")]);
    dup.ops.push(Op::Add {
        counter: "renames".into(),
        delta: 1,
    });
    dup.meta.command_id = Some("cmd-43".into());
    let (ec, idc) = c.commit(3_000, dup.clone());
    let (ea, ida) = a.commit(3_000, dup.clone());
    assert_eq!(a.state.command(stream, "cmd-43").map(|r| r.id), Some(ida));
    assert_eq!(c.state.command(stream, "cmd-43").map(|r| r.id), Some(idc));
    let (first, ignored) = if (ea.hlc, ea.author, ea.seq) < (ec.hlc, ec.author, ec.seq) {
        (ida, idc)
    } else {
        (idc, ida)
    };
    let (ao, co) = (a.order.clone(), c.order.clone());
    a.merge_from(&co);
    c.merge_from(&ao);
    assert_same(&a.state, &c.state, "after exchange");
    for n in [&mut a, &mut c] {
        assert_eq!(n.state.command(stream, "cmd-43").map(|r| r.id), Some(first));
        let s = n.state.stream(stream).unwrap();
        assert_eq!(s.counters["renames"], 1, "the command counted once");
        assert_eq!(
            s.fields["name"].len(),
            1,
            "the duplicate's write stands nowhere"
        );
        assert_eq!(
            s.duplicates["cmd-43"],
            weftlog_proto::state::Duplicated {
                took_effect: first,
                ignored: vec![ignored],
            }
        );
        match n.state.prepare(n.id, &mut n.clock, 3_001, dup.clone()) {
            Ok(Prepared::Existing(rec)) => assert_eq!(rec.id, first),
            other => panic!("{other:?}"),
        }
    }
}

/// `append_local` (check once, apply) gives exactly what `prepare`, `seal`
/// and `insert` (check twice) give: same events, ids and state.
#[test]
fn append_local_equals_prepare_then_insert() {
    use weftlog_proto::state::Appended;
    let a = Keypair::from_secret([41; 32]);
    let b = Keypair::from_secret([42; 32]);
    // `expect`: the version customer/1 has before the rename.
    let drafts = |who: &Keypair, expect: u64| -> Vec<Draft> {
        let set = |f: &str, v: &str| Op::Set {
            field: f.into(),
            value: format!("\"{v}\"").into_bytes(),
            supersedes: vec![],
        };
        vec![
            Draft {
                stream: "customer/1".into(),
                kind: "Registered".into(),
                ops: vec![set("name", "Ada"), set("email", "a@x")],
                ..Draft::default()
            },
            Draft {
                stream: "event/1".into(),
                kind: "SeatsOpened".into(),
                ops: vec![Op::EscrowInit {
                    counter: "seats".into(),
                    capacity: 10,
                }],
                ..Draft::default()
            },
            Draft {
                stream: "event/1".into(),
                kind: "SeatsSold".into(),
                ops: vec![Op::EscrowConsume {
                    counter: "seats".into(),
                    amount: 3,
                }],
                meta: weftlog_proto::Meta {
                    command_id: Some(format!("sale-{}", who.node_id().short())),
                    user: None,
                },
                ..Draft::default()
            },
            Draft {
                stream: "customer/1".into(),
                kind: "Renamed".into(),
                ops: vec![set("name", "Ada King")],
                expected_version: Some(expect),
                ..Draft::default()
            },
        ]
    };
    // A replica that already holds another author's events, so deps appear.
    let mut base = State::new();
    let mut bclock = HlcClock::default();
    for d in drafts(&b, 1) {
        let Prepared::New(e) = base.prepare(b.node_id(), &mut bclock, 5_000, d).unwrap() else {
            panic!("new event expected");
        };
        let (_, id) = e.seal();
        base.insert(&e, id).unwrap();
    }
    let (mut one, mut two) = (base.clone(), base.clone());
    let (mut c1, mut c2) = (HlcClock::default(), HlcClock::default());
    for (i, d) in drafts(&a, 3).into_iter().enumerate() {
        let now = 9_000 + i as u64;
        let via_local = one
            .append_local(a.node_id(), &mut c1, now, d.clone())
            .unwrap();
        let Appended::New { event, bytes, id } = via_local else {
            panic!("new event expected");
        };
        let Prepared::New(e2) = two.prepare(a.node_id(), &mut c2, now, d).unwrap() else {
            panic!("new event expected");
        };
        let (bytes2, id2) = e2.seal();
        assert_eq!(two.insert(&e2, id2).unwrap(), Inserted::New);
        assert_eq!((&event, &bytes, id), (&e2, &bytes2, id2));
    }
    assert_eq!(one.canonical_read_model(), two.canonical_read_model());
    assert_eq!(one.frontier(), two.frontier());
    // And a repeated command id is reported, not appended, by both.
    let mut again = drafts(&a, 3)[2].clone();
    again.expected_version = None;
    assert!(matches!(
        one.append_local(a.node_id(), &mut c1, 20_000, again)
            .unwrap(),
        Appended::Existing(_)
    ));
}

/// A dot with seq 0 names no event, so it is in no event's causal past:
/// a `Set` superseding one is refused by every replica, whether or not the
/// replica happens to know the dot's author (validity is a function of the
/// event and its causal past, `PROTOCOL.md` §2).
#[test]
fn superseding_a_dot_with_seq_zero_is_refused_whatever_the_replica_knows() {
    let (a, b) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
    let event = |author: &Keypair, ops: Vec<Op>| Event {
        version: MIN_FORMAT_VERSION,
        author: author.node_id(),
        seq: 1,
        prev: None,
        deps: vec![],
        hlc: Hlc::from_ms(1_000),
        stream: "s".into(),
        kind: "K".into(),
        ops,
        payload: vec![],
        meta: Meta::default(),
    };
    // `a`'s first event, unrelated to `b`'s below.
    let ea = event(
        &a,
        vec![Op::Add {
            counter: "n".into(),
            delta: 1,
        }],
    );
    let eb = event(
        &b,
        vec![Op::Set {
            field: "f".into(),
            value: b"1".to_vec(),
            supersedes: vec![Dot {
                author: a.node_id(),
                seq: 0,
            }],
        }],
    );
    let (_, id_a) = ea.seal();
    let (_, id_b) = eb.seal();
    let knows_a = {
        let mut s = State::new();
        s.insert(&ea, id_a).unwrap();
        s
    };
    for mut replica in [State::new(), knows_a] {
        assert!(
            matches!(
                replica.insert(&eb, id_b),
                Err(Invalid::SupersedesUnseen { .. })
            ),
            "a replica that knows {} authors took it",
            replica.frontier().len()
        );
    }
}
