//! The durable log: record framing, segments, and recovery, over a
//! [`Storage`] trait so the node (files) and simulations (memory with a
//! crash model) share one implementation.
//!
//! Layout (`PROTOCOL.md`, "Log"): a log is a sequence of segments, each named
//! by the index of its first record. A segment starts with a 16-byte header
//! and holds whole frames:
//!
//! ```text
//! u32 LE  n        length of the event encoding, 1..=MAX_EVENT_BYTES
//! u8      flags    0: unsigned, 1: a signature follows the event
//! [n]     event    canonical encoding
//! [64]    sig      ed25519 signature over the id (flags == 1 only)
//! [32]    id       EventId = blake3(event): the record's check
//! ```
//!
//! Recovery on open: a frame that is incomplete or fails its check, with no
//! valid frame after it in the last segment, is a torn tail: truncated and
//! reported. Damage followed by a valid frame, or anywhere but the last
//! segment, is corruption: open fails and nothing is served.

use std::io;

use crate::event::{Signature, MAX_EVENT_BYTES};
use crate::id::EventId;

/// Segment header magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"weftseg\0";
/// Export file magic (same frames, different header).
pub const EXPORT_MAGIC: [u8; 8] = *b"weftexp\0";
/// Log and export file format version.
pub const LOG_VERSION: u32 = 1;
/// Header bytes at the start of every segment and export file.
pub const HEADER_BYTES: usize = 16;
/// A segment is closed and a new one started once it reaches this size.
pub const SEGMENT_TARGET_BYTES: u64 = 64 * 1024 * 1024;
/// Fixed bytes of a frame besides the event and the signature.
pub const FRAME_OVERHEAD: usize = 4 + 1 + 32;
/// Signature bytes.
pub const SIG_BYTES: usize = 64;

/// Storage for log segments. Every call is synchronous; `append` need not be
/// durable until `sync` returns.
pub trait Storage {
    /// The segments present, by base record index, in any order.
    fn list(&mut self) -> io::Result<Vec<u64>>;
    /// A whole segment.
    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>>;
    /// Creates an empty segment and makes its existence durable.
    fn create(&mut self, segment: u64) -> io::Result<()>;
    /// Appends bytes to a segment.
    fn append(&mut self, segment: u64, data: &[u8]) -> io::Result<()>;
    /// Makes a segment's appended bytes durable (fdatasync).
    fn sync(&mut self, segment: u64) -> io::Result<()>;
    /// Cuts a segment to `len` bytes, durably.
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()>;
    /// Removes a segment, durably.
    fn remove(&mut self, segment: u64) -> io::Result<()>;
}

/// A decoded frame, borrowing the buffer it was read from.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The event's canonical encoding; `blake3(bytes) == id` was checked.
    pub bytes: &'a [u8],
    /// The author's signature, if the frame carries one (not covered by the check).
    pub sig: Option<Signature>,
    /// The event id.
    pub id: EventId,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The buffer ends inside the frame.
    #[error("record is incomplete ({have} of {need} bytes)")]
    Incomplete {
        /// Bytes present.
        have: usize,
        /// Bytes the header announces.
        need: usize,
    },
    /// The length is zero or above the limit.
    #[error("record length {0} is outside 1..={MAX_EVENT_BYTES}")]
    BadLength(u32),
    /// Unknown flag bits.
    #[error("record flags {0:#04x} are not 0 or 1")]
    BadFlags(u8),
    /// The id does not match the event bytes.
    #[error("record check failed: id {claimed} does not match its event bytes")]
    IdMismatch {
        /// The id the record claims.
        claimed: EventId,
    },
}

/// Appends a frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, event: &[u8], id: &EventId, sig: Option<&Signature>) {
    debug_assert!(!event.is_empty() && event.len() <= MAX_EVENT_BYTES);
    out.extend_from_slice(&(event.len() as u32).to_le_bytes());
    out.push(sig.is_some() as u8);
    out.extend_from_slice(event);
    if let Some(sig) = sig {
        out.extend_from_slice(&sig.0);
    }
    out.extend_from_slice(&id.0);
}

/// Decodes the frame at the start of `buf`; returns it and its length.
/// The length is checked before anything is allocated or hashed.
pub fn decode_frame(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    let incomplete = |need| FrameError::Incomplete {
        have: buf.len(),
        need,
    };
    if buf.len() < 5 {
        return Err(incomplete(5));
    }
    let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if n == 0 || n as usize > MAX_EVENT_BYTES {
        return Err(FrameError::BadLength(n));
    }
    let flags = buf[4];
    if flags > 1 {
        return Err(FrameError::BadFlags(flags));
    }
    let n = n as usize;
    let sig_len = if flags == 1 { SIG_BYTES } else { 0 };
    let total = FRAME_OVERHEAD + n + sig_len;
    if buf.len() < total {
        return Err(incomplete(total));
    }
    let bytes = &buf[5..5 + n];
    let sig = (flags == 1).then(|| {
        let mut s = [0u8; SIG_BYTES];
        s.copy_from_slice(&buf[5 + n..5 + n + SIG_BYTES]);
        Signature(s)
    });
    let mut claimed = [0u8; 32];
    claimed.copy_from_slice(&buf[total - 32..total]);
    let claimed = EventId(claimed);
    if blake3::hash(bytes).as_bytes() != &claimed.0 {
        return Err(FrameError::IdMismatch { claimed });
    }
    Ok((
        Frame {
            bytes,
            sig,
            id: claimed,
        },
        total,
    ))
}

/// A 16-byte file header: magic, format version, 4 reserved zero bytes.
pub fn header(magic: [u8; 8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&magic);
    h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// Checks a file header; the error says what is wrong.
pub fn check_header(data: &[u8], magic: [u8; 8], what: &str) -> Result<(), String> {
    if data.len() < HEADER_BYTES {
        return Err(format!(
            "{what} is {} bytes, shorter than its header",
            data.len()
        ));
    }
    if data[..8] != magic {
        return Err(format!(
            "{what} does not start with the weftlog magic bytes"
        ));
    }
    let v = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if v != LOG_VERSION {
        return Err(format!(
            "{what} has format version {v}; this build reads version {LOG_VERSION}"
        ));
    }
    Ok(())
}

/// The offset of the first valid frame at or after `from`, if any.
fn next_valid_frame(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len().saturating_sub(FRAME_OVERHEAD)).find(|&p| decode_frame(&data[p..]).is_ok())
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records in the log.
    pub records: u64,
    /// Segments in the log.
    pub segments: usize,
    /// A torn tail that was truncated.
    pub torn: Option<TornTail>,
}

/// A torn tail: where it started and how many bytes were cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TornTail {
    /// The segment (its base record index).
    pub segment: u64,
    /// Byte offset of the first bad byte.
    pub offset: u64,
    /// Bytes removed.
    pub dropped_bytes: u64,
    /// Why the bytes there are not a record.
    pub reason: String,
}

/// Why a log cannot be opened. Nothing is served from a log that fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Storage failed.
    #[error("log storage: {0}")]
    Io(#[from] io::Error),
    /// Damage that is not a torn tail.
    #[error("log is corrupt: segment {segment} at byte {offset}: {reason}")]
    Corrupt {
        /// The segment (its base record index).
        segment: u64,
        /// Byte offset in the segment.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record is intact but the caller refused its event.
    #[error("log record {index} (event {id}) is refused: {reason}")]
    Refused {
        /// The record's index in the log.
        index: u64,
        /// The event's id.
        id: EventId,
        /// Why.
        reason: String,
    },
}

/// Why an append failed. After any failure the log refuses further appends
/// (a failed fsync is fatal): reopen it to recover.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Storage failed during this append.
    #[error("log write or sync failed: {0}")]
    Io(#[from] io::Error),
    /// An earlier append failed.
    #[error("the log stopped accepting appends after a failed write or sync; reopen it")]
    Poisoned,
}

/// An open log.
#[derive(Debug)]
pub struct Log<S> {
    storage: S,
    /// `(base record index, bytes)` of each segment, ascending.
    segments: Vec<(u64, u64)>,
    records: u64,
    poisoned: bool,
}

impl<S: Storage> Log<S> {
    /// Opens (or creates) the log, recovering as the module docs say, and
    /// hands every record to `visit` in log order. An error from `visit`
    /// fails the open with [`OpenError::Refused`].
    pub fn open(
        mut storage: S,
        mut visit: impl FnMut(Frame<'_>) -> Result<(), String>,
    ) -> Result<(Log<S>, Recovery), OpenError> {
        let mut names = storage.list()?;
        names.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = Vec::with_capacity(names.len().max(1));
        let mut records = 0u64;
        for (i, &seg) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            let corrupt = |offset: usize, reason: String| OpenError::Corrupt {
                segment: seg,
                offset: offset as u64,
                reason,
            };
            if seg != records {
                return Err(corrupt(
                    0,
                    format!("segment starts at record {seg}, but {records} records precede it"),
                ));
            }
            let data = storage.read(seg)?;
            if data.len() < HEADER_BYTES && last {
                // Created but its header never became durable.
                storage.truncate(seg, 0)?;
                storage.append(seg, &header(SEGMENT_MAGIC))?;
                storage.sync(seg)?;
                recovery.torn = Some(TornTail {
                    segment: seg,
                    offset: 0,
                    dropped_bytes: data.len() as u64,
                    reason: "segment header incomplete".into(),
                });
                segments.push((seg, HEADER_BYTES as u64));
                continue;
            }
            check_header(&data, SEGMENT_MAGIC, "segment").map_err(|r| corrupt(0, r))?;
            let mut off = HEADER_BYTES;
            while off < data.len() {
                match decode_frame(&data[off..]) {
                    Ok((frame, used)) => {
                        visit(frame).map_err(|reason| OpenError::Refused {
                            index: records,
                            id: frame.id,
                            reason,
                        })?;
                        records += 1;
                        off += used;
                    }
                    Err(e) if !last => return Err(corrupt(off, e.to_string())),
                    Err(e) => {
                        if let Some(p) = next_valid_frame(&data, off + 1) {
                            return Err(corrupt(
                                off,
                                format!("{e}, and a valid record follows at byte {p}"),
                            ));
                        }
                        storage.truncate(seg, off as u64)?;
                        recovery.torn = Some(TornTail {
                            segment: seg,
                            offset: off as u64,
                            dropped_bytes: (data.len() - off) as u64,
                            reason: e.to_string(),
                        });
                        break;
                    }
                }
            }
            segments.push((seg, off as u64));
        }
        if segments.is_empty() {
            storage.create(0)?;
            storage.append(0, &header(SEGMENT_MAGIC))?;
            storage.sync(0)?;
            segments.push((0, HEADER_BYTES as u64));
        }
        recovery.records = records;
        recovery.segments = segments.len();
        Ok((
            Log {
                storage,
                segments,
                records,
                poisoned: false,
            },
            recovery,
        ))
    }

    /// Records in the log.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes in the log, headers included.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Appends `count` whole frames held in `frames` and syncs them: when this
    /// returns `Ok`, they are durable.
    pub fn append(&mut self, frames: &[u8], count: u64) -> Result<(), AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        let r = self.append_inner(frames, count);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn append_inner(&mut self, frames: &[u8], count: u64) -> Result<(), AppendError> {
        // Invariant: `segments` is never empty after open.
        let &(mut seg, mut len) = self.segments.last().expect("open made a segment");
        if len >= SEGMENT_TARGET_BYTES {
            seg = self.records;
            self.storage.create(seg)?;
            self.storage.append(seg, &header(SEGMENT_MAGIC))?;
            len = HEADER_BYTES as u64;
            self.segments.push((seg, len));
        }
        self.storage.append(seg, frames)?;
        self.storage.sync(seg)?;
        // Invariant: pushed or present above.
        self.segments.last_mut().expect("segment").1 = len + frames.len() as u64;
        self.records += count;
        Ok(())
    }

    /// Reads every record again, in log order.
    pub fn scan(
        &mut self,
        mut visit: impl FnMut(Frame<'_>) -> Result<(), String>,
    ) -> Result<(), OpenError> {
        let mut index = 0u64;
        for &(seg, len) in &self.segments {
            let data = self.storage.read(seg)?;
            let mut off = HEADER_BYTES;
            while off < (len as usize).min(data.len()) {
                let (frame, used) = decode_frame(&data[off..]).map_err(|e| OpenError::Corrupt {
                    segment: seg,
                    offset: off as u64,
                    reason: e.to_string(),
                })?;
                visit(frame).map_err(|reason| OpenError::Refused {
                    index,
                    id: frame.id,
                    reason,
                })?;
                index += 1;
                off += used;
            }
        }
        Ok(())
    }

    /// Cuts the log back to its first `keep` records, durably. For records
    /// that recovery above this layer finds unusable (an interrupted batch
    /// whose signature never reached the disk).
    ///
    /// Returns where the cut starts and how many bytes it removed.
    ///
    /// # Panics
    /// If `keep` is more than the log holds.
    pub fn cut(&mut self, keep: u64) -> Result<TornTail, OpenError> {
        let mut dropped_bytes = 0;
        assert!(keep <= self.records, "cut beyond the end of the log");
        while let Some(&(seg, _)) = self.segments.last() {
            if seg <= keep || self.segments.len() == 1 {
                break;
            }
            self.storage.remove(seg)?;
            dropped_bytes += self.segments.pop().map_or(0, |s| s.1);
        }
        // Invariant: the first segment is never removed.
        let (seg, len) = *self.segments.last().expect("segment");
        let data = self.storage.read(seg)?;
        let mut off = HEADER_BYTES;
        let mut index = seg;
        while index < keep && off < len as usize {
            let (_, used) = decode_frame(&data[off..]).map_err(|e| OpenError::Corrupt {
                segment: seg,
                offset: off as u64,
                reason: e.to_string(),
            })?;
            off += used;
            index += 1;
        }
        self.storage.truncate(seg, off as u64)?;
        // Invariant: as above.
        self.segments.last_mut().expect("segment").1 = off as u64;
        self.records = keep;
        Ok(TornTail {
            segment: seg,
            offset: off as u64,
            dropped_bytes: dropped_bytes + len - off as u64,
            reason: String::new(),
        })
    }

    /// The storage, for tests that crash and reopen.
    pub fn into_storage(self) -> S {
        self.storage
    }
}

/// In-memory storage with a crash model: each segment keeps the bytes that
/// were synced (`durable`) and the bytes written since (`pending`).
/// [`MemStorage::crash`] keeps the durable image plus a prefix of the
/// pending bytes, as a power cut may.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    segments: std::collections::BTreeMap<u64, MemSegment>,
    /// When set, `sync` fails (to test that failed syncs are fatal).
    pub fail_sync: bool,
}

#[derive(Debug, Clone, Default)]
struct MemSegment {
    durable: Vec<u8>,
    pending: Vec<u8>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Simulates a crash: pending bytes are lost except the first
    /// `keep_pending` bytes of each segment's pending data (a torn write).
    pub fn crash(&mut self, keep_pending: usize) {
        for s in self.segments.values_mut() {
            let keep = keep_pending.min(s.pending.len());
            let kept: Vec<u8> = s.pending.drain(..keep).collect();
            s.durable.extend_from_slice(&kept);
            s.pending.clear();
        }
    }

    /// A segment's current bytes, for tests that damage them.
    pub fn bytes_mut(&mut self, segment: u64) -> Option<&mut Vec<u8>> {
        self.segments.get_mut(&segment).map(|s| {
            let p = std::mem::take(&mut s.pending);
            s.durable.extend_from_slice(&p);
            &mut s.durable
        })
    }
}

impl Storage for MemStorage {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        Ok(self.segments.keys().copied().collect())
    }
    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>> {
        let s = self.segments.get(&segment).ok_or(io::ErrorKind::NotFound)?;
        let mut out = s.durable.clone();
        out.extend_from_slice(&s.pending);
        Ok(out)
    }
    fn create(&mut self, segment: u64) -> io::Result<()> {
        self.segments.entry(segment).or_default();
        Ok(())
    }
    fn append(&mut self, segment: u64, data: &[u8]) -> io::Result<()> {
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        s.pending.extend_from_slice(data);
        Ok(())
    }
    fn sync(&mut self, segment: u64) -> io::Result<()> {
        if self.fail_sync {
            return Err(io::Error::other("injected sync failure"));
        }
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        let p = std::mem::take(&mut s.pending);
        s.durable.extend_from_slice(&p);
        Ok(())
    }
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        let p = std::mem::take(&mut s.pending);
        s.durable.extend_from_slice(&p);
        s.durable.truncate(len as usize);
        Ok(())
    }
    fn remove(&mut self, segment: u64) -> io::Result<()> {
        self.segments.remove(&segment);
        Ok(())
    }
}
