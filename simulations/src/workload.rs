//! Workloads: the commands users issue at each node.
//!
//! A workload sees only what a user at that node could: the node's own
//! state and which peers it is connected to. Commands go through the real
//! command path ([`weftlog_proto::State::append_local`]): a register write
//! names the writes the node shows, an escrow op is refused when the node
//! holds too few rights in its causal past, an expected version is checked
//! against the node's stream.

use weftlog_proto::event::Policy;
use weftlog_proto::state::{Draft, State};
use weftlog_proto::{NodeId, Op};

use crate::rng::Rng;
use crate::scenario::{self, Scenario};

/// What a command was, for the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Setting up: escrow capacity and its first shares, first records.
    Setup,
    /// A register write.
    Set,
    /// A counter increment.
    Add,
    /// A use of escrow rights (a sale, an order) of this many.
    Consume(u64),
    /// A move of escrow rights.
    Transfer,
    /// A new record.
    Register,
}

impl Tag {
    /// Whether a client sends it (and may retry it at another node), as
    /// opposed to the setup and the desks' own rights moves.
    pub fn from_client(self) -> bool {
        matches!(self, Tag::Set | Tag::Add | Tag::Consume(_) | Tag::Register)
    }
}

/// A command for one node.
#[derive(Clone, Debug)]
pub struct Cmd {
    /// What to append.
    pub draft: Draft,
    /// What it is.
    pub tag: Tag,
}

/// What the workload may look at when it makes a command at a node.
pub struct View<'a> {
    /// The node.
    pub me: usize,
    /// Its state.
    pub state: &'a State,
    /// Every node's id, by index.
    pub ids: &'a [NodeId],
    /// The peers it is connected to now, ascending.
    pub connected: &'a [usize],
}

impl View<'_> {
    /// Rights `node` holds on `counter` of `stream`, as this node knows.
    fn rights(&self, stream: &str, counter: &str, node: usize) -> u64 {
        self.state
            .stream(stream)
            .and_then(|s| s.escrow.get(counter))
            .and_then(|e| e.accounts.get(&self.ids[node]))
            .map_or(0, |a| a.rights().min(u64::MAX as u128) as u64)
    }
}

const VENUE_STREAM: &str = "event/keynote";
const SEATS: &str = "seats";
const VENUE_FIELDS: [&str; 5] = ["name", "email", "company", "badge", "diet"];
const VENUE_FIELD_WEIGHTS: [f64; 5] = [0.15, 0.35, 0.15, 0.25, 0.10];
const CUSTOMER_FIELDS: [&str; 4] = ["name", "address", "tier", "credit"];
const CATALOG_FIELDS: [&str; 3] = ["price", "title", "note"];

/// A workload's state: its generator and what it has created.
#[derive(Debug)]
pub struct Workload {
    spec: scenario::Workload,
    rng: Rng,
    nodes: usize,
    sites: usize,
    /// Venue: attendee streams registered so far.
    attendees: Vec<String>,
    /// Per node, records it registered (for unique names).
    made: Vec<u64>,
    /// Values written (for unique values).
    counter: u64,
}

fn set(field: &str, value: String) -> Op {
    Op::Set {
        field: field.to_string(),
        value: value.into_bytes(),
        supersedes: Vec::new(), // `prepare` fills it in
    }
}

fn draft(stream: String, kind: &str, ops: Vec<Op>) -> Draft {
    Draft {
        stream,
        kind: kind.to_string(),
        ops,
        ..Draft::default()
    }
}

impl Workload {
    /// The workload of `sc` for the run seeded with `seed`.
    pub fn new(sc: &Scenario, seed: u64) -> Workload {
        Workload {
            spec: sc.workload.clone(),
            rng: Rng::derive(seed, "workload"),
            nodes: sc.nodes,
            sites: sc.sites.as_ref().map_or(1, |s| s.count),
            attendees: Vec::new(),
            made: vec![0; sc.nodes],
            counter: 0,
        }
    }

    /// Total escrow capacity the setup creates.
    pub fn capacity(&self) -> u64 {
        match &self.spec {
            scenario::Workload::Random {
                escrows, capacity, ..
            } => *escrows as u64 * capacity,
            scenario::Workload::Venue { seats_per_desk, .. } => seats_per_desk * self.nodes as u64,
            scenario::Workload::MultiSite { stock, .. } => stock * self.sites as u64,
        }
    }

    fn value(&mut self, me: usize, what: &str) -> String {
        self.counter += 1;
        format!("\"{what}-{me}-{}\"", self.counter)
    }

    /// Escrow init plus transfers of `share` to each of `to`, in events of
    /// at most 1,000 ops.
    fn escrow_setup(
        stream: &str,
        counter: &str,
        capacity: u64,
        ids: &[NodeId],
        to: &[usize],
        share: u64,
    ) -> Vec<Draft> {
        let mut ops = vec![Op::EscrowInit {
            counter: counter.to_string(),
            capacity,
        }];
        let mut drafts = Vec::new();
        for &t in to {
            if share == 0 {
                break;
            }
            if ops.len() == 1_000 {
                let kind = if drafts.is_empty() {
                    "CapacityOpened"
                } else {
                    "RightsMoved"
                };
                drafts.push(draft(stream.to_string(), kind, std::mem::take(&mut ops)));
            }
            ops.push(Op::EscrowTransfer {
                counter: counter.to_string(),
                to: ids[t],
                amount: share,
            });
        }
        if !ops.is_empty() {
            let kind = if drafts.is_empty() {
                "CapacityOpened"
            } else {
                "RightsMoved"
            };
            drafts.push(draft(stream.to_string(), kind, ops));
        }
        drafts
    }

    /// Commands made at virtual time 0, before any fault: escrow counters
    /// and their shares, first records.
    pub fn setup(&mut self, ids: &[NodeId]) -> Vec<(usize, Cmd)> {
        let mut out = Vec::new();
        let n = self.nodes;
        match self.spec.clone() {
            scenario::Workload::Random {
                escrows, capacity, ..
            } => {
                for j in 0..escrows {
                    let owner = j % n;
                    let others: Vec<usize> = (0..n).filter(|&x| x != owner).collect();
                    let share = capacity / (2 * n as u64);
                    for d in Self::escrow_setup(
                        &format!("stock/{j}"),
                        "units",
                        capacity,
                        ids,
                        &others,
                        share,
                    ) {
                        out.push((
                            owner,
                            Cmd {
                                draft: d,
                                tag: Tag::Setup,
                            },
                        ));
                    }
                }
            }
            scenario::Workload::Venue {
                seats_per_desk,
                initial_attendees,
                policy,
                ..
            } => {
                let others: Vec<usize> = (1..n).collect();
                let mut drafts = Self::escrow_setup(
                    VENUE_STREAM,
                    SEATS,
                    seats_per_desk * n as u64,
                    ids,
                    &others,
                    seats_per_desk,
                );
                // Checked by `Scenario::validate`.
                if let Some(policy) = policy.as_deref().and_then(|p| Policy::parse_spec(p).ok()) {
                    drafts[0].ops.push(Op::EscrowPolicy {
                        counter: SEATS.to_string(),
                        policy,
                        supersedes: Vec::new(),
                    });
                }
                for d in drafts {
                    out.push((
                        0,
                        Cmd {
                            draft: d,
                            tag: Tag::Setup,
                        },
                    ));
                }
                for desk in 0..n {
                    for _ in 0..initial_attendees {
                        let c = self.register(desk);
                        out.push((desk, c));
                    }
                }
            }
            scenario::Workload::MultiSite { stock, .. } => {
                let per_site = n / self.sites;
                for site in 0..self.sites {
                    let first = site * per_site;
                    let others: Vec<usize> = (first + 1..first + per_site).collect();
                    let share = stock / (2 * per_site as u64);
                    for d in Self::escrow_setup(
                        &format!("warehouse/{site}"),
                        "stock",
                        stock,
                        ids,
                        &others,
                        share,
                    ) {
                        out.push((
                            first,
                            Cmd {
                                draft: d,
                                tag: Tag::Setup,
                            },
                        ));
                    }
                }
            }
        }
        out
    }

    fn register(&mut self, desk: usize) -> Cmd {
        self.made[desk] += 1;
        let stream = format!("attendee/{desk}-{}", self.made[desk]);
        self.attendees.push(stream.clone());
        let ops = vec![
            set("name", self.value(desk, "name")),
            set("email", self.value(desk, "email")),
            set("company", self.value(desk, "company")),
        ];
        Cmd {
            draft: draft(stream, "AttendeeRegistered", ops),
            tag: Tag::Register,
        }
    }

    /// The next command at `view.me`, or `None` when the chosen action has
    /// nothing to do there (a rebalance with nothing to give).
    pub fn next(&mut self, view: &View<'_>) -> Option<Cmd> {
        match self.spec.clone() {
            scenario::Workload::Random {
                streams,
                fields,
                escrows,
                weights,
                ..
            } => self.random(view, streams, fields, escrows, &weights),
            scenario::Workload::Venue {
                weights,
                expected_version,
                max_tickets,
                ..
            } => self.venue(view, &weights, expected_version, max_tickets),
            scenario::Workload::MultiSite {
                customers_per_site,
                catalog,
                remote_share,
                ..
            } => self.multi_site(view, customers_per_site, catalog, remote_share),
        }
    }

    fn random(
        &mut self,
        view: &View<'_>,
        streams: usize,
        fields: usize,
        escrows: usize,
        weights: &[f64; 4],
    ) -> Option<Cmd> {
        let me = view.me;
        match self.rng.weighted(weights)? {
            0 => {
                let s = self.rng.index(streams.max(1));
                let f = self.rng.index(fields.max(1));
                let v = self.value(me, "v");
                Some(Cmd {
                    draft: draft(
                        format!("item/{s}"),
                        "ItemEdited",
                        vec![set(&format!("f{f}"), v)],
                    ),
                    tag: Tag::Set,
                })
            }
            1 => {
                let s = self.rng.index(streams.max(1));
                let delta = self.rng.range(1, 9) as i64 - 4;
                let delta = if delta == 0 { 1 } else { delta };
                Some(Cmd {
                    draft: draft(
                        format!("item/{s}"),
                        "ItemCounted",
                        vec![Op::Add {
                            counter: "n".into(),
                            delta,
                        }],
                    ),
                    tag: Tag::Add,
                })
            }
            2 if escrows > 0 => {
                let j = self.rng.index(escrows);
                let amount = self.rng.range(1, 3);
                Some(Cmd {
                    draft: draft(
                        format!("stock/{j}"),
                        "UnitsTaken",
                        vec![Op::EscrowConsume {
                            counter: "units".into(),
                            amount,
                        }],
                    ),
                    tag: Tag::Consume(amount),
                })
            }
            3 if escrows > 0 => {
                let j = self.rng.index(escrows);
                let stream = format!("stock/{j}");
                let held = view.rights(&stream, "units", me);
                let to = self.rng.index(self.nodes - 1);
                let to = if to >= me { to + 1 } else { to };
                if held < 2 {
                    return None;
                }
                Some(Cmd {
                    draft: draft(
                        stream,
                        "UnitsMoved",
                        vec![Op::EscrowTransfer {
                            counter: "units".into(),
                            to: view.ids[to],
                            amount: held / 2,
                        }],
                    ),
                    tag: Tag::Transfer,
                })
            }
            _ => None,
        }
    }

    fn venue(
        &mut self,
        view: &View<'_>,
        weights: &[f64; 4],
        expected_version: f64,
        max_tickets: u64,
    ) -> Option<Cmd> {
        let me = view.me;
        match self.rng.weighted(weights)? {
            0 => Some(self.register(me)),
            1 => {
                if self.attendees.is_empty() {
                    return Some(self.register(me));
                }
                // Recent attendees are edited more: the desk that just
                // registered someone, and others fixing a typo in it.
                let n = self.attendees.len();
                let back = (self.rng.exp(8.0) as usize).min(n - 1);
                let stream = self.attendees[n - 1 - back].clone();
                let f = self.rng.weighted(&VENUE_FIELD_WEIGHTS)?;
                let mut ops = vec![set(VENUE_FIELDS[f], self.value(me, VENUE_FIELDS[f]))];
                if self.rng.chance(0.2) {
                    // Two different fields in one edit.
                    let g = (f + 1 + self.rng.index(VENUE_FIELDS.len() - 1)) % VENUE_FIELDS.len();
                    ops.push(set(VENUE_FIELDS[g], self.value(me, VENUE_FIELDS[g])));
                }
                let mut d = draft(stream, "AttendeeEdited", ops);
                if self.rng.chance(expected_version) {
                    // The version the desk's screen showed a moment ago:
                    // usually current, sometimes one behind.
                    let v = view.state.version(&d.stream);
                    d.expected_version = Some(if self.rng.chance(0.1) {
                        v.saturating_sub(1)
                    } else {
                        v
                    });
                }
                Some(Cmd {
                    draft: d,
                    tag: Tag::Set,
                })
            }
            2 => {
                let amount = self.rng.range(1, max_tickets.max(1));
                let mut d = draft(
                    VENUE_STREAM.to_string(),
                    "SeatsPurchased",
                    vec![Op::EscrowConsume {
                        counter: SEATS.into(),
                        amount,
                    }],
                );
                d.payload = format!("{{\"desk\":{me},\"seats\":{amount}}}").into_bytes();
                Some(Cmd {
                    draft: d,
                    tag: Tag::Consume(amount),
                })
            }
            3 => {
                // Rights move between desks when they meet: give half the
                // difference to the connected desk with the fewest.
                let mine = view.rights(VENUE_STREAM, SEATS, me);
                let (to, theirs) = view
                    .connected
                    .iter()
                    .map(|&p| (p, view.rights(VENUE_STREAM, SEATS, p)))
                    .min_by_key(|&(p, r)| (r, p))?;
                let amount = mine.saturating_sub(theirs) / 2;
                if amount == 0 {
                    return None;
                }
                Some(Cmd {
                    draft: draft(
                        VENUE_STREAM.to_string(),
                        "SeatsRebalanced",
                        vec![Op::EscrowTransfer {
                            counter: SEATS.into(),
                            to: view.ids[to],
                            amount,
                        }],
                    ),
                    tag: Tag::Transfer,
                })
            }
            _ => None,
        }
    }

    fn multi_site(
        &mut self,
        view: &View<'_>,
        customers: usize,
        catalog: usize,
        remote_share: f64,
    ) -> Option<Cmd> {
        let me = view.me;
        let per_site = self.nodes / self.sites;
        let site = me / per_site;
        match self.rng.weighted(&[0.45, 0.15, 0.3, 0.05, 0.05])? {
            0 => {
                let s = if self.rng.chance(remote_share) {
                    self.rng.index(self.sites)
                } else {
                    site
                };
                let k = self.rng.index(customers.max(1));
                let f = *self.rng.pick(&CUSTOMER_FIELDS);
                let v = self.value(me, f);
                Some(Cmd {
                    draft: draft(
                        format!("customer/{s}-{k}"),
                        "CustomerEdited",
                        vec![set(f, v)],
                    ),
                    tag: Tag::Set,
                })
            }
            1 => {
                let k = self.rng.index(catalog.max(1));
                let f = *self.rng.pick(&CATALOG_FIELDS);
                let v = self.value(me, f);
                Some(Cmd {
                    draft: draft(format!("catalog/{k}"), "CatalogEdited", vec![set(f, v)]),
                    tag: Tag::Set,
                })
            }
            2 => {
                let amount = self.rng.range(1, 2);
                Some(Cmd {
                    draft: draft(
                        format!("warehouse/{site}"),
                        "OrderPlaced",
                        vec![Op::EscrowConsume {
                            counter: "stock".into(),
                            amount,
                        }],
                    ),
                    tag: Tag::Consume(amount),
                })
            }
            3 => {
                // Move stock rights of this site's warehouse to a node of
                // another site (it lands when the WAN is up).
                let stream = format!("warehouse/{site}");
                let held = view.rights(&stream, "stock", me);
                if held < 4 {
                    return None;
                }
                let other = (site + 1 + self.rng.index(self.sites - 1)) % self.sites;
                let to = other * per_site + self.rng.index(per_site);
                Some(Cmd {
                    draft: draft(
                        stream,
                        "StockMoved",
                        vec![Op::EscrowTransfer {
                            counter: "stock".into(),
                            to: view.ids[to],
                            amount: held / 4,
                        }],
                    ),
                    tag: Tag::Transfer,
                })
            }
            _ => Some(Cmd {
                draft: draft(
                    format!("site/{site}"),
                    "Visited",
                    vec![Op::Add {
                        counter: "visits".into(),
                        delta: 1,
                    }],
                ),
                tag: Tag::Add,
            }),
        }
    }
}
