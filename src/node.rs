//! A node: its key, its durable log and its folded state, with group commit.
//!
//! Appenders (threads, or async tasks through [`Node::append_async`]) hand
//! requests to a committer thread through a bounded queue and wait for the
//! reply. The committer drains every request that has arrived and turns each
//! into an event against the current state (so later requests in a batch see
//! earlier ones). A syncer thread takes everything the committer made while
//! it was busy, signs the last own event, writes the batch, makes it durable
//! with one `fdatasync`, and only then replies; so the CPU work of one batch
//! overlaps the sync of the one before, and batches grow with load. When
//! nothing else waits, the committer syncs a batch itself, saving the hop.
//! Batches become durable, and are acknowledged, in order. A failed write or
//! sync is fatal: the node refuses every later append until it is reopened
//! (and recovery has decided what is on disk).
//!
//! State is updated when an event is made, before it is durable, so readers
//! may see an event a moment before its append is acknowledged. A crash can
//! lose only unacknowledged events.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};

use weftlog_proto::event::{Event, Keypair, Signature};
use weftlog_proto::exchange::{self, ImportError, Incoming, Outgoing};
use weftlog_proto::log::{self, encode_frame_with, Log, OpenError, Recovery};
use weftlog_proto::state::{self, Draft, Inserted, Invalid, PrepareError, State};
use weftlog_proto::sync;
use weftlog_proto::{EventId, Hlc, HlcClock, NodeId};

use crate::storage::{sync_dir, FileStorage};

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
    /// The log failed earlier or now; the node must be reopened.
    #[error("the log is unusable after a failed write or sync: {0}")]
    Fatal(String),
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
}

/// An acknowledged append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Event id.
    pub id: EventId,
    /// Author.
    pub author: NodeId,
    /// Seq.
    pub seq: u64,
    /// Hlc.
    pub hlc: Hlc,
    /// Stream.
    pub stream: String,
    /// Stream version after the event.
    pub version: u64,
    /// Whether the command id was already in the log (nothing was appended).
    pub existing: bool,
}

/// A batch that just became durable, as [`Node::subscribe`] delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Per author, the highest seq in the batch that carries a signature,
    /// ascending by author: what sync sessions may now push
    /// ([`sync::Session::handle_stored`]).
    pub heads: Vec<(NodeId, u64)>,
    /// The batch's events in log order: `(id, encoded event)`.
    pub events: Vec<(EventId, Vec<u8>)>,
}

/// Batches a slow subscriber may fall behind before it is told it lagged.
pub const FEED_CAP: usize = 1024;

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// New events stored.
    pub imported: u64,
    /// Events already present.
    pub duplicates: u64,
}

/// Requests waiting for the committer, at most.
pub const QUEUE_CAP: usize = 4096;
/// Requests the committer takes from the queue at once, at most.
pub const MAX_BATCH: usize = 4096;
/// Records waiting for the syncer, at most; the committer pauses past it.
pub const MAX_BATCH_RECORDS: usize = 65_536;

struct Pending {
    bytes: Vec<u8>,
    id: EventId,
    author: NodeId,
    seq: u64,
    hlc: Hlc,
    sig: Option<Signature>,
}

/// What is durable, per author: the log record index and hlc of each seq
/// (`[seq - 1]`). Updated only after a batch is synced, so it describes the
/// durable log.
#[derive(Default)]
struct Durable {
    authors: BTreeMap<NodeId, Vec<(u64, Hlc)>>,
    /// Per author, the highest durable seq whose record carries a signature:
    /// what sync advertises (a run of received events may reach the log in
    /// two batches, the signed end in the second).
    signed: BTreeMap<NodeId, u64>,
}

struct Shared {
    state: State,
    clock: HlcClock,
    failed: Option<String>,
    /// Events received from peers and applied to `state`, waiting for the
    /// committer to put them in its next batch (ahead of anything applied
    /// after them, so the log stays in causal order).
    received: Vec<Pending>,
}

enum Request {
    /// Writes `Shared::received`; with a sender, replies once everything
    /// before it is durable.
    Flush(Option<oneshot::Sender<Result<(), AppendError>>>),
    Append(Draft, oneshot::Sender<Result<Appended, AppendError>>),
    Import(
        Vec<Incoming>,
        oneshot::Sender<Result<Imported, NodeImportError>>,
    ),
}

/// A reply the committer sends once the batch is durable.
enum Reply {
    Flush(oneshot::Sender<Result<(), AppendError>>),
    Append(oneshot::Sender<Result<Appended, AppendError>>, Appended),
    Import(oneshot::Sender<Result<Imported, NodeImportError>>, Imported),
}

impl Reply {
    fn send(self, fatal: Option<&str>) {
        // A dropped receiver means the caller went away; nothing to tell.
        match (self, fatal) {
            (Reply::Flush(tx), None) => drop(tx.send(Ok(()))),
            (Reply::Flush(tx), Some(e)) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
            (Reply::Append(tx, a), None) => drop(tx.send(Ok(a))),
            (Reply::Append(tx, _), Some(e)) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
            (Reply::Import(tx, i), None) => drop(tx.send(Ok(i))),
            (Reply::Import(tx, _), Some(e)) => drop(tx.send(Err(NodeImportError::Fatal(e.into())))),
        }
    }
}

/// What the committer thread and the node's handles share.
struct Inner {
    key: Keypair,
    id: NodeId,
    shared: Mutex<Shared>,
    log: Mutex<Log<FileStorage>>,
    durable: Mutex<Durable>,
    feed: broadcast::Sender<Arc<Committed>>,
}

/// An open node. Safe to share between threads; its append and import
/// calls have blocking and async forms.
pub struct Node {
    dir: PathBuf,
    inner: Arc<Inner>,
    tx: Option<mpsc::Sender<Request>>,
    committer: Option<JoinHandle<()>>,
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
        let (state, log, recovery, durable) = load(&log_dir)?;
        let clock = HlcClock::new(state.max_hlc());
        let inner = Arc::new(Inner {
            id: key.node_id(),
            key,
            shared: Mutex::new(Shared {
                state,
                clock,
                failed: None,
                received: Vec::new(),
            }),
            log: Mutex::new(log),
            durable: Mutex::new(durable),
            feed: broadcast::channel(FEED_CAP).0,
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
        f(&self.lock().state)
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
        let (tx, rx) = oneshot::channel();
        self.sender()
            .blocking_send(Request::Append(draft, tx))
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())?
    }

    /// [`Node::append`] for async callers.
    pub async fn append_async(&self, draft: Draft) -> Result<Appended, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .send(Request::Append(draft, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Waits until everything applied so far (appends, imports, events
    /// received by sync) is durable.
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn flush(&self) -> Result<(), AppendError> {
        let (tx, rx) = oneshot::channel();
        self.sender()
            .blocking_send(Request::Flush(Some(tx)))
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
        let mut items = exchange::read_export(data)?;
        exchange::authenticate(&mut items)?;
        let (tx, rx) = oneshot::channel();
        let fatal = || NodeImportError::Fatal("the node is shutting down".into());
        self.sender()
            .blocking_send(Request::Import(items, tx))
            .map_err(|_| fatal())?;
        rx.blocking_recv().map_err(|_| fatal())?
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

    /// An export file holding every event past `since` (author → seq; all
    /// events when empty), each author's run ending at its last signed
    /// event, with the signatures the log holds.
    pub fn export(&self, since: &BTreeMap<NodeId, u64>) -> Result<(Vec<u8>, usize), OpenError> {
        // Per author: the seq of its last signed record. A run is exported
        // up to it: a receiver must be able to authenticate every event.
        let mut signed: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut out = Vec::new();
        let mut log = self.inner.log.lock().expect("log lock poisoned");
        log.scan(|frame| {
            let e = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            if frame.sig.is_some() {
                signed.insert(e.author, e.seq);
            }
            if e.seq > since.get(&e.author).copied().unwrap_or(0) {
                out.push(Outgoing {
                    bytes: frame.bytes.to_vec(),
                    id: frame.id,
                    author: e.author,
                    seq: e.seq,
                    hlc: e.hlc,
                    sig: frame.sig,
                });
            }
            Ok(())
        })?;
        drop(log);
        out.retain(|o| signed.get(&o.author).is_some_and(|&s| o.seq <= s));
        let n = out.len();
        Ok((exchange::write_export(out), n))
    }
}

/// The node as a [`sync::Store`] for sync sessions: it advertises and serves
/// only durable events, each author up to its last signed one, and stores
/// received events through the committer, in its next batch (ahead of
/// anything applied after them, so the log stays in causal order).
///
/// Make one per [`sync::Session::handle_message`] call and drop it after:
/// from its first insert until it is dropped it holds the node's state
/// lock, so the committer never takes part of a received run. (Otherwise
/// it could write a batch that ends inside a run, with a local event that
/// depends on it: the node would advertise a head whose dependency it
/// does not serve yet.)
pub struct SyncStore<'a> {
    node: &'a Node,
    held: std::cell::RefCell<Option<MutexGuard<'a, Shared>>>,
    /// Received events were queued: wake the committer on drop.
    wake: bool,
}

impl Node {
    /// This node as a store for [`sync::Session`]s; see [`SyncStore`].
    pub fn sync_store(&self) -> SyncStore<'_> {
        SyncStore {
            node: self,
            held: std::cell::RefCell::new(None),
            wake: false,
        }
    }
}

impl Drop for SyncStore<'_> {
    fn drop(&mut self) {
        let woke = self.held.get_mut().take().is_some() && self.wake;
        if woke {
            // The committer takes all received events at once. A full queue
            // means it is busy and takes them with its next batch anyway.
            let _ = self.node.sender().try_send(Request::Flush(None));
        }
    }
}

impl SyncStore<'_> {
    /// Runs `f` on the node's shared state, under the lock this store holds
    /// if it holds it.
    fn shared<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        let mut held = self.held.borrow_mut();
        match held.as_mut() {
            Some(g) => f(g),
            None => f(&mut self.node.lock()),
        }
    }

    fn durable_seq(&self, author: &NodeId, seq: u64) -> Option<(u64, Hlc)> {
        let d = self
            .node
            .inner
            .durable
            .lock()
            .expect("durable index lock poisoned");
        d.authors
            .get(author)?
            .get(seq.checked_sub(1)? as usize)
            .copied()
    }
}

impl sync::Store for SyncStore<'_> {
    fn frontier(&self) -> Vec<sync::Head> {
        let heads: Vec<(NodeId, u64)> = {
            let d = self
                .node
                .inner
                .durable
                .lock()
                .expect("durable index lock poisoned");
            d.signed.iter().map(|(a, seq)| (*a, *seq)).collect()
        };
        self.shared(|g| {
            heads
                .into_iter()
                .filter_map(|(author, seq)| {
                    let id = g.state.event_id(&author, seq)?;
                    Some(sync::Head { author, seq, id })
                })
                .collect()
        })
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.shared(|g| g.state.event_id(author, seq))
    }

    fn contains(&self, id: &EventId) -> bool {
        self.shared(|g| g.state.contains(id))
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.durable_seq(author, seq).map(|(_, hlc)| hlc)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<sync::Stored> {
        let (record, hlc) = self.durable_seq(author, seq)?;
        let mut log = self.node.inner.log.lock().expect("log lock poisoned");
        let (stored, _) = log
            .read_with(record, |f| sync::Stored {
                bytes: f.bytes.to_vec(),
                id: f.id,
                hlc,
                sig: f.sig,
            })
            .ok()?;
        Some(stored)
    }

    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid> {
        let held = self.held.get_mut();
        let g = held.get_or_insert_with(|| self.node.lock());
        let r = g.state.insert(event, id)?;
        if r == Inserted::New {
            g.clock.observe(event.hlc);
            g.received.push(Pending {
                bytes: bytes.to_vec(),
                id,
                author: event.author,
                seq: event.seq,
                hlc: event.hlc,
                sig,
            });
            self.wake = true;
        }
        Ok(r)
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

fn stopped() -> AppendError {
    AppendError::Fatal("the node is shutting down".into())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves state we cannot trust.
        self.shared.lock().expect("node state lock poisoned")
    }

    /// Applies one request to the state, adding its records to `pending`.
    /// Returns the reply to send once they are durable, or sends a refusal
    /// at once (nothing of it was applied).
    fn apply(&self, g: &mut Shared, req: Request, pending: &mut Vec<Pending>) -> Option<Reply> {
        match req {
            Request::Flush(tx) => tx.map(Reply::Flush),
            Request::Append(draft, tx) => {
                let made = g
                    .state
                    .append_local(self.id, &mut g.clock, wall_ms(), draft);
                match made {
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        None
                    }
                    Ok(state::Appended::Existing(rec)) => Some(Reply::Append(
                        tx,
                        Appended {
                            id: rec.id,
                            author: rec.author,
                            seq: rec.seq,
                            hlc: rec.hlc,
                            stream: rec.stream,
                            version: rec.version,
                            existing: true,
                        },
                    )),
                    Ok(state::Appended::New { event, bytes, id }) => {
                        pending.push(Pending {
                            bytes,
                            id,
                            author: self.id,
                            seq: event.seq,
                            hlc: event.hlc,
                            sig: None,
                        });
                        let version = g.state.version(&event.stream);
                        Some(Reply::Append(
                            tx,
                            Appended {
                                id,
                                author: self.id,
                                seq: event.seq,
                                hlc: event.hlc,
                                stream: event.stream,
                                version,
                                existing: false,
                            },
                        ))
                    }
                }
            }
            Request::Import(items, tx) => {
                let mut scratch = g.state.clone();
                let mut new = Vec::new();
                let mut duplicates = 0;
                for item in items {
                    match scratch.insert(&item.event, item.id) {
                        Ok(Inserted::New) => new.push(item),
                        Ok(Inserted::Duplicate) => duplicates += 1,
                        Err(e) => {
                            let _ = tx.send(Err(ImportError::event(&item, e).into()));
                            return None;
                        }
                    }
                }
                g.clock.observe(scratch.max_hlc());
                g.state = scratch;
                let imported = new.len() as u64;
                pending.extend(new.into_iter().map(|item| Pending {
                    bytes: item.bytes,
                    id: item.id,
                    author: item.event.author,
                    seq: item.event.seq,
                    hlc: item.event.hlc,
                    sig: item.sig,
                }));
                Some(Reply::Import(
                    tx,
                    Imported {
                        imported,
                        duplicates,
                    },
                ))
            }
        }
    }

    /// Signs the batch's last own record, then writes and syncs the batch.
    fn write(&self, batch: &mut [Pending], buf: &mut Vec<u8>) -> Result<(), String> {
        if let Some(p) = batch.iter_mut().rev().find(|p| p.author == self.id) {
            p.sig = Some(self.key.sign(&p.id));
        }
        buf.clear();
        for (i, p) in batch.iter().enumerate() {
            let end = i + 1 == batch.len();
            encode_frame_with(buf, &p.bytes, &p.id, p.sig.as_ref(), end);
        }
        let mut log = self.log.lock().expect("log lock poisoned");
        let first = log.records();
        log.append(buf, batch.len() as u64)
            .map_err(|e| e.to_string())?;
        drop(log);
        let mut durable = self.durable.lock().expect("durable index lock poisoned");
        for (i, p) in batch.iter().enumerate() {
            let seqs = durable.authors.entry(p.author).or_default();
            debug_assert_eq!(seqs.len() as u64 + 1, p.seq);
            seqs.push((first + i as u64, p.hlc));
            if p.sig.is_some() {
                durable.signed.insert(p.author, p.seq);
            }
        }
        Ok(())
    }
}

/// Answers a request with the fatal error that stopped the log.
fn refuse(req: Request, e: &str) {
    match req {
        Request::Flush(None) => {}
        Request::Flush(Some(tx)) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
        Request::Append(_, tx) => drop(tx.send(Err(AppendError::Fatal(e.into())))),
        Request::Import(_, tx) => drop(tx.send(Err(NodeImportError::Fatal(e.into())))),
    }
}

/// Records made by the committer and not yet taken by the syncer, with the
/// replies to send once they are durable.
#[derive(Default)]
struct Batch {
    pending: Vec<Pending>,
    replies: Vec<Reply>,
    /// The committer has stopped: take what is left and end.
    closed: bool,
    /// A batch is being written and synced (by the syncer, or inline by the
    /// committer when nothing else waits); batches finish in order.
    syncing: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.replies.is_empty()
    }
}

/// The hand-off between committer and syncer.
#[derive(Default)]
struct Handoff {
    next: Mutex<Batch>,
    /// Signalled when `next` gains records or closes (syncer waits), and when
    /// the syncer takes it (committer waits while it is full).
    changed: std::sync::Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Batch> {
        self.next.lock().expect("hand-off lock poisoned")
    }
}

/// The committer: see the module docs. It makes events while the syncer
/// writes and syncs the batch before, so the CPU work and the `fdatasync`
/// overlap, and everything made during one sync goes into the next.
fn commit_loop(inner: &Arc<Inner>, mut rx: mpsc::Receiver<Request>) {
    let handoff = Arc::new(Handoff::default());
    let syncer = {
        let (inner, handoff) = (inner.clone(), handoff.clone());
        std::thread::Builder::new()
            .name("weftlog-sync".into())
            .spawn(move || sync_loop(&inner, &handoff))
    };
    let syncer = match syncer {
        Ok(s) => s,
        Err(e) => {
            let e = format!("cannot start the sync thread: {e}");
            inner.lock().failed = Some(e.clone());
            while let Some(req) = rx.blocking_recv() {
                refuse(req, &e);
            }
            return;
        }
    };
    let mut reqs = Vec::new();
    let (mut pending, mut replies) = (Vec::new(), Vec::new());
    let mut buf = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        reqs.push(first);
        while reqs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        {
            let mut g = inner.lock();
            let failed = g.failed.clone();
            // Received events were applied before anything below.
            pending.append(&mut g.received);
            for req in reqs.drain(..) {
                match &failed {
                    None => replies.extend(inner.apply(&mut g, req, &mut pending)),
                    Some(e) => refuse(req, e),
                }
            }
        }
        if pending.is_empty() && replies.is_empty() {
            continue;
        }
        let mut next = handoff.lock();
        if !next.syncing && next.is_empty() && rx.is_empty() {
            // Nothing else is waiting: sync here rather than wake the syncer,
            // which saves a thread hop on an idle or single-writer node.
            next.syncing = true;
            drop(next);
            let batch = Batch {
                pending: std::mem::take(&mut pending),
                replies: std::mem::take(&mut replies),
                ..Batch::default()
            };
            finish(inner, batch, &mut buf);
            handoff.lock().syncing = false;
            handoff.changed.notify_all();
            continue;
        }
        while next.pending.len() >= MAX_BATCH_RECORDS {
            next = handoff.changed.wait(next).expect("hand-off lock poisoned");
        }
        // Replies without records still wait for the syncer: the event they
        // name may be in the batch it is syncing now.
        next.pending.append(&mut pending);
        next.replies.append(&mut replies);
        handoff.changed.notify_all();
    }
    // Events received after the last request still go to the log.
    let rest = std::mem::take(&mut inner.lock().received);
    let mut next = handoff.lock();
    next.pending.extend(rest);
    next.closed = true;
    handoff.changed.notify_all();
    drop(next);
    let _ = syncer.join();
}

/// Takes what the committer made and finishes it.
fn sync_loop(inner: &Inner, handoff: &Handoff) {
    let mut buf = Vec::new();
    loop {
        let batch = {
            let mut next = handoff.lock();
            while (next.is_empty() || next.syncing) && !next.closed {
                next = handoff.changed.wait(next).expect("hand-off lock poisoned");
            }
            if next.is_empty() {
                return; // closed and drained
            }
            next.syncing = true;
            let batch = Batch {
                pending: std::mem::take(&mut next.pending),
                replies: std::mem::take(&mut next.replies),
                ..Batch::default()
            };
            handoff.changed.notify_all();
            batch
        };
        finish(inner, batch, &mut buf);
        handoff.lock().syncing = false;
        handoff.changed.notify_all();
    }
}

/// Writes and syncs a batch, then acknowledges it (or reports the failure
/// that stopped the log).
fn finish(inner: &Inner, mut batch: Batch, buf: &mut Vec<u8>) {
    let failed = inner.lock().failed.clone();
    let failed = match failed {
        Some(e) => Some(e),
        None if batch.pending.is_empty() => None,
        None => inner.write(&mut batch.pending, buf).err().inspect(|e| {
            inner.lock().failed = Some(e.clone());
        }),
    };
    if failed.is_none() && !batch.pending.is_empty() && inner.feed.receiver_count() > 0 {
        let mut heads: BTreeMap<NodeId, u64> = BTreeMap::new();
        for p in batch.pending.iter().filter(|p| p.sig.is_some()) {
            heads.insert(p.author, p.seq);
        }
        let events = batch.pending.into_iter().map(|p| (p.id, p.bytes)).collect();
        // No receiver left is not an error: nobody is listening.
        let _ = inner.feed.send(Arc::new(Committed {
            heads: heads.into_iter().collect(),
            events,
        }));
    }
    for r in batch.replies {
        r.send(failed.as_deref());
    }
}

type Loaded = (State, Log<FileStorage>, Recovery, Durable);

/// Recovers and folds the log in `log_dir` ([`log::open_committed`]: an
/// interrupted batch is cut, each author's last signature verified), and
/// indexes the durable records for sync.
fn load(log_dir: &Path) -> Result<Loaded, NodeOpenError> {
    let storage = || FileStorage::new(log_dir).map_err(OpenError::Io);
    let fresh = || (State::new(), Durable::default(), 0u64);
    let (log, recovery, (state, durable, _)) =
        log::open_committed(storage, fresh, |(state, durable, index), frame, event| {
            durable
                .authors
                .entry(event.author)
                .or_default()
                .push((*index, event.hlc));
            if frame.sig.is_some() {
                durable.signed.insert(event.author, event.seq);
            }
            match state.insert(event, frame.id).map_err(|e| e.to_string())? {
                Inserted::New => {}
                Inserted::Duplicate => return Err("the event is in the log twice".into()),
            }
            *index += 1;
            Ok(())
        })?;
    Ok((state, log, recovery, durable))
}
