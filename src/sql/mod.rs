//! SQL read models: the node's read model mirrored into SQLite or
//! PostgreSQL, kept current from the durable log, for views across streams
//! in the database a team already uses.
//!
//! # The model
//! A [`Mirror`] follows the node's durable feed in log order (never the
//! in-memory state, which may hold events a moment before they are
//! durable). It keeps a [`State`] of its own, folded from the events it has
//! mirrored with the same [`State::insert`] the node's replica uses, so its
//! rows are a function of a prefix of the log. After each batch of events
//! it writes, in ONE transaction: the batch's `events` rows, the rows of
//! every stream the batch touched that changed (`streams`, `fields`,
//! `counters`, `escrow`, `escrow_rights`; a batch that reveals a fork
//! rewrites every stream's rows), and the checkpoint. So the database
//! always holds the read model of exactly the log prefix its checkpoint
//! names: a crash (SIGKILL) at any point loses at most a batch that was
//! never committed, and the mirror resumes from the checkpoint and ends
//! identical to a rebuild from scratch. Late events and conflicts are no
//! special case: the fold gives the stream's new state and its rows are
//! rewritten. The rows render the node's own JSON ([`crate::json`]): the
//! shown value of a field and its standing values are what `weftlog get`
//! shows, by one copy of the rule.
//!
//! # Tables (schema version [`SCHEMA_VERSION`])
//! | table | columns |
//! | --- | --- |
//! | `events` | `position` (key), `id`, `author`, `seq`, `hlc`, `stream`, `kind`, `user_name`, `command_id`, `payload` |
//! | `streams` | `stream` (key), `version` |
//! | `fields` | `stream`, `field` (key), `value` (the shown value), `conflict`, `standing` (every standing write, shown first) |
//! | `counters` | `stream`, `counter` (key), `value` |
//! | `escrow` | `stream`, `counter` (key), `capacity`, `consumed` |
//! | `escrow_rights` | `stream`, `counter`, `node` (key), `rights` |
//! | `weftlog_checkpoint` | one row: `node`, `epoch`, `position`, `event_id`, `state_hash`, `hash_position`, `schema_version` |
//!
//! Values, standing writes and payloads are JSON text (`JSONB` in
//! PostgreSQL): a value that is JSON as is, anything else as
//! `{"hex": …}`, the node's rendering. Counters are 128-bit: `NUMERIC` in
//! PostgreSQL; in SQLite an integer while it fits 64 bits, else its decimal
//! text (the columns have no declared type, so SQLite keeps either as
//! given). So is `hlc`, a u64. `state_hash` is the node's state hash
//! ([`State::state_hash`]) of the mirrored state at `hash_position`
//! (at most `position`): hashing the whole state after every small batch
//! would cost more than the batch, so it is taken at most every
//! [`HASH_INTERVAL`] and whenever the mirror stops.
//!
//! # Resuming
//! On start the mirror reads the checkpoint, folds the node's log up to its
//! position (local and fast: no writes) and checks it: the same schema
//! version, node and log epoch, the log at least that long, the event at
//! that position the one recorded, and the state hash at `hash_position`
//! the one recorded. Any mismatch is logged with its reason and the mirror
//! rebuilds from scratch: it drops its tables and mirrors the whole log.
//! A later schema version rebuilds the same way, and may add tables (for
//! example oversold sales, text fields, duplicates, forks) without a
//! migration.
//!
//! Every commit moves the checkpoint only from the position it read
//! (`UPDATE … WHERE position = old`): a second mirror writing the same
//! database is refused rather than interleaved.

mod postgres;
mod sqlite;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use weftlog_proto::state::Stream;
use weftlog_proto::{Event, EventId, State};

use crate::json;
use crate::node::{wall_ms, Node};
use crate::subscribe::{Positioned, ReadError, READ_CHUNK};

/// The schema this build writes. A database with another version is
/// rebuilt from scratch.
pub const SCHEMA_VERSION: u32 = 1;

/// Events one transaction mirrors at most (catch-up writes in batches of
/// this many; a live batch is one group commit of the node, at most this).
pub const MAX_BATCH_EVENTS: usize = 8192;

/// The state hash in the checkpoint is refreshed at most this often while
/// the mirror runs (and always when it stops).
pub const HASH_INTERVAL: Duration = Duration::from_millis(1000);

/// How often `weftlog sql` reports progress on stderr in a long run.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The name of the default SQLite file in a data directory (`run --sql`
/// without a URL).
pub const DEFAULT_DB: &str = "read.db";

/// Where the read model goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `sqlite:PATH`: an embedded database file.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: a PostgreSQL connection string.
    Postgres(String),
}

impl Url {
    /// Parses `sqlite:PATH`, `postgres://…` or `postgresql://…`.
    pub fn parse(s: &str) -> Result<Url, SqlError> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(SqlError::Url(s.to_string()));
            }
            return Ok(Url::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Url::Postgres(s.to_string()));
        }
        Err(SqlError::Url(s.to_string()))
    }

    /// `sqlite:<dir>/read.db`, the default of `run --sql`.
    pub fn default_for(dir: &Path) -> Url {
        Url::Sqlite(dir.join(DEFAULT_DB))
    }
}

impl fmt::Display for Url {
    /// The URL without a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Url::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Url::Postgres(s) => f.write_str(&redact(s)),
        }
    }
}

/// A PostgreSQL URL with its password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Why mirroring failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlError {
    /// The URL is neither `sqlite:PATH` nor `postgres://…`.
    #[error("{0:?} is not a read model URL: use sqlite:PATH or postgres://USER@HOST/DB")]
    Url(String),
    /// SQLite failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// A durable event did not fold (the log is damaged or not this build's).
    #[error("the event at log position {position} does not fold: {why}")]
    Fold {
        /// Its position.
        position: u64,
        /// Why.
        why: String,
    },
    /// The durable log could not be read.
    #[error("reading the log: {0}")]
    Read(String),
    /// The checkpoint row moved under this mirror: another process writes
    /// the same database.
    #[error("the checkpoint in the database is not at position {expected}: another mirror writes this database; run one mirror per database")]
    Concurrent {
        /// Where this mirror left it.
        expected: u64,
    },
    /// The database holds something this build cannot read as its own.
    #[error("the database's checkpoint is unreadable: {0}")]
    Checkpoint(String),
    /// The mirror's thread could not be started.
    #[error("cannot start the mirror thread: {0}")]
    Thread(std::io::Error),
    /// A thread of the mirror ended unexpectedly (it panicked).
    #[error("a thread of the SQL mirror ended unexpectedly")]
    Panicked,
    /// A number does not fit the column.
    #[error("{what} {value} does not fit the database")]
    Range {
        /// The column.
        what: &'static str,
        /// The value.
        value: String,
    },
}

/// The checkpoint row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The node whose log is mirrored.
    pub node: String,
    /// The log's epoch (16 hex digits).
    pub epoch: String,
    /// Events mirrored: the log position of the last one (0: none).
    pub position: u64,
    /// The id of the event at `position` (empty at 0).
    pub event_id: String,
    /// The state hash (hex) of the mirrored state at `hash_position`.
    pub state_hash: String,
    /// Where `state_hash` was taken.
    pub hash_position: u64,
    /// The schema version the rows follow.
    pub schema_version: u32,
}

/// One `events` row.
#[derive(Clone, Debug)]
pub(crate) struct EventRow {
    pub position: u64,
    pub id: String,
    pub author: String,
    pub seq: u64,
    pub hlc: u64,
    pub stream: String,
    pub kind: String,
    pub user: Option<String>,
    pub command_id: Option<String>,
    pub payload: Option<String>,
}

/// One `fields` row's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldRow {
    /// The shown value, JSON.
    pub value: String,
    pub conflict: bool,
    /// Every standing write, shown first, JSON.
    pub standing: String,
}

/// The rows one stream has in the database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct StreamRows {
    version: u64,
    fields: BTreeMap<String, FieldRow>,
    counters: BTreeMap<String, i128>,
    escrow: BTreeMap<String, (u128, u128)>,
    rights: BTreeMap<(String, String), u128>,
}

impl StreamRows {
    /// The rows of `s`, as the node renders it ([`json`]).
    fn of(s: &Stream) -> StreamRows {
        let fields = s
            .fields
            .iter()
            .filter_map(|(f, writes)| {
                let standing = json::conflict_values(writes);
                let value = standing.first()?.get("value")?.to_string();
                Some((
                    f.clone(),
                    FieldRow {
                        value,
                        conflict: standing.len() > 1,
                        standing: Value::Array(standing).to_string(),
                    },
                ))
            })
            .collect();
        let mut rights = BTreeMap::new();
        for (c, e) in &s.escrow {
            for (n, a) in &e.accounts {
                rights.insert((c.clone(), n.to_string()), a.rights());
            }
        }
        StreamRows {
            version: s.version,
            fields,
            counters: s.counters.clone(),
            escrow: s
                .escrow
                .iter()
                .map(|(c, e)| (c.clone(), (e.capacity, e.consumed)))
                .collect(),
            rights,
        }
    }
}

/// An escrow counter's `(capacity, consumed)`.
pub(crate) type Capacity = (u128, u128);

/// What one transaction writes: rows to put (`Some`) or delete (`None`),
/// and the checkpoint it moves to.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub events: Vec<EventRow>,
    pub streams: Vec<(String, u64)>,
    pub fields: Vec<(String, String, Option<FieldRow>)>,
    pub counters: Vec<(String, String, Option<i128>)>,
    pub escrow: Vec<(String, String, Option<Capacity>)>,
    pub rights: Vec<(String, String, String, Option<u128>)>,
}

/// Puts what differs between `old` and `new` into `out`.
fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut out: impl FnMut(K, Option<V>),
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out(k.clone(), Some(v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out(k.clone(), None);
        }
    }
}

/// A database the mirror writes: SQLite or PostgreSQL.
pub(crate) trait Backend: Send {
    /// The checkpoint, if the tables exist. `Err(Checkpoint)` if they exist
    /// but cannot be read as this build's.
    fn checkpoint(&mut self) -> Result<Option<Checkpoint>, SqlError>;
    /// Empties every mirror table (creating those missing), with the
    /// checkpoint `start`. `drop` drops the tables first (a database of
    /// another schema version): views that users built on them keep
    /// working across an ordinary rebuild, not across that.
    fn reset(&mut self, start: &Checkpoint, drop: bool) -> Result<(), SqlError>;
    /// Writes `changes` and moves the checkpoint from `from` to `to`, in
    /// one transaction.
    fn commit(&mut self, from: u64, changes: &Changes, to: &Checkpoint) -> Result<(), SqlError>;
    /// Every row of `sql`'s result, each column as text (NULL: `None`).
    fn query_text(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SqlError>;
}

fn connect(url: &Url) -> Result<Box<dyn Backend>, SqlError> {
    Ok(match url {
        Url::Sqlite(path) => Box::new(sqlite::Sqlite::open(path)?),
        Url::Postgres(s) => Box::new(postgres::Postgres::open(s)?),
    })
}

/// The mirror tables, in the order they are dropped.
pub const TABLES: [&str; 7] = [
    "events",
    "streams",
    "fields",
    "counters",
    "escrow",
    "escrow_rights",
    "weftlog_checkpoint",
];

/// Every mirror table's rows as text, each ordered by its key: the whole
/// database, for comparing two mirrors (the checkpoint's `hash_position`
/// left out: where the hash was last taken depends on timing).
pub type Dump = BTreeMap<String, Vec<Vec<Option<String>>>>;

/// Reads every mirror table of the database at `url` ([`Dump`]).
pub fn dump(url: &Url) -> Result<Dump, SqlError> {
    let mut db = connect(url)?;
    let queries: [(&str, &str); 7] = [
        ("events", "SELECT CAST(position AS TEXT), id, author, CAST(seq AS TEXT), CAST(hlc AS TEXT), stream, kind, user_name, command_id, CAST(payload AS TEXT) FROM events ORDER BY position"),
        ("streams", "SELECT stream, CAST(version AS TEXT) FROM streams ORDER BY stream"),
        ("fields", "SELECT stream, field, CAST(value AS TEXT), CAST(conflict AS TEXT), CAST(standing AS TEXT) FROM fields ORDER BY stream, field"),
        ("counters", "SELECT stream, counter, CAST(value AS TEXT) FROM counters ORDER BY stream, counter"),
        ("escrow", "SELECT stream, counter, CAST(capacity AS TEXT), CAST(consumed AS TEXT) FROM escrow ORDER BY stream, counter"),
        ("escrow_rights", "SELECT stream, counter, node, CAST(rights AS TEXT) FROM escrow_rights ORDER BY stream, counter, node"),
        ("weftlog_checkpoint", "SELECT node, epoch, CAST(position AS TEXT), event_id, state_hash, CAST(schema_version AS TEXT) FROM weftlog_checkpoint"),
    ];
    let mut out = Dump::new();
    for (table, sql) in queries {
        out.insert(table.to_string(), db.query_text(sql)?);
    }
    Ok(out)
}

/// The checkpoint of the database at `url`: `None` if it holds no mirror.
pub fn checkpoint(url: &Url) -> Result<Option<Checkpoint>, SqlError> {
    connect(url)?.checkpoint()
}

/// The epoch of `node`'s log, 16 hex digits ([`Node::epoch`]).
pub fn log_epoch(node: &Node) -> String {
    node.epoch().to_string()
}

/// Lowercase hex of 32 bytes, as ids print (`EventId`'s and `NodeId`'s
/// `Display`), without the formatter's cost per byte.
fn hex64(b: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(64);
    for x in b {
        out.push(DIGITS[(x >> 4) as usize]);
        out.push(DIGITS[(x & 15) as usize]);
    }
    // Invariant: only ASCII hex digits were pushed.
    String::from_utf8(out).expect("hex is ASCII")
}

/// Bytes as a JSON column: the text itself when it is JSON (the node's
/// rule, [`json::bytes_value`], without parsing it into a tree), else the
/// node's `{"hex": …}` form.
fn json_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => text.to_string(),
        _ => json::bytes_value(bytes).to_string(),
    }
}

fn hex32(h: [u8; 32]) -> String {
    json::hex(&h)
}

/// How far a running mirror is behind the durable log, for metrics
/// (`weftlog_sql_lag_events`, `weftlog_sql_lag_ms`). Shared between the
/// mirror's thread and readers; every read is a snapshot.
#[derive(Debug, Default)]
pub struct SqlLag {
    /// Durable events the mirror knows of (log position).
    durable: AtomicU64,
    /// Events committed to the database (log position).
    mirrored: AtomicU64,
    /// Wall ms since when the mirror has been behind (0: it is not).
    behind_since_ms: AtomicU64,
}

impl SqlLag {
    /// Durable events not yet mirrored.
    pub fn events(&self) -> u64 {
        self.durable
            .load(Ordering::Acquire)
            .saturating_sub(self.mirrored.load(Ordering::Acquire))
    }

    /// How long the oldest durable event not yet mirrored has waited (ms);
    /// 0 when the mirror is current.
    pub fn ms(&self) -> u64 {
        match self.behind_since_ms.load(Ordering::Acquire) {
            0 => 0,
            t => wall_ms().saturating_sub(t),
        }
    }

    /// Durable events not yet mirrored when the log's durable end is
    /// `durable_pos` ([`Node::durable_pos`]): what metrics export as
    /// `weftlog_sql_lag_events`, current even while the mirror waits.
    pub fn events_behind(&self, durable_pos: u64) -> u64 {
        self.durable_at(durable_pos);
        durable_pos.saturating_sub(self.mirrored())
    }

    /// The log position mirrored so far.
    pub fn mirrored(&self) -> u64 {
        self.mirrored.load(Ordering::Acquire)
    }

    fn durable_at(&self, pos: u64) {
        if self.durable.load(Ordering::Acquire) <= self.mirrored.load(Ordering::Acquire)
            && pos > self.mirrored.load(Ordering::Acquire)
        {
            self.behind_since_ms
                .store(wall_ms().max(1), Ordering::Release);
        }
        self.durable.fetch_max(pos, Ordering::AcqRel);
    }

    fn mirrored_at(&self, pos: u64) {
        self.mirrored.store(pos, Ordering::Release);
        self.durable.fetch_max(pos, Ordering::AcqRel);
        if pos >= self.durable.load(Ordering::Acquire) {
            self.behind_since_ms.store(0, Ordering::Release);
        }
    }
}

/// A write the writer thread carries out.
enum Job {
    /// [`Backend::reset`].
    Reset(Checkpoint, bool),
    /// [`Backend::commit`] from the position given.
    Commit(u64, Changes, Checkpoint),
}

/// Transactions queued for the writer at most: folding the next batch
/// overlaps committing this one, and no more.
const WRITER_QUEUE: usize = 1;

/// The thread that writes the database, in order, one transaction per
/// job, so folding and rendering the next batch overlaps the commit of
/// this one. It stops at the first failure, which the next
/// [`Writer::send`] or [`Writer::flush`] returns.
struct Writer {
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    acks: std::sync::mpsc::Receiver<Result<(), SqlError>>,
    in_flight: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mut db: Box<dyn Backend>, lag: Arc<SqlLag>) -> Result<Writer, SqlError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(WRITER_QUEUE);
        let (ack, acks) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("weftlog-sql-write".into())
            .spawn(move || {
                for job in rx {
                    let r = match job {
                        Job::Reset(start, drop) => db.reset(&start, drop),
                        Job::Commit(from, changes, to) => db
                            .commit(from, &changes, &to)
                            .map(|()| lag.mirrored_at(to.position)),
                    };
                    let failed = r.is_err();
                    if ack.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(SqlError::Thread)?;
        Ok(Writer {
            jobs: Some(jobs),
            acks,
            in_flight: 0,
            thread: Some(thread),
        })
    }

    /// Queues `job` (waiting while the queue is full); returns a failure
    /// of an earlier job, if one is known.
    fn send(&mut self, job: Job) -> Result<(), SqlError> {
        self.poll()?;
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            // The thread stopped: its failure, or that it vanished.
            self.flush()?;
            return Err(SqlError::Panicked);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Takes the answers that have arrived.
    fn poll(&mut self) -> Result<(), SqlError> {
        while let Ok(r) = self.acks.try_recv() {
            self.in_flight -= 1;
            r?;
        }
        Ok(())
    }

    /// Waits until every queued job is committed.
    fn flush(&mut self) -> Result<(), SqlError> {
        while self.in_flight > 0 {
            match self.acks.recv() {
                Ok(r) => {
                    self.in_flight -= 1;
                    r?;
                }
                Err(_) => return Err(SqlError::Panicked),
            }
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written the rest.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What opening a mirror found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Resumed at the checkpoint's position.
    Resumed(u64),
    /// Started from scratch, for the reason given (a new database, `--rebuild`,
    /// or a checkpoint that does not match the log).
    Rebuilt(String),
}

/// The read model of one node's log in one database; see the module docs.
pub struct Mirror {
    writer: Writer,
    url: Url,
    state: State,
    rows: BTreeMap<String, StreamRows>,
    forks: usize,
    /// The checkpoint as committed.
    at: Checkpoint,
    /// Events folded but not yet committed, and the streams they touched.
    pending: Vec<EventRow>,
    touched: BTreeSet<String>,
    hashed_at: Instant,
    lag: Arc<SqlLag>,
}

impl Mirror {
    /// Connects to `url` and brings the mirror to the checkpoint there:
    /// resumes if it matches `node`'s log (see the module docs), else, or
    /// with `rebuild`, starts from scratch. Then mirrors the rest of the
    /// durable log, reporting progress to `progress` (events done, total).
    pub fn open(
        node: &Node,
        url: &Url,
        rebuild: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(Mirror, Start), SqlError> {
        let mut db = connect(url)?;
        let epoch = log_epoch(node);
        let (found, unreadable) = match db.checkpoint() {
            Ok(c) => (c, false),
            Err(SqlError::Checkpoint(why)) => {
                tracing::warn!(url = %url, "{why}: rebuilding the read model");
                (None, true)
            }
            Err(e) => return Err(e),
        };
        let drop = unreadable
            || found
                .as_ref()
                .is_some_and(|c| c.schema_version != SCHEMA_VERSION);
        let mut why = if rebuild {
            Some("asked to rebuild".to_string())
        } else {
            match &found {
                None => Some("a new database".to_string()),
                Some(c) if c.schema_version != SCHEMA_VERSION => Some(format!(
                    "schema version {} in the database, this build writes {SCHEMA_VERSION}",
                    c.schema_version
                )),
                Some(c) if c.node != node.id().to_string() => {
                    Some(format!("the database mirrors node {}", c.node))
                }
                Some(c) if c.epoch != epoch => Some(format!(
                    "the log's epoch is {epoch}, the database's {} (the log was restored or repaired)",
                    c.epoch
                )),
                Some(_) => None,
            }
        };
        let lag = Arc::new(SqlLag::default());
        let mut mirror = Mirror {
            writer: Writer::start(db, lag.clone())?,
            url: url.clone(),
            state: State::new(),
            rows: BTreeMap::new(),
            forks: 0,
            at: Checkpoint {
                node: node.id().to_string(),
                epoch,
                position: 0,
                event_id: String::new(),
                state_hash: hex32(State::new().state_hash()),
                hash_position: 0,
                schema_version: SCHEMA_VERSION,
            },
            pending: Vec::new(),
            touched: BTreeSet::new(),
            hashed_at: Instant::now(),
            lag,
        };
        let total = node.with_state(|s| s.len());
        if why.is_none() {
            // Invariant: `why` is None only when a checkpoint was found.
            let c = found.clone().expect("a checkpoint to resume from");
            match mirror.resume(node, &c, total, &mut progress)? {
                None => {
                    mirror.writer.flush()?;
                    tracing::info!(url = %url, position = c.position, "read model resumed");
                    return Ok((mirror, Start::Resumed(c.position)));
                }
                Some(reason) => why = Some(reason),
            }
        }
        let why = why.unwrap_or_default();
        tracing::info!(url = %url, "read model built from scratch: {why}");
        mirror.state = State::new();
        mirror.rows.clear();
        mirror.forks = 0;
        mirror.pending.clear();
        mirror.touched.clear();
        mirror.at.position = 0;
        mirror.at.event_id.clear();
        mirror.at.hash_position = 0;
        mirror.at.state_hash = hex32(State::new().state_hash());
        mirror.writer.send(Job::Reset(mirror.at.clone(), drop))?;
        mirror.catch_up(node, total, &mut progress)?;
        mirror.writer.flush()?;
        Ok((mirror, Start::Rebuilt(why)))
    }

    /// Folds the log up to `c.position`, checks it against `c`, then
    /// mirrors the rest. `Some(reason)` if the checkpoint does not match
    /// (nothing was written then).
    fn resume(
        &mut self,
        node: &Node,
        c: &Checkpoint,
        total: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Option<String>, SqlError> {
        if c.hash_position == 0 {
            let empty = hex32(State::new().state_hash());
            if c.state_hash != empty {
                return Ok(Some(format!(
                    "the state hash at position 0 is {empty}, the database recorded {}",
                    c.state_hash
                )));
            }
        }
        if c.position == 0 {
            self.at = c.clone();
        }
        let pos = self.run_log(node, Some(c), total, progress)?;
        match pos {
            Err(why) => return Ok(Some(why)),
            Ok(end) if end < c.position => {
                return Ok(Some(format!(
                    "the log holds {end} events, the database mirrors {}",
                    c.position
                )));
            }
            Ok(_) => {}
        }
        self.commit(true)?;
        Ok(None)
    }

    /// Mirrors the whole durable log from position 0.
    fn catch_up(
        &mut self,
        node: &Node,
        total: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), SqlError> {
        // Invariant: without a checkpoint to check there is no mismatch.
        let _ = self.run_log(node, None, total, progress)?;
        self.commit(true)
    }

    /// Reads the durable log from the start in chunks (no lock held while
    /// the database is written): folds the events up to the checkpoint
    /// `check` (if any) and checks it there, then mirrors the rest in
    /// batches. Returns the last position read, or why the checkpoint does
    /// not match (then nothing was written).
    fn run_log(
        &mut self,
        node: &Node,
        check: Option<&Checkpoint>,
        total: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Result<u64, String>, SqlError> {
        let upto = check.map_or(0, |c| c.position);
        let mut pos = 0u64;
        let mut last = Instant::now();
        loop {
            let chunk = node
                .read_from(pos, READ_CHUNK)
                .map_err(|e| SqlError::Read(e.to_string()))?;
            if chunk.is_empty() {
                return Ok(Ok(pos));
            }
            for e in chunk {
                pos = e.pos;
                let event = decode(&e)?;
                if pos > upto {
                    self.push(pos, &event, e.id)?;
                    if self.pending.len() >= MAX_BATCH_EVENTS {
                        self.commit(false)?;
                    }
                    continue;
                }
                self.state
                    .insert(&event, e.id)
                    .map_err(|why| SqlError::Fold {
                        position: pos,
                        why: why.to_string(),
                    })?;
                // Invariant: `upto > 0` only with a checkpoint.
                let Some(c) = check else { continue };
                if pos == c.position && e.id.to_string() != c.event_id {
                    return Ok(Err(format!(
                        "the event at position {pos} is {}, the database recorded {}",
                        e.id, c.event_id
                    )));
                }
                if pos == c.hash_position {
                    let h = hex32(self.state.state_hash());
                    if h != c.state_hash {
                        return Ok(Err(format!(
                            "the state hash at position {pos} is {h}, the database recorded {}",
                            c.state_hash
                        )));
                    }
                }
                if pos == c.position {
                    self.at = c.clone();
                    self.lag.mirrored_at(c.position);
                    self.rows = self
                        .state
                        .streams()
                        .iter()
                        .map(|(n, s)| (n.clone(), StreamRows::of(s)))
                        .collect();
                    self.forks = self.state.forks().len();
                }
            }
            if last.elapsed() >= PROGRESS_INTERVAL {
                progress(pos, total);
                last = Instant::now();
            }
        }
    }

    /// Folds the event at `position` and queues its row.
    fn push(&mut self, position: u64, event: &Event, id: EventId) -> Result<(), SqlError> {
        debug_assert_eq!(position, self.at.position + self.pending.len() as u64 + 1);
        self.state.insert(event, id).map_err(|e| SqlError::Fold {
            position,
            why: e.to_string(),
        })?;
        self.touched.insert(event.stream.clone());
        self.pending.push(EventRow {
            position,
            id: hex64(&id.0),
            author: hex64(&event.author.0),
            seq: event.seq,
            hlc: event.hlc.0,
            stream: event.stream.clone(),
            kind: event.kind.clone(),
            user: event.meta.user.clone(),
            command_id: event.meta.command_id.clone(),
            payload: (!event.payload.is_empty()).then(|| json_text(&event.payload)),
        });
        Ok(())
    }

    /// Commits the pending events, the rows they changed and the
    /// checkpoint in one transaction. `hash` takes the state hash now;
    /// otherwise it is taken if [`HASH_INTERVAL`] has passed.
    fn commit(&mut self, hash: bool) -> Result<(), SqlError> {
        let hash = hash || self.hashed_at.elapsed() >= HASH_INTERVAL;
        if self.pending.is_empty() && !(hash && self.at.hash_position != self.at.position) {
            return Ok(());
        }
        let mut changes = Changes {
            events: std::mem::take(&mut self.pending),
            ..Changes::default()
        };
        let forks = self.state.forks().len();
        let touched: Vec<String> = if forks != self.forks {
            // A fork may change rights on any stream the author spent on.
            self.forks = forks;
            self.state.streams().keys().cloned().collect()
        } else {
            std::mem::take(&mut self.touched).into_iter().collect()
        };
        self.touched.clear();
        for name in touched {
            let new = self
                .state
                .stream(&name)
                .map(StreamRows::of)
                .unwrap_or_default();
            let old = self.rows.remove(&name).unwrap_or_default();
            if new.version != old.version {
                changes.streams.push((name.clone(), new.version));
            }
            diff(&old.fields, &new.fields, |f, v| {
                changes.fields.push((name.clone(), f, v))
            });
            diff(&old.counters, &new.counters, |c, v| {
                changes.counters.push((name.clone(), c, v))
            });
            diff(&old.escrow, &new.escrow, |c, v| {
                changes.escrow.push((name.clone(), c, v))
            });
            diff(&old.rights, &new.rights, |(c, n), v| {
                changes.rights.push((name.clone(), c, n, v))
            });
            self.rows.insert(name, new);
        }
        let mut to = self.at.clone();
        if let Some(last) = changes.events.last() {
            to.position = last.position;
            to.event_id = last.id.clone();
        }
        if hash {
            to.state_hash = hex32(self.state.state_hash());
            to.hash_position = to.position;
            self.hashed_at = Instant::now();
        }
        let from = self.at.position;
        self.at = to.clone();
        self.writer.send(Job::Commit(from, changes, to))
    }

    /// The checkpoint as committed.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.at
    }

    /// The database this mirror writes.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The lag readers (metrics) see.
    pub fn lag(&self) -> Arc<SqlLag> {
        self.lag.clone()
    }

    /// Mirrors events the subscription delivered (the next positions).
    fn handle_events(&mut self, events: Vec<Positioned>) -> Result<(), SqlError> {
        for e in events {
            let event = decode(&e)?;
            self.push(e.pos, &event, e.id)?;
            if self.pending.len() >= MAX_BATCH_EVENTS {
                self.commit(false)?;
            }
        }
        Ok(())
    }

    /// The position of the last event folded (committed or pending).
    fn folded(&self) -> u64 {
        self.at.position + self.pending.len() as u64
    }
}

/// The event a log read delivered.
fn decode(e: &Positioned) -> Result<Event, SqlError> {
    Event::decode_trusted(&e.bytes).map_err(|why| SqlError::Fold {
        position: e.pos,
        why: why.to_string(),
    })
}

/// `weftlog sql`: mirrors `node`'s durable log into `url` up to its end,
/// resuming at the checkpoint (or from scratch with `rebuild`), with
/// progress on stderr for long runs. Returns the checkpoint reached and
/// how the mirror started.
pub fn mirror_once(node: &Node, url: &Url, rebuild: bool) -> Result<(Checkpoint, Start), SqlError> {
    let started = Instant::now();
    let (mut mirror, start) = Mirror::open(node, url, rebuild, |done, total| {
        let s = started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "weftlog sql: {done}/{total} events mirrored ({:.0} events/s)",
            done as f64 / s
        );
    })?;
    mirror.commit(true)?;
    mirror.writer.flush()?;
    Ok((mirror.at.clone(), start))
}

/// A mirror running live beside a node (`weftlog run --sql`): a thread
/// that follows the node's durable log ([`Node::subscribe_from`]) and
/// commits what each wake-up finds in one transaction. Stop it with
/// [`Live::stop`].
pub struct Live {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<(), SqlError>>>,
    lag: Arc<SqlLag>,
}

/// What ended the live loop.
enum Followed {
    /// Asked to stop, or the node closed: everything durable is committed.
    Stopped,
    /// The log's epoch changed under the mirror: open it again (it
    /// rebuilds).
    EpochChanged(String),
}

impl Live {
    /// Catches up with `node`'s durable log (resuming at the checkpoint)
    /// on the calling thread, then follows it on a thread of its own; `rt`
    /// runs the waits.
    pub fn start(node: Arc<Node>, url: &Url, rt: tokio::runtime::Handle) -> Result<Live, SqlError> {
        let progress = |done, total| tracing::info!(done, total, "read model catching up");
        let (mut mirror, start) = Mirror::open(&node, url, false, progress)?;
        tracing::info!(url = %url, ?start, position = mirror.at.position, "read model mirroring live");
        let lag = mirror.lag();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let url = url.clone();
        let thread = std::thread::Builder::new()
            .name("weftlog-sql".into())
            .spawn(move || loop {
                match follow(&mut mirror, &node, &mut stopped, &rt) {
                    Ok(Followed::Stopped) => return Ok(()),
                    Ok(Followed::EpochChanged(why)) => {
                        tracing::warn!("SQL mirror: {why}; rebuilding");
                        let lag = mirror.lag();
                        drop(mirror);
                        mirror = match Mirror::open(&node, &url, false, progress) {
                            Ok((m, _)) => m,
                            Err(e) => {
                                tracing::error!("SQL mirror into {url} stopped: {e}");
                                return Err(e);
                            }
                        };
                        // Readers keep the handle they were given.
                        mirror.lag = lag;
                        mirror.lag.mirrored_at(mirror.at.position);
                    }
                    Err(e) => {
                        tracing::error!("SQL mirror into {url} stopped: {e}");
                        return Err(e);
                    }
                }
            })
            .map_err(SqlError::Thread)?;
        Ok(Live {
            stop,
            thread: Some(thread),
            lag,
        })
    }

    /// The mirror's lag, for metrics.
    pub fn lag(&self) -> Arc<SqlLag> {
        self.lag.clone()
    }

    /// Stops the mirror: it commits what is durable, with a final
    /// checkpoint, and its thread ends. Returns the error that stopped it
    /// earlier, if one did.
    pub fn stop(mut self) -> Result<(), SqlError> {
        self.stop.send_replace(true);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(SqlError::Panicked),
            None => Ok(()),
        }
    }

    /// Whether the mirror's thread has ended (an error stopped it).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// The live mirror's loop: each wake-up takes every event the
/// subscription has ready and commits them in one transaction; on stop,
/// what is durable by then, and the final checkpoint with its hash.
fn follow(
    mirror: &mut Mirror,
    node: &Node,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
    rt: &tokio::runtime::Handle,
) -> Result<Followed, SqlError> {
    let mut sub = node.subscribe_from(mirror.folded());
    if sub.epoch().to_string() != mirror.at.epoch {
        return Ok(Followed::EpochChanged(format!(
            "the log's epoch is {}, the mirror's {}",
            sub.epoch(),
            mirror.at.epoch
        )));
    }
    loop {
        let next = rt.block_on(async {
            tokio::select! {
                b = sub.next_batch() => Some(b),
                _ = stopped.wait_for(|s| *s) => None,
            }
        });
        match next {
            None | Some(None) => break,
            Some(Some(Err(ReadError::EpochChanged { was, now }))) => {
                mirror.commit(true)?;
                mirror.writer.flush()?;
                return Ok(Followed::EpochChanged(format!(
                    "the log's epoch changed from {was} to {now}"
                )));
            }
            Some(Some(Err(e))) => return Err(SqlError::Read(e.to_string())),
            Some(Some(Ok(events))) => {
                let durable = node.durable_pos();
                mirror.lag.durable_at(durable);
                mirror.handle_events(events)?;
                mirror.commit(false)?;
            }
        }
    }
    // Stopping: what is durable now, then the final checkpoint.
    loop {
        let chunk = node
            .read_from(mirror.folded(), READ_CHUNK)
            .map_err(|e| SqlError::Read(e.to_string()))?;
        if chunk.is_empty() {
            break;
        }
        mirror.handle_events(chunk)?;
    }
    mirror.commit(true)?;
    mirror.writer.flush()?;
    Ok(Followed::Stopped)
}

/// The numbers of the 128-bit columns, as text where they do not fit 64
/// bits.
pub(crate) enum Num {
    Int(i64),
    Text(String),
}

impl Num {
    pub fn of(n: i128) -> Num {
        i64::try_from(n).map_or_else(|_| Num::Text(n.to_string()), Num::Int)
    }
}

/// `n` as an `i64` column, or why it does not fit.
pub(crate) fn int64(what: &'static str, n: u64) -> Result<i64, SqlError> {
    i64::try_from(n).map_err(|_| SqlError::Range {
        what,
        value: n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_passwords() {
        assert_eq!(
            Url::parse("sqlite:/tmp/r.db").unwrap(),
            Url::Sqlite("/tmp/r.db".into())
        );
        assert_eq!(
            Url::parse("sqlite:///tmp/r.db").unwrap(),
            Url::Sqlite("/tmp/r.db".into())
        );
        assert!(Url::parse("sqlite:").is_err());
        assert!(Url::parse("mysql://x").is_err());
        let pg = Url::parse("postgres://u:secret@localhost/db").unwrap();
        assert_eq!(pg.to_string(), "postgres://u:***@localhost/db");
    }

    #[test]
    fn hex_and_json_text_match_the_node_rendering() {
        let id = EventId([0xa5; 32]);
        assert_eq!(hex64(&id.0), id.to_string());
        assert_eq!(json_text(br#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(
            json_text(&[0xff, 0]),
            json::bytes_value(&[0xff, 0]).to_string()
        );
        assert_eq!(
            json_text(b"not json"),
            json::bytes_value(b"not json").to_string()
        );
    }

    #[test]
    fn diff_puts_changed_and_deletes_gone() {
        let old: BTreeMap<&str, i32> = [("a", 1), ("b", 2)].into();
        let new: BTreeMap<&str, i32> = [("b", 3), ("c", 4)].into();
        let mut out = Vec::new();
        diff(&old, &new, |k, v| out.push((k, v)));
        assert_eq!(out, vec![("b", Some(3)), ("c", Some(4)), ("a", None)]);
    }

    #[test]
    fn lag_counts_what_is_durable_and_not_mirrored() {
        let lag = SqlLag::default();
        assert_eq!((lag.events(), lag.ms()), (0, 0));
        lag.durable_at(5);
        assert_eq!(lag.events(), 5);
        lag.mirrored_at(5);
        assert_eq!((lag.events(), lag.ms()), (0, 0));
    }
}
