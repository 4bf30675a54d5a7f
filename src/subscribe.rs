//! Log positions, the log's epoch, and catch-up subscriptions.
//!
//! Every event in a node's log has a **position**: its place in that
//! node's log, counting from 1. Positions differ between nodes (each log
//! holds the events in the order it made or received them) and never
//! change within a log, except when the log itself is replaced.
//!
//! The **epoch** names one history of positions. It is a random 64-bit
//! number kept in the data directory's [`EPOCH_FILE`], made at `init` (or
//! at the first open of an older directory), and made again when the
//! node learns that its log was restored from a copy: an event it wrote
//! itself comes back from a peer or an import ([`Replica::own_returned`]),
//! so positions past the copy's end now name other events than a reader
//! saw. A reader that resumes with a position from another epoch starts
//! again from the beginning, and is told so.
//!
//! A resume [`Token`] carries the epoch, the position and a **check**: the
//! first four bytes of the id of the event at that position. The check
//! catches the restore the node cannot notice (a copy put back while no
//! peer is reachable, with new events written at the old positions): a
//! token whose event is not the one this log holds there, or whose
//! position lies past this log's end, names another history too.
//!
//! [`Node::subscribe_from`] replays the durable log after a position and
//! then follows the durable feed ([`Node::subscribe`]) with no gap and no
//! duplicate: it listens to the feed before it reads the log, skips what
//! the feed brings that it has already read, and reads the log again for
//! whatever the feed did not bring (a subscriber that fell behind the
//! feed's [`FEED_CAP`](crate::node::FEED_CAP) batches is caught up from the log, never dropped).
//! Only durable events are delivered.
//!
//! [`Replica::own_returned`]: weftlog_proto::replica::Replica::own_returned

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast;

use weftlog_proto::EventId;

use crate::node::{Committed, Inner, Node};
use crate::storage::sync_dir;

/// The file in a data directory that holds the log's epoch (16 hex
/// digits and a newline).
pub const EPOCH_FILE: &str = "epoch";

/// Events a subscription reads from the log at once, at most.
pub const READ_CHUNK: usize = 4096;

/// The epoch of a node's log: one history of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Epoch {
    type Err = String;

    fn from_str(s: &str) -> Result<Epoch, String> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("an epoch is 16 hex digits, not {s:?}"));
        }
        u64::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|e| format!("epoch {s:?}: {e}"))
    }
}

/// The first four bytes of an event's id: a token's check.
pub fn check_of(id: &EventId) -> u32 {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}

/// Where a reader stands in a node's log: `EPOCH-POS-CHECK` in text
/// (`CHECK` is 8 hex digits), as the SSE `id:` of each event and the SQL
/// checkpoint carry it. Position 0 (the beginning) has no event, so no
/// check: `EPOCH-0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The epoch the position belongs to.
    pub epoch: Epoch,
    /// The position of the last event read (0: none).
    pub pos: u64,
    /// [`check_of`] the event at `pos`; `None` at position 0.
    pub check: Option<u32>,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.pos)?;
        if let Some(c) = self.check {
            write!(f, "-{c:08x}")?;
        }
        Ok(())
    }
}

impl FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Token, String> {
        let mut parts = s.split('-');
        let (Some(epoch), Some(pos)) = (parts.next(), parts.next()) else {
            return Err(format!("a position is EPOCH-POS[-CHECK], not {s:?}"));
        };
        let check = parts.next();
        if parts.next().is_some() {
            return Err(format!("a position is EPOCH-POS[-CHECK], not {s:?}"));
        }
        let epoch = epoch.parse()?;
        let pos = pos
            .parse::<u64>()
            .map_err(|_| format!("position {pos:?} in {s:?} is not a number"))?;
        let check = match check {
            None => None,
            Some(c) if c.len() == 8 => Some(
                u32::from_str_radix(c, 16)
                    .map_err(|_| format!("check {c:?} is not 8 hex digits"))?,
            ),
            Some(c) => return Err(format!("check {c:?} is not 8 hex digits")),
        };
        Ok(Token { epoch, pos, check })
    }
}

/// Where a reader resumes, once its token was weighed against the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The token names this history: go on after `pos`.
    After(u64),
    /// The token names another history: start from the beginning, for the
    /// reason given.
    Restart(String),
}

/// An event read from the log with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned {
    /// The event's position in this node's log (from 1).
    pub pos: u64,
    /// Its id.
    pub id: EventId,
    /// Its canonical encoding.
    pub bytes: Vec<u8>,
}

/// Why a subscription or a log read stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The log could not be read.
    #[error("reading the log: {0}")]
    Log(String),
    /// The log's epoch changed while the subscription ran (the node found
    /// it was restored): positions from before name another history.
    #[error("the log's epoch changed from {was} to {now} (the node found its log restored from a copy); read again from the beginning")]
    EpochChanged {
        /// The epoch the subscription started in.
        was: Epoch,
        /// The epoch now.
        now: Epoch,
    },
}

/// The epoch in memory and where it is kept.
#[derive(Debug)]
pub(crate) struct EpochCell {
    path: PathBuf,
    now: AtomicU64,
    /// [`Replica::own_returned`](weftlog_proto::replica::Replica::own_returned)
    /// when the epoch was last made.
    returned: Mutex<u64>,
}

impl EpochCell {
    /// Reads the epoch of the data directory `dir`, or makes and stores
    /// one where there is none.
    pub(crate) fn open(dir: &Path) -> io::Result<EpochCell> {
        let path = dir.join(EPOCH_FILE);
        let epoch = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<Epoch>().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let epoch = fresh();
                store(&path, epoch)?;
                epoch
            }
            Err(e) => return Err(e),
        };
        Ok(EpochCell {
            path,
            now: AtomicU64::new(epoch.0),
            returned: Mutex::new(0),
        })
    }

    pub(crate) fn get(&self) -> Epoch {
        Epoch(self.now.load(Ordering::Acquire))
    }

    /// Makes a new epoch if own events came back since the last time
    /// (`returned` is the replica's count of them).
    pub(crate) fn renew_if_returned(&self, returned: u64) {
        let mut seen = self.returned.lock().expect("epoch lock poisoned");
        if returned == *seen {
            return;
        }
        *seen = returned;
        let epoch = fresh();
        // In memory first: readers in this process see the new history at
        // once. A failed write leaves the old epoch on disk, and the check
        // of a resume token still catches the change.
        self.now.store(epoch.0, Ordering::Release);
        match store(&self.path, epoch) {
            Ok(()) => tracing::warn!(
                %epoch,
                "events this node wrote came back from a peer: its log was restored from a \
                 copy; the log's positions start a new epoch (readers start again)"
            ),
            Err(e) => tracing::error!(
                %epoch,
                "the log was restored from a copy, but the new epoch could not be stored in {}: {e}",
                self.path.display()
            ),
        }
    }
}

fn fresh() -> Epoch {
    Epoch(rand_core::RngCore::next_u64(&mut rand_core::OsRng))
}

/// Writes `epoch` to `path` durably (a temporary file, synced and renamed).
fn store(path: &Path, epoch: Epoch) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{epoch}")?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Reads durable records at positions `from + 1 ..= from + max`.
fn read_after(inner: &Inner, from: u64, max: usize) -> Result<Vec<Positioned>, ReadError> {
    let durable = inner.durable.load(Ordering::Acquire);
    let max = (max as u64).min(durable.saturating_sub(from));
    let mut out = Vec::with_capacity(max as usize);
    let mut log = inner.log.lock().expect("log lock poisoned");
    log.read_range(from, max, |index, frame| {
        out.push(Positioned {
            pos: index + 1,
            id: frame.id,
            bytes: frame.bytes.to_vec(),
        })
    })
    .map_err(|e| ReadError::Log(e.to_string()))?;
    Ok(out)
}

impl Node {
    /// The log's epoch now.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch.get()
    }

    /// The position of the last durable event (0: the log is empty).
    pub fn durable_pos(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// Durable events at positions `from + 1 ..= from + max`, in log order
    /// (fewer at the end of the durable log).
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Positioned>, ReadError> {
        read_after(&self.inner, from, max)
    }

    /// The token of position `pos` in this log now (its check read from
    /// the log), or `None` past the durable end.
    pub fn token_at(&self, pos: u64) -> Result<Option<Token>, ReadError> {
        let epoch = self.epoch();
        if pos == 0 {
            return Ok(Some(Token {
                epoch,
                pos,
                check: None,
            }));
        }
        Ok(self.read_from(pos - 1, 1)?.first().map(|e| Token {
            epoch,
            pos,
            check: Some(check_of(&e.id)),
        }))
    }

    /// Weighs a reader's token against this log: whether it resumes after
    /// its position or starts again (module docs).
    pub fn resume(&self, token: &Token) -> Result<Resume, ReadError> {
        let epoch = self.epoch();
        if token.epoch != epoch {
            return Ok(Resume::Restart(format!(
                "position {token} is from epoch {}, and this log is in epoch {epoch} (it was \
                 restored or made anew): starting again from the beginning",
                token.epoch
            )));
        }
        let durable = self.durable_pos();
        if token.pos > durable {
            return Ok(Resume::Restart(format!(
                "position {token} lies past the end of this log ({durable} events): it names \
                 another history; starting again from the beginning"
            )));
        }
        if let Some(check) = token.check.filter(|_| token.pos > 0) {
            let at = self.read_from(token.pos - 1, 1)?;
            let here = at.first().map(|e| check_of(&e.id));
            if here != Some(check) {
                return Ok(Resume::Restart(format!(
                    "position {token} names event {check:08x}…, and this log holds {} there: \
                     it names another history; starting again from the beginning",
                    here.map_or_else(|| "nothing".into(), |c| format!("{c:08x}…"))
                )));
            }
        }
        Ok(Resume::After(token.pos))
    }

    /// Every durable event after position `from`, then every event made
    /// durable from now on, each once, in log order (module docs).
    pub fn subscribe_from(&self, from: u64) -> LogSubscription {
        // The feed first, so that nothing made durable from here on is
        // missed; the log is read after it.
        LogSubscription {
            rx: self.inner.feed.subscribe(),
            inner: Arc::downgrade(&self.inner),
            epoch: self.epoch(),
            // A position from a client may be any number.
            next: from.saturating_add(1),
            ready: VecDeque::new(),
            done: false,
        }
    }
}

/// A catch-up subscription ([`Node::subscribe_from`]). It ends (`None`)
/// once the node is closed and everything durable was delivered.
pub struct LogSubscription {
    rx: broadcast::Receiver<Arc<Committed>>,
    /// The node, while it is open: the feed's sender lives in it, so the
    /// feed closes when the node goes.
    inner: Weak<Inner>,
    epoch: Epoch,
    /// The position of the next event to deliver.
    next: u64,
    ready: VecDeque<Positioned>,
    done: bool,
}

impl LogSubscription {
    /// The epoch the subscription reads in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The position of the last event delivered (or the start).
    pub fn pos(&self) -> u64 {
        self.next - 1
    }

    /// The next event, or `None` once the node closed. After an error
    /// the subscription ends.
    pub async fn next(&mut self) -> Option<Result<Positioned, ReadError>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.next = e.pos + 1;
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill().await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    /// Events that are ready now, without waiting: up to [`READ_CHUNK`].
    /// Empty when the next event is not durable yet (or the node closed).
    pub async fn next_batch(&mut self) -> Option<Result<Vec<Positioned>, ReadError>> {
        if self.ready.is_empty() {
            match self.next().await? {
                Ok(e) => self.ready.push_front(e),
                Err(e) => return Some(Err(e)),
            }
        }
        let batch: Vec<Positioned> = self.ready.drain(..).collect();
        if let Some(last) = batch.last() {
            self.next = last.pos + 1;
        }
        Some(Ok(batch))
    }

    /// Puts the next events in `ready`: from the log while it holds more
    /// than was delivered, else from the feed, waiting for it.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let Some(inner) = self.inner.upgrade() else {
            return self.drain_closed();
        };
        let now = inner.epoch.get();
        if now != self.epoch {
            return Err(ReadError::EpochChanged {
                was: self.epoch,
                now,
            });
        }
        if inner.durable.load(Ordering::Acquire) >= self.next {
            let from = self.next - 1;
            let read = tokio::task::spawn_blocking(move || read_after(&inner, from, READ_CHUNK))
                .await
                .map_err(|e| ReadError::Log(format!("the log reader failed: {e}")))??;
            self.ready.extend(read);
            return Ok(());
        }
        drop(inner);
        match self.rx.recv().await {
            Ok(batch) => self.take(&batch),
            // Caught up from the log at the next call.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => self.done = true,
        }
        Ok(())
    }

    /// Keeps what a feed batch holds past the last delivered position; a
    /// batch that starts past it leaves the gap to the log.
    fn take(&mut self, batch: &Committed) {
        if batch.epoch != self.epoch || batch.first > self.next {
            return;
        }
        let skip = (self.next - batch.first) as usize;
        for (i, (id, bytes)) in batch.events.iter().enumerate().skip(skip) {
            self.ready.push_back(Positioned {
                pos: batch.first + i as u64,
                id: *id,
                bytes: bytes.clone(),
            });
        }
    }

    /// The node is gone: whatever the feed still holds is delivered.
    fn drain_closed(&mut self) -> Result<(), ReadError> {
        loop {
            match self.rx.try_recv() {
                Ok(batch) => self.take(&batch),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        self.done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_say_why() {
        let t = Token {
            epoch: Epoch(0x0123_4567_89ab_cdef),
            pos: 42,
            check: Some(0xdead_beef),
        };
        assert_eq!(t.to_string(), "0123456789abcdef-42-deadbeef");
        assert_eq!(t.to_string().parse::<Token>().unwrap(), t);
        let start = Token {
            epoch: Epoch(7),
            pos: 0,
            check: None,
        };
        assert_eq!(start.to_string().parse::<Token>().unwrap(), start);
        for bad in [
            "",
            "42",
            "xyz-1",
            "0123456789abcdef-x",
            "0123456789abcdef-1-2",
            "0123456789abcdef-1-deadbeef-0",
        ] {
            let e = bad.parse::<Token>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
