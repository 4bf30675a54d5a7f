//! weftlog's deterministic simulator.
//!
//! Many nodes run in one process, each with the real protocol core of
//! `weftlog-proto`: the same [`State`](weftlog_proto::State) fold, the same
//! [`Log`](weftlog_proto::log::Log) format and recovery over
//! [`MemStorage`](weftlog_proto::log::MemStorage) (which keeps a durable and
//! a pending image and tears the pending one on a crash), the same
//! [`Replica`](weftlog_proto::replica::Replica), and the same peer policy,
//! [`Peers`](weftlog_proto::peers::Peers), with its sync sessions, broadcast
//! tree, dialling, backoff and anti-entropy, configured by the node's own
//! [`PeersConfig`](weftlog_proto::peers::PeersConfig) (a scenario's
//! `[peers]` table). Only the network, the disk's
//! timing, the clocks and the users are simulated. A run is a function of
//! its scenario and one seed: [`run`] twice gives the same trace hash.
//!
//! # The engine
//!
//! A single-threaded discrete-event loop over virtual time (microseconds):
//! a priority queue of events ordered by (time, insertion number). Nothing
//! reads the wall clock, nothing iterates a hash map into anything
//! observable, and all randomness comes from xoshiro256** streams derived
//! from the seed ([`rng`]). The trace hash is blake3 over every message
//! delivered (its bytes), every append, batch write, fault, connection and
//! violation, with its virtual time.
//!
//! # The node
//!
//! [`node::SimNode`] is a shell around the node's
//! [`Replica`](weftlog_proto::replica::Replica), the same core `src/node.rs`
//! drives with threads and files: local commands become events against
//! the current state at once, received events are applied at once, and
//! both are written by the next group commit (the last own event signed, a
//! commit mark on the batch's last record, one sync, no batch ending inside
//! a received run). A sync takes virtual time; appends are acknowledged
//! and the batch's signed heads handed to the node's peer policy
//! (`Peers::handle_stored`: live push along the tree) when it ends. The node advertises and serves
//! only durable, signed heads, read back from its log. A crash during a
//! write tears it (a seeded prefix of the unsynced bytes survives); a
//! restart recovers as the node does (`Replica::open`): torn tail cut,
//! records after the last commit mark cut, the log folded again, head
//! signatures verified, the clock re-seeded.
//!
//! # The network, and what "loss", "duplication", "reordering" mean here
//!
//! Each node's policy dials its neighbours in the topology (a mesh, a random
//! graph, or sites: a mesh per site plus gateway links across the WAN), both
//! ends of every link, as nodes that list each other with `--peer` do; the
//! policy keeps one connection per pair, as in the daemon. A dial completes
//! after one round trip if the path is up both ways and the peer runs, and
//! fails after the policy's connect timeout otherwise; a restarted node is
//! a new incarnation (its epoch), whose connection replaces the old one at
//! once. A connection stands for
//! a QUIC stream: **reliable and ordered while it is up**, so packet-level
//! faults never reach a session as such:
//!
//! - **loss**: each message is lost with the link's probability, again and
//!   again; each loss adds a retransmission timeout (doubling). Eight
//!   losses of one message break the connection;
//! - **duplication**: a duplicated packet is dropped by the transport; it
//!   is counted, and has no other effect;
//! - **reordering**: each message gets its own delay (base + exponential
//!   jitter, plus serialization time on links with a bandwidth), so
//!   messages race; the stream still delivers them in order, so a message
//!   that would have overtaken is held back (counted as reordered).
//!
//! Duplicated and out-of-order *events*, which the protocol must survive,
//! happen where they happen in deployments: across connections (the same
//! event pushed by several peers, racing anti-entropy rounds) and across
//! reconnects (a new session resends what the broken one may have sent).
//!
//! **Partitions** cut directed links (one-way cuts too). Messages on a cut
//! direction wait (the transport retransmits them once it heals); a
//! direction cut for the idle timeout breaks the connection (both sessions
//! dropped, in-flight messages lost), and the policies redial with their
//! backoff. A crashed node's connections break at once, and its policy is
//! gone with the process: the restart makes a new one. Timers (dials,
//! grafts, anti-entropy) are the policy's own deadlines
//! ([`Peers::poll_timeout`](weftlog_proto::peers::Peers::poll_timeout)),
//! scheduled as events on virtual time; its randomness is a stream of the
//! seed.
//!
//! **Clocks**: each node's hybrid logical clock is fed virtual time plus a
//! per-node offset, drift, steps and jumps (`clock_jumps_per_min`: the wall
//! clock far ahead, ten minutes by default, and back). The node's wall time
//! reaches its replica as in the daemon: with each append, at a restart,
//! and through `Replica::handle_time` before each message the node handles
//! and each timer, so that the clock observes received events only within
//! the horizon of that time.
//!
//! **Restores** (`restores_per_min`, `kind = "restore"`): a copy of a
//! node's synced storage is taken, and later the node crashes and restarts
//! from the copy, with its peers reachable or cut off for a while. A
//! restored node that appends before it hears of its newer events signs
//! again seqs it had signed: its author forks.
//!
//! **The hold after a restart** (`[node] confirm_wait_ms`): as the node at
//! start, a restarted node with peers holds the commands it gets until a
//! peer's sync round confirms its own log or the wait passes (the
//! replica's rule, `Replica::appends_held`); they run in order when the
//! hold ends, and a crash loses them. Restored with its peers reachable,
//! the node takes its newer events back first and does not fork.
//!
//! **Byzantine members** (`[byzantine]`): honest nodes whose sync sessions'
//! messages are rewritten where bytes leave the node, before the
//! transport: frames sent twice, frames of earlier messages replayed, frames
//! shuffled within a message, messages swapped. Every frame is a valid,
//! signed event the node's own session sent. See `README.md` for which
//! rewrites receivers refuse today.
//!
//! **Clients** (`[clients]`): with `retry` above zero every user command
//! carries a command id, and that share of them is sent again, after
//! `retry_after_ms`, to another node, as a client whose request timed out
//! fails over. The other node answers with the event in effect if it holds
//! one, or carries the command out a second time if it cannot see the first
//! (a partition, or sync not yet done).
//!
//! # Oracles
//!
//! After the final heal (every cut lifted, every node restarted) the run
//! goes on until quiescence (every node's durable, advertised frontier equal
//! to its state's and to every other node's, nothing left to write), or
//! fails after a bound. Then [`oracle`] checks: equal frontiers, state
//! hashes and advertised digests; every acknowledged append on every node,
//! in its state and its log; each log reopened folds to the node's state;
//! each log in causal order; escrow never over capacity and its totals
//! matching a recount of the log; every field's standing writes exactly the
//! writes no other write to it saw (so concurrent same-field edits show as
//! conflicts on every node unless superseded); every (stream, command id)
//! taking effect once, through the first of its events in canonical order,
//! the others listed as ignored (duplicates are left out of the escrow
//! recount and the field check, as the fold leaves them out). With jumped
//! clocks: no node's event is more than `hlc::MAX_CLOCK_AHEAD_MS` past the
//! highest wall time its clock has shown, and no node whose clock never
//! jumped ends with a latest local event that far past its wall time. With
//! restores: acknowledged events count as kept on whichever branch any node
//! holds them; every node that holds both branches of a fork has reported
//! it; the escrow read model is the same on every node; no restore with
//! peers reachable at restart forks by an append made unconfirmed within
//! the hold's bound, or after a peer holding all its newer events finished
//! a sync round with it (`restore-fork`). During the run, a
//! failed sync session, an equivocation by an author that was never
//! restored, a failed recovery or write is a violation too: in honest
//! traffic none of them may happen.

#![warn(missing_docs)]

pub mod cli;
pub mod html;
pub mod node;
pub mod oracle;
pub mod report;
pub mod rng;
pub mod scenario;
mod sim;
pub mod workload;

use std::time::Instant;

pub use report::{RunReport, Summary, Violation};
pub use scenario::{Scenario, SeedRange};

/// Where a run is, for progress bars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The run's seed.
    pub seed: u64,
    /// Virtual time reached, ms.
    pub virtual_ms: u64,
    /// Virtual ms of workload before the final heal (quiescence follows).
    pub duration_ms: u64,
    /// Events acknowledged so far.
    pub events: u64,
}

/// How to run: overrides of the scenario, and test-only hooks.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replaces the scenario's node count.
    pub nodes: Option<usize>,
    /// Replaces the scenario's duration, seconds.
    pub duration_s: Option<f64>,
    /// The scenario as named on the command line (a built-in name or a
    /// file), for replay commands; the scenario's name when `None`.
    pub scenario_arg: Option<String>,
    /// Replaces the venue workload's seat policy (`--policy`).
    pub policy: Option<String>,
    /// Test only: the breakage to build into the nodes listed in
    /// `sabotage_nodes`.
    #[doc(hidden)]
    pub sabotage: node::Sabotage,
    /// Test only: which nodes are broken.
    #[doc(hidden)]
    pub sabotage_nodes: Vec<usize>,
    /// Debug log on stderr: 1 for faults, connections and convergence, 2
    /// for every message too. `WEFTLOG_SIM_LOG` sets it for the CLI.
    #[doc(hidden)]
    pub log: u8,
}

impl RunOptions {
    /// The scenario with the overrides applied.
    pub fn apply(&self, sc: &Scenario) -> Scenario {
        let mut sc = sc.clone();
        if let Some(n) = self.nodes {
            sc.nodes = n;
        }
        if let Some(d) = self.duration_s {
            sc.duration_s = d;
        }
        if let (Some(p), scenario::Workload::Venue { policy, .. }) =
            (&self.policy, &mut sc.workload)
        {
            *policy = Some(p.clone());
        }
        sc
    }

    /// The command that replays `seed`.
    pub fn replay(&self, sc: &Scenario, seed: u64) -> String {
        let name = self.scenario_arg.clone().unwrap_or_else(|| sc.name.clone());
        let mut cmd = format!("weftlog simulate --scenario {name} --seed {seed}");
        if let Some(n) = self.nodes {
            cmd.push_str(&format!(" --nodes {n}"));
        }
        if let Some(d) = self.duration_s {
            cmd.push_str(&format!(" --duration {d}s"));
        }
        if let Some(p) = &self.policy {
            cmd.push_str(&format!(" --policy {p}"));
        }
        cmd
    }
}

/// Runs `scenario` from `seed` and checks the oracles.
pub fn run(scenario: &Scenario, seed: u64) -> RunReport {
    run_with(scenario, seed, &RunOptions::default(), &mut |_| {})
}

/// [`run`] with options and a progress callback (called about every
/// virtual sample period).
pub fn run_with(
    scenario: &Scenario,
    seed: u64,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> RunReport {
    let started = Instant::now();
    let sc = opts.apply(scenario);
    let replay = opts.replay(&sc, seed);
    let mut report = match sc.validate().and_then(|()| sim::Sim::new(&sc, seed, opts)) {
        Ok(sim) => sim.run(progress),
        Err(e) => RunReport {
            scenario: sc.name.clone(),
            seed,
            nodes: sc.nodes,
            violations: vec![Violation {
                oracle: "setup".into(),
                at_ms: 0,
                detail: e,
            }],
            ..RunReport::default()
        },
    };
    report.replay = replay;
    report.wall_ms = started.elapsed().as_millis() as u64;
    report
}
