//! The discrete-event engine: its events, its queue and the loop that
//! runs them. See the crate docs for the model. The engine's handlers are
//! split by what they simulate: [`network`] (links, connections, delivery),
//! [`commands`] (the workload and group commits), [`faults`] (partitions,
//! crashes, clocks, restores) and [`checks`] (measures and oracles).

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

mod checks;
mod commands;
mod faults;
mod network;

use network::Frame;

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
}
