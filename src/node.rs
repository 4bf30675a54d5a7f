//! A node: its key, its durable log and its folded state, with group commit.
//!
//! Appends that arrive together share one `fdatasync`: the first appender to
//! find no sync under way becomes the leader, takes every pending record,
//! signs the last of its own, writes and syncs them, and wakes the others.
//! An append returns only after the sync that covers it. A failed write or
//! sync is fatal: the node refuses every later append until it is reopened
//! (and recovery has decided what is on disk).
//!
//! State is updated when an event is made, before it is durable, so that the
//! next event in the same batch sees it; readers may see an event a moment
//! before its append is acknowledged. A crash can lose only unacknowledged
//! events.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use weftlog_proto::event::{verify, Event, Keypair, Signature};
use weftlog_proto::exchange::{self, ImportError, Outgoing};
use weftlog_proto::log::{encode_frame, Log, OpenError, Recovery, TornTail};
use weftlog_proto::state::{Draft, Inserted, PrepareError, Prepared, State};
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

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// New events stored.
    pub imported: u64,
    /// Events already present.
    pub duplicates: u64,
}

struct Pending {
    bytes: Vec<u8>,
    id: EventId,
    author: NodeId,
    sig: Option<Signature>,
}

struct Shared {
    state: State,
    clock: HlcClock,
    pending: Vec<Pending>,
    /// Records handed to `pending` so far, and those durable.
    enqueued: u64,
    durable: u64,
    syncing: bool,
    failed: Option<String>,
}

/// An open node. Safe to share between threads.
pub struct Node {
    dir: PathBuf,
    key: Keypair,
    id: NodeId,
    shared: Mutex<Shared>,
    log: Mutex<(Log<FileStorage>, Vec<u8>)>,
    durable_cv: Condvar,
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
        let (state, log, recovery) = load(&log_dir)?;
        let clock = HlcClock::new(state.max_hlc());
        let durable = log.records();
        Ok((
            Node {
                dir: dir.to_path_buf(),
                id: key.node_id(),
                key,
                shared: Mutex::new(Shared {
                    state,
                    clock,
                    pending: Vec::new(),
                    enqueued: durable,
                    durable,
                    syncing: false,
                    failed: None,
                }),
                log: Mutex::new((log, Vec::new())),
                durable_cv: Condvar::new(),
                _lock: lock,
            },
            recovery,
        ))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves state we cannot trust.
        self.shared.lock().expect("node state lock poisoned")
    }

    /// Runs `f` on the current state.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// Appends a local command as an event and waits until it is durable.
    pub fn append(&self, draft: Draft) -> Result<Appended, AppendError> {
        let mut g = self.lock();
        if let Some(e) = &g.failed {
            return Err(AppendError::Fatal(e.clone()));
        }
        let g2 = &mut *g;
        let out = match g2.state.prepare(self.id, &mut g2.clock, wall_ms(), draft)? {
            Prepared::Existing(rec) => Appended {
                id: rec.id,
                author: rec.author,
                seq: rec.seq,
                hlc: rec.hlc,
                stream: rec.stream,
                version: rec.version,
                existing: true,
            },
            Prepared::New(event) => {
                let (bytes, id) = event.seal();
                // Invariant: `prepare` checked the event against this state.
                g2.state.insert(&event, id).expect("prepared event inserts");
                g2.pending.push(Pending {
                    bytes,
                    id,
                    author: self.id,
                    sig: None,
                });
                g2.enqueued += 1;
                Appended {
                    id,
                    author: self.id,
                    seq: event.seq,
                    hlc: event.hlc,
                    version: g2.state.version(&event.stream),
                    stream: event.stream,
                    existing: false,
                }
            }
        };
        // An existing command's event may still be in a pending batch.
        let ticket = g.enqueued;
        self.wait_durable(g, ticket).map_err(AppendError::Fatal)?;
        Ok(out)
    }

    /// Waits until record `ticket` is durable, leading a group commit if
    /// no other thread is.
    fn wait_durable<'a>(
        &'a self,
        mut g: MutexGuard<'a, Shared>,
        ticket: u64,
    ) -> Result<(), String> {
        loop {
            if g.durable >= ticket {
                return Ok(());
            }
            if let Some(e) = &g.failed {
                return Err(e.clone());
            }
            if g.syncing {
                g = self.durable_cv.wait(g).expect("node state lock poisoned");
                continue;
            }
            g.syncing = true;
            let mut batch = std::mem::take(&mut g.pending);
            let upto = g.enqueued;
            // Sign the last own record: it covers the batch's own events.
            if let Some(p) = batch.iter_mut().rev().find(|p| p.author == self.id) {
                let sig = self.key.sign(&p.id);
                p.sig = Some(sig);
            }
            drop(g);
            let r = self.write(&batch);
            g = self.lock();
            g.syncing = false;
            match r {
                Ok(()) => g.durable = upto,
                Err(e) => g.failed = Some(e.to_string()),
            }
            self.durable_cv.notify_all();
        }
    }

    fn write(&self, batch: &[Pending]) -> Result<(), weftlog_proto::log::AppendError> {
        let mut guard = self.log.lock().expect("log lock poisoned");
        let (log, buf) = &mut *guard;
        buf.clear();
        for p in batch {
            encode_frame(buf, &p.bytes, &p.id, p.sig.as_ref());
        }
        log.append(buf, batch.len() as u64)
    }

    /// Imports an export file: all of it, or none of it.
    pub fn import(&self, data: &[u8]) -> Result<Imported, NodeImportError> {
        let mut items = exchange::read_export(data)?;
        exchange::authenticate(&mut items)?;
        let mut g = self.lock();
        if let Some(e) = &g.failed {
            return Err(NodeImportError::Fatal(e.clone()));
        }
        let mut scratch = g.state.clone();
        let mut new = Vec::new();
        let mut duplicates = 0;
        for item in &items {
            match scratch.insert(&item.event, item.id) {
                Ok(Inserted::New) => new.push(item),
                Ok(Inserted::Duplicate) => duplicates += 1,
                Err(e) => return Err(ImportError::event(item, e).into()),
            }
        }
        g.clock.observe(scratch.max_hlc());
        g.state = scratch;
        for item in &new {
            g.pending.push(Pending {
                bytes: item.bytes.clone(),
                id: item.id,
                author: item.event.author,
                sig: item.sig,
            });
        }
        g.enqueued += new.len() as u64;
        let ticket = g.enqueued;
        self.wait_durable(g, ticket)
            .map_err(NodeImportError::Fatal)?;
        Ok(Imported {
            imported: new.len() as u64,
            duplicates,
        })
    }

    /// Reads every durable event in log order.
    pub fn scan(&self, mut visit: impl FnMut(&Event, EventId)) -> Result<(), OpenError> {
        let mut guard = self.log.lock().expect("log lock poisoned");
        guard.0.scan(|frame| {
            let event = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            visit(&event, frame.id);
            Ok(())
        })
    }

    /// An export file holding every event past `since` (author → seq; all
    /// events when empty), each author's run ending at its head, with the
    /// signatures the log holds.
    pub fn export(&self, since: &BTreeMap<NodeId, u64>) -> Result<(Vec<u8>, usize), OpenError> {
        // Per author: the id and signature of its last record.
        let mut heads: BTreeMap<NodeId, (u64, EventId, Option<Signature>)> = BTreeMap::new();
        let mut index = 0u64;
        let mut out = Vec::new();
        let mut guard = self.log.lock().expect("log lock poisoned");
        guard.0.scan(|frame| {
            let e = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            heads.insert(e.author, (index, frame.id, frame.sig));
            index += 1;
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
        drop(guard);
        // Every finished batch ends each author's run with a signed record,
        // and the scan above saw only finished batches.
        for (author, (index, id, sig)) in &heads {
            if sig.is_none() {
                return Err(OpenError::Refused {
                    index: *index,
                    id: *id,
                    reason: format!("the last record of author {author} carries no signature"),
                });
            }
        }
        let n = out.len();
        Ok((exchange::write_export(out), n))
    }
}

type Loaded = (State, Log<FileStorage>, Recovery);

/// Recovers and folds the log in `log_dir`. Records after an author's last
/// signed record can only be an interrupted batch (its signature is the
/// batch's last own record): they were never acknowledged, so they are cut
/// and the log is folded again.
fn load(log_dir: &Path) -> Result<Loaded, NodeOpenError> {
    let mut earlier: Option<TornTail> = None;
    loop {
        let storage = FileStorage::new(log_dir).map_err(io_err(log_dir))?;
        let mut state = State::new();
        // Per author: its last signed record (index, seq, id, sig), and the
        // index of the first record after that one.
        let mut signed: BTreeMap<NodeId, (u64, u64, EventId, Signature)> = BTreeMap::new();
        let mut unsigned_from: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut index = 0u64;
        let (mut log, mut recovery) = Log::open(storage, |frame| {
            let event = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            match state.insert(&event, frame.id).map_err(|e| e.to_string())? {
                Inserted::New => {}
                Inserted::Duplicate => return Err("the event is in the log twice".into()),
            }
            match frame.sig {
                Some(sig) => {
                    signed.insert(event.author, (index, event.seq, frame.id, sig));
                    unsigned_from.remove(&event.author);
                }
                None => {
                    unsigned_from.entry(event.author).or_insert(index);
                }
            }
            index += 1;
            Ok(())
        })?;
        if let Some(&keep) = unsigned_from.values().min() {
            let dropped = log.records() - keep;
            let cut = log.cut(keep)?;
            let note = format!("{dropped} records of an interrupted batch had no signature");
            // What an earlier pass or this open's framing check removed lay
            // after the cut, in the same segment.
            let before = recovery.torn.or(earlier);
            earlier = Some(TornTail {
                segment: cut.segment,
                offset: cut.offset,
                dropped_bytes: cut.dropped_bytes + before.as_ref().map_or(0, |t| t.dropped_bytes),
                reason: match before {
                    Some(t) => format!("{}; {note}", t.reason),
                    None => note,
                },
            });
            continue;
        }
        if recovery.torn.is_none() {
            recovery.torn = earlier.take();
        }
        for (author, (index, seq, id, sig)) in &signed {
            verify(author, id, sig).map_err(|e| OpenError::Refused {
                index: *index,
                id: *id,
                reason: format!(
                    "{}: head signature: {e}",
                    exchange::describe(id, author, *seq)
                ),
            })?;
        }
        recovery.records = log.records();
        return Ok((state, log, recovery));
    }
}
