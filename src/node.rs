//! A node: its key, its durable log and its [`Replica`], with group commit.
//!
//! Every rule between a command or a received event and the log is the
//! replica's ([`weftlog_proto::replica`]: the fold, the clock, pending
//! records, batching and signing, the durable and signed indexes, imports,
//! the store sync sessions use). This file is the shell around it: threads,
//! files, the hand-off between them, replies and the feed.
//!
//! Appenders (threads, or async tasks through [`Node::append_async`]) hand
//! requests to a committer thread through a bounded queue and wait for the
//! reply. The committer drains every request that has arrived and hands
//! each to the replica (so later requests in a batch see earlier ones);
//! each reply waits for the replica's [`Mark`] at that moment to become
//! durable. A writer thread takes the next batch from the replica
//! ([`Replica::poll_batch`]) whenever the one before is durable, writes its
//! frames, makes them durable with one `fdatasync`, tells the replica
//! ([`Replica::handle_durable`]), and only then replies; so the CPU work of
//! one batch overlaps the sync of the one before, and batches grow with
//! load. When nothing else waits, the committer syncs a batch itself,
//! saving the hop. Batches become durable, and are acknowledged, in order.
//! A failed write or sync is fatal: the replica refuses every later append
//! until the node is reopened (and recovery has decided what is on disk).
//!
//! A full disk is not fatal. When a write or the zero-fill ahead of it
//! fails with `ENOSPC` or `EDQUOT`, the log undoes it (it ends at its last
//! record, on disk too) and the replica keeps the batch
//! ([`weftlog_proto::replica`], "A full disk pauses"). Until the batch is
//! durable: appends and imports are refused at once with
//! [`AppendError::DiskFull`] / [`NodeImportError::DiskFull`] (nothing of
//! them applied); replies already waiting for the kept batch or for what
//! queued behind it keep waiting, since their events are applied and will
//! be written (they are neither acknowledged nor refused; a client that
//! gives up and retries with the same command id is refused while the disk
//! is full and gets the existing event once it is durable); a flush fails
//! at once with [`AppendError::DiskFull`] (it applied nothing); events
//! received by sync are applied and queued, and neither advertised nor
//! acknowledged. The writer tries the kept batch again every
//! [`DISK_FULL_RETRY`]; once it is durable everything continues by itself,
//! in order. [`Node::disk_full`] says since when. A node closed while the
//! disk is full tries once more, then answers the replies still waiting
//! with an error: those events were never written (nor acknowledged).
//!
//! A node with peers may be asked to hold appends until a peer has
//! confirmed its own log ([`Node::await_confirmation`]; the rule is the
//! replica's, [`weftlog_proto::replica`], "A restored node learns its own
//! log"): the committer then waits, before it hands an append to the
//! replica, until [`Replica::appends_held`] lets it go (a confirmation
//! wakes it, [`Node::handle_own_head`]), so appends are held, never
//! refused; requests queued behind a held append wait with it.
//!
//! A sale refused for want of rights that connected peers hold spare
//! waits for their transfer instead, up to
//! [`weftlog_proto::rebalance::RIGHTS_WAIT_MS`] (the rule is the replica's,
//! [`weftlog_proto::rebalance`], "A refused sale waits for the answer"): the
//! calling task, not the committer, waits, and gives the sale again after
//! each durable batch (received rights become durable in one) and at the
//! deadline, so other requests go on meanwhile. [`Node::rights_wanted`]
//! tells the daemon to send the ask at once.
//!
//! A batch of commands ([`Node::append_many`]) is one request: the
//! committer hands its drafts to the replica one after the other, through
//! the same calls as single appends ([`Replica::handle_append`]: validation,
//! command ids, seat admission), under one hold of the lock, so a later
//! draft sees the effect of the earlier ones and nothing else is applied in
//! between. Each draft gets its own outcome, in order. A refused draft
//! applies nothing and does not stop the others: they are made, and the
//! refused one's error is its outcome, as if the batch had been sent as
//! single appends in that order with nothing between them. (A client that
//! wants all or nothing makes its drafts depend on each other with
//! `expected_version`.) The reply waits for the mark after the last draft,
//! so every event of the batch is acknowledged together, once all are
//! durable; the committer applies a batch only when the records pending
//! leave room for all of it in the next group commit
//! ([`MAX_BATCH_RECORDS`]), so the batch takes one `fdatasync`, shared with
//! whatever else is pending (only a received sync run still open can end a
//! group commit inside it: see [`weftlog_proto::replica`]). A sale in a
//! batch does not wait for rights from peers: it is refused as a held sale
//! is at the end of its wait, with the shortfall named (the ask for rights
//! still goes out).
//!
//! State is updated when an event is made, before it is durable, so readers
//! may see an event a moment before its append is acknowledged. A crash can
//! lose only unacknowledged events.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};

use weftlog_proto::admission::{self, RuleNow};
use weftlog_proto::event::{Compensation, Event, Keypair, Signature};
use weftlog_proto::exchange::{self, ImportError, Incoming, Outgoing};
use weftlog_proto::fork_proof::{BuildError, ForkProof};
use weftlog_proto::log::{self, Log, OpenError, Recovery};
use weftlog_proto::rebalance::Ask;
use weftlog_proto::replica::{self, Access, Batch, Mark, Replica, ReplicaStore};
use weftlog_proto::since::SinceError;
use weftlog_proto::state::{Draft, Fork, PrepareError, State};
use weftlog_proto::sync::Head;
use weftlog_proto::{EventId, NodeId, Op};

use crate::metrics::Metrics;
use crate::storage::{sync_dir, FileStorage};
use crate::subscribe::{Epoch, EpochCell, EPOCH_FILE};

pub use weftlog_proto::replica::{Appended, DiskFull, Imported, OwnFrontier};

/// The secret key file in a data directory.
pub const KEY_FILE: &str = "node.key";
/// The lock file that keeps two processes off one data directory.
pub const LOCK_FILE: &str = "LOCK";
/// The log directory.
pub const LOG_DIR: &str = "log";

/// Why a data directory could not be initialised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A node already lives there.
    #[error("{0} already holds a node (its {KEY_FILE} exists); refusing to overwrite it")]
    Exists(PathBuf),
    /// Filesystem failure.
    #[error("cannot initialise {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// Why a node could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeOpenError {
    /// No key in the directory.
    #[error("no node in {0} (no {KEY_FILE}); run `weftlog init` first")]
    NotInitialised(PathBuf),
    /// Another process holds the directory.
    #[error("{0} is in use by another weftlog process")]
    Locked(PathBuf),
    /// The key file is damaged.
    #[error("{0} is not a 32-byte secret key")]
    BadKey(PathBuf),
    /// Filesystem failure.
    #[error("cannot open {path}: {source}")]
    Io {
        /// What was being opened.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The log failed recovery or verification.
    #[error(transparent)]
    Log(#[from] OpenError),
}

/// Why an append failed. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The command was refused.
    #[error(transparent)]
    Refused(#[from] PrepareError),
    /// A seat policy's admission rule refused a sale, or a staff decision
    /// ([`weftlog_proto::admission`]).
    #[error(transparent)]
    Seats(#[from] admission::Refused),
    /// The log failed earlier or now; the node must be reopened.
    #[error("the log is unusable after a failed write or sync: {0}")]
    Fatal(String),
    /// The disk is full (the storage error): refused, nothing applied.
    /// Appends resume by themselves once space is freed.
    #[error(
        "disk full ({0}): refused, nothing stored; appends resume by themselves when space is freed"
    )]
    DiskFull(String),
}

impl From<replica::AppendError> for AppendError {
    fn from(e: replica::AppendError) -> AppendError {
        match e {
            replica::AppendError::Refused(e) => AppendError::Refused(e),
            replica::AppendError::Seats(e) => AppendError::Seats(e),
            replica::AppendError::Failed(why) => AppendError::Fatal(why),
            replica::AppendError::DiskFull(why) => AppendError::DiskFull(why),
            e => AppendError::Fatal(e.to_string()),
        }
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeImportError {
    /// An event or the file was refused; nothing was stored.
    #[error(transparent)]
    Refused(#[from] ImportError),
    /// The log failed; the node must be reopened.
    #[error("the log is unusable after a failed write or sync: {0}")]
    Fatal(String),
    /// The disk is full (the storage error): refused, nothing stored.
    /// Imports resume by themselves once space is freed.
    #[error(
        "disk full ({0}): refused, nothing stored; imports resume by themselves when space is freed"
    )]
    DiskFull(String),
    /// The file holds events by authors the caller's member list does not
    /// name ([`Node::import_admitting`]): refused at the edge, nothing
    /// stored. The events are valid; the caller may accept them.
    #[error(
        "the file holds events by {} not on the member list: {}; nothing stored (membership gates connections, not validity: accept them with `weftlog import --allow-non-members`, or `POST /v1/import?allow_non_members=true`)",
        plural(.0.len(), "a node", "nodes"),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    NonMembers(Vec<NodeId>),
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The other node's heads were refused (a contradiction or a limit):
    /// nothing was written.
    #[error("the other node's frontier: {0}")]
    Since(#[from] SinceError),
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// A log record is not the event the replica indexed there.
    #[error("log record {record} is not event {id} as indexed")]
    Mismatch {
        /// The record index.
        record: u64,
        /// The event the replica indexed at it.
        id: EventId,
    },
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        one.to_string()
    } else {
        format!("{n} {many}")
    }
}

impl From<replica::ImportError> for NodeImportError {
    fn from(e: replica::ImportError) -> NodeImportError {
        match e {
            replica::ImportError::Refused(e) => NodeImportError::Refused(e),
            replica::ImportError::Failed(why) => NodeImportError::Fatal(why),
            replica::ImportError::DiskFull(why) => NodeImportError::DiskFull(why),
            e => NodeImportError::Fatal(e.to_string()),
        }
    }
}

/// A batch that just became durable, as [`Node::subscribe`] delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The log's epoch when the batch became durable.
    pub epoch: Epoch,
    /// The log position of `events[0]` (positions count from 1; see
    /// [`crate::subscribe`]).
    pub first: u64,
    /// Per author, the highest seq in the batch that carries a signature,
    /// ascending by author: what sync sessions may now push
    /// ([`Session::handle_stored`](weftlog_proto::sync::Session::handle_stored)).
    pub heads: Vec<Head>,
    /// The batch's events in log order: `(id, encoded event)`.
    pub events: Vec<(EventId, Vec<u8>)>,
}

/// Batches a slow subscriber may fall behind before it is told it lagged.
pub const FEED_CAP: usize = 1024;

/// Drafts one [`Node::append_many`] takes at most: a tenth of
/// [`MAX_BATCH_RECORDS`], so that a batch always fits in one group commit
/// with room for what else is pending.
pub const MAX_APPEND_MANY: usize = 10_000;

/// The bound both forms of `append_many` hold their callers to.
fn check_many(drafts: &[Draft]) {
    assert!(
        drafts.len() <= MAX_APPEND_MANY,
        "append_many takes at most {MAX_APPEND_MANY} drafts, not {}",
        drafts.len()
    );
}

/// Requests waiting for the committer, at most.
pub const QUEUE_CAP: usize = 4096;
/// Requests the committer takes from the queue at once, at most.
pub const MAX_BATCH: usize = 4096;
/// Records one group commit takes at most ([`Replica::poll_batch`]); the
/// committer pauses while this many wait for the writer.
pub const MAX_BATCH_RECORDS: usize = 65_536;
/// How long the writer waits before it tries a batch again after the disk
/// was full ([`replica::DISK_FULL_RETRY_MS`]).
pub const DISK_FULL_RETRY: Duration = Duration::from_millis(replica::DISK_FULL_RETRY_MS);

/// How often a blocking [`Node::append`] whose sale waits for rights looks
/// again (ms).
const RIGHTS_POLL_MS: u64 = 20;

/// Longest single wait of a held append before the committer looks at the
/// wall clock again.
const HOLD_POLL_MS: u64 = 100;

/// What the node's threads share under one lock: the replica, and the
/// replies waiting for it.
struct Shared {
    replica: Replica,
    /// Replies waiting for their mark to become durable, ascending by mark.
    replies: VecDeque<(Mark, Reply)>,
    /// A batch is being written and synced (by the writer, or inline by the
    /// committer when nothing else waits); batches finish in order.
    syncing: bool,
    /// The committer has stopped: the writer writes what is left, and ends.
    closed: bool,
}

enum Request {
    /// Replies once everything applied before it is durable.
    Flush(oneshot::Sender<Result<(), AppendError>>),
    /// A command, or a sale given again after it waited for rights until
    /// the given wall time.
    Append(Draft, Option<u64>, oneshot::Sender<AppendAnswer>),
    Import(
        Vec<Incoming>,
        oneshot::Sender<Result<Imported, NodeImportError>>,
    ),
    /// Commands applied in order, acknowledged together
    /// ([`Node::append_many`]).
    AppendMany(Vec<Draft>, oneshot::Sender<Outcomes>),
}

/// One outcome per draft of [`Node::append_many`], in order.
pub type Outcomes = Vec<Result<Appended, AppendError>>;

/// The committer's answer to an append: its outcome, or that the sale
/// waits for rights until the given wall time (ms) and is to be given again.
enum AppendAnswer {
    Done(Result<Appended, AppendError>),
    AwaitingRights(u64),
}

/// A reply sent once the records it waits for are durable.
enum Reply {
    Flush(oneshot::Sender<Result<(), AppendError>>),
    Append(oneshot::Sender<AppendAnswer>, Appended),
    Import(oneshot::Sender<Result<Imported, NodeImportError>>, Imported),
    AppendMany(oneshot::Sender<Outcomes>, Outcomes),
}

impl Reply {
    fn send(self, fatal: Option<&str>) {
        // A dropped receiver means the caller went away; nothing to tell.
        match (self, fatal) {
            (Reply::Flush(tx), None) => drop(tx.send(Ok(()))),
            (Reply::Flush(tx), Some(e)) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
            (Reply::Append(tx, a), None) => drop(tx.send(AppendAnswer::Done(Ok(a)))),
            (Reply::Append(tx, _), Some(e)) => {
                drop(tx.send(AppendAnswer::Done(Err(AppendError::Fatal(e.into())))))
            }
            (Reply::Import(tx, i), None) => drop(tx.send(Ok(i))),
            (Reply::Import(tx, _), Some(e)) => drop(tx.send(Err(NodeImportError::Fatal(e.into())))),
            (Reply::AppendMany(tx, outcomes), None) => drop(tx.send(outcomes)),
            (Reply::AppendMany(tx, outcomes), Some(e)) => {
                // What was made is not durable; what was refused stays so.
                let outcomes = outcomes
                    .into_iter()
                    .map(|o| o.and_then(|_| Err(AppendError::Fatal(e.into()))))
                    .collect();
                drop(tx.send(outcomes))
            }
        }
    }
}

/// What the committer and writer threads and the node's handles share.
pub(crate) struct Inner {
    key: Keypair,
    id: NodeId,
    shared: Mutex<Shared>,
    /// Signalled when records are queued or the committer closes (the
    /// writer waits), and when a batch is taken or finished (the committer
    /// waits while too many records are pending).
    changed: Condvar,
    pub(crate) log: Mutex<Log<FileStorage>>,
    pub(crate) feed: broadcast::Sender<Arc<Committed>>,
    /// The log's epoch and where it is kept ([`crate::subscribe`]).
    pub(crate) epoch: EpochCell,
    /// Records durable in the log: the last durable position.
    pub(crate) durable: AtomicU64,
    /// Received events waiting for a dependency, shared by every sync
    /// session (`None` while a store holds it).
    pool: Mutex<Option<weftlog_proto::sync::Pool>>,
    /// What `GET /metrics` counts as it happens ([`crate::metrics`]).
    metrics: Metrics,
}

/// An open node. Safe to share between threads; its append and import
/// calls have blocking and async forms.
pub struct Node {
    dir: PathBuf,
    pub(crate) inner: Arc<Inner>,
    tx: Option<mpsc::Sender<Request>>,
    committer: Option<JoinHandle<()>>,
    /// Notified when a sale waits for rights ([`Node::rights_wanted`]).
    rights_wanted: tokio::sync::Notify,
    _lock: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NodeOpenError + '_ {
    move |source| NodeOpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 if before it).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates a node in `dir`: a fresh key (mode 0600) and an empty log.
pub fn init(dir: &Path) -> Result<NodeId, InitError> {
    let io = |source| InitError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() {
        return Err(InitError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(io)?;
    let mut secret = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
    let key = Keypair::from_secret(secret);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&secret).map_err(io)?;
    f.sync_all().map_err(io)?;
    if fs::hard_link(&tmp, &key_path).is_err() {
        let _ = fs::remove_file(&tmp);
        return Err(InitError::Exists(dir.to_path_buf()));
    }
    fs::remove_file(&tmp).map_err(io)?;
    FileStorage::new(&dir.join(LOG_DIR)).map_err(io)?;
    EpochCell::open(dir).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    Ok(key.node_id())
}

impl Node {
    /// Opens the node in `dir`: takes the directory lock, recovers the log
    /// (see [`weftlog_proto::log`]), folds it, and verifies each author's
    /// head signature, which covers its whole chain.
    pub fn open(dir: &Path) -> Result<(Node, Recovery), NodeOpenError> {
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            return Err(NodeOpenError::NotInitialised(dir.to_path_buf()));
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(NodeOpenError::Locked(dir.to_path_buf()));
        }
        let secret = fs::read(&key_path).map_err(io_err(&key_path))?;
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| NodeOpenError::BadKey(key_path.clone()))?;
        let key = Keypair::from_secret(secret);
        let log_dir = dir.join(LOG_DIR);
        let storage = || FileStorage::new(&log_dir).map_err(OpenError::Io);
        let (replica, log, recovery) =
            Replica::open(Keypair::from_secret(secret), wall_ms(), storage)?;
        let epoch = EpochCell::open(dir).map_err(io_err(&dir.join(EPOCH_FILE)))?;
        let durable = AtomicU64::new(log.records());
        let metrics = Metrics::new();
        metrics.set_log(log.records(), log.bytes());
        let inner = Arc::new(Inner {
            id: key.node_id(),
            key,
            shared: Mutex::new(Shared {
                replica,
                replies: VecDeque::new(),
                syncing: false,
                closed: false,
            }),
            changed: Condvar::new(),
            log: Mutex::new(log),
            feed: broadcast::channel(FEED_CAP).0,
            epoch,
            durable,
            pool: Mutex::new(Some(weftlog_proto::sync::Pool::new())),
            metrics,
        });
        let (tx, rx) = mpsc::channel(QUEUE_CAP);
        let committer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("weftlog-commit".into())
                .spawn(move || commit_loop(&inner, rx))
                .map_err(io_err(dir))?
        };
        Ok((
            Node {
                dir: dir.to_path_buf(),
                inner,
                tx: Some(tx),
                committer: Some(committer),
                rights_wanted: tokio::sync::Notify::new(),
                _lock: lock,
            },
            recovery,
        ))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The figures `GET /metrics` shows that the node counts as they
    /// happen; the projections and the SQL mirror report their lag here.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The node's key pair (for its TLS identity).
    pub fn keypair(&self) -> &Keypair {
        &self.inner.key
    }

    /// Every batch made durable from now on: local appends, imports and
    /// events received by sync. A subscriber that falls more than
    /// [`FEED_CAP`] batches behind gets `Lagged` and must catch up another
    /// way (sync: an anti-entropy round).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.inner.feed.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock()
    }

    /// Runs `f` on the current state.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(self.lock().replica.state())
    }

    /// Whether writes are paused because the disk is full (see the module
    /// docs): since when, how many tries, the last storage error.
    pub fn disk_full(&self) -> Option<DiskFull> {
        self.lock().replica.disk_full().cloned()
    }

    /// Holds appends until a peer confirms this node's own log (see
    /// [`weftlog_proto::replica`], "A restored node learns its own log") or
    /// `wait` passes. Call it after opening, before appends arrive, when the
    /// node has peers to learn from; a zero `wait` holds nothing.
    pub fn await_confirmation(&self, wait: Duration) {
        if !wait.is_zero() {
            let until = wall_ms().saturating_add(wait.as_millis() as u64);
            self.lock().replica.await_confirmation(until);
        }
    }

    /// A sync round with `peer` ended, the peer holding this node's own
    /// events up to `seq` ([`Replica::handle_own_head`]): held appends go
    /// if the peer confirmed the node's own log. Returns whether it did.
    pub fn handle_own_head(&self, peer: NodeId, seq: u64) -> bool {
        let confirmed = self.lock().replica.handle_own_head(peer, seq, wall_ms());
        if confirmed {
            self.inner.changed.notify_all();
        }
        confirmed
    }

    /// A sync round with a peer ended in sync now
    /// ([`Replica::handle_synced`]): the seat policies measure
    /// connectivity from it.
    pub fn handle_synced(&self) {
        let mut g = self.lock();
        g.replica.handle_synced(wall_ms());
        // It may have written a compensation that waited (appends held):
        // the writer takes it.
        let queued = g.replica.has_pending();
        drop(g);
        if queued {
            self.inner.changed.notify_all();
        }
    }

    /// The seat rule that applies now on every escrow counter, in stream
    /// and counter order ([`Replica::rule_now`]).
    pub fn seat_rules(&self) -> Vec<(String, String, RuleNow)> {
        let g = self.lock();
        let now = wall_ms();
        let r = &g.replica;
        r.state()
            .streams()
            .iter()
            .flat_map(|(s, st)| st.escrow.keys().map(move |c| (s, c)))
            .map(|(s, c)| (s.clone(), c.clone(), r.rule_now(s, c, now)))
            .collect()
    }

    /// A durable event by id, read back from the log (`None`: this node
    /// holds no durable event with that id, or the record cannot be read).
    pub fn durable_event(&self, id: &EventId) -> Option<Event> {
        let (record, _) = self.lock().replica.durable_record_of(id)?;
        let mut log = self.inner.log.lock().ok()?;
        let (bytes, _, _) = replica::read_record(&mut log, record)?;
        Event::decode_trusted(&bytes).ok()
    }

    /// A staff decision on an oversold sale ([`admission::staff_decision`]):
    /// supersedes the compensation standing, within the policy's override
    /// window.
    pub fn decide(
        &self,
        sale: &EventId,
        action: Compensation,
        user: Option<String>,
    ) -> Result<Appended, AppendError> {
        let draft =
            self.with_state(|s| admission::staff_decision(s, sale, action, user, wall_ms()))?;
        self.append(draft)
    }

    /// The asks for escrow rights due now, to peers in `connected`
    /// ([`Replica::poll_asks`], [`weftlog_proto::rebalance`]).
    pub fn poll_asks(&self, connected: &[NodeId]) -> Vec<(NodeId, Ask)> {
        self.lock().replica.poll_asks(wall_ms(), connected)
    }

    /// `peer`'s ask for escrow rights: the transfer to append now, if any
    /// ([`Replica::handle_ask`]).
    pub fn handle_ask(&self, peer: NodeId, ask: &Ask) -> Option<Draft> {
        self.lock().replica.handle_ask(peer, ask, wall_ms())
    }

    /// Transfers for open asks this node can answer now
    /// ([`Replica::poll_answers`]).
    pub fn poll_answers(&self) -> Vec<Draft> {
        self.lock().replica.poll_answers(wall_ms())
    }

    /// The node's own frontier as peers confirmed it.
    pub fn own_frontier(&self) -> OwnFrontier {
        self.lock().replica.own_frontier()
    }

    /// Why the log stopped for good (a failed sync, or a write failure
    /// other than a full disk), if it did: the node must be reopened.
    pub fn failed(&self) -> Option<String> {
        self.lock().replica.failed().map(str::to_string)
    }

    fn sender(&self) -> &mpsc::Sender<Request> {
        // Invariant: only `drop` takes the sender.
        self.tx.as_ref().expect("node is open")
    }

    /// Appends a local command as an event and waits until it is durable.
    /// Blocks the thread; from async code use [`Node::append_async`].
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn append(&self, draft: Draft) -> Result<Appended, AppendError> {
        let started = Instant::now();
        let kept = sells(&draft).then(|| draft.clone());
        let mut answer = self.request_blocking(draft, None)?;
        while let (AppendAnswer::AwaitingRights(until), Some(sale)) = (&answer, &kept) {
            // Rights arrive by sync, in the daemon's tasks: look again
            // every little while until the wait is over.
            self.rights_wanted.notify_one();
            let left = until.saturating_sub(wall_ms());
            std::thread::sleep(Duration::from_millis(left.clamp(1, RIGHTS_POLL_MS)));
            answer = self.request_blocking(sale.clone(), Some(*until))?;
        }
        self.measured(started, done(answer))
    }

    /// Appends many commands as events, in order, and waits until they are
    /// durable: one outcome per draft, in order (see the module docs: each
    /// draft sees the effect of those before it, a refused one does not
    /// stop the others, and the events made are acknowledged together,
    /// after one group commit). A sale does not wait for rights from
    /// peers. Blocks the thread; from async code use
    /// [`Node::append_many_async`].
    ///
    /// # Panics
    /// If given more than [`MAX_APPEND_MANY`] drafts, or if called from
    /// within an async runtime.
    pub fn append_many(&self, drafts: Vec<Draft>) -> Outcomes {
        check_many(&drafts);
        if drafts.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let n = drafts.len();
        let (tx, rx) = oneshot::channel();
        let outcomes = match self.sender().blocking_send(Request::AppendMany(drafts, tx)) {
            Ok(()) => rx.blocking_recv().ok(),
            Err(_) => None,
        };
        self.measured_many(started, n, outcomes)
    }

    /// [`Node::append_many`] for async callers.
    ///
    /// # Panics
    /// If given more than [`MAX_APPEND_MANY`] drafts.
    pub async fn append_many_async(&self, drafts: Vec<Draft>) -> Outcomes {
        check_many(&drafts);
        if drafts.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let n = drafts.len();
        let (tx, rx) = oneshot::channel();
        let outcomes = match self.sender().send(Request::AppendMany(drafts, tx)).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        self.measured_many(started, n, outcomes)
    }

    /// Counts a batch's acknowledged appends in the metrics; `None` (the
    /// committer went away): every draft is refused, the node stopping.
    fn measured_many(&self, started: Instant, n: usize, outcomes: Option<Outcomes>) -> Outcomes {
        let Some(outcomes) = outcomes else {
            return (0..n).map(|_| Err(stopped())).collect();
        };
        let took = started.elapsed();
        for a in outcomes.iter().flatten() {
            self.inner.metrics.record_append(took, !a.existing);
        }
        outcomes
    }

    /// Counts an acknowledged append in the metrics.
    fn measured(
        &self,
        started: Instant,
        r: Result<Appended, AppendError>,
    ) -> Result<Appended, AppendError> {
        if let Ok(a) = &r {
            self.inner
                .metrics
                .record_append(started.elapsed(), !a.existing);
        }
        r
    }

    fn request_blocking(
        &self,
        draft: Draft,
        held_until: Option<u64>,
    ) -> Result<AppendAnswer, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .blocking_send(Request::Append(draft, held_until, tx))
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())
    }

    /// [`Node::append`] for async callers.
    pub async fn append_async(&self, draft: Draft) -> Result<Appended, AppendError> {
        let started = Instant::now();
        let Some(sale) = sells(&draft).then(|| draft.clone()) else {
            let answer = self.request(draft, None).await?;
            return self.measured(started, done(answer));
        };
        // Subscribed before the first try: a batch durable after it may
        // bring the rights.
        let mut feed = self.subscribe();
        let mut answer = self.request(draft, None).await?;
        while let AppendAnswer::AwaitingRights(until) = answer {
            self.rights_wanted.notify_one();
            let left = Duration::from_millis(until.saturating_sub(wall_ms()).max(1));
            // Any durable batch, a lag, or the deadline: try again.
            let _ = tokio::time::timeout(left, feed.recv()).await;
            answer = self.request(sale.clone(), Some(until)).await?;
        }
        self.measured(started, done(answer))
    }

    async fn request(
        &self,
        draft: Draft,
        held_until: Option<u64>,
    ) -> Result<AppendAnswer, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .send(Request::Append(draft, held_until, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Completes when a sale waits for rights from connected peers
    /// ([`weftlog_proto::rebalance::RIGHTS_WAIT_MS`]): the daemon sends
    /// the replica's asks at once ([`Node::poll_asks`]) rather than at its
    /// next tick.
    pub async fn rights_wanted(&self) {
        self.rights_wanted.notified().await;
    }

    /// Waits until everything applied so far (appends, imports, events
    /// received by sync) is durable. Fails at once with
    /// [`AppendError::DiskFull`] while the disk is full.
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn flush(&self) -> Result<(), AppendError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .blocking_send(Request::Flush(tx))
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())?
    }

    /// Imports an export file: all of it, or none of it. Framing, ids,
    /// encodings, limits, chains and signatures are checked on the calling
    /// thread; causal validity and storing happen in the committer.
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn import(&self, data: &[u8]) -> Result<Imported, NodeImportError> {
        self.import_admitting(data, |_| true)
    }

    /// [`Node::import`], refused at the edge ([`NodeImportError::NonMembers`],
    /// naming them, nothing stored) if any event's author is one `admits`
    /// refuses. Only an edge check: events of non-members that arrive by
    /// sync are stored like any other.
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn import_admitting(
        &self,
        data: &[u8],
        admits: impl Fn(&NodeId) -> bool,
    ) -> Result<Imported, NodeImportError> {
        let mut items = exchange::read_export(data)?;
        // Authenticated first: an author is named only once it signed.
        exchange::authenticate(&mut items)?;
        let refused: BTreeSet<NodeId> = items
            .iter()
            .map(|i| i.event.author)
            .filter(|a| !admits(a))
            .collect();
        if !refused.is_empty() {
            return Err(NodeImportError::NonMembers(refused.into_iter().collect()));
        }
        let (tx, rx) = oneshot::channel();
        let fatal = || NodeImportError::Fatal("the node is shutting down".into());
        self.sender()
            .blocking_send(Request::Import(items, tx))
            .map_err(|_| fatal())?;
        let r = rx.blocking_recv().map_err(|_| fatal())?;
        if let Ok(i) = &r {
            self.inner.metrics.record_import(i.imported, i.duplicates);
        }
        r
    }

    /// Reads every durable event in log order.
    pub fn scan(&self, mut visit: impl FnMut(&Event, EventId)) -> Result<(), OpenError> {
        let mut log = self.inner.log.lock().expect("log lock poisoned");
        log.scan(|frame| {
            let event = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            visit(&event, frame.id);
            Ok(())
        })
    }

    /// Every fork the log holds ([`State::forks`]), each with its proof
    /// ([`ForkProof::of_fork`]), or why it cannot be made yet (a branch not
    /// yet durable up to a signed event).
    pub fn fork_proofs(&self) -> Vec<(Fork, Result<ForkProof, BuildError>)> {
        // The state lock is released before the store reads it again.
        let forks = self.with_state(State::forks);
        let store = self.sync_store();
        forks
            .into_iter()
            .map(|f| {
                let p = ForkProof::of_fork(&store, &f);
                (f, p)
            })
            .collect()
    }

    /// An export file holding every event a node whose branch heads are
    /// `since` lacks (all events when empty), each chain ending at its last
    /// signed event, with the signatures the log holds, in log order. The
    /// rule is [`since::lacking`](weftlog_proto::since::lacking)'s
    /// ([`Replica::export_records`]); the count is the events written.
    pub fn export(&self, since: &[Head]) -> Result<(Vec<u8>, usize), ExportError> {
        // Chosen under the state lock, read after it: appends may go on.
        let records = self.lock().replica.export_records(since)?;
        let mut wanted = records.into_iter().peekable();
        let mut out = Vec::new();
        let mut record = 0u64;
        let mut mismatch = None;
        let mut log = self.inner.log.lock().expect("log lock poisoned");
        log.scan(|frame| {
            let index = record;
            record += 1;
            let Some(&(at, id)) = wanted.peek() else {
                return Ok(());
            };
            if at != index {
                return Ok(());
            }
            wanted.next();
            if frame.id != id {
                mismatch.get_or_insert(ExportError::Mismatch { record: at, id });
                return Ok(());
            }
            let e = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            out.push(Outgoing {
                bytes: frame.bytes.to_vec(),
                id: frame.id,
                author: e.author,
                seq: e.seq,
                hlc: e.hlc,
                sig: frame.sig,
            });
            Ok(())
        })?;
        drop(log);
        if let Some(e) = mismatch {
            return Err(e);
        }
        if let Some((record, id)) = wanted.next() {
            return Err(ExportError::Mismatch { record, id });
        }
        let n = out.len();
        Ok((exchange::write_export(out), n))
    }
}

/// The node as a [`sync::Store`](weftlog_proto::sync::Store) for sync
/// sessions: the replica's one store ([`ReplicaStore`]). It advertises and
/// serves only durable events, each author up to its last signed one, read
/// back from the log, and queues received events for the next batch.
///
/// Make one per [`Session`](weftlog_proto::sync::Session) call and drop it
/// after: from its first insert until it is dropped it holds the node's
/// state lock, so signature checks run outside the lock and a received run
/// is stored whole before the writer can take any of it (the replica never
/// ends a batch inside a run either; see [`weftlog_proto::replica`]).
pub type SyncStore<'a> = ReplicaStore<NodeAccess<'a>>;

/// How a [`SyncStore`] reaches the node's replica and log: reads take the
/// state lock for the call, inserts take it at the first and hold it until
/// the store is dropped, which then wakes the writer.
pub struct NodeAccess<'a> {
    inner: &'a Inner,
    held: RefCell<Option<MutexGuard<'a, Shared>>>,
}

impl Node {
    /// This node as a store for sync sessions; see [`SyncStore`].
    pub fn sync_store(&self) -> SyncStore<'_> {
        ReplicaStore::new(NodeAccess {
            inner: &self.inner,
            held: RefCell::new(None),
        })
    }
}

impl Access for NodeAccess<'_> {
    fn read<T>(&self, f: impl FnOnce(&Replica) -> T) -> T {
        match self.held.borrow().as_ref() {
            Some(g) => f(&g.replica),
            None => f(&self.inner.lock().replica),
        }
    }

    fn write<T>(&mut self, f: impl FnOnce(&mut Replica) -> T) -> T {
        let g = self.held.get_mut().get_or_insert_with(|| {
            let mut g = self.inner.lock();
            // Received events are observed against it (the clock's horizon).
            g.replica.handle_time(wall_ms());
            g
        });
        f(&mut g.replica)
    }

    fn read_record(&self, record: u64) -> Option<(Vec<u8>, EventId, Option<Signature>)> {
        replica::read_record(
            &mut self.inner.log.lock().expect("log lock poisoned"),
            record,
        )
    }

    fn take_pool(&mut self) -> Option<weftlog_proto::sync::Pool> {
        self.inner.pool.lock().ok()?.take()
    }

    fn put_pool(&mut self, pool: weftlog_proto::sync::Pool) {
        if let Ok(mut slot) = self.inner.pool.lock() {
            *slot = Some(pool);
        }
    }
}

impl Drop for NodeAccess<'_> {
    fn drop(&mut self) {
        if self.held.get_mut().take().is_some() {
            // Received events may be queued: the writer takes them.
            self.inner.changed.notify_all();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Closing the queue ends the committer once it has replied to
        // everything queued.
        self.tx = None;
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

/// Whether `draft` sells seats (it may wait for rights).
fn sells(draft: &Draft) -> bool {
    draft
        .ops
        .iter()
        .any(|op| matches!(op, Op::EscrowConsume { .. } | Op::EscrowOverdraw { .. }))
}

/// The outcome of an append that waits no longer.
fn done(answer: AppendAnswer) -> Result<Appended, AppendError> {
    match answer {
        AppendAnswer::Done(r) => r,
        // Invariant: only a sale given again before its deadline waits, and
        // the callers loop while it does.
        AppendAnswer::AwaitingRights(until) => Err(AppendError::Fatal(format!(
            "a sale was still waiting for rights at {until} ms"
        ))),
    }
}

fn stopped() -> AppendError {
    AppendError::Fatal("the node is shutting down".into())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves state we cannot trust.
        self.shared.lock().expect("node state lock poisoned")
    }

    /// Hands one request to the replica. Its reply waits for the records
    /// applied so far to be durable; a refusal is sent at once (nothing of
    /// the request was applied).
    fn apply(&self, g: &mut Shared, req: Request) {
        if let Some(e) = g.replica.failed() {
            return refuse(req, e);
        }
        let reply = match req {
            Request::Flush(tx) => match g.replica.disk_full() {
                Some(full) => return drop(tx.send(Err(AppendError::DiskFull(full.error.clone())))),
                None => Reply::Flush(tx),
            },
            Request::Append(draft, held_until, tx) => {
                let made = match held_until {
                    None => g.replica.handle_append(draft, wall_ms()),
                    Some(until) => g.replica.handle_held_sale(draft, wall_ms(), until),
                };
                match made {
                    Ok(a) => Reply::Append(tx, a),
                    Err(replica::AppendError::AwaitingRights { until_ms }) => {
                        return drop(tx.send(AppendAnswer::AwaitingRights(until_ms)));
                    }
                    Err(e) => return drop(tx.send(AppendAnswer::Done(Err(e.into())))),
                }
            }
            Request::Import(items, tx) => match g.replica.handle_import(items, wall_ms()) {
                Ok(i) => Reply::Import(tx, i),
                Err(e) => return drop(tx.send(Err(e.into()))),
            },
            Request::AppendMany(drafts, tx) => {
                let now = wall_ms();
                let outcomes = drafts
                    .into_iter()
                    .map(|draft| {
                        let made = if sells(&draft) {
                            // A sale in a batch does not wait for rights:
                            // given as a held sale whose wait is over, it
                            // gets the refusal a single append gets at the
                            // end of its wait.
                            g.replica.handle_held_sale(draft, now, now)
                        } else {
                            g.replica.handle_append(draft, now)
                        };
                        made.map_err(AppendError::from)
                    })
                    .collect();
                Reply::AppendMany(tx, outcomes)
            }
        };
        g.replies.push_back((g.replica.mark(), reply));
    }
}

impl Shared {
    /// The replies whose records are all durable.
    fn ready(&mut self) -> Vec<Reply> {
        let durable = self.replica.durable_mark();
        let n = self.replies.partition_point(|(m, _)| *m <= durable);
        self.replies.drain(..n).map(|(_, r)| r).collect()
    }
}

/// Answers a request with the fatal error that stopped the log.
fn refuse(req: Request, e: &str) {
    match req {
        Request::Flush(tx) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
        Request::Append(_, _, tx) => {
            drop(tx.send(AppendAnswer::Done(Err(AppendError::Fatal(e.into())))))
        }
        Request::Import(_, tx) => drop(tx.send(Err(NodeImportError::Fatal(e.into())))),
        Request::AppendMany(drafts, tx) => drop(
            tx.send(
                drafts
                    .iter()
                    .map(|_| Err(AppendError::Fatal(e.into())))
                    .collect(),
            ),
        ),
    }
}

/// The committer: see the module docs. It hands requests to the replica
/// while the writer writes and syncs the batch before, so the CPU work and
/// the `fdatasync` overlap, and everything applied during one sync goes
/// into the next batch.
fn commit_loop(inner: &Arc<Inner>, mut rx: mpsc::Receiver<Request>) {
    let writer = {
        let inner = inner.clone();
        std::thread::Builder::new()
            .name("weftlog-fsync".into())
            .spawn(move || fsync_loop(&inner))
    };
    let writer = match writer {
        Ok(s) => s,
        Err(e) => {
            let e = format!("cannot start the sync thread: {e}");
            inner.lock().replica.handle_write_failed(e.clone());
            while let Some(req) = rx.blocking_recv() {
                refuse(req, &e);
            }
            return;
        }
    };
    let mut reqs = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        reqs.push(first);
        while reqs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let mut g = inner.lock();
        // While the disk is full nothing drains, and requests are refused.
        while g.replica.pending_len() >= MAX_BATCH_RECORDS
            && g.replica.failed().is_none()
            && g.replica.disk_full().is_none()
        {
            inner.changed.notify_all();
            g = inner.changed.wait(g).expect("node state lock poisoned");
        }
        if reqs
            .iter()
            .any(|r| matches!(r, Request::Append(..) | Request::AppendMany(..)))
        {
            // Held until a peer confirms the own log or the wait passes;
            // a confirmation wakes this wait.
            while let Some(until) = g.replica.appends_held(wall_ms()) {
                let wait = until.saturating_sub(wall_ms()).clamp(1, HOLD_POLL_MS);
                g = inner
                    .changed
                    .wait_timeout(g, Duration::from_millis(wait))
                    .expect("node state lock poisoned")
                    .0;
            }
        }
        for req in reqs.drain(..) {
            if let Request::AppendMany(drafts, _) = &req {
                // Room for the whole batch in the next group commit (see
                // the module docs); the writer drains what is pending.
                while g.replica.pending_len() + drafts.len() > MAX_BATCH_RECORDS
                    && g.replica.failed().is_none()
                    && g.replica.disk_full().is_none()
                {
                    inner.changed.notify_all();
                    g = inner.changed.wait(g).expect("node state lock poisoned");
                }
            }
            inner.apply(&mut g, req);
        }
        // Replies to requests that queued nothing new (a flush, a command
        // id already durable) may go at once, unless a batch is being
        // finished: its feed goes out before them (`finish` sends them).
        let ready = if g.syncing { Vec::new() } else { g.ready() };
        let inline = if !g.syncing && rx.is_empty() && g.replica.disk_full().is_none() {
            // Nothing else is waiting: sync here rather than wake the
            // writer, which saves a thread hop on an idle or single-writer
            // node. (While the disk is full, the writer alone retries.)
            g.replica.poll_batch(MAX_BATCH_RECORDS)
        } else {
            None
        };
        g.syncing |= inline.is_some();
        drop(g);
        inner.changed.notify_all();
        for r in ready {
            r.send(None);
        }
        if let Some(batch) = inline {
            finish(inner, batch);
        }
    }
    inner.lock().closed = true;
    inner.changed.notify_all();
    let _ = writer.join();
}

/// The writer: takes the next batch from the replica whenever none is being
/// written, and finishes it. Ends once the committer has stopped and
/// everything is written (events received after the last request too).
/// While the disk is full it tries the kept batch every [`DISK_FULL_RETRY`];
/// once the committer has stopped, it tries once more and then gives up
/// ([`give_up`]).
fn fsync_loop(inner: &Inner) {
    let mut g = inner.lock();
    // While the disk is full: when to try the kept batch again.
    let mut retry_at: Option<Instant> = None;
    // The committer stopped while the disk was full, and the kept batch
    // was tried once more since.
    let mut tried_after_close = false;
    loop {
        if !g.syncing {
            if g.replica.disk_full().is_some() {
                if g.closed {
                    if tried_after_close {
                        return give_up(g);
                    }
                    tried_after_close = true;
                } else {
                    let at = *retry_at.get_or_insert_with(|| Instant::now() + DISK_FULL_RETRY);
                    let now = Instant::now();
                    if now < at {
                        g = inner
                            .changed
                            .wait_timeout(g, at - now)
                            .expect("node state lock poisoned")
                            .0;
                        continue;
                    }
                }
                retry_at = None;
            }
            if let Some(batch) = g.replica.poll_batch(MAX_BATCH_RECORDS) {
                g.syncing = true;
                drop(g);
                // The committer may wait for pending records to drain.
                inner.changed.notify_all();
                finish(inner, batch);
                g = inner.lock();
                continue;
            }
            if g.closed {
                return;
            }
        }
        g = inner.changed.wait(g).expect("node state lock poisoned");
    }
}

/// The node closes while the disk is full: the replies still waiting are
/// answered with an error. Their events were applied but never written,
/// nor acknowledged; the log ends at its last durable record.
fn give_up(mut g: MutexGuard<'_, Shared>) {
    let why = g
        .replica
        .disk_full()
        .map_or_else(String::new, |f| f.error.clone());
    let waiting: Vec<Reply> = g.replies.drain(..).map(|(_, r)| r).collect();
    let own = g.replica.unacked();
    drop(g);
    tracing::warn!(
        own_events = own,
        "closing with the disk full ({why}): what was applied since it filled was never \
         written (nor acknowledged)"
    );
    let msg = format!("the node stopped while the disk was full ({why}); not stored");
    for r in waiting {
        r.send(Some(&msg));
    }
}

/// Writes and syncs a batch, tells the replica, then acknowledges what
/// became durable (or reports the failure that stopped the log). Called by
/// whichever thread set `syncing`; clears it when done.
fn finish(inner: &Inner, batch: Batch) {
    let written = {
        let mut log = inner.log.lock().expect("log lock poisoned");
        let first = log.records();
        let started = Instant::now();
        let r = log.append(batch.frames(), batch.len() as u64);
        if r.is_ok() {
            inner.metrics.record_fsync(started.elapsed());
            inner.metrics.set_log(log.records(), log.bytes());
        }
        r.map(|()| first)
    };
    let first = written.as_ref().ok().copied();
    if let Some(first) = first {
        inner
            .durable
            .store(first + batch.len() as u64, Ordering::Release);
    }
    let mut g = inner.lock();
    let was_full = g.replica.disk_full().map(|f| f.tries);
    let committed = match written {
        Ok(first) => {
            if let Some(tries) = was_full {
                tracing::info!(
                    tries,
                    "disk space freed: the kept batch is written, writes resume"
                );
            }
            Some(g.replica.handle_durable(batch, first))
        }
        Err(log::AppendError::Full(e)) => {
            let e = e.to_string();
            if was_full.is_none() {
                tracing::warn!(
                    "disk full ({e}): appends and imports are refused, and the batch is \
                     tried again every {DISK_FULL_RETRY:?}"
                );
            }
            g.replica.handle_write_full(batch, e, wall_ms());
            None
        }
        Err(e) => {
            g.replica.handle_write_failed(e.to_string());
            None
        }
    };
    let durable = g.ready();
    // After a fatal failure nothing more becomes durable: the rest is
    // refused. While the disk is full, replies wait for the kept batch,
    // except flushes, which applied nothing.
    let refused: Vec<Reply> = if g.replica.failed().is_some() {
        g.replies.drain(..).map(|(_, r)| r).collect()
    } else if g.replica.disk_full().is_some() {
        let (flushes, rest): (VecDeque<_>, VecDeque<_>) = g
            .replies
            .drain(..)
            .partition(|(_, r)| matches!(r, Reply::Flush(_)));
        g.replies = rest;
        flushes.into_iter().map(|(_, r)| r).collect()
    } else {
        Vec::new()
    };
    let failed = g.replica.failed().map(str::to_string);
    let full = g.replica.disk_full().map(|f| f.error.clone());
    let returned = g.replica.own_returned();
    drop(g);
    if committed.is_some() {
        // Own events came back: the log was restored from a copy, so its
        // positions name another history than its readers saw.
        inner.epoch.renew_if_returned(returned);
    }
    if let Some((c, first)) = committed
        .zip(first)
        .filter(|_| inner.feed.receiver_count() > 0)
    {
        // No receiver left is not an error: nobody is listening.
        let _ = inner.feed.send(Arc::new(Committed {
            epoch: inner.epoch.get(),
            first: first + 1,
            heads: c.heads,
            events: c.events,
        }));
    }
    for r in durable {
        r.send(None);
    }
    for r in refused {
        match (&full, r) {
            (Some(e), Reply::Flush(tx)) if failed.is_none() => {
                drop(tx.send(Err(AppendError::DiskFull(e.clone()))))
            }
            (_, r) => r.send(failed.as_deref()),
        }
    }
    // Cleared only now, so that feeds and replies go out in batch order.
    let mut g = inner.lock();
    g.syncing = false;
    // Replies the committer queued meanwhile whose records were durable.
    let late = g.ready();
    drop(g);
    inner.changed.notify_all();
    for r in late {
        r.send(None);
    }
}
