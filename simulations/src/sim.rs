//! The discrete-event engine. See the crate docs for the model.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use weftlog_proto::hlc::MAX_CLOCK_AHEAD_MS;
use weftlog_proto::log::MemStorage;
use weftlog_proto::peers::{ConnId, PeerEvent, PeerStats, Peers, Random, TargetId};
use weftlog_proto::rebalance::{self, Ask};
use weftlog_proto::state::{PrepareError, State};
use weftlog_proto::sync::{
    decode_message, decode_wire_frame, encode_message, Message, SessionConfig, SyncError,
    MAX_MESSAGE_BYTES,
};
use weftlog_proto::{Event, EventId, Keypair, NodeId};

use crate::node::{AppendResult, Refusal, Sabotage, SimNode};
use crate::oracle::{self, NodeFinal};
use crate::report::{RunReport, Seats, Timeline, Violation};
use crate::rng::Rng;
use crate::scenario::{Link, Scenario, Scheduled, Shape, Topology};
use crate::workload::{View, Workload};
use crate::{Progress, RunOptions};

/// Virtual microseconds.
type Us = u64;

const MS: Us = 1_000;
const SEC: Us = 1_000_000;
/// The wall clock of virtual time 0: 2025-01-01T00:00:00Z.
const EPOCH_MS: f64 = 1_735_689_600_000.0;
/// Losses of one message after which the transport gives up on the
/// connection.
const MAX_RETRANSMITS: u32 = 8;
/// How often open convergence measurements are checked.
const CONVERGE_TICK: Us = 10 * MS;
/// Frames a Byzantine member keeps for replays.
const BYZ_HISTORY: usize = 1024;
/// How long the changes of a node's spare rights are kept, for the
/// measure of avoidable refusals (it looks one round trip back).
const SPARE_HISTORY: Us = 2 * SEC;
/// A node's rights on a counter, and the part beyond its reserve
/// ([`rebalance::spare`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    rights: u64,
    spare: u64,
}

/// The cluster id every node shares.
const CLUSTER: [u8; 32] = *b"weftlog-sim cluster id v1.......";

#[derive(Debug)]
enum Ev {
    Deliver {
        conn: u64,
        dir: usize,
    },
    CommitStart {
        node: usize,
        epoch: u64,
    },
    CommitEnd {
        node: usize,
        epoch: u64,
    },
    /// The node's peer policy is due ([`Peers::poll_timeout`]).
    PeerTimer {
        node: usize,
        epoch: u64,
        at: Us,
    },
    /// A dial's handshake completes (or fails if the path broke meanwhile).
    Handshake {
        node: usize,
        epoch: u64,
        target: TargetId,
        peer_epoch: u64,
    },
    /// A dial got no answer within the connect timeout.
    DialFailed {
        node: usize,
        epoch: u64,
        target: TargetId,
    },
    IdleCheck {
        from: usize,
        to: usize,
        since: Us,
    },
    Command,
    /// A client whose request timed out sends it again, with the same
    /// command id, to `node`.
    Retry {
        node: usize,
        cmd: Box<crate::workload::Cmd>,
    },
    PartitionNext,
    PartitionHeal {
        id: u64,
    },
    PartitionRoll {
        id: u64,
    },
    ScheduledFault {
        index: usize,
    },
    CrashNext,
    Crash {
        node: usize,
        epoch: u64,
        down: Us,
    },
    Restart {
        node: usize,
        epoch: u64,
    },
    ClockStepNext,
    ClockJumpNext,
    /// A jumped clock comes back (`gen`: the jump's).
    ClockJumpBack {
        node: usize,
        gen: u64,
    },
    /// The node's wait for a peer to confirm its own log is due to pass:
    /// its held commands go unless a confirmation let them go already.
    HoldEnd {
        node: usize,
        epoch: u64,
    },
    /// A sale's wait for rights is due to end ([`AwaitingSale`]).
    RightsWait {
        node: usize,
        epoch: u64,
    },
    RestoreNext,
    /// A copy of the node's storage is taken; `age` later, it is restored.
    Backup {
        node: usize,
        age: Us,
        down: Us,
        isolate: Us,
    },
    /// The node crashes (if up) and restarts from its copy after `down`.
    Restore {
        node: usize,
        down: Us,
        isolate: Us,
    },
    Sample,
    ConvergeCheck,
    FinalHeal,
    Deadline,
}

struct Item {
    at: Us,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Item) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Item) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Item) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A message on a connection: ready once its last packet arrived; `None`
/// while its direction is cut (the transport retransmits after the heal).
struct Msg {
    bytes: Vec<u8>,
    ready: Option<Us>,
    /// When it was sent.
    sent: Us,
}

/// One direction of a connection: an ordered, reliable stream.
#[derive(Default)]
struct Chan {
    queue: VecDeque<Msg>,
    /// The link is busy sending until then (bandwidth).
    busy_until: Us,
    /// Ready time of the last message queued: later ones are not earlier.
    last_ready: Us,
}

/// A connection between two nodes (each end's session lives in that
/// node's [`Peers`]).
struct Conn {
    ends: [usize; 2],
    /// `chans[d]` carries messages from `ends[d]` to `ends[1 - d]`.
    chans: [Chan; 2],
}

/// A command a node holds until a peer confirms its own log.
struct HeldCmd {
    cmd: crate::workload::Cmd,
    /// When it arrived.
    since: Us,
    /// Whether it is a client's retry ([`Ev::Retry`]).
    retry: bool,
}

/// A sale that waits for rights from a connected peer
/// ([`weftlog_proto::rebalance::RIGHTS_WAIT_MS`]).
struct AwaitingSale {
    cmd: crate::workload::Cmd,
    /// The node's wall time (ms) after which it is refused.
    until_ms: u64,
    /// When it was first refused.
    since: Us,
    /// Whether it is a client's retry ([`Ev::Retry`]).
    retry: bool,
    /// The counter it sells from.
    key: (String, String),
}

/// A node restarted from a restored copy, watched until its next restore
/// or the end: did its author fork, and could a peer have told it better?
struct RestoreWatch {
    /// Whether it restarted cut off from every peer.
    isolated: bool,
    /// The highest own seq its copy held.
    copy_seq: u64,
    /// The highest own seq any other node held at the restart (its memory,
    /// or its disk if it was down): an own event at or below it that the
    /// node signs again is a fork.
    peer_max: u64,
    /// The restart plus `confirm_wait_ms`: the end of the hold's bound.
    bound_at: Us,
    /// When a peer holding every own event any node held at the restart
    /// (up to `peer_max`, beyond the copy) first finished a sync round
    /// with the node: that round brings them all back.
    full_round_at: Option<Us>,
    /// When the node first signed a seq another node held (the fork).
    forked_at: Option<Us>,
    /// Whether its hold was still on, or ended unconfirmed, when it forked.
    forked_unconfirmed: bool,
}

/// A node and what the simulator keeps about it.
struct Slot {
    node: SimNode,
    /// The node's peer policy: the node's own code. A restart makes a new
    /// one (a new process).
    peers: Peers,
    /// The time of the scheduled [`Ev::PeerTimer`], if one is.
    timer_at: Option<Us>,
    /// Counters of the peer policies of earlier incarnations.
    peer_stats: PeerStats,
    /// Bumped by each crash: events of an older epoch are stale.
    epoch: u64,
    conns: BTreeSet<u64>,
    commit_scheduled: bool,
    skew_ms: f64,
    drift_ppm: f64,
    step_ms: f64,
    /// A crash waits for the node's next write: how long it stays down.
    crash_in_write: Option<Us>,
    /// Records synced before the last crash: recovery must return them all.
    synced_at_crash: u64,
    /// How far the clock is jumped ahead now, ms.
    jump_ms: f64,
    /// Bumped by each jump.
    jump_gen: u64,
    /// Whether the clock ever jumped.
    jumped: bool,
    /// The highest wall time the node's clock has shown.
    max_wall_ms: u64,
    /// A copy of the storage, waiting to be restored.
    backup: Option<MemStorage>,
    /// Whether the node was ever restored from a copy (its author may fork).
    restored: bool,
    /// Set by a restore until the restart from the copy: whether that
    /// restart is cut off from every peer.
    restore_pending: Option<bool>,
    /// The last restore, watched for a fork.
    watch: Option<RestoreWatch>,
    /// Commands held until a peer confirms the node's own log, in arrival
    /// order (the node holds its requests in order).
    held: VecDeque<HeldCmd>,
    /// Sales waiting for rights from a connected peer, in arrival order.
    awaiting: Vec<AwaitingSale>,
    /// Whether a hold that began at the last restart has not ended yet.
    holding: bool,
    /// Own acknowledged events that no other running node held when the
    /// node was restored: unless the copy holds them, the restore lost them.
    restore_only_here: BTreeSet<EventId>,
    /// Forked authors the node's sessions reported (the node records them,
    /// as the daemon's equivocation file does, across restarts).
    forks: BTreeSet<NodeId>,
    /// An own event whose hlc was beyond the horizon of the highest wall
    /// time the node's clock had shown: (hlc ms, that wall time ms).
    clock_ahead: Option<(u64, u64)>,
    /// Per escrow counter sold from, the node's spare rights
    /// ([`rebalance::spare`], 0 while down) since when: the recent changes,
    /// for the measure of avoidable refusals.
    spare: BTreeMap<(String, String), VecDeque<(Us, Held)>>,
}

struct Partition {
    shape: Shape,
    cuts: Vec<(usize, usize)>,
    start: Us,
    end: Us,
}

struct Measure {
    heal_at: Us,
    /// Every head any node advertised at the heal, on every branch.
    target: BTreeSet<EventId>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Main,
    Final,
    Done,
}

pub(crate) struct Sim<'a> {
    sc: &'a Scenario,
    log: u8,
    now: Us,
    seq: u64,
    queue: BinaryHeap<Reverse<Item>>,
    slots: Vec<Slot>,
    ids: Vec<NodeId>,
    conns: BTreeMap<u64, Conn>,
    /// Connections between each pair `(min, max)` of nodes: one, or two
    /// for a moment while both ends dialled at once.
    pair_conns: BTreeMap<(usize, usize), BTreeSet<ConnId>>,
    next_conn: ConnId,
    /// Each node's dial targets: its neighbours in the topology (a
    /// target's id is the neighbour's index).
    neighbours: Vec<Vec<usize>>,
    /// `cuts[from * n + to]`: partitions cutting that direction.
    cuts: Vec<u16>,
    /// Per directed link, when it was last healed (0 if never cut).
    up_since: Vec<Us>,
    down_since: Vec<Us>,
    cut_links: u64,
    partitions: BTreeMap<u64, Partition>,
    next_partition: u64,
    rng_net: Rng,
    rng_fault: Rng,
    rng_disk: Rng,
    rng_node: Rng,
    rng_peers: Rng,
    rng_client: Rng,
    rng_byz: Rng,
    /// Byzantine members: each node's frames sent so far (the last
    /// [`BYZ_HISTORY`]), for replays.
    byz_history: BTreeMap<usize, VecDeque<Frame>>,
    /// Byzantine members: per connection direction, the authors whose run
    /// is open in the stream (their last frame sent was unsigned).
    byz_open: BTreeMap<(ConnId, usize), BTreeSet<NodeId>>,
    /// Byzantine members: an Events message held back per connection
    /// direction.
    byz_held: BTreeMap<(ConnId, usize), Vec<u8>>,
    /// Command ids handed out (`[clients] retry`).
    next_command: u64,
    /// The escrow counters `(stream, counter)` commands sold from.
    sold_from: BTreeSet<(String, String)>,
    /// The union of the events made durable on any node, each folded once
    /// when it first is: what every replica shows once all have met, read
    /// by the seats timeline ([`Seats`]). Not traced.
    cluster: State,
    /// The escrow counters `(stream, counter)` initialised in `cluster`.
    seat_counters: BTreeSet<(String, String)>,
    workload: Workload,
    acked: BTreeMap<EventId, (usize, u64)>,
    trace: blake3::Hasher,
    report: RunReport,
    timeline: Timeline,
    measures: Vec<Measure>,
    converge_scheduled: bool,
    phase: Phase,
    duration: Us,
    sample: Us,
    final_heal_at: Us,
    // Counters for the current sample period.
    period_bytes: u64,
    period_messages: u64,
    period_appends: u64,
}

fn ms(t: Us) -> u64 {
    t / MS
}

fn us_of_ms(x: f64) -> Us {
    (x.max(0.0) * MS as f64) as Us
}

fn us_of_s(x: f64) -> Us {
    (x.max(0.0) * SEC as f64) as Us
}

impl<'a> Sim<'a> {
    pub(crate) fn new(
        sc: &'a Scenario,
        seed: u64,
        opts: &'a RunOptions,
    ) -> Result<Sim<'a>, String> {
        let n = sc.nodes;
        let mut rng_node = Rng::derive(seed, "nodes");
        let mut slots = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let mut h = blake3::Hasher::new_derive_key("weftlog-sim node key v1");
            h.update(&seed.to_le_bytes());
            h.update(&(i as u64).to_le_bytes());
            let key = Keypair::from_secret(*h.finalize().as_bytes());
            let sabotage = if opts.sabotage_nodes.contains(&i)
                && opts.sabotage != Sabotage::Nondeterministic
            {
                opts.sabotage
            } else {
                Sabotage::None
            };
            let id = key.node_id();
            let node = SimNode::new(key, sabotage)?;
            ids.push(node.id());
            let skew = sc.faults.clock_skew_ms;
            let drift = sc.faults.clock_drift_ppm;
            slots.push(Slot {
                node,
                peers: Peers::new(sc.peers.clone(), SessionConfig::new(CLUSTER, id)),
                timer_at: None,
                peer_stats: PeerStats::default(),
                epoch: 0,
                conns: BTreeSet::new(),
                commit_scheduled: false,
                skew_ms: rng_node.uniform(-skew, skew),
                drift_ppm: rng_node.uniform(-drift, drift),
                step_ms: 0.0,
                crash_in_write: None,
                synced_at_crash: 0,
                jump_ms: 0.0,
                jump_gen: 0,
                jumped: false,
                max_wall_ms: 0,
                backup: None,
                restored: false,
                restore_pending: None,
                watch: None,
                held: VecDeque::new(),
                awaiting: Vec::new(),
                holding: false,
                restore_only_here: BTreeSet::new(),
                forks: BTreeSet::new(),
                clock_ahead: None,
                spare: BTreeMap::new(),
            });
        }
        let duration = us_of_s(sc.duration_s);
        let sample = (duration / 120).clamp(100 * MS, SEC);
        let mut sim = Sim {
            sc,
            log: opts.log,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slots,
            ids,
            conns: BTreeMap::new(),
            pair_conns: BTreeMap::new(),
            next_conn: 0,
            neighbours: vec![Vec::new(); n],
            cuts: vec![0; n * n],
            up_since: vec![0; n * n],
            down_since: vec![0; n * n],
            cut_links: 0,
            partitions: BTreeMap::new(),
            next_partition: 0,
            rng_net: Rng::derive(seed, "network"),
            rng_fault: Rng::derive(seed, "faults"),
            rng_disk: Rng::derive(seed, "disk"),
            rng_node,
            rng_peers: Rng::derive(seed, "peers"),
            rng_client: Rng::derive(seed, "clients"),
            rng_byz: Rng::derive(seed, "byzantine"),
            byz_history: BTreeMap::new(),
            byz_open: BTreeMap::new(),
            byz_held: BTreeMap::new(),
            next_command: 0,
            sold_from: BTreeSet::new(),
            cluster: State::new(),
            seat_counters: BTreeSet::new(),
            workload: Workload::new(sc, seed),
            acked: BTreeMap::new(),
            trace: blake3::Hasher::new_derive_key("weftlog-sim trace v1"),
            report: RunReport {
                scenario: sc.name.clone(),
                seed,
                nodes: n,
                duration_ms: ms(duration),
                ..RunReport::default()
            },
            timeline: Timeline {
                sample_ms: ms(sample),
                ..Timeline::default()
            },
            measures: Vec::new(),
            converge_scheduled: false,
            phase: Phase::Main,
            duration,
            sample,
            final_heal_at: duration,
            period_bytes: 0,
            period_messages: 0,
            period_appends: 0,
        };
        if opts.sabotage == Sabotage::Nondeterministic {
            static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            sim.rng_net = Rng::new(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1);
        }
        sim.build_topology(seed);
        Ok(sim)
    }

    // ----- the queue -----

    fn at(&mut self, at: Us, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Item {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        }));
    }

    fn after(&mut self, d: Us, ev: Ev) {
        self.at(self.now + d, ev);
    }

    fn tr(&mut self, tag: u8, words: &[u64], data: &[u8]) {
        if self.log >= 2 || (self.log == 1 && !matches!(tag, b'D' | b'P' | b'W' | b'R' | b'A')) {
            let text = if tag == b'D' || tag == b'P' {
                format!("{} bytes", data.len())
            } else {
                String::from_utf8_lossy(data).into_owned()
            };
            eprintln!(
                "{:>10.3} s  {} {:?} {}",
                self.now as f64 / SEC as f64,
                tag as char,
                words,
                text
            );
        }
        self.trace.update(&[tag]);
        self.trace.update(&self.now.to_le_bytes());
        for w in words {
            self.trace.update(&w.to_le_bytes());
        }
        self.trace.update(&(data.len() as u64).to_le_bytes());
        self.trace.update(data);
    }

    fn fault(&mut self, kind: &str) {
        *self.report.faults.entry(kind.to_string()).or_default() += 1;
    }

    fn violation(&mut self, oracle: &str, detail: String) {
        self.tr(b'V', &[], detail.as_bytes());
        if self.report.violations.len() < 100 {
            self.report.violations.push(Violation {
                oracle: oracle.to_string(),
                at_ms: ms(self.now),
                detail,
            });
        }
    }

    // ----- setup -----

    fn build_topology(&mut self, seed: u64) {
        let n = self.sc.nodes;
        let mut rng = Rng::derive(seed, "topology");
        let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
        let (sites, per_site) = match &self.sc.sites {
            Some(s) => (s.count, n / s.count),
            None => (1, n),
        };
        for site in 0..sites {
            let members: Vec<usize> = (site * per_site..(site + 1) * per_site).collect();
            match self.sc.topology {
                Topology::Mesh => {
                    for (i, &a) in members.iter().enumerate() {
                        for &b in &members[i + 1..] {
                            pairs.insert((a, b));
                        }
                    }
                }
                Topology::Random { degree } => {
                    let m = members.len();
                    for (i, &a) in members.iter().enumerate() {
                        // A ring keeps the graph connected.
                        let b = members[(i + 1) % m];
                        if a != b {
                            pairs.insert((a.min(b), a.max(b)));
                        }
                        for _ in 1..degree {
                            let b = members[rng.index(m)];
                            if a != b {
                                pairs.insert((a.min(b), a.max(b)));
                            }
                        }
                    }
                }
            }
        }
        if let Some(s) = &self.sc.sites {
            for sa in 0..sites {
                for sb in sa + 1..sites {
                    for ga in 0..s.gateways {
                        for gb in 0..s.gateways {
                            pairs.insert((sa * per_site + ga, sb * per_site + gb));
                        }
                    }
                }
            }
        }
        // Both ends list each other, as `--peer` on every node does.
        for &(a, b) in &pairs {
            self.neighbours[a].push(b);
            self.neighbours[b].push(a);
        }
    }

    fn link(&self, a: usize, b: usize) -> &Link {
        match &self.sc.sites {
            Some(s) if self.sc.site_of(a) != self.sc.site_of(b) => &s.wan,
            _ => &self.sc.network,
        }
    }

    fn up(&self, from: usize, to: usize) -> bool {
        self.cuts[from * self.sc.nodes + to] == 0
    }

    fn wall_ms(&self, node: usize) -> u64 {
        let s = &self.slots[node];
        let t = self.now as f64 / MS as f64;
        (EPOCH_MS + t + s.skew_ms + s.step_ms + s.jump_ms + s.drift_ppm * t / 1e6).max(0.0) as u64
    }

    // ----- running -----

    pub(crate) fn run(mut self, progress: &mut dyn FnMut(&Progress)) -> RunReport {
        let n = self.sc.nodes;
        // Setup commands at time 0, then the clocks.
        let setup = self.workload.setup(&self.ids);
        for (node, cmd) in setup {
            self.command_at(node, cmd);
        }
        for node in 0..n {
            // Nodes start within 10 ms of each other.
            let start = self.rng_net.below(10 * MS);
            for i in 0..self.neighbours[node].len() {
                let b = self.neighbours[node][i];
                self.slots[node].peers.add_target(b as TargetId, ms(start));
            }
            self.arm(node);
        }
        let rate = self.sc.workload.rate_per_node_s() * n as f64;
        if rate > 0.0 {
            let first = us_of_s(self.rng_node.exp(1.0 / rate));
            self.at(first, Ev::Command);
        }
        let warmup = us_of_s(self.sc.faults.warmup_s);
        if self.sc.faults.partitions_per_min > 0.0 {
            let d = us_of_s(self.rng_fault.exp(60.0 / self.sc.faults.partitions_per_min));
            self.at(warmup + d, Ev::PartitionNext);
        }
        if self.sc.faults.crashes_per_min > 0.0 {
            let d = us_of_s(self.rng_fault.exp(60.0 / self.sc.faults.crashes_per_min));
            self.at(warmup + d, Ev::CrashNext);
        }
        if self.sc.faults.clock_steps_per_min > 0.0 {
            let d = us_of_s(
                self.rng_fault
                    .exp(60.0 / self.sc.faults.clock_steps_per_min),
            );
            self.at(warmup + d, Ev::ClockStepNext);
        }
        for index in 0..self.sc.schedule.len() {
            let at = us_of_s(self.sc.schedule[index].at_s());
            if at >= self.duration {
                continue;
            }
            if let Scheduled::Restore {
                node,
                age_s,
                down_s,
                isolate_s,
                ..
            } = self.sc.schedule[index]
            {
                // The copy is taken `age_s` before the restore.
                let age = us_of_s(age_s);
                let ev = Ev::Backup {
                    node,
                    age,
                    down: us_of_s(down_s),
                    isolate: us_of_s(isolate_s),
                };
                self.at(at.saturating_sub(age), ev);
            } else {
                self.at(at, Ev::ScheduledFault { index });
            }
        }
        if self.sc.faults.clock_jumps_per_min > 0.0 {
            let d = us_of_s(
                self.rng_fault
                    .exp(60.0 / self.sc.faults.clock_jumps_per_min),
            );
            self.at(warmup + d, Ev::ClockJumpNext);
        }
        if self.sc.faults.restores_per_min > 0.0 {
            let d = us_of_s(self.rng_fault.exp(60.0 / self.sc.faults.restores_per_min));
            self.at(warmup + d, Ev::RestoreNext);
        }
        if self.sc.faults.clock_skew_ms > 0.0 {
            let skewed = self.slots.iter().filter(|s| s.skew_ms != 0.0).count() as u64;
            *self
                .report
                .faults
                .entry("clock_skewed_nodes".into())
                .or_default() += skewed;
        }
        self.at(self.sample, Ev::Sample);
        self.at(self.duration, Ev::FinalHeal);
        self.at(
            self.duration + us_of_s(self.sc.quiesce_timeout_s),
            Ev::Deadline,
        );

        while let Some(Reverse(item)) = self.queue.pop() {
            self.now = item.at;
            let sample = matches!(item.ev, Ev::Sample);
            self.handle(item.ev);
            if sample {
                progress(&Progress {
                    seed: self.report.seed,
                    virtual_ms: ms(self.now),
                    duration_ms: ms(self.duration),
                    events: self.report.events,
                });
            }
            if self.phase == Phase::Done {
                break;
            }
        }
        self.finish()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { conn, dir } => self.deliver(conn, dir),
            Ev::CommitStart { node, epoch } => self.commit_start(node, epoch),
            Ev::CommitEnd { node, epoch } => self.commit_end(node, epoch),
            Ev::PeerTimer { node, epoch, at } => self.peer_timer(node, epoch, at),
            Ev::Handshake {
                node,
                epoch,
                target,
                peer_epoch,
            } => self.handshake(node, epoch, target, peer_epoch),
            Ev::DialFailed {
                node,
                epoch,
                target,
            } => self.dial_failed(node, epoch, target, "no answer"),
            Ev::IdleCheck { from, to, since } => self.idle_check(from, to, since),
            Ev::Command => self.command(),
            Ev::Retry { node, cmd } => self.retry(node, *cmd),
            Ev::PartitionNext => self.partition_next(),
            Ev::PartitionHeal { id } => self.partition_heal(id),
            Ev::PartitionRoll { id } => self.partition_roll(id),
            Ev::ScheduledFault { index } => self.scheduled(index),
            Ev::CrashNext => self.crash_next(),
            Ev::Crash { node, epoch, down } => {
                if self.slots[node].epoch == epoch && self.phase == Phase::Main {
                    self.crash(node, down);
                }
            }
            Ev::Restart { node, epoch } => {
                if self.slots[node].epoch == epoch {
                    self.restart(node);
                }
            }
            Ev::ClockStepNext => self.clock_step_next(),
            Ev::ClockJumpNext => self.clock_jump_next(),
            Ev::ClockJumpBack { node, gen } => self.clock_jump_back(node, gen),
            Ev::HoldEnd { node, epoch } => {
                if self.slots[node].epoch == epoch {
                    self.hold_end(node);
                }
            }
            Ev::RightsWait { node, epoch } => {
                if self.slots[node].epoch == epoch {
                    self.retry_awaiting(node);
                }
            }
            Ev::RestoreNext => self.restore_next(),
            Ev::Backup {
                node,
                age,
                down,
                isolate,
            } => self.backup(node, age, down, isolate),
            Ev::Restore {
                node,
                down,
                isolate,
            } => self.restore(node, down, isolate),
            Ev::Sample => self.sample(),
            Ev::ConvergeCheck => self.converge_check(),
            Ev::FinalHeal => self.final_heal(),
            Ev::Deadline => self.deadline(),
        }
    }

    // ----- the network -----

    /// When a message of `len` bytes sent now on `conn`'s direction `d`
    /// is ready at the receiver; `None` when the transport gives up.
    fn arrival(&mut self, conn: u64, d: usize, len: usize) -> Option<Us> {
        let (from, to) = {
            let c = &self.conns[&conn];
            (c.ends[d], c.ends[1 - d])
        };
        let link = self.link(from, to).clone();
        let tx = if link.bandwidth_kbps > 0.0 {
            (len as f64 * 8.0 / (link.bandwidth_kbps * 1000.0) * SEC as f64) as Us
        } else {
            0
        };
        let mut delay = us_of_ms(link.delay_ms + self.rng_net.exp(link.jitter_ms));
        let mut rto = us_of_ms((3.0 * (link.delay_ms + link.jitter_ms)).max(20.0));
        let mut losses = 0;
        while self.rng_net.chance(link.loss) {
            losses += 1;
            delay += rto;
            rto *= 2;
            if losses >= MAX_RETRANSMITS {
                break;
            }
        }
        if losses > 0 {
            *self.report.faults.entry("packets_lost".into()).or_default() += losses as u64;
        }
        if self.rng_net.chance(link.duplicate) {
            self.fault("packets_duplicated");
        }
        if losses >= MAX_RETRANSMITS {
            return None;
        }
        let chan = &mut self.conns.get_mut(&conn).expect("live conn").chans[d];
        let start = self.now.max(chan.busy_until);
        chan.busy_until = start + tx;
        let natural = start + tx + delay;
        let ready = natural.max(chan.last_ready);
        chan.last_ready = ready;
        if natural < ready {
            *self
                .report
                .faults
                .entry("packets_reordered".into())
                .or_default() += 1;
        }
        Some(ready)
    }

    /// Sends a message a node's session made: as it is, or rewritten if
    /// the node is Byzantine.
    fn send(&mut self, conn: u64, d: usize, bytes: Vec<u8>) {
        let from = self.conns[&conn].ends[d];
        if !self.sc.byzantine.nodes.contains(&from) {
            self.send_raw(conn, d, bytes);
            return;
        }
        for m in self.byzantine(conn, d, from, bytes) {
            if !self.conns.contains_key(&conn) {
                return;
            }
            if let Ok(Some((Message::Events { frames }, _))) = decode_message(&m) {
                let open = self.byz_open.entry((conn, d)).or_default();
                for f in split_frames(&frames).unwrap_or_default() {
                    if let Some(a) = f.author {
                        if f.signed {
                            open.remove(&a);
                        } else {
                            open.insert(a);
                        }
                    }
                }
            }
            self.send_raw(conn, d, m);
        }
    }

    /// What a Byzantine member sends instead of `bytes` (see
    /// [`crate::scenario::Byzantine`]): nothing (held back), or one or two
    /// messages.
    fn byzantine(&mut self, conn: u64, d: usize, from: usize, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let b = self.sc.byzantine.clone();
        let frames = match decode_message(&bytes) {
            Ok(Some((Message::Events { frames }, _))) => frames,
            _ => {
                // Any other message: what was held back goes first.
                let mut out: Vec<Vec<u8>> = self.byz_held.remove(&(conn, d)).into_iter().collect();
                out.push(bytes);
                return out;
            }
        };
        let Some(original) = split_frames(&frames) else {
            return vec![bytes];
        };
        let mut out: Vec<Frame> = Vec::with_capacity(original.len());
        let open = self.byz_open.get(&(conn, d)).cloned().unwrap_or_default();
        // Where receivers accept a frame again today (see `open_runs`).
        let allowed =
            |f: &Frame| b.open_runs || (f.signed && f.author.is_some_and(|a| !open.contains(&a)));
        let history = self.byz_history.entry(from).or_default();
        if !history.is_empty() && self.rng_byz.chance(b.replay) {
            let k = self.rng_byz.range(1, b.replay_frames.max(1) as u64) as usize;
            let mut picked: Vec<usize> =
                (0..k).map(|_| self.rng_byz.index(history.len())).collect();
            picked.sort_unstable();
            picked.dedup();
            for i in picked {
                if allowed(&history[i]) {
                    out.push(history[i].clone());
                }
            }
            let n = out.len() as u64;
            *self
                .report
                .faults
                .entry("byzantine_frames_replayed".into())
                .or_default() += n;
        }
        let mut duplicated = 0;
        for f in &original {
            out.push(f.clone());
            if self.rng_byz.chance(b.duplicate) && (b.open_runs || f.signed) {
                out.push(f.clone());
                duplicated += 1;
            }
        }
        if duplicated > 0 {
            *self
                .report
                .faults
                .entry("byzantine_frames_duplicated".into())
                .or_default() += duplicated;
        }
        if out.len() > 1 && self.rng_byz.chance(b.reorder) {
            if b.reorder_same_author {
                self.rng_byz.shuffle(&mut out);
            } else {
                out = interleave(out, &mut self.rng_byz);
            }
            self.fault("byzantine_messages_reordered");
        }
        let history = self.byz_history.entry(from).or_default();
        for f in original {
            if history.len() >= BYZ_HISTORY {
                history.pop_front();
            }
            history.push_back(f);
        }
        let mut msg = Vec::new();
        if encode_events(&out, &mut msg).is_none() {
            msg = bytes;
        }
        if let Some(held) = self.byz_held.remove(&(conn, d)) {
            // The held message goes after this one, unless that would put
            // one author's frames out of seq order and that is not allowed.
            if b.reorder_same_author || disjoint_authors(&held, &msg) {
                self.fault("byzantine_messages_swapped");
                return vec![msg, held];
            }
            return vec![held, msg];
        }
        if self.rng_byz.chance(b.swap) {
            self.byz_held.insert((conn, d), msg);
            return Vec::new();
        }
        vec![msg]
    }

    fn send_raw(&mut self, conn: u64, d: usize, bytes: Vec<u8>) {
        let (from, to) = {
            let c = &self.conns[&conn];
            (c.ends[d], c.ends[1 - d])
        };
        self.report.messages += 1;
        self.report.bytes += bytes.len() as u64;
        self.period_bytes += bytes.len() as u64;
        self.period_messages += 1;
        let ready = if self.up(from, to) {
            match self.arrival(conn, d, bytes.len()) {
                Some(t) => Some(t),
                None => {
                    self.close(conn, "too many retransmissions");
                    return;
                }
            }
        } else {
            None
        };
        let c = self.conns.get_mut(&conn).expect("live conn");
        c.chans[d].queue.push_back(Msg {
            bytes,
            ready,
            sent: self.now,
        });
        if let Some(t) = ready {
            self.at(t, Ev::Deliver { conn, dir: d });
        }
    }

    fn deliver(&mut self, conn: u64, d: usize) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let (from, to) = (c.ends[d], c.ends[1 - d]);
            match c.chans[d].queue.front() {
                Some(Msg { ready: Some(t), .. }) if *t <= self.now => {}
                _ => return,
            }
            if self.cuts[from * self.sc.nodes + to] > 0 {
                // The packets were lost on the cut link; the transport
                // retransmits them once it heals.
                for m in &mut c.chans[d].queue {
                    m.ready = None;
                }
                return;
            }
            let msg = c.chans[d].queue.pop_front().expect("front checked");
            self.tr(b'D', &[conn, d as u64], &msg.bytes);
            let now = ms(self.now);
            let wall = self.wall_ms(to);
            let s = &mut self.slots[to];
            // As the node does before it stores received events.
            s.node.handle_time(wall);
            s.peers
                .handle_message(conn, &msg.bytes, now, &mut s.node.store());
            self.after_policy(to);
            if self.conns.contains_key(&conn) {
                self.drive(conn, d);
            }
        }
    }

    /// Sends what `conn`'s end `side` has while the direction's window has
    /// room (the daemon's bounded writer queue).
    fn drive(&mut self, conn: ConnId, side: usize) {
        let window = self.sc.peers.window;
        loop {
            let Some(c) = self.conns.get(&conn) else {
                return;
            };
            if c.chans[side].queue.len() >= window {
                return;
            }
            let node = c.ends[side];
            let now = ms(self.now);
            let s = &mut self.slots[node];
            let msg = s.peers.poll_transmit(conn, now, &s.node.store());
            let quiet = msg.is_none();
            if let Some(msg) = msg {
                self.send(conn, side, msg);
            }
            self.node_events(node);
            if quiet {
                return;
            }
        }
    }

    /// After a call into a node's policy: carries out its events, lets
    /// every connection of the node send, and re-arms its timer.
    fn after_policy(&mut self, node: usize) {
        self.retry_awaiting(node);
        self.ask_peers(node);
        self.node_events(node);
        let conns = self.slots[node].peers.take_dirty();
        for conn in conns {
            if let Some(c) = self.conns.get(&conn) {
                let side = if c.ends[0] == node { 0 } else { 1 };
                self.drive(conn, side);
            }
        }
        if self.slots[node].node.take_received() {
            self.request_commit(node);
        }
        self.note_spare(node);
        self.arm(node);
    }

    /// Sends the asks for escrow rights the node's replica says are due
    /// ([`weftlog_proto::replica::Replica::poll_asks`]) to its connected
    /// peers, as the daemon does.
    fn ask_peers(&mut self, node: usize) {
        if !self.sc.node.rebalance || self.phase == Phase::Done {
            return;
        }
        self.answer(node, None);
        let wall = self.wall_ms(node);
        let s = &mut self.slots[node];
        let connected = s.peers.connected();
        for (peer, ask) in s.node.poll_asks(wall, &connected) {
            if s.peers.ask(&peer, ask) {
                self.report.rebalance.asks += 1;
            }
        }
    }

    /// `peer` asked `node` for escrow rights (or, with `None`, the node's
    /// open asks may be answerable now): the replica answers with
    /// transfers, or not ([`weftlog_proto::replica::Replica::handle_ask`],
    /// [`weftlog_proto::replica::Replica::poll_answers`]).
    fn answer(&mut self, node: usize, ask: Option<(NodeId, &Ask)>) {
        if !self.sc.node.rebalance {
            return;
        }
        let wall = self.wall_ms(node);
        for (id, seq, moved) in self.slots[node].node.answer(ask, wall) {
            self.report.rebalance.transfers += 1;
            self.report.rebalance.rights_moved += moved;
            self.check_clock(node, wall);
            self.watch_append(node, seq, id);
            self.append_result(node, Ok(Some((id, seq))));
        }
    }

    /// Records the node's spare rights on each counter sold from, when
    /// they changed.
    fn note_spare(&mut self, node: usize) {
        let now = self.now;
        let me = self.ids[node];
        let s = &mut self.slots[node];
        let up = s.node.is_up();
        for key in &self.sold_from {
            let v = if up {
                Held {
                    rights: rebalance::rights(s.node.state(), &key.0, &key.1, &me),
                    spare: rebalance::spare(s.node.state(), &key.0, &key.1, &me),
                }
            } else {
                Held {
                    rights: 0,
                    spare: 0,
                }
            };
            let h = s.spare.entry(key.clone()).or_default();
            if h.back().is_none_or(|&(_, last)| last != v) {
                h.push_back((now, v));
            }
            while h.len() > 1 && h[1].0 + SPARE_HISTORY <= now {
                h.pop_front();
            }
        }
    }

    /// Whether a sale of `amount` on `key` that `node` refused now could
    /// have been avoided: from one round trip of the link before until
    /// now, a node connected to it (and reachable both ways, with nothing
    /// older waiting on the link) held spare rights covering the sale and
    /// any debt `node` owes there; and whether such a node held rights
    /// covering it at all, reserve included.
    fn avoidable(&self, node: usize, key: &(String, String), amount: u64) -> (bool, bool) {
        // Rights it receives repay its debt first (an overdraft's).
        let me = self.ids[node];
        let amount = amount + rebalance::owed(self.slots[node].node.state(), &key.0, &key.1, &me);
        let held: Vec<Held> = self
            .connected_peers(node)
            .into_iter()
            .filter_map(|p| {
                if !self.up(node, p) || !self.up(p, node) {
                    // Cut by a partition: an ask could not get through.
                    return None;
                }
                let link = self.link(node, p);
                let rtt = us_of_ms(2.0 * (link.delay_ms + link.jitter_ms));
                let then = self.now.saturating_sub(rtt);
                let n = self.sc.nodes;
                if self.up_since[node * n + p] > then || self.up_since[p * n + node] > then {
                    // Healed less than a round trip ago: no ask and answer
                    // could have crossed it yet.
                    return None;
                }
                if self.backlogged(node, p, then) {
                    // The transport still retransmits what a cut lost (in
                    // order): an ask would wait behind it.
                    return None;
                }
                // What it held throughout the round trip: the figure at
                // `then`, and every change since (rights it sold or gave to
                // another desk meanwhile could not have come here).
                let h = self.slots[p].spare.get(key)?;
                let start = h.iter().rposition(|(t, _)| *t <= then)?;
                h.iter().skip(start).map(|&(_, v)| v).reduce(|a, b| Held {
                    rights: a.rights.min(b.rights),
                    spare: a.spare.min(b.spare),
                })
            })
            .collect();
        (
            held.iter().any(|h| h.spare >= amount),
            held.iter().any(|h| h.rights >= amount),
        )
    }

    /// Whether a connection between `a` and `b` holds, either way, a
    /// message sent before `then` and not delivered yet.
    fn backlogged(&self, a: usize, b: usize, then: Us) -> bool {
        self.pair_conns
            .get(&(a.min(b), a.max(b)))
            .into_iter()
            .flatten()
            .filter_map(|c| self.conns.get(c))
            .any(|c| {
                c.chans
                    .iter()
                    .any(|ch| ch.queue.front().is_some_and(|m| m.sent < then))
            })
    }

    /// Carries out the events a node's policy queued.
    fn node_events(&mut self, node: usize) {
        while let Some(e) = self.slots[node].peers.poll_event() {
            match e {
                PeerEvent::Dial { target } => self.dial(node, target),
                PeerEvent::Close {
                    conn, reason, last, ..
                } => {
                    if let Some(last) = last {
                        // The goodbye goes out; the close follows it at once.
                        self.report.messages += 1;
                        self.report.bytes += last.len() as u64;
                    }
                    self.close(conn, &reason);
                }
                PeerEvent::Synced { .. } => {
                    self.report.rounds += 1;
                    let wall = self.wall_ms(node);
                    self.slots[node].node.handle_synced(wall);
                }
                PeerEvent::Asked { peer, ask } => self.answer(node, Some((peer, &ask))),
                PeerEvent::OwnHead { peer, seq, .. } => self.own_head(node, peer, seq),
                PeerEvent::Received { count, .. } => {
                    self.tr(b'R', &[node as u64, count], &[]);
                    self.request_commit(node);
                }
                PeerEvent::Equivocation { proof: eq, .. } => {
                    let restored = self
                        .ids
                        .iter()
                        .position(|i| *i == eq.author)
                        .is_some_and(|a| self.slots[a].restored);
                    if !restored {
                        self.violation(
                            "equivocation",
                            format!(
                                "node {node} saw two events for seq {} of author {} ({} and {}, {})",
                                eq.seq,
                                eq.author.short(),
                                eq.held.short(),
                                eq.other.short(),
                                if eq.proven { "proven" } else { "claimed" }
                            ),
                        );
                    } else if self.slots[node].forks.insert(eq.author) {
                        // A restored node's author forked: expected. The
                        // node records it (as the daemon's equivocation
                        // file does), once per author.
                        self.fault("forks_reported");
                        self.tr(b'f', &[node as u64, eq.seq], &eq.author.0);
                    }
                }
                PeerEvent::SessionFailed { peer, error, .. }
                    if !matches!(error, SyncError::Peer { .. }) =>
                {
                    let peer = self.ids.iter().position(|i| *i == peer);
                    let peer = peer.unwrap_or(usize::MAX);
                    let byzantine = self.sc.byzantine.nodes.contains(&peer);
                    let local = matches!(
                        error,
                        SyncError::LocalMissing { .. }
                            | SyncError::LocalUnsigned { .. }
                            | SyncError::LocalFrontierTooLarge { .. }
                    );
                    if byzantine && !local {
                        // A rewritten stream the receiver refuses (a run
                        // a replayed unsigned frame opened and nothing
                        // ends): the session ends, the peer redials, and
                        // the oracles say whether anything was lost.
                        self.fault("byzantine_sessions_refused");
                        continue;
                    }
                    self.violation(
                        "session",
                        format!("node {node}'s session with node {peer} failed: {error}"),
                    );
                }
                _ => {}
            }
        }
    }

    /// Schedules the node's policy timer if it is due earlier than the one
    /// scheduled.
    fn arm(&mut self, node: usize) {
        let s = &mut self.slots[node];
        if !s.node.is_up() {
            return;
        }
        let Some(at) = s.peers.poll_timeout() else {
            return;
        };
        let at = (at * MS).max(self.now);
        if s.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        s.timer_at = Some(at);
        let epoch = s.epoch;
        self.at(at, Ev::PeerTimer { node, epoch, at });
    }

    fn peer_timer(&mut self, node: usize, epoch: u64, at: Us) {
        let s = &mut self.slots[node];
        if s.epoch != epoch || s.timer_at != Some(at) || !s.node.is_up() {
            return;
        }
        s.timer_at = None;
        if self.phase != Phase::Done {
            let now = ms(self.now);
            let wall = self.wall_ms(node);
            let s = &mut self.slots[node];
            s.node.handle_time(wall);
            s.peers
                .handle_timeout(now, &s.node.store(), &mut self.rng_peers);
        }
        self.after_policy(node);
    }

    fn close(&mut self, conn: ConnId, why: &str) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.tr(b'X', &[conn], why.as_bytes());
        let (a, b) = (c.ends[0], c.ends[1]);
        self.slots[a].conns.remove(&conn);
        self.slots[b].conns.remove(&conn);
        let key = (a.min(b), a.max(b));
        if let Some(set) = self.pair_conns.get_mut(&key) {
            set.remove(&conn);
            if set.is_empty() {
                self.pair_conns.remove(&key);
            }
        }
        // Policy reasons are short phrases; a session error names events,
        // and is counted under one key (the error itself is traced).
        let kind = if why.len() <= 48 && !why.contains(['(', ':']) {
            why.replace(' ', "_")
        } else {
            "a_session_error".to_string()
        };
        self.fault(&format!("connections_closed_{kind}"));
        self.byz_held.retain(|(c, _), _| *c != conn);
        self.byz_open.retain(|(c, _), _| *c != conn);
        let now = ms(self.now);
        for end in [a, b] {
            let s = &mut self.slots[end];
            if s.node.is_up() {
                s.peers.handle_closed(conn, why, now, &mut self.rng_peers);
                self.after_policy(end);
            }
        }
    }

    /// A node's policy dials `target` (a neighbour): the handshake takes
    /// one round trip if the path is up both ways and the peer runs, and
    /// gets no answer within the connect timeout otherwise.
    fn dial(&mut self, node: usize, target: TargetId) {
        let b = target as usize;
        let epoch = self.slots[node].epoch;
        if self.slots[b].node.is_up() && self.up(node, b) && self.up(b, node) {
            let link = self.link(node, b).clone();
            let rtt = 2 * us_of_ms(link.delay_ms + self.rng_net.exp(link.jitter_ms));
            let peer_epoch = self.slots[b].epoch;
            self.after(
                rtt,
                Ev::Handshake {
                    node,
                    epoch,
                    target,
                    peer_epoch,
                },
            );
        } else {
            let wait = self.sc.peers.connect_timeout_ms * MS;
            self.after(
                wait,
                Ev::DialFailed {
                    node,
                    epoch,
                    target,
                },
            );
        }
    }

    fn dial_failed(&mut self, node: usize, epoch: u64, target: TargetId, why: &str) {
        let s = &mut self.slots[node];
        if s.epoch != epoch || !s.node.is_up() {
            return;
        }
        let now = ms(self.now);
        s.peers
            .handle_dial_failed(target, why.to_string(), now, &mut self.rng_peers);
        self.after_policy(node);
    }

    fn handshake(&mut self, a: usize, epoch: u64, target: TargetId, peer_epoch: u64) {
        let b = target as usize;
        if self.slots[a].epoch != epoch || !self.slots[a].node.is_up() {
            return;
        }
        let alive = self.slots[b].node.is_up() && self.slots[b].epoch == peer_epoch;
        if !(alive && self.up(a, b) && self.up(b, a)) {
            self.dial_failed(a, epoch, target, "the handshake broke off");
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                ends: [a, b],
                chans: [Chan::default(), Chan::default()],
            },
        );
        self.pair_conns
            .entry((a.min(b), a.max(b)))
            .or_default()
            .insert(id);
        self.slots[a].conns.insert(id);
        self.slots[b].conns.insert(id);
        self.tr(b'C', &[id, a as u64, b as u64], &[]);
        let now = ms(self.now);
        let (ia, ib) = (self.ids[a], self.ids[b]);
        // A node's incarnation, as its peers see it: its epoch, which every
        // crash bumps.
        let (ea, eb) = (self.slots[a].epoch, self.slots[b].epoch);
        let s = &mut self.slots[a];
        s.peers
            .handle_connected(id, ib, true, eb, Some(target), now, &s.node.store());
        let s = &mut self.slots[b];
        s.peers
            .handle_connected(id, ia, false, ea, None, now, &s.node.store());
        self.after_policy(a);
        self.after_policy(b);
    }

    fn idle_check(&mut self, from: usize, to: usize, since: Us) {
        let ix = from * self.sc.nodes + to;
        if self.cuts[ix] == 0 || self.down_since[ix] != since {
            return;
        }
        let key = (from.min(to), from.max(to));
        let conns: Vec<ConnId> = self
            .pair_conns
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for conn in conns {
            self.close(conn, "idle timeout");
        }
    }

    fn cut(&mut self, from: usize, to: usize) {
        let ix = from * self.sc.nodes + to;
        self.cuts[ix] += 1;
        if self.cuts[ix] == 1 {
            if self.cut_links == 0 && !self.measures.is_empty() {
                // A new partition before the last heal converged: what
                // follows measures the new partition, not the heal.
                self.report.convergence_interrupted += self.measures.len() as u64;
                self.measures.clear();
            }
            self.cut_links += 1;
            self.down_since[ix] = self.now;
            let key = (from.min(to), from.max(to));
            if self.pair_conns.contains_key(&key) {
                let idle = self.sc.peers.idle_timeout_ms * MS;
                self.after(
                    idle,
                    Ev::IdleCheck {
                        from,
                        to,
                        since: self.now,
                    },
                );
            }
        }
    }

    fn uncut(&mut self, from: usize, to: usize) {
        let ix = from * self.sc.nodes + to;
        debug_assert!(self.cuts[ix] > 0);
        self.cuts[ix] -= 1;
        if self.cuts[ix] > 0 {
            return;
        }
        self.up_since[ix] = self.now;
        self.cut_links -= 1;
        let key = (from.min(to), from.max(to));
        let conns: Vec<ConnId> = self
            .pair_conns
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for conn in conns {
            self.retransmit(conn, from);
        }
    }

    /// The transport retransmits what a cut lost on `conn`'s direction
    /// from `from`, after a backed-off probe timeout.
    fn retransmit(&mut self, conn: ConnId, from: usize) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let d = if self.conns[&conn].ends[0] == from {
            0
        } else {
            1
        };
        // The transport retransmits what was lost, after a backed-off
        // probe timeout.
        let n = self.conns[&conn].chans[d].queue.len();
        let mut first = None;
        for i in 0..n {
            if self.conns[&conn].chans[d].queue[i].ready.is_some() {
                continue;
            }
            let len = self.conns[&conn].chans[d].queue[i].bytes.len();
            let pto = us_of_ms(self.rng_net.exp(200.0));
            let Some(t) = self.arrival(conn, d, len) else {
                self.close(conn, "too many retransmissions");
                return;
            };
            let t = t + pto;
            let chan = &mut self.conns.get_mut(&conn).expect("live conn").chans[d];
            chan.last_ready = chan.last_ready.max(t);
            chan.queue[i].ready = Some(t);
            first.get_or_insert(t);
        }
        // One event per message keeps delivery simple: each checks the front.
        let times: Vec<Us> = self.conns[&conn].chans[d]
            .queue
            .iter()
            .filter_map(|m| m.ready)
            .collect();
        for t in times {
            self.at(t, Ev::Deliver { conn, dir: d });
        }
    }

    // ----- nodes -----

    fn request_commit(&mut self, node: usize) {
        let s = &mut self.slots[node];
        if s.commit_scheduled || s.node.is_writing() || !s.node.has_pending() || !s.node.is_up() {
            return;
        }
        s.commit_scheduled = true;
        let epoch = s.epoch;
        self.after(0, Ev::CommitStart { node, epoch });
    }

    fn commit_start(&mut self, node: usize, epoch: u64) {
        let s = &mut self.slots[node];
        if s.epoch != epoch {
            return;
        }
        s.commit_scheduled = false;
        if !s.node.start_commit() {
            return;
        }
        let p = &self.sc.node;
        let d = us_of_ms(p.fsync_ms + self.rng_disk.exp(p.fsync_jitter_ms)).max(1);
        self.after(d, Ev::CommitEnd { node, epoch });
        if let Some(down) = self.slots[node].crash_in_write.take() {
            // The armed crash lands inside this write.
            let at = self.rng_disk.below(d.max(1));
            self.after(at, Ev::Crash { node, epoch, down });
        }
    }

    fn commit_end(&mut self, node: usize, epoch: u64) {
        if self.slots[node].epoch != epoch {
            return;
        }
        let c = match self.slots[node].node.finish_commit() {
            Ok(c) => c,
            Err(e) => {
                self.violation(
                    "durability",
                    format!("node {node}: a log write failed: {e}"),
                );
                return;
            }
        };
        self.report.commits += 1;
        self.tr(b'W', &[node as u64, c.records, c.bytes], &[]);
        let at_ms = ms(self.now);
        for (id, bytes) in &c.events {
            self.fold_durable(*id, bytes);
        }
        for (id, _) in &c.acked {
            self.acked.insert(*id, (node, at_ms));
            self.report.appends.acked += 1;
            self.report.events += 1;
            self.period_appends += 1;
        }
        // Live push: the policy learns of the batch's signed heads.
        let s = &mut self.slots[node];
        s.peers
            .handle_stored(&c.heads, &s.node.store(), &mut self.rng_peers);
        self.after_policy(node);
        self.request_commit(node);
    }

    /// Folds an event a node just made durable into `cluster`, the first
    /// time any node does.
    fn fold_durable(&mut self, id: EventId, bytes: &[u8]) {
        if self.cluster.contains(&id) {
            return;
        }
        // The node wrote these bytes and checked them against their id.
        let Ok(event) = Event::decode_trusted(bytes) else {
            return;
        };
        for op in &event.ops {
            if let weftlog_proto::Op::EscrowInit { counter, .. } = op {
                self.seat_counters
                    .insert((event.stream.clone(), counter.clone()));
            }
        }
        // A node stores an event only after its prev and deps and writes
        // its log in that order, and validity is a function of the causal
        // past: the insert cannot fail. Were it to, the event would only be
        // missing from the seats timeline (a measure, not an oracle).
        let _ = self.cluster.insert(&event, id);
    }

    /// The seats of every escrow counter in `cluster`, now.
    fn seats(&self) -> Seats {
        let mut out = Seats {
            at_ms: ms(self.now),
            ..Seats::default()
        };
        let units = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        for (stream, counter) in &self.seat_counters {
            let Some(e) = self
                .cluster
                .stream(stream)
                .and_then(|s| s.escrow.get(counter))
            else {
                continue;
            };
            out.sold = out.sold.saturating_add(units(e.consumed));
            out.capacity = out
                .capacity
                .saturating_add(units(e.capacity.saturating_add(e.honoured)));
            for m in e.oversold.values() {
                out.oversold = out.oversold.saturating_add(m.units);
                if m.compensation.is_some() {
                    out.compensated = out.compensated.saturating_add(m.units);
                }
            }
        }
        out
    }

    fn connected_peers(&self, node: usize) -> Vec<usize> {
        self.slots[node]
            .conns
            .iter()
            .filter_map(|c| self.conns.get(c))
            .map(|c| {
                if c.ends[0] == node {
                    c.ends[1]
                } else {
                    c.ends[0]
                }
            })
            .collect()
    }

    fn command(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let rate = self.sc.workload.rate_per_node_s() * self.sc.nodes as f64;
        let next = us_of_s(self.rng_node.exp(1.0 / rate)).max(1);
        self.after(next, Ev::Command);
        let node = self.rng_node.index(self.sc.nodes);
        if !self.slots[node].node.is_up() {
            self.report.appends.attempted += 1;
            self.report.appends.node_down += 1;
            return;
        }
        let connected = self.connected_peers(node);
        let view = View {
            me: node,
            state: self.slots[node].node.state(),
            ids: &self.ids,
            connected: &connected,
        };
        let Some(mut cmd) = self.workload.next(&view) else {
            return;
        };
        let clients = &self.sc.clients;
        if clients.retry > 0.0 && cmd.tag.from_client() {
            self.next_command += 1;
            cmd.draft.meta.command_id = Some(format!("c{}", self.next_command));
            if self.rng_client.chance(clients.retry) {
                let other = self.rng_client.index(self.sc.nodes - 1);
                let other = if other >= node { other + 1 } else { other };
                let [lo, hi] = clients.retry_after_ms;
                let wait = us_of_ms(self.rng_client.uniform(lo, hi)).max(1);
                self.after(
                    wait,
                    Ev::Retry {
                        node: other,
                        cmd: Box::new(cmd.clone()),
                    },
                );
            }
        }
        self.command_at(node, cmd);
    }

    /// A client retries a command at `node` (see [`Ev::Retry`]).
    fn retry(&mut self, node: usize, cmd: crate::workload::Cmd) {
        if self.phase != Phase::Main {
            return;
        }
        self.report.retries.sent += 1;
        self.tr(b'y', &[node as u64], b"");
        if !self.slots[node].node.is_up() {
            self.report.appends.attempted += 1;
            self.report.appends.node_down += 1;
            return;
        }
        self.submit(node, cmd, true);
    }

    fn command_at(&mut self, node: usize, cmd: crate::workload::Cmd) {
        self.submit(node, cmd, false);
    }

    /// A command reaches `node`: it runs at once, or waits behind the
    /// node's hold while no peer has confirmed its own log (the node's
    /// HTTP API holds append requests the same way: they wait, in order,
    /// and none is refused).
    fn submit(&mut self, node: usize, cmd: crate::workload::Cmd, retry: bool) {
        self.report.appends.attempted += 1;
        let wall = self.wall_ms(node);
        let held = self.slots[node].node.appends_held(wall).is_some();
        if self.slots[node].holding && !held {
            // The wait passed by the node's clock before its timer fired.
            self.release(node);
        }
        let s = &mut self.slots[node];
        if held {
            s.held.push_back(HeldCmd {
                cmd,
                since: self.now,
                retry,
            });
            self.report.held.commands += 1;
            self.tr(b'h', &[node as u64], &[]);
            return;
        }
        self.run_command(node, cmd, retry);
    }

    /// Runs a command at `node` (it is up and not holding).
    fn run_command(&mut self, node: usize, cmd: crate::workload::Cmd, retry: bool) {
        let wall = self.wall_ms(node);
        let sale = match cmd.tag {
            crate::workload::Tag::Consume(amount) => cmd.draft.ops.iter().find_map(|op| match op {
                weftlog_proto::Op::EscrowConsume { counter, .. }
                | weftlog_proto::Op::EscrowOverdraw { counter, .. } => {
                    Some(((cmd.draft.stream.clone(), counter.clone()), amount))
                }
                _ => None,
            }),
            _ => None,
        };
        if let Some((key, _)) = &sale {
            if self.sold_from.insert(key.clone()) {
                for n in 0..self.slots.len() {
                    self.note_spare(n);
                }
            }
        }
        let keep = sale.as_ref().map(|_| cmd.clone());
        let res = self.slots[node].node.append(wall, cmd.draft);
        if let (Some(cmd), Err(Refusal::AwaitingRights { until_ms })) = (keep, &res) {
            let (key, _) = sale.expect("kept only for a sale");
            self.report.rebalance.waited += 1;
            let epoch = self.slots[node].epoch;
            let d = us_of_ms(until_ms.saturating_sub(wall) as f64).max(MS);
            self.after(d, Ev::RightsWait { node, epoch });
            self.slots[node].awaiting.push(AwaitingSale {
                cmd,
                until_ms: *until_ms,
                since: self.now,
                retry,
                key,
            });
            self.check_clock(node, wall);
            if self.sc.node.rebalance {
                // Its ask goes now.
                self.after_policy(node);
            }
            return;
        }
        self.command_done(node, sale, res, retry, wall);
    }

    /// Gives again the sales waiting at `node` for rights, as the node
    /// does after each durable batch and at the deadline.
    fn retry_awaiting(&mut self, node: usize) {
        if self.slots[node].awaiting.is_empty() || !self.slots[node].node.is_up() {
            return;
        }
        let wall = self.wall_ms(node);
        let waiting = std::mem::take(&mut self.slots[node].awaiting);
        for a in waiting {
            let res =
                self.slots[node]
                    .node
                    .append_held(wall, a.cmd.draft.clone(), Some(a.until_ms));
            if matches!(res, Err(Refusal::AwaitingRights { .. })) {
                self.slots[node].awaiting.push(a);
                continue;
            }
            let waited = ms(self.now - a.since);
            self.report.rebalance.wait_ms += waited;
            if res.is_ok() {
                self.report.rebalance.waited_sold += 1;
                let r = &mut self.report.rebalance;
                r.sold_wait_max_ms = r.sold_wait_max_ms.max(waited);
            }
            let amount = match a.cmd.tag {
                crate::workload::Tag::Consume(amount) => amount,
                _ => 0,
            };
            self.command_done(node, Some((a.key, amount)), res, a.retry, wall);
        }
    }

    /// What follows a command's outcome at `node` (not a wait for rights).
    fn command_done(
        &mut self,
        node: usize,
        sale: Option<((String, String), u64)>,
        res: AppendResult,
        retry: bool,
        wall: u64,
    ) {
        if let (Some((key, amount)), Err(r)) = (&sale, &res) {
            if r.is_rights() {
                self.report.rebalance.refusals += 1;
                let (avoidable, covered) = self.avoidable(node, key, *amount);
                self.report.rebalance.covered += covered as u64;
                if avoidable {
                    self.report.rebalance.avoidable += 1;
                }
            }
        }
        self.check_clock(node, wall);
        if retry && matches!(res, Ok(None)) {
            self.report.retries.answered_existing += 1;
        }
        if let Ok(Some((id, seq))) = res {
            self.watch_append(node, seq, id);
        }
        self.append_result(node, res);
        if self.sc.node.rebalance {
            // A sale may have taken the node below its low-water mark, or
            // been refused: its asks go now.
            self.after_policy(node);
        }
    }

    /// Whether `node`'s new own event `id` at `seq` starts a branch: its
    /// prev already has another successor on some other node (down nodes
    /// by their disk). Extending a branch of an author that forked before
    /// is not a new fork.
    fn diverges(&self, node: usize, seq: u64, id: EventId) -> bool {
        let me = self.ids[node];
        let prev = if seq > 1 {
            let Some(p) = self.slots[node].node.state().chain_id(&id, seq - 1) else {
                return false;
            };
            Some(p)
        } else {
            None
        };
        (0..self.slots.len()).filter(|&i| i != node).any(|i| {
            let n = &self.slots[i].node;
            let reloaded;
            let st = if n.is_up() {
                n.state()
            } else {
                match n.reload() {
                    Ok((st, _)) => {
                        reloaded = st;
                        &reloaded
                    }
                    Err(_) => return false,
                }
            };
            st.frontier()
                .into_iter()
                .filter(|&(a, s, _)| a == me && s >= seq)
                .any(|(_, _, h)| {
                    let at = st.chain_id(&h, seq);
                    at.is_some_and(|x| x != id) && (seq == 1 || st.chain_id(&h, seq - 1) == prev)
                })
        })
    }

    /// The fork watch of a restored node, on each own event it makes.
    fn watch_append(&mut self, node: usize, seq: u64, id: EventId) {
        let wall = self.wall_ms(node);
        let candidate = self.slots[node]
            .watch
            .as_ref()
            .is_some_and(|w| w.forked_at.is_none() && seq <= w.peer_max);
        if !candidate || !self.diverges(node, seq, id) {
            return;
        }
        let s = &mut self.slots[node];
        let unconfirmed = !s.node.own_frontier().confirmed;
        let now = self.now;
        if let Some(w) = s.watch.as_mut() {
            if w.forked_at.is_none() {
                w.forked_at = Some(now);
                w.forked_unconfirmed = unconfirmed;
                debug_assert!(s.node.appends_held(wall).is_none());
                self.tr(b'x', &[node as u64, seq], &[]);
            }
        }
    }

    /// A sync round of `node` with `peer` ended, the peer holding `node`'s
    /// own events up to `seq`: the replica decides whether that confirms
    /// the node's own log, and a confirmation lets the held commands go.
    fn own_head(&mut self, node: usize, peer: NodeId, seq: u64) {
        let wall = self.wall_ms(node);
        let now = self.now;
        let s = &mut self.slots[node];
        if let Some(w) = s.watch.as_mut() {
            if seq > w.copy_seq && seq >= w.peer_max && w.full_round_at.is_none() {
                w.full_round_at = Some(now);
            }
        }
        let confirmed = s.node.handle_own_head(peer, seq, wall);
        if confirmed && s.holding && s.node.appends_held(wall).is_none() {
            self.release(node);
        }
    }

    /// The wait of `node`'s hold is due: its held commands go unless the
    /// node's clock says the wait has not passed (a clock stepped back).
    fn hold_end(&mut self, node: usize) {
        if !self.slots[node].node.is_up() || !self.slots[node].holding {
            return;
        }
        let wall = self.wall_ms(node);
        match self.slots[node].node.appends_held(wall) {
            Some(until) => {
                let epoch = self.slots[node].epoch;
                let d = us_of_ms(until.saturating_sub(wall) as f64).max(MS);
                self.after(d, Ev::HoldEnd { node, epoch });
            }
            None => self.release(node),
        }
    }

    /// `node`'s hold ended (a peer confirmed its own log, or the wait
    /// passed): its held commands run, in the order they arrived.
    fn release(&mut self, node: usize) {
        let s = &mut self.slots[node];
        s.holding = false;
        if s.node.own_frontier().confirmed {
            self.report.held.confirmed += 1;
        } else {
            self.report.held.timed_out += 1;
        }
        let held = std::mem::take(&mut s.held);
        self.tr(b'H', &[node as u64, held.len() as u64], &[]);
        for h in held {
            let waited = ms(self.now - h.since);
            self.report.held.total_ms += waited;
            self.report.held.max_ms = self.report.held.max_ms.max(waited);
            self.run_command(node, h.cmd, h.retry);
        }
    }

    /// The clock oracle, on each local event: its hlc is at most
    /// [`MAX_CLOCK_AHEAD_MS`] past the highest wall time the node's clock
    /// has shown, whatever it received from a clock that jumped ahead.
    fn check_clock(&mut self, node: usize, wall: u64) {
        let s = &mut self.slots[node];
        s.max_wall_ms = s.max_wall_ms.max(wall);
        if let Some(hlc) = s.node.last_hlc() {
            if hlc.ms() > s.max_wall_ms.saturating_add(MAX_CLOCK_AHEAD_MS)
                && s.clock_ahead.is_none()
            {
                s.clock_ahead = Some((hlc.ms(), s.max_wall_ms));
            }
        }
    }

    fn append_result(&mut self, node: usize, res: AppendResult) {
        match res {
            Ok(Some((id, seq))) => {
                self.tr(b'P', &[node as u64, seq], &id.0);
                self.request_commit(node);
            }
            Ok(None) => {}
            Err(Refusal::Prepare(PrepareError::VersionMismatch { .. })) => {
                self.report.appends.refused_version += 1
            }
            Err(r) if r.is_rights() => {
                self.report.appends.refused_rights += 1;
                self.report.oversell_refused += 1;
            }
            Err(e) => {
                self.report.appends.refused_other += 1;
                self.violation(
                    "workload",
                    format!("node {node} refused a command for an unexpected reason: {e}"),
                );
            }
        }
    }

    // ----- faults -----

    fn partition_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.partitions_per_min));
        self.after(d.max(1), Ev::PartitionNext);
        let shape = *self.rng_fault.pick(&f.shapes);
        let len = us_of_s(self.rng_fault.uniform(f.partition_s[0], f.partition_s[1]));
        let cuts = self.draw(shape);
        self.start_partition(shape, cuts, len);
    }

    fn start_partition(&mut self, shape: Shape, cuts: Vec<(usize, usize)>, len: Us) {
        if cuts.is_empty() {
            return;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        for &(a, b) in &cuts {
            self.cut(a, b);
        }
        self.fault(&format!("partition_{}", shape.name()));
        self.tr(b'p', &[id, cuts.len() as u64, len], shape.name().as_bytes());
        let end = (self.now + len).min(self.duration);
        let roll = us_of_s(self.sc.faults.rolling_period_s).max(MS);
        self.partitions.insert(
            id,
            Partition {
                shape,
                cuts,
                start: self.now,
                end,
            },
        );
        self.at(end, Ev::PartitionHeal { id });
        if shape == Shape::Rolling && self.now + roll < end {
            self.after(roll, Ev::PartitionRoll { id });
        }
    }

    fn partition_roll(&mut self, id: u64) {
        let roll = us_of_s(self.sc.faults.rolling_period_s).max(MS);
        let Some(p) = self.partitions.get(&id) else {
            return;
        };
        if self.now + roll >= p.end || self.phase != Phase::Main {
            return;
        }
        let old = p.cuts.clone();
        let new = self.draw(Shape::Split);
        // Apply the new split before lifting the old: links in both stay cut.
        for &(a, b) in &new {
            self.cut(a, b);
        }
        for &(a, b) in &old {
            self.uncut(a, b);
        }
        self.fault("partition_changes");
        self.tr(b'r', &[id, new.len() as u64], &[]);
        let p = self.partitions.get_mut(&id).expect("checked above");
        p.cuts = new;
        self.after(roll, Ev::PartitionRoll { id });
    }

    fn partition_heal(&mut self, id: u64) {
        let Some(p) = self.partitions.remove(&id) else {
            return;
        };
        for &(a, b) in &p.cuts {
            self.uncut(a, b);
        }
        self.fault("heals");
        self.tr(b'h', &[id], &[]);
        self.timeline
            .partitions
            .push((ms(p.start), ms(self.now), p.shape.name().to_string()));
        if self.cut_links == 0 && self.phase == Phase::Main {
            self.open_measure();
        }
    }

    /// Directed cuts for a partition of `shape`.
    fn draw(&mut self, shape: Shape) -> Vec<(usize, usize)> {
        let n = self.sc.nodes;
        let mut cuts = Vec::new();
        let both = |a: usize, b: usize, cuts: &mut Vec<(usize, usize)>| {
            cuts.push((a, b));
            cuts.push((b, a));
        };
        match shape {
            Shape::Split | Shape::Rolling => {
                let k = if n >= 6 && self.rng_fault.chance(0.3) {
                    3
                } else {
                    2
                };
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                // Each group gets at least one node.
                let mut group = vec![0usize; n];
                for (i, &x) in order.iter().enumerate() {
                    group[x] = if i < k { i } else { self.rng_fault.index(k) };
                }
                for a in 0..n {
                    for b in a + 1..n {
                        if group[a] != group[b] {
                            both(a, b, &mut cuts);
                        }
                    }
                }
            }
            Shape::Isolate => {
                let x = self.rng_fault.index(n);
                for b in 0..n {
                    if b != x {
                        both(x, b, &mut cuts);
                    }
                }
            }
            Shape::OneWay => {
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                let k = self.rng_fault.range(1, (n / 2).max(1) as u64) as usize;
                let (from, to) = order.split_at(k);
                for &a in from {
                    for &b in to {
                        cuts.push((a, b));
                    }
                }
            }
            Shape::Bridge => {
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                // Ends X and Z with at least one node each; the rest bridge.
                let x_len = self.rng_fault.range(1, (n / 3).max(1) as u64) as usize;
                let z_len = self.rng_fault.range(1, (n / 3).max(1) as u64) as usize;
                let x = &order[..x_len];
                let z = &order[x_len..(x_len + z_len).min(n)];
                for &a in x {
                    for &b in z {
                        both(a, b, &mut cuts);
                    }
                }
            }
            Shape::Flaky => {
                for a in 0..n {
                    for b in a + 1..n {
                        if self.rng_fault.chance(0.5) {
                            both(a, b, &mut cuts);
                        }
                    }
                }
            }
            Shape::Site => {
                if let Some(s) = &self.sc.sites {
                    let site = self.rng_fault.index(s.count);
                    let per = n / s.count;
                    for a in site * per..(site + 1) * per {
                        for b in 0..n {
                            if b / per != site {
                                both(a, b, &mut cuts);
                            }
                        }
                    }
                }
            }
        }
        cuts
    }

    fn scheduled(&mut self, index: usize) {
        if self.phase != Phase::Main {
            return;
        }
        let n = self.sc.nodes;
        match self.sc.schedule[index].clone() {
            Scheduled::Split { for_s, groups, .. } => {
                let mut group = vec![usize::MAX; n];
                for (g, members) in groups.iter().enumerate() {
                    for &m in members {
                        group[m] = g;
                    }
                }
                let mut cuts = Vec::new();
                for a in 0..n {
                    for b in 0..n {
                        if a != b
                            && group[a] != usize::MAX
                            && group[b] != usize::MAX
                            && group[a] != group[b]
                        {
                            cuts.push((a, b));
                        }
                    }
                }
                self.start_partition(Shape::Split, cuts, us_of_s(for_s));
            }
            Scheduled::Cut {
                for_s, from, to, ..
            } => {
                let cuts: Vec<(usize, usize)> = from
                    .iter()
                    .flat_map(|&a| to.iter().filter(move |&&b| b != a).map(move |&b| (a, b)))
                    .collect();
                self.start_partition(Shape::OneWay, cuts, us_of_s(for_s));
            }
            Scheduled::SiteSplit { for_s, site, .. } => {
                let per = n / self.sc.sites.as_ref().map_or(1, |s| s.count);
                let mut cuts = Vec::new();
                for a in site * per..(site + 1) * per {
                    for b in 0..n {
                        if b / per != site {
                            cuts.push((a, b));
                            cuts.push((b, a));
                        }
                    }
                }
                self.start_partition(Shape::Site, cuts, us_of_s(for_s));
            }
            Scheduled::Crash {
                node,
                down_s,
                in_write,
                ..
            } => {
                let down = us_of_s(down_s);
                if in_write {
                    self.slots[node].crash_in_write = Some(down);
                } else {
                    self.crash(node, down);
                }
            }
            Scheduled::ClockStep { node, ms: step, .. } => {
                self.slots[node].step_ms += step as f64;
                self.fault("clock_steps");
                self.tr(b'k', &[node as u64, step as u64], &[]);
            }
            Scheduled::ClockJump {
                node,
                ms: jump,
                for_s,
                ..
            } => self.clock_jump(node, jump, us_of_s(for_s)),
            // Scheduled as a backup (`run`).
            Scheduled::Restore { .. } => {}
        }
    }

    fn crash_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.crashes_per_min));
        self.after(d.max(1), Ev::CrashNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let down = us_of_s(self.rng_fault.uniform(f.crash_down_s[0], f.crash_down_s[1]));
        if !self.slots[node].node.is_up() || self.slots[node].crash_in_write.is_some() {
            return;
        }
        if self.rng_fault.chance(f.crash_in_write) {
            self.slots[node].crash_in_write = Some(down);
        } else {
            self.crash(node, down);
        }
    }

    fn crash(&mut self, node: usize, down: Us) {
        if !self.slots[node].node.is_up() {
            return;
        }
        // How much of a running write reaches the disk: nothing, all of
        // it, or a torn prefix.
        let keep = match self.rng_disk.below(4) {
            0 => 0.0,
            1 => 2.0,
            _ => self.rng_disk.unit(),
        };
        let synced = self.slots[node].node.durable_len();
        let c = self.slots[node].node.crash(keep);
        let s = &mut self.slots[node];
        s.synced_at_crash = synced;
        s.epoch += 1;
        s.commit_scheduled = false;
        s.crash_in_write = None;
        // Held requests die with the process: their clients see an error.
        self.report.held.lost += s.held.len() as u64;
        s.held.clear();
        self.report.rebalance.wait_lost += s.awaiting.len() as u64;
        s.awaiting.clear();
        s.holding = false;
        let epoch = s.epoch;
        self.fault("crashes");
        if c.in_write {
            self.fault("crashes_during_write");
            if c.kept_bytes > 0 && c.kept_bytes < c.batch_bytes {
                self.fault("torn_writes");
            }
        }
        self.report.appends.lost_unacked += c.unacked;
        self.tr(b'K', &[node as u64, c.kept_bytes, c.batch_bytes], &[]);
        self.timeline
            .crashes
            .push((ms(self.now), node, ms(self.now + down)));
        let conns: Vec<u64> = self.slots[node].conns.iter().copied().collect();
        for conn in conns {
            self.close(conn, "peer crashed");
        }
        // The process is gone, and its policy with it.
        let s = &mut self.slots[node];
        let st = s.peers.stats();
        s.peer_stats += st;
        s.peers = Peers::new(
            self.sc.peers.clone(),
            SessionConfig::new(CLUSTER, self.ids[node]),
        );
        s.timer_at = None;
        self.note_spare(node);
        self.after(down, Ev::Restart { node, epoch });
    }

    fn restart(&mut self, node: usize) {
        if self.slots[node].node.is_up() {
            return;
        }
        let wall = self.wall_ms(node);
        match self.slots[node].node.restart(wall) {
            Ok(r) => {
                let synced = self.slots[node].synced_at_crash;
                if r.records < synced {
                    self.violation(
                        "durability",
                        format!(
                            "node {node} recovered {} records after a crash, but {synced} were synced before it",
                            r.records
                        ),
                    );
                }
                self.fault("restarts");
                // What only this node held, and its copy does not, the
                // restore lost: an operator's loss, not the protocol's.
                let only_here = std::mem::take(&mut self.slots[node].restore_only_here);
                let state = self.slots[node].node.state();
                let lost: Vec<EventId> = only_here
                    .into_iter()
                    .filter(|id| !state.contains(id))
                    .collect();
                for id in &lost {
                    self.acked.remove(id);
                }
                if !lost.is_empty() {
                    *self
                        .report
                        .faults
                        .entry("acked_lost_in_restores".into())
                        .or_default() += lost.len() as u64;
                }
                if r.torn.is_some() {
                    self.fault("torn_tails_recovered");
                }
                self.tr(b'S', &[node as u64, r.records], &[]);
            }
            Err(e) => {
                self.violation("recovery", format!("node {node} cannot recover: {e}"));
                return;
            }
        }
        if let Some(isolated) = self.slots[node].restore_pending.take() {
            self.watch_restore(node, isolated);
        }
        // As the node at start: with peers, appends wait for one of them to
        // confirm the own log, or for the wait to pass.
        let wait = self.sc.node.confirm_wait_ms;
        if wait > 0 && !self.neighbours[node].is_empty() {
            let epoch = self.slots[node].epoch;
            let s = &mut self.slots[node];
            s.node.await_confirmation(wall.saturating_add(wait));
            s.holding = true;
            self.report.held.restarts += 1;
            self.after(us_of_ms(wait as f64), Ev::HoldEnd { node, epoch });
        }
        let now = ms(self.now);
        for i in 0..self.neighbours[node].len() {
            let b = self.neighbours[node][i];
            self.slots[node].peers.add_target(b as TargetId, now);
        }
        self.arm(node);
    }

    /// `node` restarted from a restored copy: starts its fork watch (the
    /// last one ends, [`Sim::end_watch`]).
    fn watch_restore(&mut self, node: usize, isolated: bool) {
        self.end_watch(node);
        let me = self.ids[node];
        let copy_seq = self.slots[node].node.state().max_seq(&me);
        let peer_max = (0..self.slots.len())
            .filter(|&i| i != node)
            .map(|i| {
                let n = &self.slots[i].node;
                if n.is_up() {
                    n.state().max_seq(&me)
                } else {
                    n.reload().map_or(0, |(st, _)| st.max_seq(&me))
                }
            })
            .max()
            .unwrap_or(0);
        let bound_at = self.now + us_of_ms(self.sc.node.confirm_wait_ms as f64);
        self.slots[node].watch = Some(RestoreWatch {
            isolated,
            copy_seq,
            peer_max,
            bound_at,
            full_round_at: None,
            forked_at: None,
            forked_unconfirmed: false,
        });
    }

    /// Ends `node`'s fork watch: counts the restore, and checks the
    /// `restore-fork` oracle: a restore with peers reachable at restart
    /// must not fork by an append made unconfirmed before
    /// `confirm_wait_ms` passed (the hold lets none go), nor after a peer
    /// that held every newer own event finished a sync round with it (that
    /// round brought them back). A peer that lacked some of them may
    /// confirm first: the node then forks over the ones it lacked, which
    /// the report counts.
    fn end_watch(&mut self, node: usize) {
        let Some(w) = self.slots[node].watch.take() else {
            return;
        };
        let r = &mut self.report.restores;
        let forked = w.forked_at.is_some();
        if w.isolated {
            r.isolated += 1;
            r.isolated_forked += forked as u64;
            return;
        }
        r.with_peers += 1;
        r.with_peers_forked += forked as u64;
        r.with_peers_forked_unconfirmed += (forked && w.forked_unconfirmed) as u64;
        let Some(fork) = w.forked_at else {
            return;
        };
        let why = if w.full_round_at.is_some_and(|round| round <= fork) {
            "after a peer holding all its newer events finished a round with it"
        } else if w.forked_unconfirmed && fork < w.bound_at {
            "unconfirmed before the wait passed"
        } else {
            return;
        };
        self.violation(
            "restore-fork",
            format!(
                "node {node}, restored with peers reachable (its copy to seq {}, peers to seq {}), forked at {} ms, {why}",
                w.copy_seq,
                w.peer_max,
                ms(fork),
            ),
        );
    }

    fn clock_step_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.clock_steps_per_min));
        self.after(d.max(1), Ev::ClockStepNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let step = self.rng_fault.uniform(-f.clock_step_ms, f.clock_step_ms);
        self.slots[node].step_ms += step;
        self.fault("clock_steps");
        self.tr(b'k', &[node as u64, step as i64 as u64], &[]);
    }

    fn clock_jump_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.clock_jumps_per_min));
        self.after(d.max(1), Ev::ClockJumpNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let jump = f.clock_jump_ms as u64;
        let len = us_of_s(self.rng_fault.uniform(f.clock_jump_s[0], f.clock_jump_s[1]));
        if self.slots[node].jump_ms == 0.0 {
            self.clock_jump(node, jump, len);
        }
    }

    /// `node`'s wall clock jumps `jump` ms ahead, and back after `len`.
    fn clock_jump(&mut self, node: usize, jump: u64, len: Us) {
        if self.slots[node].jump_ms != 0.0 {
            // The jump replaces one under way, which ends here.
            self.fault("clock_jumps_back");
        }
        let s = &mut self.slots[node];
        s.jump_ms = jump as f64;
        s.jumped = true;
        s.jump_gen += 1;
        let gen = s.jump_gen;
        self.fault("clock_jumps");
        self.tr(b'j', &[node as u64, jump], &[]);
        self.after(len.max(1), Ev::ClockJumpBack { node, gen });
    }

    fn clock_jump_back(&mut self, node: usize, gen: u64) {
        let s = &mut self.slots[node];
        if s.jump_gen != gen || s.jump_ms == 0.0 {
            return;
        }
        s.jump_ms = 0.0;
        self.fault("clock_jumps_back");
        self.tr(b'J', &[node as u64], &[]);
    }

    fn restore_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.restores_per_min));
        self.after(d.max(1), Ev::RestoreNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let age = us_of_s(
            self.rng_fault
                .uniform(f.restore_age_s[0], f.restore_age_s[1]),
        );
        let down = us_of_s(
            self.rng_fault
                .uniform(f.restore_down_s[0], f.restore_down_s[1]),
        );
        let isolate = if self.rng_fault.chance(f.restore_isolated) {
            us_of_s(
                self.rng_fault
                    .uniform(f.restore_isolated_s[0], f.restore_isolated_s[1]),
            )
        } else {
            0
        };
        self.backup(node, age, down, isolate);
    }

    /// A copy of `node`'s storage is taken, to be restored `age` later.
    fn backup(&mut self, node: usize, age: Us, down: Us, isolate: Us) {
        if self.phase != Phase::Main || self.slots[node].backup.is_some() {
            return;
        }
        let copy = self.slots[node].node.backup();
        self.slots[node].backup = Some(copy);
        self.fault("backups");
        self.tr(b'b', &[node as u64, age], &[]);
        self.after(
            age,
            Ev::Restore {
                node,
                down,
                isolate,
            },
        );
    }

    /// `node` crashes (if it runs) and restarts from its copy after `down`
    /// (or when its restart is due, if it was down), cut off from every
    /// peer until `isolate` after that if `isolate` is above zero.
    fn restore(&mut self, node: usize, down: Us, isolate: Us) {
        if self.phase != Phase::Main {
            self.slots[node].backup = None;
            return;
        }
        let Some(copy) = self.slots[node].backup.take() else {
            return;
        };
        if isolate > 0 {
            let n = self.sc.nodes;
            let cuts: Vec<(usize, usize)> = (0..n)
                .filter(|&b| b != node)
                .flat_map(|b| [(node, b), (b, node)])
                .collect();
            self.start_partition(Shape::Isolate, cuts, down + isolate);
            self.fault("restores_isolated");
        }
        // What each node holds: a node that is down holds what its disk
        // holds (its memory is gone, and a pending restore has already
        // replaced the disk).
        let on_disk: Vec<Option<State>> = (0..self.slots.len())
            .map(|i| {
                let n = &self.slots[i].node;
                (!n.is_up()).then(|| n.reload().map(|(st, _)| st).unwrap_or_default())
            })
            .collect();
        let holds = |i: usize, id: &EventId| match &on_disk[i] {
            Some(st) => st.contains(id),
            None => self.slots[i].node.state().contains(id),
        };
        // Any acknowledged event this node alone holds, its own or
        // received: after earlier restores of the others, the only copy
        // can be here.
        let only_here: BTreeSet<EventId> = self
            .acked
            .keys()
            .filter(|id| {
                holds(node, id) && !(0..self.slots.len()).any(|i| i != node && holds(i, id))
            })
            .copied()
            .collect();
        self.crash(node, down);
        let s = &mut self.slots[node];
        s.restore_only_here.extend(only_here);
        s.node.restore(copy);
        // Recovery returns the copy, not what was synced before the crash.
        s.synced_at_crash = 0;
        s.restored = true;
        s.restore_pending = Some(isolate > 0);
        self.fault("restores");
        self.tr(b'B', &[node as u64], &[]);
    }

    // ----- measuring -----

    /// Per author, the highest seq any node holds.
    fn union_frontier(&self) -> BTreeMap<NodeId, u64> {
        let mut u: BTreeMap<NodeId, u64> = BTreeMap::new();
        for s in &self.slots {
            if !s.node.is_up() {
                continue;
            }
            for (a, seq, _) in s.node.state().frontier() {
                let e = u.entry(a).or_insert(0);
                *e = (*e).max(seq);
            }
        }
        u
    }

    fn sample(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        let u = self.union_frontier();
        let total: u64 = u.values().sum();
        let divergence: u64 = self
            .slots
            .iter()
            .filter(|s| s.node.is_up())
            .map(|s| total.saturating_sub(s.node.state().len()))
            .sum();
        self.timeline.divergence.push(divergence);
        self.timeline
            .bytes
            .push(std::mem::take(&mut self.period_bytes));
        self.timeline
            .messages
            .push(std::mem::take(&mut self.period_messages));
        self.timeline
            .appends
            .push(std::mem::take(&mut self.period_appends));
        self.timeline.connections.push(self.conns.len() as u64);
        if !self.seat_counters.is_empty() {
            let seats = self.seats();
            self.timeline.seats.push(seats);
        }
        if self.log > 0 {
            let queued: usize = self
                .conns
                .values()
                .flat_map(|c| c.chans.iter())
                .flat_map(|ch| ch.queue.iter())
                .map(|m| m.bytes.len())
                .sum();
            let durable: u64 = self.slots.iter().map(|s| s.node.durable_len()).sum();
            eprintln!(
                "{:>10.3} s  sample: divergence {divergence}, {} connections, {queued} bytes in flight, {durable} durable records",
                self.now as f64 / SEC as f64,
                self.conns.len()
            );
        }
        self.after(self.sample, Ev::Sample);
    }

    fn open_measure(&mut self) {
        let target: BTreeSet<EventId> = self
            .slots
            .iter()
            .flat_map(|s| s.node.frontier())
            .map(|h| h.id)
            .collect();
        self.measures.push(Measure {
            heal_at: self.now,
            target,
        });
        self.timeline.heals.push((ms(self.now), None));
        if !self.converge_scheduled {
            self.converge_scheduled = true;
            self.after(CONVERGE_TICK, Ev::ConvergeCheck);
        }
    }

    fn reached(&self, target: &BTreeSet<EventId>) -> bool {
        self.slots
            .iter()
            .filter(|s| s.node.is_up())
            .all(|s| target.iter().all(|id| s.node.state().contains(id)))
    }

    fn converge_check(&mut self) {
        self.converge_scheduled = false;
        let mut open = Vec::new();
        for m in std::mem::take(&mut self.measures) {
            if self.reached(&m.target) {
                let took = ms(self.now - m.heal_at);
                if self.log > 0 {
                    eprintln!(
                        "{:>10.3} s  converged after the heal at {} ms: {took} ms",
                        self.now as f64 / SEC as f64,
                        ms(m.heal_at)
                    );
                }
                self.report.convergence_ms.push(took);
                if let Some(h) = self
                    .timeline
                    .heals
                    .iter_mut()
                    .rev()
                    .find(|h| h.0 == ms(m.heal_at) && h.1.is_none())
                {
                    h.1 = Some(took);
                }
            } else {
                open.push(m);
            }
        }
        self.measures = open;
        if self.phase == Phase::Final && self.quiescent() {
            let took = ms(self.now - self.final_heal_at);
            self.report.final_convergence_ms = Some(took);
            self.phase = Phase::Done;
            return;
        }
        if !self.measures.is_empty() || self.phase == Phase::Final {
            self.converge_scheduled = true;
            self.after(CONVERGE_TICK, Ev::ConvergeCheck);
        }
    }

    /// Every node up, nothing waiting to be written, and every node's
    /// durable, advertised frontier (every branch head of every author)
    /// the same as its state's and as every other node's.
    fn quiescent(&self) -> bool {
        let first = self.slots[0].node.frontier();
        self.slots.iter().all(|s| {
            s.node.is_up()
                && s.held.is_empty()
                && !s.node.is_busy()
                && s.node.durable_len() == s.node.state().len()
                && s.node.frontier() == first
        })
    }

    fn final_heal(&mut self) {
        self.phase = Phase::Final;
        self.final_heal_at = self.now;
        self.timeline.final_heal_ms = ms(self.now);
        self.tr(b'F', &[], &[]);
        let ids: Vec<u64> = self.partitions.keys().copied().collect();
        for id in ids {
            self.partition_heal(id);
        }
        for node in 0..self.sc.nodes {
            let gen = self.slots[node].jump_gen;
            self.clock_jump_back(node, gen);
            self.slots[node].backup = None;
            self.slots[node].crash_in_write = None;
            if !self.slots[node].node.is_up() {
                self.restart(node);
            }
        }
        debug_assert_eq!(self.cut_links, 0);
        self.open_measure();
    }

    fn deadline(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        let u = self.union_frontier();
        let total: u64 = u.values().sum();
        let behind: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.node.is_up() || s.node.state().len() < total || s.node.is_busy())
            .map(|(i, s)| {
                format!(
                    "node {i} ({}, {} of {total} events, {} durable)",
                    if s.node.is_up() { "up" } else { "down" },
                    s.node.state().len(),
                    s.node.durable_len()
                )
            })
            .take(8)
            .collect();
        self.violation(
            "convergence",
            format!(
                "no quiescence {} s after the final heal; behind: {}",
                self.sc.quiesce_timeout_s,
                if behind.is_empty() {
                    "none (advertised frontiers differ)".to_string()
                } else {
                    behind.join(", ")
                }
            ),
        );
        self.phase = Phase::Done;
    }

    // ----- the end -----

    fn finish(mut self) -> RunReport {
        self.report.virtual_ms = ms(self.now);
        let mut total = PeerStats::default();
        for s in &self.slots {
            for st in [s.peer_stats, s.peers.stats()] {
                total += st;
            }
        }
        let (sent, duplicates) = (total.events_sent, total.duplicates);
        self.report.delivered = total.delivered;
        self.report.gossip = crate::report::Gossip {
            announcements: total.announcements_sent,
            grafts: total.grafts,
            prunes: total.prunes,
        };
        self.report.event_frames = sent;
        self.report.duplicate_deliveries = duplicates;
        for node in 0..self.slots.len() {
            self.end_watch(node);
        }
        if self.slots.iter().all(|s| s.node.is_up()) {
            self.check_oracles();
        }
        if let Some(s) = self.slots.first() {
            self.report.state_hash = s
                .node
                .state()
                .state_hash()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
        }
        let hash = self.report.state_hash.clone();
        self.tr(b'E', &[], hash.as_bytes());
        self.report.trace_hash = self.trace.finalize().to_hex().to_string();
        if !self.seat_counters.is_empty() {
            // The end of the run, after the last sample period.
            let seats = self.seats();
            if self.timeline.seats.last().map(|s| s.at_ms) != Some(seats.at_ms) {
                self.timeline.seats.push(seats);
            }
        }
        self.report.timeline = std::mem::take(&mut self.timeline);
        self.report
    }

    fn check_oracles(&mut self) {
        let at = ms(self.now);
        let mut found: Vec<(&str, String)> = Vec::new();
        let finals: Vec<NodeFinal<'_>> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| NodeFinal {
                ix,
                state: s.node.state(),
                advertised: s.node.frontier(),
            })
            .collect();
        for v in oracle::convergence(&finals) {
            found.push(("convergence", v));
        }
        drop(finals);
        let states: Vec<(usize, &weftlog_proto::State)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| (ix, s.node.state()))
            .collect();
        for v in oracle::escrow_identical(&states) {
            found.push(("escrow-marks", v));
        }
        let clocks: Vec<oracle::ClockView> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| oracle::ClockView {
                ix,
                jumped: s.jumped,
                last_hlc_ms: s.node.last_hlc().map(|h| h.ms()),
                wall_ms: self.wall_ms(ix),
                first_ahead: s.clock_ahead,
            })
            .collect();
        for v in oracle::clock(&clocks) {
            found.push(("clock", v));
        }
        if self.slots.iter().any(|s| s.jumped) {
            // The jumps reached the others: events still beyond their
            // clock's horizon (`State::ahead`), summed over the nodes.
            let ahead: u64 = (0..self.slots.len())
                .map(|ix| self.slots[ix].node.state().ahead(self.wall_ms(ix)).events)
                .sum();
            *self
                .report
                .faults
                .entry("events_ahead_at_end".into())
                .or_default() += ahead;
        }
        // With a restored node, authors may fork: an acknowledged event is
        // kept if any node holds it, on whichever branch.
        let forking = self.slots.iter().any(|s| s.restored);
        let mut held: BTreeSet<EventId> = BTreeSet::new();
        let mut dots: BTreeMap<(NodeId, u64), BTreeSet<EventId>> = BTreeMap::new();
        // One node's log at a time (they are large); node 0's events are
        // kept for the conflict oracle, which checks every node's standing
        // writes against them (the event sets are equal, or the
        // convergence oracle has said otherwise).
        let mut events0: Option<Vec<(weftlog_proto::Event, EventId)>> = None;
        for (ix, s) in self.slots.iter().enumerate() {
            let r = oracle::Reloaded {
                ix,
                state: s.node.state(),
                log: s.node.reload(),
            };
            for v in oracle::durability(&r) {
                found.push(("durability", v));
            }
            if !forking {
                for v in oracle::acknowledged(&self.acked, &r) {
                    found.push(("acknowledged", v));
                }
            }
            let Ok((_, events)) = r.log else {
                continue;
            };
            if forking {
                held.extend(events.iter().map(|(_, id)| *id));
                held.extend(
                    self.acked
                        .keys()
                        .filter(|id| s.node.state().contains(id))
                        .copied(),
                );
            }
            for (e, id) in &events {
                dots.entry((e.author, e.seq)).or_default().insert(*id);
            }
            // What status shows: the replica's fork list, a function of
            // the events it holds, against the branches its log holds.
            let listed: BTreeMap<NodeId, u64> = s
                .node
                .state()
                .forks()
                .iter()
                .map(|f| (f.author, f.seq))
                .collect();
            for v in oracle::forks_reported(ix, &oracle::forks_held(&events), &listed) {
                found.push(("forks", v));
            }
            if let Err(v) = oracle::causal_order(&events) {
                found.push(("causal-order", format!("node {ix}: {v}")));
            }
            match oracle::commands(&events, s.node.state()) {
                Ok(stats) if ix == 0 => {
                    self.report.retries.carried_twice = stats.carried_twice;
                    self.report.retries.duplicates = stats.duplicates;
                }
                Ok(_) => {}
                Err(vs) => {
                    for v in vs.into_iter().take(3) {
                        found.push(("commands", format!("node {ix}: {v}")));
                    }
                }
            }
            match oracle::escrow(s.node.state().streams(), &events) {
                Ok(f) if ix == 0 => {
                    // From the state: a sale retried on two nodes counts once.
                    self.report.escrow_consumed = f.consumed as u64;
                    self.report.escrow_capacity = f.capacity as u64;
                    self.report.oversold = crate::report::Oversold {
                        seats: f.oversold as u64,
                        compensated: f.compensated as u64,
                        released: f.released as u64,
                        honoured: f.honoured as u64,
                    };
                }
                Ok(_) => {}
                Err(vs) => {
                    for v in vs {
                        found.push(("escrow", format!("node {ix}: {v}")));
                    }
                }
            }
            if ix == 0 {
                events0 = Some(events);
            }
        }
        if forking {
            for v in oracle::acknowledged_anywhere(&self.acked, &held) {
                found.push(("acknowledged", v));
            }
        }
        self.report.forks = dots.values().filter(|ids| ids.len() > 1).count() as u64;
        if let Some(events) = &events0 {
            for (ix, s) in self.slots.iter().enumerate() {
                match oracle::conflicts(events, s.node.state().streams()) {
                    Ok(stats) if ix == 0 => {
                        self.report.conflicts = stats.conflicts;
                        self.report.concurrent_writes = stats.concurrent_pairs;
                    }
                    Ok(_) => {}
                    Err(vs) => {
                        for v in vs.into_iter().take(3) {
                            found.push(("conflicts", format!("node {ix}: {v}")));
                        }
                    }
                }
            }
        }
        for (oracle, detail) in found {
            self.report.violations.push(Violation {
                oracle: oracle.to_string(),
                at_ms: at,
                detail,
            });
        }
    }
}

impl Random for Rng {
    fn next_u64(&mut self) -> u64 {
        Rng::next_u64(self)
    }
}

/// One wire frame a Byzantine member sends, with what it needs to know
/// of it.
#[derive(Clone)]
struct Frame {
    bytes: Vec<u8>,
    /// The event's author, if it decodes.
    author: Option<NodeId>,
    /// Whether the frame carries a signature (it ends its author's run).
    signed: bool,
}

/// The wire frames of an Events message, each whole; `None` if they do not
/// split (a session never makes such a message).
fn split_frames(frames: &[u8]) -> Option<Vec<Frame>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < frames.len() {
        let (event, sig, len) = decode_wire_frame(&frames[off..]).ok()?;
        out.push(Frame {
            bytes: frames[off..off + len].to_vec(),
            author: Event::decode_trusted(event).ok().map(|e| e.author),
            signed: sig.is_some(),
        });
        off += len;
    }
    Some(out)
}

/// An Events message of `frames`, or `None` if it would be too large.
fn encode_events(frames: &[Frame], out: &mut Vec<u8>) -> Option<()> {
    let total: usize = frames.iter().map(|f| f.bytes.len()).sum();
    if total + 16 > MAX_MESSAGE_BYTES || frames.is_empty() {
        return None;
    }
    let msg = Message::Events {
        frames: frames
            .iter()
            .flat_map(|f| f.bytes.iter().copied())
            .collect(),
    };
    encode_message(&msg, out);
    Some(())
}

/// `frames` in a random order that keeps each author's frames in the order
/// they had (a random merge of the authors' sequences).
fn interleave(frames: Vec<Frame>, rng: &mut Rng) -> Vec<Frame> {
    let mut by_author: BTreeMap<Option<NodeId>, VecDeque<Frame>> = BTreeMap::new();
    for f in frames {
        by_author.entry(f.author).or_default().push_back(f);
    }
    let mut queues: Vec<VecDeque<Frame>> = by_author.into_values().collect();
    let mut out = Vec::new();
    while !queues.is_empty() {
        let i = rng.index(queues.len());
        if let Some(f) = queues[i].pop_front() {
            out.push(f);
        }
        if queues[i].is_empty() {
            queues.swap_remove(i);
        }
    }
    out
}

/// Whether two Events messages carry frames of no common author.
fn disjoint_authors(a: &[u8], b: &[u8]) -> bool {
    let authors = |m: &[u8]| -> Option<BTreeSet<NodeId>> {
        let Ok(Some((Message::Events { frames }, _))) = decode_message(m) else {
            return None;
        };
        split_frames(&frames)?.iter().map(|f| f.author).collect()
    };
    match (authors(a), authors(b)) {
        (Some(x), Some(y)) => x.is_disjoint(&y),
        _ => false,
    }
}
