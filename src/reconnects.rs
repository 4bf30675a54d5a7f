//! "Changes while you were offline": per peer, the periods this node was
//! cut off from it, and on reconnecting, what others did concurrently with
//! its own work of the period ([`weftlog_proto::reconcile`]).
//!
//! **A disconnected period** for peer P opens when P's connection drops,
//! when P is blocked (`POST /v1/admin/partition`), or at start for a peer
//! this node synced with before and has not reached yet in this run. It
//! records this node's durable log position and wall time then. It closes
//! when a round with P ends in sync ([`PeerEvent::Synced`]) after that:
//! then the log from the recorded position on holds this node's own
//! events of the period and everything it received since, and the report
//! is computed from it and the state. A period opened while one is open
//! for the same peer keeps the older one.
//!
//! A period shorter than [`RECONNECT_MIN_MS`] with nothing concurrent is
//! not reported: a connection replaced by a restarted peer's, or a blip of
//! the Wi-Fi, drops and comes back within a second or two, and telling
//! staff about it would teach them to ignore the notice. Two seconds is
//! above a reconnect after a replaced connection (one round trip and a
//! round) and below any cut a person would notice.
//!
//! **Files** in the data directory:
//! - [`REPORTS_FILE`]: one report per line, oldest first, each appended and
//!   fsynced before it is published; the newest [`REPORTS_KEPT`] are kept
//!   (the file is rewritten when it holds [`REPORTS_SLACK`] more). A line
//!   that does not parse (a torn tail after a crash) is skipped with a
//!   warning.
//! - [`OPEN_FILE`]: the open periods and the peers this node has synced
//!   with, rewritten (write, fsync, rename) when they change, so a desk
//!   that was cut off, restarted and reconnected still gets its report.
//!
//! A report (`GET /v1/reconnects`, the `reconciled` notice, one line of
//! the file) is `{"seq", "peer", "offline_since_ms", "reconnected_ms",
//! "offline_ms", "own_events", "received", "streams", "conflicts"}`, see
//! [`report_json`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Query, State as AxState};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};
use weftlog_proto::reconcile::{self, Change, Changed, Origin, Report, Write as Written};
use weftlog_proto::{Event, EventId, NodeId};

use crate::daemon::Daemon;
use crate::http::ApiError;
use crate::json::{bytes_value, policy};
use crate::node::Node;
use crate::storage::sync_dir;

/// The reports, one JSON object per line, oldest first.
pub const REPORTS_FILE: &str = "reconnects.jsonl";
/// The open periods and the peers synced with, one JSON object.
pub const OPEN_FILE: &str = "reconnects.open.json";
/// Reports kept (the newest).
pub const REPORTS_KEPT: usize = 1000;
/// Lines the reports file may hold beyond [`REPORTS_KEPT`] before it is
/// rewritten with the newest [`REPORTS_KEPT`].
pub const REPORTS_SLACK: usize = 100;
/// A period shorter than this with nothing concurrent is not reported
/// (module docs say why).
pub const RECONNECT_MIN_MS: u64 = 2000;
/// Reports `GET /v1/reconnects` answers without `limit`.
pub const LIMIT_DEFAULT: usize = 100;
/// Most events of a period's window read to make its report: beyond, the
/// report covers the newest this many (and says `"truncated": true`).
pub const WINDOW_MAX_EVENTS: u64 = 250_000;
/// Peers remembered as synced with, at most (the open file stays small).
pub const KNOWN_PEERS_MAX: usize = 1024;
/// Longest reports file read, in bytes: beyond, its start is skipped.
pub const REPORTS_FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// An open disconnected period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    /// This node's durable log position when it opened.
    pub pos: u64,
    /// The wall time when it opened, ms since the epoch.
    pub since_ms: u64,
}

struct Inner {
    open: BTreeMap<NodeId, Period>,
    known: BTreeSet<NodeId>,
    /// The newest reports, oldest first.
    reports: VecDeque<Value>,
    /// Lines in the reports file.
    lines: usize,
    next_seq: u64,
}

/// The periods and reports of one node.
pub struct Reconnects {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl Reconnects {
    /// Loads the files of `dir` (a missing file is empty; a damaged one is
    /// reported with a warning and read as far as it goes) and opens a
    /// period at `pos`, `now_ms` for every peer synced with before that
    /// has none open.
    pub fn open(dir: &Path, pos: u64, now_ms: u64) -> Reconnects {
        let (reports, lines, warnings) = read_reports(dir);
        for w in warnings {
            warn!("{w}");
        }
        let next_seq = reports
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .max()
            .unwrap_or(0)
            + 1;
        let (mut open, known) = read_open(dir);
        let loaded = open.len();
        for peer in &known {
            open.entry(*peer).or_insert(Period {
                pos,
                since_ms: now_ms,
            });
        }
        let opened = open.len() > loaded;
        let r = Reconnects {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                open,
                known,
                reports: reports.into(),
                lines,
                next_seq,
            }),
        };
        if opened {
            r.save(&r.lock());
        }
        r
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here holds an invariant a panic could break halfway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Peer `peer` is out of reach (its connection dropped, or it was
    /// blocked): opens a period at `pos`, `now_ms` unless one is open.
    pub fn handle_down(&self, peer: NodeId, pos: u64, now_ms: u64) {
        let mut g = self.lock();
        if g.open.contains_key(&peer) {
            return;
        }
        g.open.insert(
            peer,
            Period {
                pos,
                since_ms: now_ms,
            },
        );
        self.save(&g);
    }

    /// A round with `peer` ended in sync: closes its open period, if any,
    /// and returns it for [`Reconnects::report`].
    pub fn handle_synced(&self, peer: NodeId) -> Option<Period> {
        let mut g = self.lock();
        let new = g.known.len() < KNOWN_PEERS_MAX && g.known.insert(peer);
        let closed = g.open.remove(&peer);
        if new || closed.is_some() {
            self.save(&g);
        }
        closed
    }

    /// The open periods, by peer.
    pub fn open_periods(&self) -> BTreeMap<NodeId, Period> {
        self.lock().open.clone()
    }

    /// Makes the report of `peer`'s closed `period` at `now_ms` from
    /// `node`'s log and state; stores it and returns it, or `None` when
    /// it is too short to tell ([`RECONNECT_MIN_MS`]) or cannot be read.
    /// Blocking: it waits for the log to be durable and reads it.
    pub fn report(&self, node: &Node, peer: NodeId, period: Period, now_ms: u64) -> Option<Value> {
        // What the round stored becomes durable before the window is read.
        if let Err(e) = node.flush() {
            warn!(%peer, "reconnect report: the log did not flush: {e}");
            return None;
        }
        let end = node.durable_pos();
        let from = period
            .pos
            .min(end)
            .max(end.saturating_sub(WINDOW_MAX_EVENTS));
        let truncated = from > period.pos;
        let mut window: Vec<(Event, EventId)> = Vec::new();
        let mut at = from;
        while at < end {
            let batch = match node.read_from(at, crate::subscribe::READ_CHUNK) {
                Ok(b) if !b.is_empty() => b,
                Ok(_) => break,
                Err(e) => {
                    warn!(%peer, "reconnect report: cannot read the log: {e}");
                    return None;
                }
            };
            for p in batch {
                at = p.pos;
                match Event::decode_trusted(&p.bytes) {
                    Ok(e) => window.push((e, p.id)),
                    Err(e) => {
                        warn!(event = %p.id, pos = p.pos, "reconnect report: a durable event does not decode: {e}")
                    }
                }
            }
        }
        let me = node.id();
        let report = node.with_state(|s| reconcile::reconcile(&window, &me, s));
        let offline_ms = now_ms.saturating_sub(period.since_ms);
        if report.received == 0 && offline_ms < RECONNECT_MIN_MS {
            return None;
        }
        let mut g = self.lock();
        let seq = g.next_seq;
        let mut v = report_json(&report, seq, Some(peer), period.since_ms, now_ms);
        if truncated {
            v["truncated"] = json!(true);
        }
        if let Err(e) = self.append(&mut g, &v) {
            warn!(path = %self.dir.join(REPORTS_FILE).display(), "cannot record the reconnect report: {e}");
            return None;
        }
        g.next_seq += 1;
        info!(%peer, seq, offline_ms, received = report.received, conflicts = report.conflicts, "reconnected: changes made while offline reported");
        Some(v)
    }

    /// The newest `limit` reports, newest first.
    pub fn list(&self, limit: usize) -> Vec<Value> {
        self.lock()
            .reports
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Appends `v` to the file (fsynced) and to the kept reports; rewrites
    /// the file with the newest [`REPORTS_KEPT`] when it grew too long.
    fn append(&self, g: &mut Inner, v: &Value) -> io::Result<()> {
        let path = self.dir.join(REPORTS_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut line = format!("{v}\n");
        // A torn last line (a crash mid-append) must not swallow this one.
        if f.metadata()?.len() > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                line.insert(0, '\n');
            }
        } else {
            sync_dir(&self.dir)?;
        }
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        g.lines += 1;
        if g.reports.len() == REPORTS_KEPT {
            g.reports.pop_front();
        }
        g.reports.push_back(v.clone());
        if g.lines > REPORTS_KEPT + REPORTS_SLACK {
            let text: String = g.reports.iter().map(|r| format!("{r}\n")).collect();
            write_atomic(&self.dir, REPORTS_FILE, text.as_bytes())?;
            g.lines = g.reports.len();
        }
        Ok(())
    }

    /// Writes the open periods and known peers; a failure is a warning
    /// (the periods stay in memory).
    fn save(&self, g: &Inner) {
        let open: Vec<Value> = g
            .open
            .iter()
            .map(|(p, o)| json!({ "peer": p.to_string(), "pos": o.pos, "since_ms": o.since_ms }))
            .collect();
        let known: Vec<String> = g.known.iter().map(ToString::to_string).collect();
        let text = format!("{}\n", json!({ "open": open, "known": known }));
        if let Err(e) = write_atomic(&self.dir, OPEN_FILE, text.as_bytes()) {
            warn!(path = %self.dir.join(OPEN_FILE).display(), "cannot record the open disconnected periods: {e}");
        }
    }
}

/// Writes `name` in `dir` whole or not at all: a temporary file, fsync,
/// rename, directory sync.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// The reports in `dir`'s file, oldest first (the newest
/// [`REPORTS_KEPT`]), the number of lines, and a warning per line skipped.
pub fn read_reports(dir: &Path) -> (Vec<Value>, usize, Vec<String>) {
    let path = dir.join(REPORTS_FILE);
    let mut warnings = Vec::new();
    let text = match File::open(&path) {
        Ok(f) => {
            let len = f.metadata().map_or(0, |m| m.len());
            let mut f = f;
            if len > REPORTS_FILE_MAX_BYTES {
                warnings.push(format!(
                    "{}: {len} bytes, only the last {REPORTS_FILE_MAX_BYTES} are read",
                    path.display()
                ));
                if let Err(e) = f.seek(SeekFrom::Start(len - REPORTS_FILE_MAX_BYTES)) {
                    warnings.push(format!("{}: {e}", path.display()));
                    return (Vec::new(), 0, warnings);
                }
            }
            let mut bytes = Vec::new();
            if let Err(e) = f.take(REPORTS_FILE_MAX_BYTES).read_to_end(&mut bytes) {
                warnings.push(format!("{}: {e}", path.display()));
            }
            bytes
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warnings.push(format!("{}: {e}", path.display()));
            Vec::new()
        }
    };
    let mut out = Vec::new();
    let mut lines = 0;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines += 1;
        match serde_json::from_slice::<Value>(line) {
            Ok(v) if v.is_object() => out.push(v),
            _ => warnings.push(format!(
                "{} line {}: not a report, skipped",
                path.display(),
                i + 1
            )),
        }
    }
    let skip = out.len().saturating_sub(REPORTS_KEPT);
    out.drain(..skip);
    (out, lines, warnings)
}

/// The open periods and known peers in `dir`'s open file; anything
/// unreadable is left out with a warning.
fn read_open(dir: &Path) -> (BTreeMap<NodeId, Period>, BTreeSet<NodeId>) {
    let path = dir.join(OPEN_FILE);
    let mut open = BTreeMap::new();
    let mut known = BTreeSet::new();
    let v: Value = match fs::read(&path) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => v,
            Err(e) => {
                warn!(path = %path.display(), "open disconnected periods unreadable, forgotten: {e}");
                return (open, known);
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (open, known),
        Err(e) => {
            warn!(path = %path.display(), "open disconnected periods unreadable, forgotten: {e}");
            return (open, known);
        }
    };
    let peer = |v: &Value| v.as_str().and_then(|s| s.parse::<NodeId>().ok());
    for o in v["open"].as_array().into_iter().flatten() {
        match (peer(&o["peer"]), o["pos"].as_u64(), o["since_ms"].as_u64()) {
            (Some(p), Some(pos), Some(since_ms)) => {
                open.insert(p, Period { pos, since_ms });
            }
            _ => warn!(path = %path.display(), "an open period is malformed, skipped: {o}"),
        }
    }
    for k in v["known"].as_array().into_iter().flatten() {
        if let Some(p) = peer(k).filter(|_| known.len() < KNOWN_PEERS_MAX) {
            known.insert(p);
        }
    }
    (open, known)
}

/// A report as JSON (module docs).
pub fn report_json(
    r: &Report,
    seq: u64,
    peer: Option<NodeId>,
    since_ms: u64,
    now_ms: u64,
) -> Value {
    let streams: Vec<Value> = r
        .streams
        .iter()
        .map(|s| {
            let fields: Vec<Value> = s
                .fields
                .iter()
                .map(|f| {
                    json!({
                        "field": f.field,
                        "theirs": f.theirs.iter().map(write).collect::<Vec<_>>(),
                        "ours": f.ours.iter().map(write).collect::<Vec<_>>(),
                        "conflict": f.conflict,
                        "shown": f.shown.as_deref().map_or(Value::Null, bytes_value),
                    })
                })
                .collect();
            let counters: Vec<Value> = s
                .counters
                .iter()
                .map(|c| {
                    json!({
                        "counter": c.counter,
                        "escrow": c.escrow,
                        "theirs": c.theirs.iter().map(changed).collect::<Vec<_>>(),
                        "ours": c.ours.iter().map(changed).collect::<Vec<_>>(),
                        "value": crate::json::number(c.value),
                        "oversold": c.oversold,
                    })
                })
                .collect();
            let texts: Vec<Value> = s
                .texts
                .iter()
                .map(|t| {
                    json!({
                        "field": t.field,
                        "theirs": t.theirs.iter().map(origin).collect::<Vec<_>>(),
                        "ours": t.ours.iter().map(origin).collect::<Vec<_>>(),
                        "text": t.text,
                    })
                })
                .collect();
            json!({
                "stream": s.stream,
                "fields": fields,
                "counters": counters,
                "texts": texts,
                "events": s.events,
            })
        })
        .collect();
    json!({
        "seq": seq,
        "peer": peer.map(|p| p.to_string()),
        "offline_since_ms": since_ms,
        "reconnected_ms": now_ms,
        "offline_ms": now_ms.saturating_sub(since_ms),
        "own_events": r.own_events,
        "received": r.received,
        "streams": streams,
        "conflicts": r.conflicts,
    })
}

fn origin(o: &Origin) -> Value {
    json!({
        "author": o.author.to_string(),
        "user": o.user,
        "hlc": o.hlc.0,
        "event": o.event.to_string(),
        "kind": o.kind,
    })
}

fn write(w: &Written) -> Value {
    let mut v = origin(&w.origin);
    v["value"] = bytes_value(&w.value);
    v
}

fn changed(c: &Changed) -> Value {
    let mut v = origin(&c.origin);
    v["change"] = match &c.change {
        Change::Add(d) => json!({ "add": d }),
        Change::Init(n) => json!({ "init": n }),
        Change::Transfer { to, amount } => {
            json!({ "transfer": { "to": to.to_string(), "amount": amount } })
        }
        Change::Sold(n) => json!({ "sold": n }),
        Change::Policy(p) => json!({ "policy": policy(p) }),
    };
    v
}

/// `GET /v1/reconnects[?limit=N]`.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new().route("/v1/reconnects", get(list))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
}

async fn list(
    AxState(d): AxState<Arc<Daemon>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => LIMIT_DEFAULT,
        Some(s) => s.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!("limit must be a whole number from 1 to {REPORTS_KEPT}, not {s:?}"),
            )
        })?,
    };
    Ok(Json(
        json!({ "reconnects": d.reconnects().list(limit.min(REPORTS_KEPT)) }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(b: u8) -> NodeId {
        weftlog_proto::Keypair::from_secret([b; 32]).node_id()
    }

    #[test]
    fn periods_survive_a_restart_and_known_peers_open_one_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reconnects::open(dir.path(), 0, 10);
        assert!(r.handle_synced(peer(1)).is_none());
        r.handle_down(peer(2), 5, 100);
        r.handle_down(peer(2), 9, 200);
        drop(r);
        let r = Reconnects::open(dir.path(), 40, 1000);
        let open = r.open_periods();
        assert_eq!(
            open[&peer(2)],
            Period {
                pos: 5,
                since_ms: 100
            }
        );
        assert_eq!(
            open[&peer(1)],
            Period {
                pos: 40,
                since_ms: 1000
            }
        );
        assert_eq!(r.handle_synced(peer(2)).map(|p| p.pos), Some(5));
        // Closed, and known: the next start opens a new one there.
        assert_eq!(
            Reconnects::open(dir.path(), 77, 7).open_periods()[&peer(2)],
            Period {
                pos: 77,
                since_ms: 7
            }
        );
    }

    #[test]
    fn corrupt_and_torn_lines_are_skipped_and_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for seq in 1..=(REPORTS_KEPT + 5) {
            text.push_str(&format!("{}\n", json!({ "seq": seq })));
            if seq == 3 {
                text.push_str("not json\n");
            }
        }
        text.push_str("{\"seq\": 99");
        fs::write(dir.path().join(REPORTS_FILE), text).unwrap();
        let (reports, lines, warnings) = read_reports(dir.path());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(lines, REPORTS_KEPT + 7);
        assert_eq!(reports.len(), REPORTS_KEPT);
        assert_eq!(reports.last().unwrap()["seq"], REPORTS_KEPT + 5);
        let r = Reconnects::open(dir.path(), 0, 0);
        assert_eq!(r.lock().next_seq, REPORTS_KEPT as u64 + 6);
        // An append after a torn line starts a line of its own; past the
        // slack the file is rewritten with the newest kept.
        for _ in 0..REPORTS_SLACK - 6 {
            let mut g = r.lock();
            let seq = g.next_seq;
            g.next_seq += 1;
            r.append(&mut g, &json!({ "seq": seq })).unwrap();
        }
        let (reports, lines, warnings) = read_reports(dir.path());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((reports.len(), lines), (REPORTS_KEPT, REPORTS_KEPT));
        assert_eq!(r.list(2)[0]["seq"], REPORTS_KEPT as u64 + 99);
    }

    #[test]
    fn a_garbled_open_file_is_forgotten_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(OPEN_FILE),
            b"{\"open\": [{\"peer\": 7}], \"known\": [\"zz\"]}",
        )
        .unwrap();
        assert!(Reconnects::open(dir.path(), 0, 0).open_periods().is_empty());
        fs::write(dir.path().join(OPEN_FILE), b"\xff\xfe").unwrap();
        assert!(Reconnects::open(dir.path(), 0, 0).open_periods().is_empty());
    }
}
