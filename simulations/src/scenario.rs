//! Scenarios: what to simulate, as TOML (`simulations/scenarios/*.toml`).
//!
//! A scenario names its cluster (nodes, topology, sites), its network (per
//! link class: delay, jitter, loss, duplication, bandwidth), its faults
//! (random ones with rates, and an explicit schedule), its workload and the
//! seeds CI runs. Every field but `name`, `seeds`, `nodes`, `duration_s` and
//! `workload.kind` has a default; unknown fields are refused, so a typo
//! is an error rather than a silently ignored setting. Times in the file
//! are in seconds (`_s`) or milliseconds (`_ms`), as the field names say.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use weftlog_proto::peers::PeersConfig;

/// The scenarios shipped in `simulations/scenarios/`, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("random", include_str!("../scenarios/random.toml")),
    ("venue", include_str!("../scenarios/venue.toml")),
    ("multi-site", include_str!("../scenarios/multi-site.toml")),
    (
        "crash-oneway",
        include_str!("../scenarios/crash-oneway.toml"),
    ),
    ("rolling", include_str!("../scenarios/rolling.toml")),
    ("adversary", include_str!("../scenarios/adversary.toml")),
    (
        "venue-restore",
        include_str!("../scenarios/venue-restore.toml"),
    ),
];

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// Neither a built-in name nor a readable file.
    #[error(
        "no scenario named {name:?} (built in: {}) and no such file",
        builtin_names()
    )]
    Unknown {
        /// What was asked for.
        name: String,
    },
    /// The file could not be read.
    #[error("cannot read scenario file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema.
    #[error("scenario {what}: {message}")]
    Parse {
        /// The name or file.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The values break a rule (a node index out of range, a bad range).
    #[error("scenario {what}: {message}")]
    Invalid {
        /// The name or file.
        what: String,
        /// What is wrong.
        message: String,
    },
}

fn builtin_names() -> String {
    BUILTIN
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A half-open range of seeds, written `A..B` (`A..=B` and a single `S` are
/// accepted too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeedRange {
    /// First seed.
    pub start: u64,
    /// One past the last seed.
    pub end: u64,
}

impl SeedRange {
    /// The one seed `s`.
    pub fn one(s: u64) -> SeedRange {
        SeedRange {
            start: s,
            end: s.saturating_add(1),
        }
    }

    /// Seeds in the range.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no seed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The seeds.
    pub fn iter(&self) -> impl Iterator<Item = u64> {
        self.start..self.end
    }
}

impl fmt::Display for SeedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for SeedRange {
    type Err = String;
    fn from_str(s: &str) -> Result<SeedRange, String> {
        let num = |x: &str| {
            x.trim()
                .parse::<u64>()
                .map_err(|_| format!("seed range {s:?}: {x:?} is not a number"))
        };
        let r = if let Some((a, b)) = s.split_once("..=") {
            SeedRange {
                start: num(a)?,
                end: num(b)?.saturating_add(1),
            }
        } else if let Some((a, b)) = s.split_once("..") {
            SeedRange {
                start: num(a)?,
                end: num(b)?,
            }
        } else {
            SeedRange::one(num(s)?)
        };
        if r.is_empty() {
            return Err(format!("seed range {s:?} is empty"));
        }
        Ok(r)
    }
}

impl Serialize for SeedRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SeedRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SeedRange, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A whole simulation setup. See the module docs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in replay commands.
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The seeds CI runs.
    pub seeds: SeedRange,
    /// The seeds a long run covers (`WEFTLOG_SIM_LONG=1`, `--long`);
    /// 20 times as many as `seeds` when absent.
    #[serde(default)]
    pub long_seeds: Option<SeedRange>,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Virtual seconds of workload and faults, before the final heal.
    pub duration_s: f64,
    /// Virtual seconds after the final heal within which every node must
    /// have converged.
    #[serde(default = "default_quiesce_s")]
    pub quiesce_timeout_s: f64,
    /// Who connects to whom.
    #[serde(default)]
    pub topology: Topology,
    /// Link parameters within a site (or the whole cluster without sites).
    #[serde(default)]
    pub network: Link,
    /// Sites, for multi-site clusters.
    #[serde(default)]
    pub sites: Option<Sites>,
    /// Node parameters: the disk.
    #[serde(default)]
    pub node: NodeParams,
    /// The peer policy (timers, backoff, queues): the node's own type and
    /// defaults ([`PeersConfig`]), as `weftlog run` uses them.
    #[serde(default)]
    pub peers: PeersConfig,
    /// Random faults.
    #[serde(default)]
    pub faults: Faults,
    /// Faults at fixed times.
    #[serde(default)]
    pub schedule: Vec<Scheduled>,
    /// How clients behave when a node does not answer.
    #[serde(default)]
    pub clients: Clients,
    /// Byzantine members: nodes whose sessions replay, duplicate and
    /// reorder the valid events they send. None by default.
    #[serde(default)]
    pub byzantine: Byzantine,
    /// What the users do.
    pub workload: Workload,
}

/// Clients that fail over: a request that times out at one node is sent
/// again, with the same command id, to another node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Clients {
    /// Share of user commands (registrations, edits, counters, sales; not
    /// the desks' own rights moves) that are retried at another node. When
    /// above zero, every user command carries a command id.
    pub retry: f64,
    /// How long a client waits before it retries elsewhere, ms (uniform in
    /// the range).
    pub retry_after_ms: [f64; 2],
}

impl Default for Clients {
    fn default() -> Clients {
        Clients {
            retry: 0.0,
            retry_after_ms: [200.0, 3000.0],
        }
    }
}

/// Byzantine members (`[byzantine]`): the listed nodes run the honest
/// node, but what their sync sessions send is rewritten where bytes leave
/// the node, before the transport: every Events message is taken apart into
/// its wire frames (valid, signed events, as the session made them) and put
/// back together with frames sent twice, frames of earlier messages sent
/// again, and frames in another order. Nothing is forged: every frame is one
/// the node's own session sent at some point. Receivers must neither fail
/// nor split, and the cluster must converge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Byzantine {
    /// The Byzantine nodes.
    pub nodes: Vec<usize>,
    /// Probability, per event frame sent, that it is sent twice in a row.
    pub duplicate: f64,
    /// Probability, per Events message, that frames the node sent before
    /// (on any connection, in any earlier round) go in front of its frames.
    pub replay: f64,
    /// Most old frames one replay adds.
    pub replay_frames: usize,
    /// Probability, per Events message, that its frames are shuffled. Each
    /// author's frames keep their seq order unless `reorder_same_author`.
    pub reorder: f64,
    /// Probability, per Events message, that it is held back and sent after
    /// the next Events message on its connection (or before the next other
    /// message, whichever comes first).
    pub swap: f64,
    /// Let reordering put one author's frames out of seq order too, within
    /// a message and across swapped messages (the protocol requires seq
    /// order: receivers refuse such a stream; see the README).
    pub reorder_same_author: bool,
    /// Let duplicates and replays land while a run of the frame's author
    /// is open in the stream (after an unsigned frame of that author, before
    /// the signed one that ends the run), and replay unsigned frames. Off,
    /// only signed frames are sent twice or replayed, and only where no run
    /// of their author is open. On, a replayed unsigned frame can open a
    /// run that nothing ends: the receiver refuses that session (counted
    /// as `byzantine_sessions_refused`; see the README).
    pub open_runs: bool,
}

impl Default for Byzantine {
    fn default() -> Byzantine {
        Byzantine {
            nodes: Vec::new(),
            duplicate: 0.0,
            replay: 0.0,
            replay_frames: 8,
            reorder: 0.0,
            swap: 0.0,
            reorder_same_author: false,
            open_runs: false,
        }
    }
}

impl Byzantine {
    /// Whether any node is Byzantine.
    pub fn enabled(&self) -> bool {
        !self.nodes.is_empty()
    }
}

fn default_quiesce_s() -> f64 {
    120.0
}

/// Who keeps a connection with whom.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Topology {
    /// Every pair of nodes (within a site, with sites).
    #[default]
    Mesh,
    /// Each node dials `degree` random others (a connected random graph: a
    /// ring plus random chords), within a site with sites.
    Random {
        /// Dials per node.
        degree: usize,
    },
}

/// One class of links.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Link {
    /// One-way base delay.
    pub delay_ms: f64,
    /// Mean of the exponential jitter added to each message.
    pub jitter_ms: f64,
    /// Probability that a packet is lost (and retransmitted).
    pub loss: f64,
    /// Probability that a packet is duplicated (the transport drops the copy).
    pub duplicate: f64,
    /// Bandwidth each way; 0 for unlimited.
    pub bandwidth_kbps: f64,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            delay_ms: 1.0,
            jitter_ms: 2.0,
            loss: 0.01,
            duplicate: 0.01,
            bandwidth_kbps: 0.0,
        }
    }
}

/// Sites of a multi-site cluster: nodes `0..per_site` are site 0, and so on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sites {
    /// Number of sites; `nodes` must be a multiple of it.
    pub count: usize,
    /// Nodes of each site that peer across the WAN (with every gateway of
    /// every other site).
    #[serde(default = "default_gateways")]
    pub gateways: usize,
    /// WAN links.
    #[serde(default = "wan_default")]
    pub wan: Link,
}

fn default_gateways() -> usize {
    2
}

fn wan_default() -> Link {
    Link {
        delay_ms: 60.0,
        jitter_ms: 20.0,
        loss: 0.02,
        duplicate: 0.01,
        bandwidth_kbps: 2_000.0,
    }
}

/// Node parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeParams {
    /// Time an fdatasync takes: base.
    pub fsync_ms: f64,
    /// Mean of the exponential part of an fdatasync's time.
    pub fsync_jitter_ms: f64,
    /// After a restart, how long the node holds the commands it gets for a
    /// peer to confirm its own log (the node's `--confirm-wait-ms`,
    /// [`weftlog_proto::replica::CONFIRM_WAIT_MS`] by default); 0 holds
    /// nothing.
    pub confirm_wait_ms: u64,
    /// Whether nodes rebalance escrow rights while connected
    /// ([`weftlog_proto::rebalance`]: a node short of rights asks its
    /// peers, a node with spare rights transfers some), as the node always
    /// does; `false` only to measure what rebalancing changes.
    pub rebalance: bool,
}

/// The longest `confirm_wait_ms` a scenario may set: a minute.
pub const MAX_CONFIRM_WAIT_MS: u64 = 60_000;

impl Default for NodeParams {
    fn default() -> NodeParams {
        NodeParams {
            fsync_ms: 0.5,
            fsync_jitter_ms: 0.5,
            confirm_wait_ms: weftlog_proto::replica::CONFIRM_WAIT_MS,
            rebalance: true,
        }
    }
}

/// A partition shape (see [`Faults::shapes`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// The nodes fall into two or three groups that cannot reach each other.
    Split,
    /// One node is cut off.
    Isolate,
    /// A group can send to the rest but not hear from it (one-way).
    OneWay,
    /// Three groups: the middle one reaches both ends, the ends not each
    /// other (non-transitive reachability).
    Bridge,
    /// Each link is cut (both ways) with probability one half.
    Flaky,
    /// A split whose groups are drawn anew several times before it heals.
    Rolling,
    /// Sites: one site loses its WAN links (both ways).
    Site,
}

impl Shape {
    /// The shape's name as in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Split => "split",
            Shape::Isolate => "isolate",
            Shape::OneWay => "one_way",
            Shape::Bridge => "bridge",
            Shape::Flaky => "flaky",
            Shape::Rolling => "rolling",
            Shape::Site => "site",
        }
    }
}

/// Random faults. Rates are per virtual minute; each kind is a Poisson
/// process that starts after `warmup_s`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// No random fault before this.
    pub warmup_s: f64,
    /// Partitions started per minute.
    pub partitions_per_min: f64,
    /// A partition lasts uniformly between these, in seconds.
    pub partition_s: [f64; 2],
    /// The shapes partitions are drawn from, uniformly.
    pub shapes: Vec<Shape>,
    /// A rolling partition redraws its groups this often, in seconds.
    pub rolling_period_s: f64,
    /// Node crashes per minute (over the whole cluster).
    pub crashes_per_min: f64,
    /// A crashed node restarts after uniformly between these, in seconds.
    pub crash_down_s: [f64; 2],
    /// Probability that a crash lands while a batch is being written, so
    /// that the write may be torn; otherwise it lands between writes (or
    /// during one, if one happens to run).
    pub crash_in_write: f64,
    /// Each node's clock is off by up to this much, either way.
    pub clock_skew_ms: f64,
    /// And drifts by up to this much, either way (parts per million).
    pub clock_drift_ppm: f64,
    /// A node's clock steps (NTP correction, a user) this often per minute.
    pub clock_steps_per_min: f64,
    /// A step is up to this large, either way.
    pub clock_step_ms: f64,
    /// A node's wall clock jumps far ahead (a wrong RTC, a zone error) this
    /// often per minute (over the whole cluster), and back after
    /// `clock_jump_s`.
    pub clock_jumps_per_min: f64,
    /// How far a jump moves the clock ahead, ms (10 minutes by default).
    pub clock_jump_ms: f64,
    /// A jumped clock comes back after uniformly between these, seconds.
    pub clock_jump_s: [f64; 2],
    /// Restores per minute (over the whole cluster): a copy of a node's
    /// storage is taken (what is synced), and `restore_age_s` later the
    /// node crashes and restarts from that copy. The node then signs again
    /// seqs it had already signed: a fork.
    pub restores_per_min: f64,
    /// The copy is this old when restored, uniformly between, seconds.
    pub restore_age_s: [f64; 2],
    /// The restored node is down for uniformly between these, seconds.
    pub restore_down_s: [f64; 2],
    /// Share of restores after which the node restarts cut off from every
    /// peer (and makes events on its old copy before it hears of its
    /// newer ones).
    pub restore_isolated: f64,
    /// Such a node stays cut off for uniformly between these, seconds,
    /// after its restart.
    pub restore_isolated_s: [f64; 2],
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            warmup_s: 1.0,
            partitions_per_min: 0.0,
            partition_s: [2.0, 20.0],
            shapes: vec![Shape::Split, Shape::Isolate, Shape::OneWay, Shape::Bridge],
            rolling_period_s: 3.0,
            crashes_per_min: 0.0,
            crash_down_s: [0.5, 5.0],
            crash_in_write: 0.5,
            clock_skew_ms: 0.0,
            clock_drift_ppm: 0.0,
            clock_steps_per_min: 0.0,
            clock_step_ms: 1_000.0,
            clock_jumps_per_min: 0.0,
            clock_jump_ms: 600_000.0,
            clock_jump_s: [2.0, 10.0],
            restores_per_min: 0.0,
            restore_age_s: [2.0, 10.0],
            restore_down_s: [0.5, 3.0],
            restore_isolated: 0.5,
            restore_isolated_s: [2.0, 8.0],
        }
    }
}

/// A fault at a fixed time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scheduled {
    /// The groups cannot reach each other (nodes in no group stay connected
    /// to everyone) from `at_s` for `for_s`.
    Split {
        /// Start.
        at_s: f64,
        /// Length.
        for_s: f64,
        /// The groups.
        groups: Vec<Vec<usize>>,
    },
    /// One-way: `from` cannot send to `to`.
    Cut {
        /// Start.
        at_s: f64,
        /// Length.
        for_s: f64,
        /// Senders cut off.
        from: Vec<usize>,
        /// Receivers they cannot reach.
        to: Vec<usize>,
    },
    /// Sites: `site`'s WAN links are cut both ways.
    SiteSplit {
        /// Start.
        at_s: f64,
        /// Length.
        for_s: f64,
        /// The site.
        site: usize,
    },
    /// A node crashes and restarts after `down_s`.
    Crash {
        /// When.
        at_s: f64,
        /// Which node.
        node: usize,
        /// Down for.
        down_s: f64,
        /// Crash while the node's next batch is being written.
        #[serde(default)]
        in_write: bool,
    },
    /// A node's clock steps by `ms` (negative: backwards).
    ClockStep {
        /// When.
        at_s: f64,
        /// Which node.
        node: usize,
        /// By how much.
        ms: i64,
    },
    /// A node's wall clock jumps `ms` ahead (10 minutes by default) and
    /// back after `for_s`.
    ClockJump {
        /// When.
        at_s: f64,
        /// Which node.
        node: usize,
        /// How far ahead.
        #[serde(default = "d_jump_ms")]
        ms: u64,
        /// How long it stays ahead.
        for_s: f64,
    },
    /// A copy of a node's storage is taken at `at_s - age_s`; at `at_s` the
    /// node crashes, and after `down_s` it restarts from the copy, cut off
    /// from every peer for `isolate_s` more if that is above zero.
    Restore {
        /// When the node crashes.
        at_s: f64,
        /// Which node.
        node: usize,
        /// How old the copy is then.
        age_s: f64,
        /// Down for.
        down_s: f64,
        /// Cut off from its peers after the restart for this long.
        #[serde(default)]
        isolate_s: f64,
    },
}

fn d_jump_ms() -> u64 {
    600_000
}

impl Scheduled {
    /// When it starts.
    pub fn at_s(&self) -> f64 {
        match self {
            Scheduled::Split { at_s, .. }
            | Scheduled::Cut { at_s, .. }
            | Scheduled::SiteSplit { at_s, .. }
            | Scheduled::Crash { at_s, .. }
            | Scheduled::ClockStep { at_s, .. }
            | Scheduled::ClockJump { at_s, .. }
            | Scheduled::Restore { at_s, .. } => *at_s,
        }
    }
}

/// What users do: commands arrive at each node as a Poisson process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Workload {
    /// Random appends over many streams: register writes, counters, escrow.
    Random {
        /// Commands per node per second.
        rate_per_node_s: f64,
        /// Streams with register fields and counters.
        #[serde(default = "d_streams")]
        streams: usize,
        /// Fields per stream.
        #[serde(default = "d_fields")]
        fields: usize,
        /// Streams with an escrow counter (initialised at the start).
        #[serde(default = "d_escrows")]
        escrows: usize,
        /// Capacity of each escrow counter.
        #[serde(default = "d_capacity")]
        capacity: u64,
        /// Weights of: set, add, consume, transfer.
        #[serde(default = "d_weights")]
        weights: [f64; 4],
    },
    /// The venue: desks register attendees, edit their records, sell seats
    /// from an escrow counter whose rights are spread over the desks.
    Venue {
        /// Commands per desk per second.
        rate_per_node_s: f64,
        /// Seats per desk (capacity = this times the desks).
        #[serde(default = "d_seats")]
        seats_per_desk: u64,
        /// Attendees registered by each desk at the start.
        #[serde(default = "d_attendees")]
        initial_attendees: usize,
        /// Weights of: register, edit, sell, rebalance.
        #[serde(default = "d_venue_weights")]
        weights: [f64; 4],
        /// Share of edits that name the stream's expected version.
        #[serde(default = "d_expected")]
        expected_version: f64,
        /// Most seats one sale takes.
        #[serde(default = "d_tickets")]
        max_tickets: u64,
        /// The seats' policy, as the CLI's `--escrow-policy` spells it
        /// (`risk-window,max_overdraft=3`); none: plain escrow, with no
        /// policy op.
        #[serde(default)]
        policy: Option<String>,
    },
    /// Sites: customers edited mostly at their own site, a shared catalog
    /// edited anywhere, stock per warehouse (escrow) moved between sites.
    MultiSite {
        /// Commands per node per second.
        rate_per_node_s: f64,
        /// Customer streams per site.
        #[serde(default = "d_streams")]
        customers_per_site: usize,
        /// Catalog streams (edited from every site).
        #[serde(default = "d_catalog")]
        catalog: usize,
        /// Stock per warehouse (one per site).
        #[serde(default = "d_capacity")]
        stock: u64,
        /// Share of customer edits made at another site.
        #[serde(default = "d_remote")]
        remote_share: f64,
    },
}

fn d_streams() -> usize {
    20
}
fn d_fields() -> usize {
    4
}
fn d_escrows() -> usize {
    2
}
fn d_capacity() -> u64 {
    200
}
fn d_weights() -> [f64; 4] {
    [0.6, 0.2, 0.15, 0.05]
}
fn d_seats() -> u64 {
    30
}
fn d_attendees() -> usize {
    3
}
fn d_venue_weights() -> [f64; 4] {
    [0.25, 0.4, 0.3, 0.05]
}
fn d_expected() -> f64 {
    0.2
}
fn d_tickets() -> u64 {
    3
}
fn d_catalog() -> usize {
    5
}
fn d_remote() -> f64 {
    0.1
}

impl Workload {
    /// The workload's name as in scenario files.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Random { .. } => "random",
            Workload::Venue { .. } => "venue",
            Workload::MultiSite { .. } => "multi-site",
        }
    }

    /// Commands per node per second.
    pub fn rate_per_node_s(&self) -> f64 {
        match self {
            Workload::Random {
                rate_per_node_s, ..
            }
            | Workload::Venue {
                rate_per_node_s, ..
            }
            | Workload::MultiSite {
                rate_per_node_s, ..
            } => *rate_per_node_s,
        }
    }
}

impl Scenario {
    /// Parses a scenario from TOML; `what` names it in errors.
    pub fn from_toml(text: &str, what: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            what: what.to_string(),
            message: e.to_string(),
        })?;
        s.validate().map_err(|message| ScenarioError::Invalid {
            what: what.to_string(),
            message,
        })?;
        Ok(s)
    }

    /// A built-in scenario by name, or a scenario file by path.
    pub fn load(name_or_path: &str) -> Result<Scenario, ScenarioError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Scenario::from_toml(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
                path: name_or_path.to_string(),
                source,
            })?;
            return Scenario::from_toml(&text, name_or_path);
        }
        Err(ScenarioError::Unknown {
            name: name_or_path.to_string(),
        })
    }

    /// Every built-in scenario.
    pub fn builtin() -> Vec<Scenario> {
        BUILTIN
            .iter()
            .map(|(name, text)| {
                // The built-in files are tested to parse (tests/scenarios.rs).
                Scenario::from_toml(text, name).expect("built-in scenario parses")
            })
            .collect()
    }

    /// The built-in scenarios CI runs: every one.
    pub fn ci() -> Vec<Scenario> {
        Scenario::builtin()
    }

    /// The seeds of a long run.
    pub fn long_seeds(&self) -> SeedRange {
        self.long_seeds.unwrap_or(SeedRange {
            start: self.seeds.start,
            end: self
                .seeds
                .start
                .saturating_add(self.seeds.len().saturating_mul(20)),
        })
    }

    /// Which site a node is in (0 without sites).
    pub fn site_of(&self, node: usize) -> usize {
        match &self.sites {
            Some(s) => node / (self.nodes / s.count),
            None => 0,
        }
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if let Workload::Venue {
            policy: Some(p), ..
        } = &self.workload
        {
            weftlog_proto::event::Policy::parse_spec(p).map_err(|e| format!("policy: {e}"))?;
        }
        let n = self.nodes;
        if !(2..=4096).contains(&n) {
            return Err(format!("nodes = {n}: must be 2..=4096"));
        }
        if !(self.duration_s > 0.0 && self.duration_s.is_finite()) {
            return Err("duration_s must be positive".into());
        }
        if self.quiesce_timeout_s.is_nan() || self.quiesce_timeout_s <= 0.0 {
            return Err("quiesce_timeout_s must be positive".into());
        }
        if let Some(s) = &self.sites {
            if s.count < 2 || !n.is_multiple_of(s.count) {
                return Err(format!(
                    "sites.count = {}: must be at least 2 and divide nodes = {n}",
                    s.count
                ));
            }
            if s.gateways == 0 || s.gateways > n / s.count {
                return Err(format!(
                    "sites.gateways = {}: must be 1..={}",
                    s.gateways,
                    n / s.count
                ));
            }
        }
        if let Topology::Random { degree } = self.topology {
            if degree == 0 {
                return Err("topology.degree must be at least 1".into());
            }
        }
        let links = std::iter::once(&self.network).chain(self.sites.as_ref().map(|s| &s.wan));
        for l in links {
            for (what, p) in [("loss", l.loss), ("duplicate", l.duplicate)] {
                if !(0.0..0.9).contains(&p) {
                    return Err(format!("{what} = {p}: must be in [0, 0.9)"));
                }
            }
            if l.delay_ms < 0.0 || l.jitter_ms < 0.0 || l.bandwidth_kbps < 0.0 {
                return Err("link delays and bandwidth must not be negative".into());
            }
        }
        let f = &self.faults;
        for (what, r) in [
            ("partition_s", f.partition_s),
            ("crash_down_s", f.crash_down_s),
            ("clock_jump_s", f.clock_jump_s),
            ("restore_age_s", f.restore_age_s),
            ("restore_down_s", f.restore_down_s),
            ("restore_isolated_s", f.restore_isolated_s),
        ] {
            if !(r[0] >= 0.0 && r[0] <= r[1]) {
                return Err(format!(
                    "faults.{what} = {r:?}: must be [lo, hi], 0 <= lo <= hi"
                ));
            }
        }
        if !(0.0..=1.0).contains(&f.restore_isolated) {
            return Err(format!(
                "faults.restore_isolated = {}: must be in [0, 1]",
                f.restore_isolated
            ));
        }
        if self.node.confirm_wait_ms > MAX_CONFIRM_WAIT_MS {
            return Err(format!(
                "node.confirm_wait_ms = {}: must be at most {MAX_CONFIRM_WAIT_MS}",
                self.node.confirm_wait_ms
            ));
        }
        if !(f.clock_jump_ms >= 0.0 && f.clock_jump_ms.is_finite()) {
            return Err("faults.clock_jump_ms must not be negative".into());
        }
        let b = &self.byzantine;
        for (what, p) in [
            ("duplicate", b.duplicate),
            ("replay", b.replay),
            ("reorder", b.reorder),
            ("swap", b.swap),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("byzantine.{what} = {p}: must be in [0, 1]"));
            }
        }
        if let Some(x) = b.nodes.iter().find(|&&x| x >= n) {
            return Err(format!("byzantine.nodes names node {x}, but nodes = {n}"));
        }
        let c = &self.clients;
        if !(0.0..=1.0).contains(&c.retry) {
            return Err(format!("clients.retry = {}: must be in [0, 1]", c.retry));
        }
        let r = c.retry_after_ms;
        if !(r[0] >= 0.0 && r[0] <= r[1]) {
            return Err(format!(
                "clients.retry_after_ms = {r:?}: must be [lo, hi], 0 <= lo <= hi"
            ));
        }
        if f.partitions_per_min > 0.0 && f.shapes.is_empty() {
            return Err("faults.shapes is empty but partitions_per_min > 0".into());
        }
        if f.shapes.contains(&Shape::Site) && self.sites.is_none() {
            return Err("shape \"site\" needs [sites]".into());
        }
        if self.peers.window == 0 {
            return Err("peers.window must be at least 1".into());
        }
        if self.peers.anti_entropy_ms == 0 {
            return Err("peers.anti_entropy_ms must be at least 1".into());
        }
        if self.workload.rate_per_node_s() < 0.0 {
            return Err("workload rate must not be negative".into());
        }
        if matches!(self.workload, Workload::MultiSite { .. }) && self.sites.is_none() {
            return Err("the multi-site workload needs [sites]".into());
        }
        let check = |what: &str, nodes: &[usize]| -> Result<(), String> {
            match nodes.iter().find(|&&x| x >= n) {
                Some(x) => Err(format!("schedule: {what} names node {x}, but nodes = {n}")),
                None => Ok(()),
            }
        };
        for s in &self.schedule {
            match s {
                Scheduled::Split { groups, .. } => {
                    for g in groups {
                        check("split", g)?;
                    }
                }
                Scheduled::Cut { from, to, .. } => {
                    check("cut", from)?;
                    check("cut", to)?;
                }
                Scheduled::SiteSplit { site, .. } => match &self.sites {
                    Some(sites) if *site < sites.count => {}
                    _ => return Err(format!("schedule: site_split names site {site}")),
                },
                Scheduled::Crash { node, .. }
                | Scheduled::ClockStep { node, .. }
                | Scheduled::ClockJump { node, .. } => {
                    check("crash or clock step or jump", &[*node])?
                }
                Scheduled::Restore {
                    node,
                    at_s,
                    age_s,
                    down_s,
                    isolate_s,
                } => {
                    check("restore", &[*node])?;
                    if !(*age_s >= 0.0 && *age_s <= *at_s && *down_s >= 0.0 && *isolate_s >= 0.0) {
                        return Err(format!(
                            "schedule: restore at {at_s} s: age_s must be in [0, at_s], down_s and isolate_s not negative"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_parse() {
        assert_eq!("3..7".parse::<SeedRange>().unwrap().len(), 4);
        assert_eq!("3..=7".parse::<SeedRange>().unwrap().len(), 5);
        assert_eq!("9".parse::<SeedRange>().unwrap(), SeedRange::one(9));
        assert!("7..3".parse::<SeedRange>().is_err());
        assert!("x..3".parse::<SeedRange>().is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = r#"
            name = "t"
            seeds = "1..2"
            nodes = 3
            duration_s = 1
            typo = 1
            [workload]
            kind = "random"
            rate_per_node_s = 1
        "#;
        let e = Scenario::from_toml(text, "t").unwrap_err().to_string();
        assert!(e.contains("typo"), "{e}");
    }

    #[test]
    fn adversary_knobs_are_checked() {
        let base = r#"
            name = "t"
            seeds = "1..2"
            nodes = 3
            duration_s = 10
            [workload]
            kind = "random"
            rate_per_node_s = 1
        "#;
        let with = |extra: &str| Scenario::from_toml(&format!("{base}\n{extra}"), "t");
        let ok = with(
            "[byzantine]\nnodes = [2]\nduplicate = 0.1\n[faults]\nclock_jumps_per_min = 2\nrestores_per_min = 1\n[[schedule]]\nkind = \"restore\"\nat_s = 5\nnode = 1\nage_s = 2\ndown_s = 1\n[[schedule]]\nkind = \"clock_jump\"\nat_s = 3\nnode = 0\nfor_s = 2",
        )
        .unwrap();
        assert_eq!(ok.byzantine.nodes, vec![2]);
        assert_eq!(ok.faults.clock_jump_ms, 600_000.0);
        for (extra, what) in [
            ("[byzantine]\nnode = [2]", "node"),
            ("[byzantine]\nnodes = [3]", "byzantine.nodes"),
            ("[byzantine]\nnodes = [1]\nreplay = 2", "byzantine.replay"),
            ("[faults]\nrestore_isolated = 1.5", "restore_isolated"),
            ("[faults]\nrestore_age_s = [5.0, 1.0]", "restore_age_s"),
            ("[faults]\nclock_jump = 5", "clock_jump"),
            (
                "[[schedule]]\nkind = \"restore\"\nat_s = 1\nnode = 1\nage_s = 2\ndown_s = 1",
                "age_s",
            ),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(what), "{extra}: {e}");
        }
    }
}
