//! Prometheus metrics: what `GET /metrics` of `weftlog run` serves.
//!
//! Two kinds of figures, kept apart so that the write path stays cheap:
//!
//! - **Kept as they happen**, in [`Metrics`] (one per [`Node`], shared by
//!   its threads): counters are atomics, the two histograms take an
//!   uncontended lock per observation, the log gauges are atomics the
//!   writer stores once per durable batch. Nothing here takes the node's
//!   state lock.
//! - **Computed at scrape time** ([`render`]): the per-peer figures and the
//!   sync counters come from the daemon's own view (the rows `GET
//!   /v1/status` shows under `peers` and `gossip`, so the two never
//!   disagree), the open conflicts from the state ([`State::conflicts`],
//!   as `GET /v1/conflicts`), the equivocations from the forks the daemon
//!   knows. Only these take the state lock, once per scrape, never per
//!   event.
//!
//! Every name starts with `weftlog_`. Counters count since the process
//! started (Prometheus takes a restart as a counter reset).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `weftlog_events_appended_total` | counter | | events appended by local commands (HTTP, CLI, staff decisions, rights transfers), counted when durable and acknowledged; a command id already in the log is not counted |
//! | `weftlog_events_received_total` | counter | `via` (`sync`, `import`) | new events stored from peers (sync sessions) or from export files |
//! | `weftlog_duplicates_received_total` | counter | `via` (`sync`, `import`) | received events this node already held |
//! | `weftlog_append_latency_seconds` | histogram | | one append, from the request to its durable reply (a sale waiting for rights included) |
//! | `weftlog_fsync_duration_seconds` | histogram | | the writer's write and `fdatasync` of one group-commit batch |
//! | `weftlog_log_durable_position` | gauge | | position of the last durable record (positions are 1-based record indexes, so this is also the number of records) |
//! | `weftlog_log_size_bytes` | gauge | | bytes of durable records in the log, segment headers included |
//! | `weftlog_peer_connected` | gauge | `peer` | 1 while a session with the peer is up, 0 for a peer known but not connected |
//! | `weftlog_peer_events_behind` | gauge | `peer` | events this node holds that the peer is not known to hold (`behind` in `GET /v1/status`); absent before the first round |
//! | `weftlog_peer_received_bytes_total` | counter | `peer` | bytes received from the peer on its current connection (length prefixes included); restarts at 0 with a new connection |
//! | `weftlog_peer_sent_bytes_total` | counter | `peer` | bytes sent to the peer on its current connection |
//! | `weftlog_conflicts_open` | gauge | | fields with more than one standing value, over all streams |
//! | `weftlog_equivocations` | gauge | | forks this node knows of (an author that signed two events at one seq; `equivocations` in `GET /v1/status`) |
//! | `weftlog_projection_lag_events` | gauge | `projection` | durable events a projection has not yet folded ([`Metrics::set_projection_lag`]); absent until one reports |
//! | `weftlog_sql_lag_events` | gauge | | durable events the SQL mirror has not yet committed ([`Metrics::set_sql_lag`]); absent without a mirror |
//!
//! `peer` is the peer's node id, 64 hex digits, as `GET /v1/status` shows it.
//!
//! The encoding is the `prometheus-client` crate's (OpenMetrics text). A
//! scraper that asks for it (`Accept: application/openmetrics-text`, as
//! Prometheus does) gets it; any other client gets the classic text format
//! (`text/plain; version=0.0.4`), in which a counter's `HELP` and `TYPE`
//! lines name the sample (`…_total`) and there is no `# UNIT` or `# EOF`
//! ([`to_text_format`]); `promtool check metrics` checks that form.
//!
//! [`Node`]: crate::node::Node
//! [`State::conflicts`]: weftlog_proto::State::conflicts

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;

use crate::daemon::Daemon;

/// The prefix of every metric name.
pub const PREFIX: &str = "weftlog";

/// Smallest upper bound of the append latency buckets (seconds): 100 µs.
pub const APPEND_LATENCY_FIRST_S: f64 = 0.000_1;
/// Append latency buckets, each twice the one before: up to about 1.6 s.
pub const APPEND_LATENCY_BUCKETS: u16 = 15;
/// Smallest upper bound of the fsync duration buckets (seconds): 25 µs.
pub const FSYNC_FIRST_S: f64 = 0.000_025;
/// Fsync duration buckets, each twice the one before: up to about 0.4 s.
pub const FSYNC_BUCKETS: u16 = 15;
/// Projections whose lag is kept, at most: a lag set for one more is
/// dropped (projections are a handful of named, built-in or user types).
pub const MAX_PROJECTIONS: usize = 256;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The figures a node keeps as they happen; see the module docs. Cheap to
/// update from any thread.
#[derive(Debug)]
pub struct Metrics {
    appended: Counter,
    imported: Counter,
    import_duplicates: Counter,
    append_latency: Histogram,
    fsync: Histogram,
    log_position: AtomicU64,
    log_bytes: AtomicU64,
    /// Per projection name, its lag in events.
    projection_lag: Mutex<BTreeMap<String, u64>>,
    sql_lag: AtomicU64,
    /// Whether a SQL mirror ever reported its lag.
    sql_active: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Metrics {
        Metrics {
            appended: Counter::default(),
            imported: Counter::default(),
            import_duplicates: Counter::default(),
            append_latency: Histogram::new(exponential_buckets(
                APPEND_LATENCY_FIRST_S,
                2.0,
                APPEND_LATENCY_BUCKETS,
            )),
            fsync: Histogram::new(exponential_buckets(FSYNC_FIRST_S, 2.0, FSYNC_BUCKETS)),
            log_position: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            projection_lag: Mutex::new(BTreeMap::new()),
            sql_lag: AtomicU64::new(0),
            sql_active: AtomicBool::new(false),
        }
    }

    /// A local append was acknowledged after `latency` (request to durable
    /// reply); `new` unless its command id was already in the log.
    pub fn record_append(&self, latency: Duration, new: bool) {
        if new {
            self.appended.inc();
        }
        self.append_latency.observe(latency.as_secs_f64());
    }

    /// An import stored `imported` new events and found `duplicates`.
    pub fn record_import(&self, imported: u64, duplicates: u64) {
        self.imported.inc_by(imported);
        self.import_duplicates.inc_by(duplicates);
    }

    /// The writer wrote and synced one batch in `took`.
    pub fn record_fsync(&self, took: Duration) {
        self.fsync.observe(took.as_secs_f64());
    }

    /// The durable log now ends at `position` (its record count), `bytes`
    /// long.
    pub fn set_log(&self, position: u64, bytes: u64) {
        self.log_position.store(position, Ordering::Relaxed);
        self.log_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The projection `name` is `lag_events` durable events behind
    /// (`weftlog_projection_lag_events{projection=name}`). At most
    /// [`MAX_PROJECTIONS`] names are kept.
    pub fn set_projection_lag(&self, name: &str, lag_events: u64) {
        // The map holds plain numbers: a panic elsewhere cannot break it.
        let mut lags = self
            .projection_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(lag) = lags.get_mut(name) {
            *lag = lag_events;
        } else if lags.len() < MAX_PROJECTIONS {
            lags.insert(name.to_string(), lag_events);
        }
    }

    /// The projection `name` is gone: its series disappears.
    pub fn remove_projection(&self, name: &str) {
        self.projection_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// The SQL mirror is `lag_events` durable events behind
    /// (`weftlog_sql_lag_events`, shown from the first call on).
    pub fn set_sql_lag(&self, lag_events: u64) {
        self.sql_lag.store(lag_events, Ordering::Relaxed);
        self.sql_active.store(true, Ordering::Relaxed);
    }

    /// The exposition of these figures and `scrape`'s, in the OpenMetrics
    /// text format (ends with `# EOF`).
    pub fn encode(&self, scrape: &Scrape) -> String {
        let mut r = Registry::with_prefix(PREFIX);
        r.register(
            "events_appended",
            "Events appended by local commands, counted when durable and acknowledged",
            self.appended.clone(),
        );
        let received = Family::<Via, Counter>::default();
        received
            .get_or_create(&Via::SYNC)
            .inc_by(scrape.sync_received);
        received
            .get_or_create(&Via::IMPORT)
            .inc_by(self.imported.get());
        r.register(
            "events_received",
            "New events stored from peers (via=sync) or export files (via=import)",
            received,
        );
        let duplicates = Family::<Via, Counter>::default();
        duplicates
            .get_or_create(&Via::SYNC)
            .inc_by(scrape.sync_duplicates);
        duplicates
            .get_or_create(&Via::IMPORT)
            .inc_by(self.import_duplicates.get());
        r.register(
            "duplicates_received",
            "Received events this node already held, by sync or import",
            duplicates,
        );
        r.register_with_unit(
            "append_latency",
            "One local append, from the request to its durable reply",
            Unit::Seconds,
            self.append_latency.clone(),
        );
        r.register_with_unit(
            "fsync_duration",
            "The writer's write and fdatasync of one group-commit batch",
            Unit::Seconds,
            self.fsync.clone(),
        );
        r.register(
            "log_durable_position",
            "Position of the last durable record (the number of records in the log)",
            gauge(self.log_position.load(Ordering::Relaxed)),
        );
        r.register_with_unit(
            "log_size",
            "Bytes of durable records in the log, segment headers included",
            Unit::Bytes,
            gauge(self.log_bytes.load(Ordering::Relaxed)),
        );
        let connected = Family::<PeerLabel, Gauge>::default();
        let behind = Family::<PeerLabel, Gauge>::default();
        let bytes_in = Family::<PeerLabel, Counter>::default();
        let bytes_out = Family::<PeerLabel, Counter>::default();
        for p in &scrape.peers {
            let l = PeerLabel {
                peer: p.peer.clone(),
            };
            connected.get_or_create(&l).set(i64::from(p.connected));
            if let Some(b) = p.behind {
                behind.get_or_create(&l).set(clamp(b));
            }
            if let Some((rx, tx)) = p.bytes {
                bytes_in.get_or_create(&l).inc_by(rx);
                bytes_out.get_or_create(&l).inc_by(tx);
            }
        }
        r.register(
            "peer_connected",
            "1 while a session with the peer is up, 0 for a known peer not connected",
            connected,
        );
        r.register(
            "peer_events_behind",
            "Events this node holds that the peer is not known to hold",
            behind,
        );
        r.register_with_unit(
            "peer_received",
            "Bytes received from the peer on its current connection",
            Unit::Bytes,
            bytes_in,
        );
        r.register_with_unit(
            "peer_sent",
            "Bytes sent to the peer on its current connection",
            Unit::Bytes,
            bytes_out,
        );
        r.register(
            "conflicts_open",
            "Fields with more than one standing value, over all streams",
            gauge(scrape.conflicts_open),
        );
        r.register(
            "equivocations",
            "Forks this node knows of: an author signed two events at one seq",
            gauge(scrape.equivocations),
        );
        let lags = Family::<ProjectionLabel, Gauge>::default();
        for (name, lag) in self
            .projection_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            lags.get_or_create(&ProjectionLabel {
                projection: name.clone(),
            })
            .set(clamp(*lag));
        }
        r.register(
            "projection_lag_events",
            "Durable events a projection has not yet folded",
            lags,
        );
        if self.sql_active.load(Ordering::Relaxed) {
            r.register(
                "sql_lag_events",
                "Durable events the SQL mirror has not yet committed",
                gauge(self.sql_lag.load(Ordering::Relaxed)),
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// What [`render`] reads from the daemon and the state at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scrape {
    /// New events stored from peers since the daemon started.
    pub sync_received: u64,
    /// Received events already held, since the daemon started.
    pub sync_duplicates: u64,
    /// Every peer known by id, ascending.
    pub peers: Vec<PeerSample>,
    /// Fields with more than one standing value.
    pub conflicts_open: u64,
    /// Forks known.
    pub equivocations: u64,
}

/// One peer at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSample {
    /// Its node id as the API shows it (64 hex digits).
    pub peer: String,
    /// A session with it is up.
    pub connected: bool,
    /// Events it is not known to hold; `None` before the first round.
    pub behind: Option<u64>,
    /// Bytes received from it and sent to it on its current connection.
    pub bytes: Option<(u64, u64)>,
}

impl Scrape {
    /// Reads the per-peer rows and the sync counters as `GET /v1/status`
    /// shows them (`peers`, `gossip`), and the conflicts and forks.
    pub async fn of(daemon: &Daemon) -> Scrape {
        let gossip = daemon.gossip();
        let rows = daemon.peers().await;
        let mut seen = BTreeSet::new();
        let mut peers: Vec<PeerSample> = rows
            .iter()
            .filter_map(peer_sample)
            // A peer reached at two addresses shows once.
            .filter(|p| seen.insert(p.peer.clone()))
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let conflicts_open = daemon.node().with_state(|s| s.conflicts().count()) as u64;
        Scrape {
            sync_received: gossip["delivered"].as_u64().unwrap_or(0),
            sync_duplicates: gossip["duplicates"].as_u64().unwrap_or(0),
            peers,
            conflicts_open,
            equivocations: daemon.forks().len() as u64,
        }
    }
}

/// A `peers` row of `GET /v1/status` as a sample; `None` for a dial
/// target whose node id is not known yet.
fn peer_sample(row: &Value) -> Option<PeerSample> {
    let peer = row["node"].as_str()?.to_string();
    let bytes = match (row["bytes_received"].as_u64(), row["bytes_sent"].as_u64()) {
        (Some(rx), Some(tx)) => Some((rx, tx)),
        _ => None,
    };
    Some(PeerSample {
        peer,
        connected: row["connected"].as_bool().unwrap_or(false),
        behind: row["behind"].as_u64(),
        bytes,
    })
}

/// `GET /metrics`: the exposition of `daemon`'s node, in OpenMetrics text
/// when `openmetrics`, else in the classic text format; with its content
/// type.
pub async fn render(daemon: &Daemon, openmetrics: bool) -> (&'static str, String) {
    let scrape = Scrape::of(daemon).await;
    if let Some(lag) = daemon.sql_lag() {
        let node = daemon.node();
        node.metrics()
            .set_sql_lag(lag.events_behind(node.durable_pos()));
    }
    let om = daemon.node().metrics().encode(&scrape);
    if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, om)
    } else {
        (TEXT_CONTENT_TYPE, to_text_format(&om))
    }
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept
        .split(',')
        .any(|t| t.trim().starts_with("application/openmetrics-text"))
}

/// The classic text format (0.0.4) of an OpenMetrics text exposition as
/// this crate writes it: a counter family's `HELP` and `TYPE` lines name
/// its samples (`name_total`), and the `# UNIT` and `# EOF` lines, which
/// the classic format lacks, are left out. Samples are unchanged.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|kw| {
            let rest = line.strip_prefix(kw)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{kw}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A gauge holding `v`.
fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(clamp(v));
    g
}

/// `v` as a gauge value (gauges are signed; counts never reach 2^63).
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `via` label of the received counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Via {
    via: &'static str,
}

impl Via {
    const SYNC: Via = Via { via: "sync" };
    const IMPORT: Via = Via { via: "import" };
}

/// The `peer` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// The `projection` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabel {
    projection: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Scrape {
        Scrape {
            sync_received: 7,
            sync_duplicates: 2,
            peers: vec![
                PeerSample {
                    peer: "ab".repeat(32),
                    connected: true,
                    behind: Some(3),
                    bytes: Some((100, 200)),
                },
                PeerSample {
                    peer: "cd".repeat(32),
                    connected: false,
                    behind: None,
                    bytes: None,
                },
            ],
            conflicts_open: 1,
            equivocations: 0,
        }
    }

    #[test]
    fn encodes_every_metric_with_its_value() {
        let m = Metrics::new();
        m.record_append(Duration::from_micros(300), true);
        m.record_append(Duration::from_micros(300), false);
        m.record_import(4, 5);
        m.record_fsync(Duration::from_micros(80));
        m.set_log(11, 4096);
        m.set_projection_lag("counts", 2);
        let om = m.encode(&sample());
        let ab = "ab".repeat(32);
        for line in [
            "weftlog_events_appended_total 1".to_string(),
            "weftlog_events_received_total{via=\"sync\"} 7".into(),
            "weftlog_events_received_total{via=\"import\"} 4".into(),
            "weftlog_duplicates_received_total{via=\"sync\"} 2".into(),
            "weftlog_duplicates_received_total{via=\"import\"} 5".into(),
            "weftlog_append_latency_seconds_count 2".into(),
            "weftlog_fsync_duration_seconds_count 1".into(),
            "weftlog_log_durable_position 11".into(),
            "weftlog_log_size_bytes 4096".into(),
            format!("weftlog_peer_connected{{peer=\"{ab}\"}} 1"),
            format!("weftlog_peer_connected{{peer=\"{}\"}} 0", "cd".repeat(32)),
            format!("weftlog_peer_events_behind{{peer=\"{ab}\"}} 3"),
            format!("weftlog_peer_received_bytes_total{{peer=\"{ab}\"}} 100"),
            format!("weftlog_peer_sent_bytes_total{{peer=\"{ab}\"}} 200"),
            "weftlog_conflicts_open 1".into(),
            "weftlog_equivocations 0".into(),
            "weftlog_projection_lag_events{projection=\"counts\"} 2".into(),
        ] {
            assert!(om.lines().any(|l| l == line), "missing {line:?} in\n{om}");
        }
        // No behind for a peer before its first round; no SQL lag before a
        // mirror reports one.
        assert_eq!(om.matches("weftlog_peer_events_behind{").count(), 1);
        assert!(!om.contains("weftlog_sql_lag_events"));
        m.set_sql_lag(9);
        assert!(m
            .encode(&sample())
            .lines()
            .any(|l| l == "weftlog_sql_lag_events 9"));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let om = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total 3\n\
                  # HELP x_lat_seconds Lat.\n# TYPE x_lat_seconds histogram\n\
                  # UNIT x_lat_seconds seconds\nx_lat_seconds_count 0\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\nx_events_total 3\n\
             # HELP x_lat_seconds Lat.\n# TYPE x_lat_seconds histogram\nx_lat_seconds_count 0\n"
        );
    }

    #[test]
    fn projection_lags_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_PROJECTIONS + 10 {
            m.set_projection_lag(&format!("p{i}"), 1);
        }
        m.set_projection_lag("p0", 5);
        let om = m.encode(&Scrape::default());
        assert_eq!(
            om.matches("weftlog_projection_lag_events{").count(),
            MAX_PROJECTIONS
        );
        assert!(om.contains("weftlog_projection_lag_events{projection=\"p0\"} 5"));
        m.remove_projection("p0");
        assert!(!m.encode(&Scrape::default()).contains("projection=\"p0\""));
    }

    #[test]
    fn openmetrics_is_asked_for_by_accept() {
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        ));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics("*/*"));
    }
}
