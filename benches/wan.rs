//! Replication over an emulated wide-area link: two weftlog daemons on
//! loopback with a userspace WAN proxy between them.
//!
//! ```text
//! cargo bench --bench wan                          # every group, full sizes
//! cargo bench --bench wan -- catchup cold          # pick groups
//! WEFTLOG_BENCH_QUICK=1 cargo bench --bench wan    # tiny sizes (CI smoke check)
//! ```
//!
//! **The link.** `tc netem` needs a kernel this machine may not have, so
//! the link is a UDP proxy in this process ([`proxy`], in `benches/wan/`):
//! node B dials the proxy's client-side port as its peer address; the proxy
//! latches B's address from its first datagram and forwards to A's real
//! address, and A's datagrams back to B. Every datagram, either way, is
//! dropped with the loss probability (seeded generator) or released after
//! the one-way delay (plus optional uniform jitter, which may reorder;
//! without it order is kept), from a delay queue ordered by release time,
//! one task per direction on a thread of its own. The round trip is twice
//! the one-way delay. There is no bandwidth limit. Datagrams the proxy lost
//! other than by the loss model (its queue limit, send errors, its sockets'
//! receive buffers overflowing) and the kernel's drops on A's and B's own
//! sockets are counted and printed with each run.
//!
//! Both daemons run in this process on one two-worker runtime, started as
//! `benches/weftlog.rs`'s `replicate` group starts them (anti-entropy every
//! hour, so only the first round or live push counts).
//!
//! Groups:
//! - `proxy`: the proxy alone, checked before anything is measured through
//!   it: 1,200-byte datagrams offered at 80 MB/s through a 10 ms link
//!   (delivered rate, drops, reordering), and the loss rate it makes at 1 %.
//! - `catchup`: node A holds n events of the mixed workload (256-byte
//!   payloads, about 410 bytes per event on the wire), built once and kept
//!   for every run; each run starts A's daemon, then an empty B's dialling
//!   A through the proxy, and times from A's start until B holds all n in
//!   its state (polled every 0.5 ms), at one-way delays of 10, 25, 50 and
//!   100 ms without loss and at 25 ms with 1 % loss. MB/s counts the sync
//!   bytes B received (length prefixes included, QUIC's own excluded).
//! - `cold`: the same catch-up at 25 ms, but B starts first, dialling the
//!   proxy while A's daemon is not running (its datagrams go to a closed
//!   port), and A starts a few seconds later on the address the proxy
//!   forwards to; timed from A's start, against runs where A was up first
//!   (alternating). A restarted node must not be slowed by a congestion
//!   window cut by Initial packets lost while it dialled.
//! - `live`: propagation of single appends at 25 ms one-way between two
//!   connected nodes: the time from `Node::append` returning on A (durable
//!   there) until B holds the event in its state (polled every 0.1 ms); p50
//!   and p99 of m appends per run, spaced 5–10 ms after the last arrived.
//!
//! Quick sizes (`WEFTLOG_BENCH_QUICK=1`, under 30 s): n 2,000, catch-up at
//! 10 and 25 ms (and 25 ms with loss) only, B dialling 1 s before A starts,
//! 20 live appends, 5,000 datagrams through the proxy alone.
//!
//! Every figure is the median of `WEFTLOG_BENCH_RUNS` runs (at least 3);
//! runs of different links alternate so drift in a noisy machine hits all.
//! Output: a line per run, one JSON line per figure (lines starting with
//! `{`), and a table at the end, with the load average before and after.
//!
//! **Transports.** `WEFTLOG_WAN_TRANSPORTS` lists the daemons' transport
//! settings to compare ([`weftlog::transport`]), comma separated: `node`
//! (the node's defaults; the default), `bbr` and `cubic` (the node's
//! windows and socket buffers with that controller), `quinn` (the settings
//! before the transport was sized for a WAN: quinn's default windows, Cubic,
//! the system's socket buffers). With more than one, the catch-up and live
//! groups run each in turn for every link and run, and compare each with
//! the first; the cold group uses the first.
//!
//! Environment (all optional): `WEFTLOG_BENCH_QUICK=1`; `WEFTLOG_BENCH_RUNS`;
//! `WEFTLOG_WAN_EVENTS` (n, default 100,000; quick 2,000);
//! `WEFTLOG_WAN_APPENDS` (m, default 200; quick 20); `WEFTLOG_WAN_TRANSPORTS`;
//! `WEFTLOG_WAN_DELAYS_MS` (the lossless links' one-way delays, comma
//! separated); `WEFTLOG_WAN_LOSS_PCT` (the lossy link's loss, 0 for none);
//! `WEFTLOG_WAN_JITTER_MS`
//! (jitter on every link, default 0); `WEFTLOG_WAN_COLD_WAIT_MS` (how long B
//! dials before A starts, default 3,000; quick 1,000); `WEFTLOG_WAN_SEED`;
//! `WEFTLOG_BENCH_DIR` (scratch directory; default `target/bench-tmp`).

#[path = "wan/proxy.rs"]
mod proxy;

#[path = "common/mod.rs"]
mod common;

use common::{env_or, median, splitmix, PAYLOAD_BYTES};
use std::fs;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use weftlog::daemon::{self, Daemon};
use weftlog::node::{self, Node};
use weftlog::transport::{self, Congestion};
use weftlog_proto::event::{Meta, Op};
use weftlog_proto::state::Draft;

use proxy::{udp_drops, Link, Proxy};

/// Streams the workload spreads over.
const STREAMS: u64 = 1_000;
/// Register fields written by `Op::Set`.
const FIELDS: [&str; 5] = ["name", "email", "status", "tier", "region"];
/// Counters bumped by `Op::Add`.
const COUNTERS: [&str; 2] = ["visits", "total"];
/// Concurrent `append_async` tasks that fill A.
const FILL_TASKS: usize = 256;
/// Anti-entropy period of the daemons: an hour, so that only the first
/// round (catch-up) or live push (live) is measured.
const NO_ANTI_ENTROPY_MS: u64 = 3_600_000;
/// Longest wait for one catch-up or connection before giving up.
const NET_DEADLINE: Duration = Duration::from_secs(300);
/// Poll period of B's state during a catch-up.
const CATCHUP_POLL: Duration = Duration::from_micros(500);
/// Poll period of B's state for one live event.
const LIVE_POLL: Duration = Duration::from_micros(100);
/// Longest wait for one live event.
const LIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Appends before the live measurement starts (they also check the link).
const LIVE_WARMUP: u64 = 5;
/// One-way delays of the catch-up group, without loss.
const DELAYS_MS: [u64; 4] = [10, 25, 50, 100];
/// The same with `WEFTLOG_BENCH_QUICK` (time there is mostly round trips).
const QUICK_DELAYS_MS: [u64; 2] = [10, 25];
/// One-way delay of the lossy catch-up, the cold start and live.
const WAN_MS: u64 = 25;
/// Loss of the lossy catch-up and of the proxy check.
const LOSS: f64 = 0.01;
/// Datagram size of the proxy check.
const PROBE_DATAGRAM: usize = 1_200;
/// Rate the proxy check offers, MB/s.
const PROBE_OFFERED_MBPS: f64 = 80.0;

const GROUPS: [&str; 4] = ["proxy", "catchup", "cold", "live"];

struct Config {
    quick: bool,
    runs: usize,
    events: u64,
    appends: u64,
    jitter: Duration,
    cold_wait: Duration,
    /// One-way delays of the lossless catch-ups.
    delays_ms: Vec<u64>,
    /// Loss of the lossy catch-up; none if zero.
    loss: f64,
    /// Receive buffer forced on each daemon's socket; the daemon's own if 0.
    node_rcvbuf: usize,
    /// The transport settings compared: name and settings.
    transports: Vec<(String, transport::Settings)>,
    seed: u64,
    dir: PathBuf,
    groups: Vec<String>,
}

/// The transport settings `WEFTLOG_WAN_TRANSPORTS` may name.
fn transport_named(name: &str) -> Result<transport::Settings> {
    let node = transport::Settings::default();
    Ok(match name {
        "node" => node,
        "bbr" => transport::Settings {
            congestion: Congestion::Bbr,
            ..node
        },
        "cubic" => transport::Settings {
            congestion: Congestion::Cubic,
            ..node
        },
        "quinn" => transport::Settings {
            congestion: Congestion::Cubic,
            window_bytes: None,
            socket_buffer_bytes: 0,
        },
        _ => bail!("unknown transport {name:?}; expected node, bbr, cubic or quinn"),
    })
}

impl Config {
    fn from_env() -> Result<Config> {
        let quick = std::env::var("WEFTLOG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let default_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench-tmp");
        // `cargo bench` passes `--bench`; anything else not starting with `-`
        // names a group.
        let mut groups = Vec::new();
        for a in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
            if !GROUPS.contains(&a.as_str()) {
                bail!("unknown group {a:?}; the groups are {GROUPS:?}");
            }
            groups.push(a);
        }
        if groups.is_empty() {
            groups = GROUPS.iter().map(|g| g.to_string()).collect();
        }
        let delays_ms = match std::env::var("WEFTLOG_WAN_DELAYS_MS") {
            Ok(v) => v
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse::<u64>().context("WEFTLOG_WAN_DELAYS_MS"))
                .collect::<Result<Vec<_>>>()?,
            Err(_) if quick => QUICK_DELAYS_MS.to_vec(),
            Err(_) => DELAYS_MS.to_vec(),
        };
        let loss_pct = env_or("WEFTLOG_WAN_LOSS_PCT", LOSS * 100.0)?;
        if !(0.0..100.0).contains(&loss_pct) {
            bail!("WEFTLOG_WAN_LOSS_PCT={loss_pct} is not in [0, 100)");
        }
        let transports = std::env::var("WEFTLOG_WAN_TRANSPORTS")
            .unwrap_or_else(|_| "node".into())
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Ok((t.to_string(), transport_named(t)?)))
            .collect::<Result<Vec<_>>>()?;
        ensure!(!transports.is_empty(), "WEFTLOG_WAN_TRANSPORTS names none");
        Ok(Config {
            quick,
            transports,
            delays_ms,
            loss: loss_pct / 100.0,
            node_rcvbuf: env_or("WEFTLOG_WAN_NODE_RCVBUF", 0usize)?,
            runs: env_or("WEFTLOG_BENCH_RUNS", 3usize)?.max(3),
            events: env_or("WEFTLOG_WAN_EVENTS", if quick { 2_000 } else { 100_000 })?.max(1),
            appends: env_or("WEFTLOG_WAN_APPENDS", if quick { 20 } else { 200 })?.max(1),
            jitter: Duration::from_millis(env_or("WEFTLOG_WAN_JITTER_MS", 0u64)?),
            cold_wait: Duration::from_millis(env_or(
                "WEFTLOG_WAN_COLD_WAIT_MS",
                if quick { 1_000 } else { 3_000 },
            )?),
            seed: env_or("WEFTLOG_WAN_SEED", 7u64)?,
            dir: std::env::var_os("WEFTLOG_BENCH_DIR").map_or(default_dir, PathBuf::from),
            groups,
        })
    }

    /// A figure's name with the transport's, when several are compared.
    fn named(&self, figure: String, transport: &str) -> String {
        if self.transports.len() > 1 {
            format!("{figure}_{transport}")
        } else {
            figure
        }
    }

    fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    fn link(&self, delay_ms: u64, loss: f64, seed: u64) -> Link {
        Link {
            delay: Duration::from_millis(delay_ms),
            jitter: self.jitter,
            loss,
            seed: splitmix(self.seed ^ seed),
        }
    }

    fn link_name(&self, delay_ms: u64, loss: f64) -> String {
        let mut s = format!("{delay_ms} ms");
        if !self.jitter.is_zero() {
            s += &format!(" ± {} ms", self.jitter.as_millis());
        }
        if loss > 0.0 {
            s += &format!(", {}% loss", loss * 100.0);
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Figures and reporting

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    Secs,
    /// A latency in milliseconds.
    Ms,
    /// Megabytes (10^6) per second.
    MBps,
    /// A percentage.
    Pct,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Secs => "s",
            Unit::Ms => "ms",
            Unit::MBps => "MB/s",
            Unit::Pct => "%",
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Unit::Secs => format!("{v:.3} s"),
            Unit::Ms => format!("{v:.2} ms"),
            Unit::MBps => format!("{v:.1} MB/s"),
            Unit::Pct => format!("{v:.2} %"),
        }
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

struct Figure {
    group: &'static str,
    name: String,
    link: String,
    unit: Unit,
    runs: Vec<f64>,
    n: u64,
    /// Bytes moved per run (the MB/s and events/s columns of a time).
    bytes: Option<Vec<f64>>,
    /// A figure this one is compared with (same unit): name and runs.
    against: Option<(String, Vec<f64>)>,
    extra: serde_json::Map<String, serde_json::Value>,
}

/// The `p` quantile (0 < p <= 1) of `v` by nearest rank.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

impl Figure {
    fn median(&self) -> f64 {
        median(&self.runs)
    }

    /// MB/s and events/s at the median time, for a time.
    fn rates(&self) -> Option<(f64, f64)> {
        let secs = self.median();
        let bytes = median(self.bytes.as_ref()?);
        (self.unit == Unit::Secs).then(|| (bytes / secs / 1e6, self.n as f64 / secs))
    }

    fn json(&self, cfg: &Config) -> serde_json::Value {
        let (mbps, eps) = self.rates().unzip();
        json!({
            "bench": "wan",
            "group": self.group,
            "figure": self.name,
            "link": self.link,
            "unit": self.unit.name(),
            "median": self.median(),
            "runs": self.runs,
            "n": self.n,
            "mb_per_s": mbps,
            "events_per_s": eps,
            "against": self.against.as_ref().map(|(name, runs)| json!({
                "name": name,
                "median": median(runs),
                "runs": runs,
                "ratio": self.median() / median(runs),
            })),
            "quick": cfg.quick,
            "extra": self.extra,
        })
    }
}

struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, cfg: &Config, f: Figure) {
        println!("{}", f.json(cfg));
        self.figures.push(f);
    }

    fn print_table(&self) {
        println!();
        println!(
            "| figure | link (one-way) | n | median | runs | MB/s | events/s | against (median) | ratio | notes |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for f in &self.figures {
            let mut extra: Vec<String> = f
                .extra
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                .collect();
            extra.sort();
            let runs: Vec<String> = f.runs.iter().map(|v| format!("{v:.3}")).collect();
            let (mbps, eps) = f.rates().map_or(("—".into(), "—".into()), |(m, e)| {
                (format!("{m:.2}"), rate(e))
            });
            let (against, ratio) =
                f.against
                    .as_ref()
                    .map_or(("—".into(), "—".into()), |(name, runs)| {
                        (
                            format!("{name}: {}", f.unit.show(median(runs))),
                            format!("{:.2}×", f.median() / median(runs)),
                        )
                    });
            println!(
                "| {} | {} | {} | {} | {} | {mbps} | {eps} | {against} | {ratio} | {} |",
                f.name,
                f.link,
                f.n,
                f.unit.show(f.median()),
                runs.join(", "),
                extra.join(", "),
            );
        }
        println!();
        println!("Each figure is the median of its runs; every run is in the lines above.");
    }
}

// ---------------------------------------------------------------------------
// Workload (the mixed workload of benches/weftlog.rs)

fn mixed_draft(i: u64) -> Draft {
    let r = splitmix(i);
    let stream = r % STREAMS;
    let f1 = ((r >> 16) % FIELDS.len() as u64) as usize;
    let f2 = (f1 + 1 + ((r >> 20) % (FIELDS.len() as u64 - 1)) as usize) % FIELDS.len();
    let counter = COUNTERS[((r >> 24) % COUNTERS.len() as u64) as usize];
    let delta = ((r >> 28) % 10) as i64 + 1;
    let set = |f: usize| Op::Set {
        field: FIELDS[f].into(),
        value: format!("\"{}-{}\"", FIELDS[f], r >> 40).into_bytes(),
        supersedes: vec![],
    };
    let add = Op::Add {
        counter: counter.into(),
        delta,
    };
    let ops = match (r >> 32) % 4 {
        0 => vec![set(f1)],
        1 => vec![add],
        2 => vec![set(f1), add],
        _ => vec![set(f1), set(f2), add],
    };
    let mut payload = vec![0u8; PAYLOAD_BYTES];
    for (j, chunk) in payload.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix(i ^ ((j as u64) << 48)).to_le_bytes());
    }
    Draft {
        stream: format!("customer/{stream}"),
        kind: "CustomerUpdated".into(),
        ops,
        payload,
        meta: Meta::default(),
        expected_version: None,
        texts: Vec::new(),
    }
}

fn new_node(cfg: &Config, prefix: &str) -> Result<(tempfile::TempDir, Arc<Node>)> {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&cfg.dir)
        .with_context(|| format!("temp dir in {}", cfg.dir.display()))?;
    let dir = tmp.path().join("node");
    node::init(&dir).context("node init")?;
    let node = Arc::new(Node::open(&dir).context("open node")?.0);
    Ok((tmp, node))
}

/// Appends events `0..n` from `FILL_TASKS` concurrent tasks, so group
/// commit makes large batches.
async fn fill(node: Arc<Node>, n: u64) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..FILL_TASKS)
        .map(|_| {
            let (node, next) = (node.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    node.append_async(mixed_draft(i)).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("an appender panicked")??;
    }
    Ok(())
}

/// The runtime both daemons run on: two workers, as in benches/weftlog.rs.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A daemon on `listen` dialling `peers`, with anti-entropy effectively off.
fn daemon_config(
    listen: SocketAddr,
    peers: Vec<String>,
    t: &transport::Settings,
) -> daemon::Config {
    let mut c = daemon::Config::new(listen);
    c.peers = peers;
    c.transport = *t;
    c.policy.anti_entropy_ms = NO_ANTI_ENTROPY_MS;
    c
}

/// A free loopback UDP port, for a daemon that starts after the proxy
/// pointing at it is up (bound and released: another process could take
/// it in between, which would fail the run loudly).
fn free_udp_addr() -> Result<SocketAddr> {
    Ok(StdUdpSocket::bind(("127.0.0.1", 0))?.local_addr()?)
}

/// The receive buffer of this process's UDP socket bound to `addr`, after
/// forcing it to `WEFTLOG_WAN_NODE_RCVBUF` bytes if that is set (a
/// diagnostic: the daemon sizes its own socket, and drops on it are losses
/// to QUIC). The socket is found by its bound address among our fds.
fn enlarge_rcvbuf(cfg: &Config, addr: SocketAddr) -> Result<usize> {
    for entry in fs::read_dir("/proc/self/fd")? {
        let Some(raw) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: only borrowed for these calls, never closed here. The
        // daemon's socket stays open while it runs; any other fd closed
        // meanwhile only makes `bound_v4` fail, or name another address.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
        if proxy::bound_v4(fd) != Some(addr) {
            continue;
        }
        if cfg.node_rcvbuf > 0 {
            proxy::set_rcvbuf(fd, cfg.node_rcvbuf);
        }
        return Ok(proxy::rcvbuf(fd));
    }
    bail!("no socket of this process is bound to {addr}")
}

fn since(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews
/// every figure here.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

// ---------------------------------------------------------------------------
// proxy: the link alone

struct ProbeRun {
    sent: u64,
    received: u64,
    reordered: u64,
    offered_mbps: f64,
    delivered_mbps: f64,
    stats: proxy::Stats,
    receiver_drops: Option<u64>,
}

/// Sends `count` datagrams through a proxy over `link` at `offered_mbps`
/// (bursts of 32 every so often) and counts what arrives, and in which
/// order.
fn probe_run(link: Link, count: u64, offered_mbps: f64) -> Result<ProbeRun> {
    const BURST: u64 = 32;
    let rx = StdUdpSocket::bind(("127.0.0.1", 0))?;
    // As large as the proxy's own: the receiver is not what is measured.
    proxy::set_buffers(&rx);
    let rx_addr = rx.local_addr()?;
    let p = Proxy::start(rx_addr, link)?;
    rx.set_read_timeout(Some(link.delay * 2 + Duration::from_millis(100)))?;
    let receiver = thread::spawn(move || {
        let mut buf = vec![0u8; proxy::MAX_DATAGRAM];
        let (mut got, mut reordered, mut highest) = (0u64, 0u64, None::<u64>);
        let (mut first, mut last) = (None, None);
        while let Ok(len) = rx.recv(&mut buf) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            got += 1;
            if len >= 8 {
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                if highest.is_some_and(|h| seq < h) {
                    reordered += 1;
                }
                highest = Some(highest.map_or(seq, |h: u64| h.max(seq)));
            }
        }
        let drops = udp_drops(rx_addr);
        (got, reordered, first, last, drops)
    });
    let tx = StdUdpSocket::bind(("127.0.0.1", 0))?;
    let mut data = vec![0u8; PROBE_DATAGRAM];
    let burst_every =
        Duration::from_secs_f64(BURST as f64 * PROBE_DATAGRAM as f64 / (offered_mbps * 1e6));
    let t0 = Instant::now();
    let mut i = 0u64;
    while i < count {
        for _ in 0..BURST.min(count - i) {
            data[..8].copy_from_slice(&i.to_le_bytes());
            tx.send_to(&data, p.addr())?;
            i += 1;
        }
        let due = t0 + burst_every.mul_f64((i / BURST) as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let (received, reordered, first, last, receiver_drops) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    let stats = p.stop();
    let span = match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
        _ => f64::NAN,
    };
    Ok(ProbeRun {
        sent: count,
        received,
        reordered,
        offered_mbps: count as f64 * PROBE_DATAGRAM as f64 / send_secs / 1e6,
        delivered_mbps: received as f64 * PROBE_DATAGRAM as f64 / span / 1e6,
        stats,
        receiver_drops,
    })
}

fn bench_proxy(cfg: &Config, report: &mut Report) -> Result<()> {
    let offered = PROBE_OFFERED_MBPS;
    let count = if cfg.quick { 5_000 } else { 50_000 };
    println!(
        "# proxy: {count} datagrams of {PROBE_DATAGRAM} bytes offered at {offered} MB/s through a 10 ms link; then the loss model at 1 %, {} runs",
        cfg.runs
    );
    let (mut rate_runs, mut loss_runs) = (Vec::new(), Vec::new());
    let (mut unplanned, mut reordered) = (0u64, 0u64);
    for run in 0..cfg.runs {
        let r = probe_run(cfg.link(10, 0.0, 100 + run as u64), count, offered)?;
        let l = probe_run(cfg.link(10, LOSS, 200 + run as u64), count, 20.0)?;
        let lost_pct = 100.0 * (l.sent - l.received) as f64 / l.sent as f64;
        println!(
            "  run {run}: offered {:.1} MB/s, delivered {}/{} at {:.1} MB/s, reordered {}, proxy queue max {}, proxy CPU {:.2} s, proxy rcvbuf {} kB, drops: proxy sockets {}/{}, receiver socket {}, proxy overflow {} | at 1 %: {}/{} delivered ({lost_pct:.2} % lost; the model dropped {}), reordered {}",
            r.offered_mbps,
            r.received,
            r.sent,
            r.delivered_mbps,
            r.reordered,
            r.stats.to_server.max_queued,
            r.stats.cpu_secs.unwrap_or(f64::NAN),
            r.stats.socket_rcvbuf[0] / 1024,
            opt(r.stats.socket_drops[0]),
            opt(r.stats.socket_drops[1]),
            opt(r.receiver_drops),
            r.stats.to_server.overflow,
            l.received,
            l.sent,
            l.stats.to_server.lost,
            l.reordered,
        );
        // Every cause: the breakdown is in the run line.
        unplanned += r.sent - r.received;
        reordered += r.reordered + if cfg.jitter.is_zero() { l.reordered } else { 0 };
        rate_runs.push(r.delivered_mbps);
        loss_runs.push(lost_pct);
    }
    let mut extra = serde_json::Map::new();
    extra.insert("offered_mb_per_s".into(), json!(offered));
    extra.insert("lost_datagrams_all_runs".into(), json!(unplanned));
    extra.insert("reordered_all_runs".into(), json!(reordered));
    report.add(
        cfg,
        Figure {
            group: "proxy",
            name: "proxy_forward".into(),
            link: cfg.link_name(10, 0.0),
            unit: Unit::MBps,
            runs: rate_runs,
            n: count,
            bytes: None,
            against: None,
            extra,
        },
    );
    report.add(
        cfg,
        Figure {
            group: "proxy",
            name: "proxy_loss_measured".into(),
            link: cfg.link_name(10, LOSS),
            unit: Unit::Pct,
            runs: loss_runs,
            n: count,
            bytes: None,
            against: None,
            extra: serde_json::Map::new(),
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// catchup and cold

/// One catch-up, seconds from the start of A's daemon.
struct CatchupRun {
    applied_secs: f64,
    connected_secs: Option<f64>,
    first_secs: Option<f64>,
    /// Sync bytes B received from A.
    bytes: u64,
    /// Datagrams B sent towards A before A's daemon started (cold start).
    dialled_into_void: u64,
    proxy: proxy::Stats,
    /// The kernel's drops on A's and B's sockets.
    node_drops: [Option<u64>; 2],
    /// The receive buffers of A's and B's sockets, bytes.
    node_rcvbuf: [usize; 2],
    shutdown_secs: f64,
}

/// Brings a fresh empty B up to `a` (holding `n` events, hash `a_hash`)
/// through a proxy over `link`. With `cold_wait`, B's daemon starts first
/// and A's that long after; otherwise A's first, then B's at once.
fn catchup_run(
    cfg: &Config,
    a: &Arc<Node>,
    a_hash: [u8; 32],
    n: u64,
    link: Link,
    cold_wait: Option<Duration>,
    t: &transport::Settings,
) -> Result<CatchupRun> {
    let (_tb, b) = new_node(cfg, "wan-b-")?;
    let a_id = a.id();
    let a_addr = free_udp_addr()?;
    let p = Proxy::start(a_addr, link).context("start the proxy")?;
    let rt = runtime()?;
    let start_a = || Daemon::start(a.clone(), daemon_config(a_addr, Vec::new(), t));
    let start_b = || {
        Daemon::start(
            b.clone(),
            daemon_config(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                vec![p.addr().to_string()],
                t,
            ),
        )
    };
    let (t0, daemon_a, daemon_b, dialled_into_void) = match cold_wait {
        None => {
            let t0 = Instant::now();
            let (da, db) =
                rt.block_on(async { anyhow::Ok((start_a().await?, start_b().await?)) })?;
            (t0, da, db, 0)
        }
        Some(wait) => {
            let db = rt.block_on(start_b())?;
            thread::sleep(wait);
            let void = p.snapshot()[0].sent;
            let t0 = Instant::now();
            let da = rt.block_on(start_a())?;
            (t0, da, db, void)
        }
    };
    let node_rcvbuf = [
        enlarge_rcvbuf(cfg, daemon_a.local_addr())?,
        enlarge_rcvbuf(cfg, daemon_b.local_addr())?,
    ];
    let (mut connected, mut first) = (None, None);
    let applied = loop {
        let len = b.with_state(|s| s.len());
        let now = Instant::now();
        if connected.is_none() && daemon_b.is_connected(&a_id) {
            connected = Some(now);
        }
        if first.is_none() && len > 0 {
            first = Some(now);
        }
        if len >= n {
            break now;
        }
        if now - t0 > NET_DEADLINE {
            bail!("catch-up: B holds {len} of {n} events after {NET_DEADLINE:?}");
        }
        thread::sleep(CATCHUP_POLL);
    };
    let node_drops = [
        udp_drops(daemon_a.local_addr()),
        udp_drops(daemon_b.local_addr()),
    ];
    let peers = rt.block_on(daemon_b.peers());
    let a_str = a_id.to_string();
    let bytes = peers
        .iter()
        .find(|r| r["node"].as_str() == Some(a_str.as_str()))
        .and_then(|r| r["bytes_received"].as_u64())
        .unwrap_or(0);
    ensure!(
        b.with_state(|s| s.state_hash()) == a_hash,
        "catch-up: B's state differs from A's"
    );
    let t_shutdown = Instant::now();
    rt.block_on(async {
        tokio::join!(daemon_a.shutdown(), daemon_b.shutdown());
    });
    drop((daemon_a, daemon_b));
    drop(rt);
    let shutdown_secs = t_shutdown.elapsed().as_secs_f64();
    let proxy = p.stop();
    Ok(CatchupRun {
        shutdown_secs,
        applied_secs: since(t0, applied),
        connected_secs: connected.map(|t| since(t0, t)),
        first_secs: first.map(|t| since(t0, t)),
        bytes,
        dialled_into_void,
        proxy,
        node_drops,
        node_rcvbuf,
    })
}

fn print_catchup(label: &str, n: u64, r: &CatchupRun) {
    let s = &r.proxy;
    println!(
        "  {label}: {:.3} s ({}, {:.2} MB/s), connected {} ms, first event {} ms, {:.1} B/event | proxy: {} datagrams A→B, {} B→A, lost by model {}/{}, queue max {}, CPU {:.2} s | drops: proxy sockets {}/{}, A's socket {}, B's socket {} (rcvbuf {} kB), proxy overflow {}, send errors {} | shutdown {:.2} s{}",
        r.applied_secs,
        rate(n as f64 / r.applied_secs),
        r.bytes as f64 / r.applied_secs / 1e6,
        r.connected_secs.map_or("?".into(), |v| format!("{:.0}", v * 1e3)),
        r.first_secs.map_or("?".into(), |v| format!("{:.0}", v * 1e3)),
        r.bytes as f64 / n as f64,
        s.to_client.sent,
        s.to_server.sent,
        s.to_client.lost,
        s.to_server.lost,
        s.to_client.max_queued.max(s.to_server.max_queued),
        s.cpu_secs.unwrap_or(f64::NAN),
        opt(s.socket_drops[0]),
        opt(s.socket_drops[1]),
        opt(r.node_drops[0]),
        opt(r.node_drops[1]),
        r.node_rcvbuf[1] / 1024,
        s.to_client.overflow + s.to_server.overflow,
        s.to_client.send_errors + s.to_server.send_errors,
        r.shutdown_secs,
        if r.dialled_into_void > 0 {
            format!(
                " | B sent {} datagrams towards A before A started",
                r.dialled_into_void
            )
        } else {
            String::new()
        },
    );
}

/// Drops the proxy did not choose, plus the kernel's on A's and B's sockets.
fn unplanned(r: &CatchupRun) -> u64 {
    r.proxy.unplanned_drops() + r.node_drops.iter().flatten().sum::<u64>()
}

/// A node holding the catch-up backlog, built once for every run.
struct Backlog {
    _tmp: tempfile::TempDir,
    node: Arc<Node>,
    hash: [u8; 32],
}

fn backlog(cfg: &Config) -> Result<Backlog> {
    let n = cfg.events;
    let (tmp, node) = new_node(cfg, "wan-a-")?;
    let t = Instant::now();
    runtime()?.block_on(fill(node.clone(), n))?;
    let (len, hash) = node.with_state(|s| (s.len(), s.state_hash()));
    ensure!(len == n, "A holds {len} events, expected {n}");
    println!(
        "# built A's backlog of {n} events in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(Backlog {
        _tmp: tmp,
        node,
        hash,
    })
}

fn catchup_figure(
    cfg: &Config,
    group: &'static str,
    name: String,
    link: String,
    runs: &[CatchupRun],
    against: Option<(String, Vec<f64>)>,
) -> Figure {
    let n = cfg.events;
    let ms = |v: Vec<f64>| json!((median(&v) * 1e3).round());
    let mut extra = serde_json::Map::new();
    extra.insert(
        "connected_ms".into(),
        ms(runs
            .iter()
            .map(|r| r.connected_secs.unwrap_or(f64::NAN))
            .collect()),
    );
    extra.insert(
        "wire_bytes_per_event".into(),
        json!(
            (median(&runs.iter().map(|r| r.bytes as f64).collect::<Vec<_>>()) / n as f64).round()
        ),
    );
    extra.insert(
        "unplanned_drops_all_runs".into(),
        json!(runs.iter().map(unplanned).sum::<u64>()),
    );
    let void: u64 = runs.iter().map(|r| r.dialled_into_void).sum();
    if void > 0 {
        extra.insert(
            "datagrams_before_a_started".into(),
            json!(median(
                &runs
                    .iter()
                    .map(|r| r.dialled_into_void as f64)
                    .collect::<Vec<_>>()
            )),
        );
    }
    Figure {
        group,
        name,
        link,
        unit: Unit::Secs,
        runs: runs.iter().map(|r| r.applied_secs).collect(),
        n,
        bytes: Some(runs.iter().map(|r| r.bytes as f64).collect()),
        against,
        extra,
    }
}

fn bench_catchup(cfg: &Config, a: &Backlog, report: &mut Report) -> Result<()> {
    let n = cfg.events;
    let mut links: Vec<(u64, f64)> = cfg.delays_ms.iter().map(|&d| (d, 0.0)).collect();
    if cfg.loss > 0.0 {
        links.push((WAN_MS, cfg.loss));
    }
    println!(
        "# catchup: {n} events from A to an empty B through the proxy, one-way {}, {} runs",
        links
            .iter()
            .map(|&(d, l)| cfg.link_name(d, l))
            .collect::<Vec<_>>()
            .join(" / "),
        cfg.runs
    );
    let ts = &cfg.transports;
    let mut results: Vec<Vec<Vec<CatchupRun>>> = links
        .iter()
        .map(|_| ts.iter().map(|_| Vec::new()).collect())
        .collect();
    for run in 0..cfg.runs {
        for (i, &(delay, loss)) in links.iter().enumerate() {
            // Every transport meets the same link (same loss sequence).
            let link = cfg.link(delay, loss, (run * 100 + i) as u64);
            for (j, (tname, t)) in ts.iter().enumerate() {
                let r = catchup_run(cfg, &a.node, a.hash, n, link, None, t)?;
                print_catchup(
                    &format!("run {run}, {}, {tname}", cfg.link_name(delay, loss)),
                    n,
                    &r,
                );
                results[i][j].push(r);
            }
        }
    }
    for (&(delay, loss), per_t) in links.iter().zip(&results) {
        let name = if loss > 0.0 {
            format!("catchup_{delay}ms_loss{}pct", loss * 100.0)
        } else {
            format!("catchup_{delay}ms")
        };
        let first: Vec<f64> = per_t[0].iter().map(|r| r.applied_secs).collect();
        for (j, ((tname, _), runs)) in ts.iter().zip(per_t).enumerate() {
            let against = (j > 0).then(|| (ts[0].0.clone(), first.clone()));
            report.add(
                cfg,
                catchup_figure(
                    cfg,
                    "catchup",
                    cfg.named(name.clone(), tname),
                    cfg.link_name(delay, loss),
                    runs,
                    against,
                ),
            );
        }
    }
    Ok(())
}

fn bench_cold(cfg: &Config, a: &Backlog, report: &mut Report) -> Result<()> {
    let n = cfg.events;
    println!(
        "# cold: {n} events at {}, B dialling for {} ms before A starts, against A up first, {} runs",
        cfg.link_name(WAN_MS, 0.0),
        cfg.cold_wait.as_millis(),
        cfg.runs
    );
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for run in 0..cfg.runs {
        let link = cfg.link(WAN_MS, 0.0, 1_000 + run as u64);
        let t = &cfg.transports[0].1;
        let c = catchup_run(cfg, &a.node, a.hash, n, link, Some(cfg.cold_wait), t)?;
        print_catchup(&format!("run {run}, B first"), n, &c);
        let w = catchup_run(cfg, &a.node, a.hash, n, link, None, t)?;
        print_catchup(&format!("run {run}, A first"), n, &w);
        cold.push(c);
        warm.push(w);
    }
    let warm_secs: Vec<f64> = warm.iter().map(|r| r.applied_secs).collect();
    let warm_connect: Vec<f64> = warm
        .iter()
        .map(|r| r.connected_secs.unwrap_or(f64::NAN))
        .collect();
    let mut f = catchup_figure(
        cfg,
        "cold",
        format!("cold_{WAN_MS}ms_b_first"),
        cfg.link_name(WAN_MS, 0.0),
        &cold,
        Some(("A up first".into(), warm_secs)),
    );
    // Time after the connection came up, which leaves out the dial backoff.
    let after = |runs: &[CatchupRun]| {
        let v: Vec<f64> = runs
            .iter()
            .map(|r| r.applied_secs - r.connected_secs.unwrap_or(f64::NAN))
            .collect();
        json!((median(&v) * 1e3).round())
    };
    f.extra.insert("after_connect_ms".into(), after(&cold));
    f.extra
        .insert("a_first_after_connect_ms".into(), after(&warm));
    f.extra.insert(
        "a_first_connected_ms".into(),
        json!((median(&warm_connect) * 1e3).round()),
    );
    report.add(cfg, f);
    Ok(())
}

// ---------------------------------------------------------------------------
// live

struct LiveRun {
    /// Per measured append: ms from A's ack until B holds it.
    latency: Vec<f64>,
    /// Per measured append: A's own append latency, ms.
    ack: Vec<f64>,
    connected_secs: f64,
    proxy: proxy::Stats,
    node_drops: [Option<u64>; 2],
}

fn live_run(cfg: &Config, link: Link, seed: u64, t: &transport::Settings) -> Result<LiveRun> {
    let (_ta, a) = new_node(cfg, "wan-live-a-")?;
    let (_tb, b) = new_node(cfg, "wan-live-b-")?;
    let a_id = a.id();
    let a_addr = free_udp_addr()?;
    let p = Proxy::start(a_addr, link).context("start the proxy")?;
    let rt = runtime()?;
    let t0 = Instant::now();
    let (da, db) = rt.block_on(async {
        let da = Daemon::start(a.clone(), daemon_config(a_addr, Vec::new(), t)).await?;
        let db = Daemon::start(
            b.clone(),
            daemon_config(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                vec![p.addr().to_string()],
                t,
            ),
        )
        .await?;
        anyhow::Ok((da, db))
    })?;
    enlarge_rcvbuf(cfg, da.local_addr())?;
    enlarge_rcvbuf(cfg, db.local_addr())?;
    while !db.is_connected(&a_id) {
        if t0.elapsed() > NET_DEADLINE {
            bail!("live: B did not connect within {NET_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(1));
    }
    let connected_secs = t0.elapsed().as_secs_f64();
    let mut rng = seed;
    let (mut latency, mut ack) = (Vec::new(), Vec::new());
    for e in 0..LIVE_WARMUP + cfg.appends {
        let t = Instant::now();
        let appended = a.append(mixed_draft(e))?;
        let acked = Instant::now();
        let seen = loop {
            if b.with_state(|s| s.event_id(&a_id, appended.seq).is_some()) {
                break Instant::now();
            }
            if acked.elapsed() > LIVE_TIMEOUT {
                bail!("live: append {e} did not reach B within {LIVE_TIMEOUT:?}");
            }
            thread::sleep(LIVE_POLL);
        };
        if e >= LIVE_WARMUP {
            latency.push(ms(seen.saturating_duration_since(acked)));
            ack.push(ms(acked - t));
        }
        rng = splitmix(rng);
        thread::sleep(Duration::from_micros(5_000 + rng % 5_001));
    }
    let node_drops = [udp_drops(da.local_addr()), udp_drops(db.local_addr())];
    rt.block_on(async {
        tokio::join!(da.shutdown(), db.shutdown());
    });
    drop((da, db));
    drop(rt);
    let proxy = p.stop();
    Ok(LiveRun {
        latency,
        ack,
        connected_secs,
        proxy,
        node_drops,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_live(cfg: &Config, report: &mut Report) -> Result<()> {
    let m = cfg.appends;
    println!(
        "# live: {m} single appends on A, {} to B, 5–10 ms after the last arrived, {} runs",
        cfg.link_name(WAN_MS, 0.0),
        cfg.runs
    );
    let ts = &cfg.transports;
    let mut per_t: Vec<Vec<LiveRun>> = ts.iter().map(|_| Vec::new()).collect();
    for run in 0..cfg.runs {
        for (j, (tname, t)) in ts.iter().enumerate() {
            let r = live_run(
                cfg,
                cfg.link(WAN_MS, 0.0, 2_000 + run as u64),
                3_000 + run as u64,
                t,
            )?;
            println!(
                "  run {run}, {tname}: connected in {:.0} ms | ack→B p50 {:.2} / p99 {:.2} / max {:.2} ms | A's append p50 {:.2} ms | drops: proxy sockets {}/{}, A's socket {}, B's socket {}",
                r.connected_secs * 1e3,
                percentile(&r.latency, 0.5),
                percentile(&r.latency, 0.99),
                percentile(&r.latency, 1.0),
                percentile(&r.ack, 0.5),
                opt(r.proxy.socket_drops[0]),
                opt(r.proxy.socket_drops[1]),
                opt(r.node_drops[0]),
                opt(r.node_drops[1]),
            );
            per_t[j].push(r);
        }
    }
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    for (tag, q) in [("p50", 0.5), ("p99", 0.99)] {
        let first: Vec<f64> = per_t[0].iter().map(|r| percentile(&r.latency, q)).collect();
        for (j, ((tname, _), runs)) in ts.iter().zip(&per_t).enumerate() {
            let pooled: Vec<f64> = runs.iter().flat_map(|r| r.latency.clone()).collect();
            let acks: Vec<f64> = runs.iter().flat_map(|r| r.ack.clone()).collect();
            let mut extra = serde_json::Map::new();
            extra.insert("pooled".into(), json!(round2(percentile(&pooled, q))));
            extra.insert("a_append_ack".into(), json!(round2(percentile(&acks, q))));
            extra.insert(
                "unplanned_drops_all_runs".into(),
                json!(runs
                    .iter()
                    .map(|r| r.proxy.unplanned_drops() + r.node_drops.iter().flatten().sum::<u64>())
                    .sum::<u64>()),
            );
            report.add(
                cfg,
                Figure {
                    group: "live",
                    name: cfg.named(format!("live_{WAN_MS}ms_{tag}"), tname),
                    link: cfg.link_name(WAN_MS, 0.0),
                    unit: Unit::Ms,
                    runs: runs.iter().map(|r| percentile(&r.latency, q)).collect(),
                    n: m,
                    bytes: None,
                    against: (j > 0).then(|| (ts[0].0.clone(), first.clone())),
                    extra,
                },
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    fs::create_dir_all(&cfg.dir).with_context(|| format!("create {}", cfg.dir.display()))?;
    println!(
        "weftlog wan bench: groups {:?}, {} runs each{}, transports {:?}, n {} events, {} cores (load average {}), scratch {}",
        cfg.groups,
        cfg.runs,
        if cfg.quick { ", QUICK sizes" } else { "" },
        cfg.transports.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        cfg.events,
        thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        cfg.dir.display(),
    );
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run `cargo bench` for release figures.");
    }
    let mut report = Report {
        figures: Vec::new(),
    };
    let t0 = Instant::now();
    if cfg.wants("proxy") {
        bench_proxy(&cfg, &mut report)?;
    }
    if cfg.wants("catchup") || cfg.wants("cold") {
        let a = backlog(&cfg)?;
        if cfg.wants("catchup") {
            bench_catchup(&cfg, &a, &mut report)?;
        }
        if cfg.wants("cold") {
            bench_cold(&cfg, &a, &mut report)?;
        }
    }
    if cfg.wants("live") {
        bench_live(&cfg, &mut report)?;
    }
    report.print_table();
    println!(
        "total {:.1} s (load average {})",
        t0.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}
