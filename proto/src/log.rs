//! The durable log: record framing, segments, and recovery, over a
//! [`Storage`] trait so the node (files) and simulations (memory with a
//! crash model) share one implementation.
//!
//! Layout (`PROTOCOL.md` §4–6): a log is a sequence of segments, each named
//! by the index of its first record. A segment starts with a 16-byte header
//! and holds whole frames, then zeros up to its allocated size:
//!
//! ```text
//! u32 LE  n        length of the event encoding, 1..=MAX_EVENT_BYTES
//! u8      flags    bit 0: a signature follows; bit 1: last record of a commit
//! [64]    sig      ed25519 signature over the id (flag bit 0 only)
//! [4]     check    blake3(n ‖ flags ‖ sig)[..4]: the frame header's check
//! [n]     event    canonical encoding
//! [32]    id       EventId = blake3(event): the event's check
//! ```
//!
//! Segments are zero-filled ahead of the records in steps of
//! [`Storage::alloc_step`] ([`SEGMENT_ALLOC_BYTES`] on files), so that an append overwrites blocks the file
//! already has and its `fdatasync` need not commit a new file size. Zeros are
//! never a frame (n = 0 is invalid), so an all-zero tail is the clean end.
//!
//! A full disk (`ENOSPC` or `EDQUOT` from a write, a zero-fill or the
//! creation of a segment) is not fatal: [`Log::append`] undoes what it wrote
//! (it cuts the segment back to its last record, or removes the segment it
//! had just created), durably, and returns [`AppendError::Full`]; the log is
//! exactly as before the call and accepts the same frames again once space
//! is freed. Every other failure, and any failed sync (a full disk reported
//! by `fdatasync` included), is fatal: the log refuses further appends until
//! it is reopened.
//!
//! Recovery on open: a frame that is incomplete or fails a check, in the
//! last segment, with no valid frame after it, is a torn tail: truncated and
//! reported. When its header check passes, its length is trusted, and the
//! search for later frames starts after it (a payload may itself hold bytes
//! that look like a frame). Damage followed by a valid frame, or damage in
//! an earlier segment, is corruption: open fails and nothing is served.

use std::io;
use std::ops::Range;

use std::collections::BTreeMap;

use crate::event::{verify, Event, Signature, MAX_EVENT_BYTES};
use crate::id::{EventId, EventRef, NodeId};

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
/// Segments are zero-filled ahead of the records in steps of this size.
pub const SEGMENT_ALLOC_BYTES: u64 = 4 * 1024 * 1024;
/// Fixed bytes of a frame besides the event and the signature.
pub const FRAME_OVERHEAD: usize = 4 + 1 + 4 + 32;
/// Signature bytes.
pub const SIG_BYTES: usize = 64;

/// Storage for log segments. Every call is synchronous; writes need not be
/// durable until `sync_data` returns.
pub trait Storage {
    /// The segments present, by base record index, in any order.
    fn list(&mut self) -> io::Result<Vec<u64>>;
    /// A whole segment.
    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>>;
    /// Creates an empty segment and makes its existence durable.
    fn create(&mut self, segment: u64) -> io::Result<()>;
    /// `len` bytes of a segment from `offset`.
    fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Writes bytes at an offset of a segment, growing it if needed.
    fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes a segment's written bytes and size durable (fdatasync).
    fn sync_data(&mut self, segment: u64) -> io::Result<()>;
    /// Cuts a segment to `len` bytes, durably.
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()>;
    /// Removes a segment, durably.
    fn remove(&mut self, segment: u64) -> io::Result<()>;
    /// How far ahead of its records a segment is zero-filled.
    fn alloc_step(&self) -> u64 {
        SEGMENT_ALLOC_BYTES
    }
}

/// One storage shared by several owners (a log, and a test or simulator
/// that reaches in to crash it); [`open_committed`] opens it once per pass.
impl<S: Storage> Storage for std::rc::Rc<std::cell::RefCell<S>> {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.borrow_mut().list()
    }
    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>> {
        self.borrow_mut().read(segment)
    }
    fn create(&mut self, segment: u64) -> io::Result<()> {
        self.borrow_mut().create(segment)
    }
    fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.borrow_mut().read_at(segment, offset, len)
    }
    fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.borrow_mut().write_at(segment, offset, data)
    }
    fn sync_data(&mut self, segment: u64) -> io::Result<()> {
        self.borrow_mut().sync_data(segment)
    }
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
        self.borrow_mut().truncate(segment, len)
    }
    fn remove(&mut self, segment: u64) -> io::Result<()> {
        self.borrow_mut().remove(segment)
    }
    fn alloc_step(&self) -> u64 {
        self.borrow().alloc_step()
    }
}

/// A decoded frame, borrowing the buffer it was read from.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The event's canonical encoding; `blake3(bytes) == id` was checked.
    pub bytes: &'a [u8],
    /// The author's signature, if the frame carries one (covered by the
    /// header check).
    pub sig: Option<Signature>,
    /// The event id.
    pub id: EventId,
    /// Whether the frame is marked as the last record of a commit.
    pub commit_end: bool,
}

/// Where the parts of a frame lie, relative to its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameLayout {
    /// The signature, if the frame has one.
    pub sig: Option<Range<usize>>,
    /// The header check.
    pub check: Range<usize>,
    /// The event encoding.
    pub event: Range<usize>,
    /// The id.
    pub id: Range<usize>,
}

impl FrameLayout {
    /// The layout of a frame with an `n`-byte event.
    pub fn new(n: usize, signed: bool) -> FrameLayout {
        let sig_end = 5 + if signed { SIG_BYTES } else { 0 };
        let check = sig_end..sig_end + 4;
        let event = check.end..check.end + n;
        FrameLayout {
            sig: signed.then_some(5..sig_end),
            id: event.end..event.end + 32,
            check,
            event,
        }
    }

    /// The frame's length.
    pub fn len(&self) -> usize {
        self.id.end
    }

    /// Never true: a frame has a header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The buffer ends inside the frame header.
    #[error("record header is incomplete ({have} of {need} bytes)")]
    ShortHeader {
        /// Bytes present.
        have: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// The length is zero or above the limit.
    #[error("record length {0} is outside 1..={MAX_EVENT_BYTES}")]
    BadLength(u32),
    /// Unknown flag bits.
    #[error("record flags {0:#04x} have bits other than 0 and 1 set")]
    BadFlags(u8),
    /// The header check failed: length, flags or signature are damaged.
    #[error("record header check failed")]
    HeaderCheck,
    /// The header is sound but the buffer ends inside the frame.
    #[error("record is incomplete ({have} of {need} bytes)")]
    Incomplete {
        /// Bytes present.
        have: usize,
        /// Bytes the header announces.
        need: usize,
    },
    /// The header is sound but the id does not match the event bytes.
    #[error("record check failed: id {claimed} does not match its event bytes")]
    IdMismatch {
        /// The id the record claims.
        claimed: EventId,
        /// The frame's length, which the header check vouches for.
        len: usize,
    },
}

impl FrameError {
    /// The frame's length when its header passed its check (so the damage
    /// is inside this frame), else `None`.
    pub fn trusted_len(&self) -> Option<usize> {
        match self {
            FrameError::Incomplete { need, .. } => Some(*need),
            FrameError::IdMismatch { len, .. } => Some(*len),
            _ => None,
        }
    }
}

fn header_check(n: u32, flags: u8, sig: &[u8]) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(&n.to_le_bytes());
    h.update(&[flags]);
    h.update(sig);
    let mut out = [0u8; 4];
    out.copy_from_slice(&h.finalize().as_bytes()[..4]);
    out
}

/// Flag bit: a signature follows the header.
pub const FLAG_SIGNED: u8 = 1;
/// Flag bit: the record is the last of a commit (a log writer's batch);
/// meaningless, and cleared, in export files.
pub const FLAG_COMMIT_END: u8 = 2;

/// Appends a frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, event: &[u8], id: &EventId, sig: Option<&Signature>) {
    encode_frame_with(out, event, id, sig, false);
}

/// Appends a frame to `out`, marking it as the last record of a commit if
/// `commit_end`.
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    event: &[u8],
    id: &EventId,
    sig: Option<&Signature>,
    commit_end: bool,
) {
    debug_assert!(!event.is_empty() && event.len() <= MAX_EVENT_BYTES);
    let n = event.len() as u32;
    let flags = (sig.is_some() as u8 * FLAG_SIGNED) | (commit_end as u8 * FLAG_COMMIT_END);
    let sig = sig.map_or(&[][..], |s| &s.0[..]);
    out.extend_from_slice(&n.to_le_bytes());
    out.push(flags);
    out.extend_from_slice(sig);
    out.extend_from_slice(&header_check(n, flags, sig));
    out.extend_from_slice(event);
    out.extend_from_slice(&id.0);
}

/// Decodes the frame at the start of `buf`; returns it and its length.
/// The length is checked before anything is allocated or hashed.
pub fn decode_frame(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    if buf.len() < 5 {
        return Err(FrameError::ShortHeader {
            have: buf.len(),
            need: 5,
        });
    }
    let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if n == 0 || n as usize > MAX_EVENT_BYTES {
        return Err(FrameError::BadLength(n));
    }
    let flags = buf[4];
    if flags & !(FLAG_SIGNED | FLAG_COMMIT_END) != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let layout = FrameLayout::new(n as usize, flags & FLAG_SIGNED != 0);
    if buf.len() < layout.event.start {
        return Err(FrameError::ShortHeader {
            have: buf.len(),
            need: layout.event.start,
        });
    }
    let sig_bytes = layout.sig.clone().map_or(&[][..], |r| &buf[r]);
    if buf[layout.check.clone()] != header_check(n, flags, sig_bytes) {
        return Err(FrameError::HeaderCheck);
    }
    if buf.len() < layout.len() {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            need: layout.len(),
        });
    }
    let bytes = &buf[layout.event.clone()];
    let mut claimed = [0u8; 32];
    claimed.copy_from_slice(&buf[layout.id.clone()]);
    let claimed = EventId(claimed);
    if blake3::hash(bytes).as_bytes() != &claimed.0 {
        return Err(FrameError::IdMismatch {
            claimed,
            len: layout.len(),
        });
    }
    let sig = layout.sig.as_ref().map(|_| {
        let mut s = [0u8; SIG_BYTES];
        s.copy_from_slice(sig_bytes);
        Signature(s)
    });
    Ok((
        Frame {
            bytes,
            sig,
            id: claimed,
            commit_end: flags & FLAG_COMMIT_END != 0,
        },
        layout.len(),
    ))
}

/// A 16-byte file header: magic, format version, 4 reserved zero bytes.
pub fn header(magic: [u8; 8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&magic);
    h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// Checks a file header: magic, version, and zeros in the reserved bytes;
/// the error says what is wrong.
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
    // Reserved: a writer of this version writes zeros, so a reader that
    // took anything else would read files that version never makes.
    if data[12..HEADER_BYTES] != [0; 4] {
        return Err(format!(
            "{what} has non-zero reserved header bytes (12 to 15)"
        ));
    }
    Ok(())
}

/// The offset of the first valid frame at or after `from`, if any.
fn next_valid_frame(data: &[u8], from: usize) -> Option<usize> {
    let end = data.len().saturating_sub(FRAME_OVERHEAD);
    let mut p = from;
    while p < end {
        // No frame starts with four zero bytes (n >= 1): skip zero runs,
        // such as a segment's zero-filled allocation, to the next non-zero
        // byte, which may be the second, third or fourth byte of a length.
        if data[p..p + 4] == [0; 4] {
            match data[p + 4..].iter().position(|&b| b != 0) {
                Some(q) => p = (p + 4 + q).saturating_sub(3).max(p + 1),
                None => return None,
            }
            continue;
        }
        if decode_frame(&data[p..]).is_ok() {
            return Some(p);
        }
        p += 1;
    }
    None
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
    #[error("log record {index} ({event}) is refused: {reason}")]
    Refused {
        /// The record's index in the log.
        index: u64,
        /// The event's id.
        id: EventId,
        /// The event as messages name it: id, author and seq.
        event: String,
        /// Why.
        reason: String,
    },
}

/// Why an append failed. After [`AppendError::Full`] the log is as it was
/// and takes the same append again; after any other failure it refuses
/// further appends (a failed fsync is fatal): reopen it to recover.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Storage failed during this append.
    #[error("log write or sync failed: {0}")]
    Io(#[from] io::Error),
    /// Storage ran out of space ([`is_full`]) while writing the frames,
    /// zero-filling ahead of them or creating a segment. What the append
    /// wrote was undone, durably: the log ends at its last record, and the
    /// append may be tried again.
    #[error("log storage is full: {0}")]
    Full(io::Error),
    /// An earlier append failed.
    #[error("the log stopped accepting appends after a failed write or sync; reopen it")]
    Poisoned,
}

/// Whether a storage error means the storage is out of space: `ENOSPC`
/// ([`io::ErrorKind::StorageFull`]) or `EDQUOT`
/// ([`io::ErrorKind::QuotaExceeded`]).
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// One segment: base record index, bytes of records (with the header), and
/// bytes allocated (zero-filled past the records).
#[derive(Debug, Clone, Copy)]
struct Segment {
    base: u64,
    end: u64,
    alloc: u64,
}

/// Where one record lies: segment, byte offset, frame length.
#[derive(Debug, Clone, Copy)]
struct Position {
    segment: u64,
    offset: u64,
    len: u32,
}

/// An open log.
#[derive(Debug)]
pub struct Log<S> {
    storage: S,
    /// Ascending by base; never empty after open.
    segments: Vec<Segment>,
    /// Every record's position, by record index (16 bytes a record).
    positions: Vec<Position>,
    records: u64,
    poisoned: bool,
}

/// A buffer of zeros for filling segments ahead of the records.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

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
        let mut positions = Vec::new();
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
            if last && data.len() < HEADER_BYTES {
                // Created, but its header never became durable.
                storage.truncate(seg, 0)?;
                storage.write_at(seg, 0, &header(SEGMENT_MAGIC))?;
                storage.sync_data(seg)?;
                recovery.torn = Some(TornTail {
                    segment: seg,
                    offset: 0,
                    dropped_bytes: data.len() as u64,
                    reason: "segment header incomplete".into(),
                });
                segments.push(Segment {
                    base: seg,
                    end: HEADER_BYTES as u64,
                    alloc: HEADER_BYTES as u64,
                });
                continue;
            }
            check_header(&data, SEGMENT_MAGIC, "segment").map_err(|r| corrupt(0, r))?;
            let mut off = HEADER_BYTES;
            let mut alloc = data.len();
            while off < data.len() {
                let e = match decode_frame(&data[off..]) {
                    Ok((frame, used)) => {
                        visit(frame).map_err(|reason| OpenError::Refused {
                            index: records,
                            id: frame.id,
                            event: EventRef::describe_bytes(frame.id, frame.bytes),
                            reason,
                        })?;
                        positions.push(Position {
                            segment: seg,
                            offset: off as u64,
                            len: used as u32,
                        });
                        records += 1;
                        off += used;
                        continue;
                    }
                    Err(e) => e,
                };
                if data[off..].iter().all(|&b| b == 0) {
                    break; // the zero-filled allocation: the clean end
                }
                if !last {
                    return Err(corrupt(off, e.to_string()));
                }
                // Where a later valid frame could start: after this one if
                // its header vouches for its length, else anywhere.
                let resume = e.trusted_len().map_or(off + 1, |len| off + len);
                if let Some(p) = next_valid_frame(&data, resume) {
                    return Err(corrupt(
                        off,
                        format!("{e}, and a valid record follows at byte {p}"),
                    ));
                }
                storage.truncate(seg, off as u64)?;
                alloc = off;
                recovery.torn = Some(TornTail {
                    segment: seg,
                    offset: off as u64,
                    dropped_bytes: (data.len() - off) as u64,
                    reason: e.to_string(),
                });
                break;
            }
            segments.push(Segment {
                base: seg,
                end: off as u64,
                alloc: alloc as u64,
            });
        }
        if segments.is_empty() {
            storage.create(0)?;
            storage.write_at(0, 0, &header(SEGMENT_MAGIC))?;
            storage.sync_data(0)?;
            segments.push(Segment {
                base: 0,
                end: HEADER_BYTES as u64,
                alloc: HEADER_BYTES as u64,
            });
        }
        recovery.records = records;
        recovery.segments = segments.len();
        Ok((
            Log {
                storage,
                segments,
                positions,
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

    /// Bytes of records in the log, segment headers included (not the
    /// zero-filled allocation).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.end).sum()
    }

    /// Appends `count` whole frames held in `frames` and syncs them: when this
    /// returns `Ok`, they are durable. On [`AppendError::Full`] nothing of
    /// them stays in the log (see the module docs); on any other error the
    /// log is unusable.
    pub fn append(&mut self, frames: &[u8], count: u64) -> Result<(), AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        let r = self.append_inner(frames, count);
        if matches!(r, Err(AppendError::Io(_))) {
            self.poisoned = true;
        }
        r
    }

    fn append_inner(&mut self, frames: &[u8], count: u64) -> Result<(), AppendError> {
        // Invariant: `segments` is never empty after open.
        let last = *self.segments.last().expect("open made a segment");
        let fresh = last.end >= SEGMENT_TARGET_BYTES;
        let mut seg = if fresh {
            Segment {
                base: self.records,
                end: HEADER_BYTES as u64,
                alloc: HEADER_BYTES as u64,
            }
        } else {
            last
        };
        if let Err(e) = self.write_frames(&mut seg, fresh, frames) {
            return Err(self.undo_write(seg, fresh, e));
        }
        if fresh {
            self.segments.push(seg);
        }
        let end = seg.end + frames.len() as u64;
        // A failed sync is fatal, whatever its error (`AppendError::Io`).
        self.storage.sync_data(seg.base)?;
        let mut off = 0;
        while off < frames.len() {
            // The caller's frames are whole (encode_frame made them).
            let n = u32::from_le_bytes([
                frames[off],
                frames[off + 1],
                frames[off + 2],
                frames[off + 3],
            ]);
            let len = FrameLayout::new(n as usize, frames[off + 4] & FLAG_SIGNED != 0).len();
            self.positions.push(Position {
                segment: seg.base,
                offset: seg.end + off as u64,
                len: len as u32,
            });
            off += len;
        }
        debug_assert_eq!(off, frames.len());
        seg.end = end;
        // Invariant: pushed or present above.
        *self.segments.last_mut().expect("segment") = seg;
        self.records += count;
        Ok(())
    }

    /// Writes `frames` after the records of `seg` (creating it first if
    /// `fresh`) and zero-fills ahead of them, raising `seg.alloc`. Nothing is
    /// synced.
    fn write_frames(&mut self, seg: &mut Segment, fresh: bool, frames: &[u8]) -> io::Result<()> {
        if fresh {
            self.storage.create(seg.base)?;
            self.storage.write_at(seg.base, 0, &header(SEGMENT_MAGIC))?;
        }
        let end = seg.end + frames.len() as u64;
        self.storage.write_at(seg.base, seg.end, frames)?;
        if end > seg.alloc {
            // Zero-fill ahead; the sync after this makes the new size durable.
            let target = end.max(seg.alloc + self.storage.alloc_step());
            let mut at = end;
            while at < target {
                let n = (target - at).min(ZEROS.len() as u64);
                self.storage.write_at(seg.base, at, &ZEROS[..n as usize])?;
                at += n;
            }
            seg.alloc = target;
        }
        Ok(())
    }

    /// After [`Log::write_frames`] failed with `e`: if the storage is full,
    /// undoes the write durably (a fresh segment is removed; otherwise the
    /// segment is cut back to its last record, dropping any partial frame
    /// and the zero-fill past it) and returns [`AppendError::Full`]. Any
    /// other error, or a failure to undo, is fatal ([`AppendError::Io`]).
    fn undo_write(&mut self, seg: Segment, fresh: bool, e: io::Error) -> AppendError {
        if !is_full(&e) {
            return AppendError::Io(e);
        }
        let undone = if fresh {
            // `create` itself may have failed: then there is nothing to remove.
            match self.storage.remove(seg.base) {
                Err(r) if r.kind() != io::ErrorKind::NotFound => Err(r),
                _ => Ok(()),
            }
        } else {
            self.storage.truncate(seg.base, seg.end).map(|()| {
                // Invariant: `seg` is the last segment (not fresh).
                self.segments.last_mut().expect("segment").alloc = seg.end;
            })
        };
        match undone {
            Ok(()) => AppendError::Full(e),
            Err(r) => AppendError::Io(io::Error::new(
                r.kind(),
                format!("{e}; undoing the partial write failed too: {r}"),
            )),
        }
    }

    /// Reads every record again, in log order.
    pub fn scan(
        &mut self,
        mut visit: impl FnMut(Frame<'_>) -> Result<(), String>,
    ) -> Result<(), OpenError> {
        let mut index = 0u64;
        for seg in &self.segments {
            let data = self.storage.read(seg.base)?;
            let end = (seg.end as usize).min(data.len());
            let mut off = HEADER_BYTES;
            while off < end {
                let (frame, used) =
                    decode_frame(&data[off..end]).map_err(|e| OpenError::Corrupt {
                        segment: seg.base,
                        offset: off as u64,
                        reason: e.to_string(),
                    })?;
                visit(frame).map_err(|reason| OpenError::Refused {
                    index,
                    id: frame.id,
                    event: EventRef::describe_bytes(frame.id, frame.bytes),
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
    /// whose signature never reached the disk). Returns where the cut starts
    /// and how many bytes it removed from the files (zero-fill included, as
    /// for a torn tail).
    ///
    /// # Panics
    /// If `keep` is more than the log holds.
    pub fn cut(&mut self, keep: u64) -> Result<TornTail, OpenError> {
        assert!(keep <= self.records, "cut beyond the end of the log");
        let mut dropped_bytes = 0;
        while let Some(&seg) = self.segments.last() {
            if seg.base <= keep || self.segments.len() == 1 {
                break;
            }
            self.storage.remove(seg.base)?;
            self.segments.pop();
            dropped_bytes += seg.alloc;
        }
        // Invariant: the first segment is never removed.
        let seg = *self.segments.last().expect("segment");
        let data = self.storage.read(seg.base)?;
        let mut off = HEADER_BYTES;
        let mut index = seg.base;
        while index < keep && off < seg.end as usize {
            let (_, used) = decode_frame(&data[off..]).map_err(|e| OpenError::Corrupt {
                segment: seg.base,
                offset: off as u64,
                reason: e.to_string(),
            })?;
            off += used;
            index += 1;
        }
        self.storage.truncate(seg.base, off as u64)?;
        *self.segments.last_mut().expect("segment") = Segment {
            base: seg.base,
            end: off as u64,
            alloc: off as u64,
        };
        self.records = keep;
        self.positions.truncate(keep as usize);
        Ok(TornTail {
            segment: seg.base,
            offset: off as u64,
            dropped_bytes: dropped_bytes + (data.len() - off) as u64,
            reason: String::new(),
        })
    }

    /// The frame of record `index` (its checks are made again on read).
    pub fn read(&mut self, index: u64) -> Result<Vec<u8>, OpenError> {
        let data = self.read_with(index, |_| ())?.1;
        Ok(data)
    }

    /// Reads record `index`, checks it like [`Log::read`], and hands the
    /// decoded frame to `f` (so callers need not decode it again).
    pub fn read_with<T>(
        &mut self,
        index: u64,
        f: impl FnOnce(Frame<'_>) -> T,
    ) -> Result<(T, Vec<u8>), OpenError> {
        let p = *self
            .positions
            .get(index as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no record {index}")))?;
        let data = self.storage.read_at(p.segment, p.offset, p.len as usize)?;
        let (frame, _) = decode_frame(&data).map_err(|e| OpenError::Corrupt {
            segment: p.segment,
            offset: p.offset,
            reason: e.to_string(),
        })?;
        let t = f(frame);
        Ok((t, data))
    }

    /// Reads records `from..from + max` (fewer at the end of the log), in
    /// log order, with one storage read per segment they span, and hands
    /// each record's index and frame to `visit`. Returns the records read.
    pub fn read_range(
        &mut self,
        from: u64,
        max: u64,
        mut visit: impl FnMut(u64, Frame<'_>),
    ) -> Result<u64, OpenError> {
        let end = from.saturating_add(max).min(self.records);
        let mut index = from;
        while index < end {
            let first = self.positions[index as usize];
            // The run of records in the same segment as `first`.
            let mut last = index;
            while last + 1 < end && self.positions[(last + 1) as usize].segment == first.segment {
                last += 1;
            }
            let tail = self.positions[last as usize];
            let len = (tail.offset + u64::from(tail.len) - first.offset) as usize;
            let data = self.storage.read_at(first.segment, first.offset, len)?;
            let mut off = 0;
            while index <= last {
                let (frame, used) = decode_frame(&data[off..]).map_err(|e| OpenError::Corrupt {
                    segment: first.segment,
                    offset: first.offset + off as u64,
                    reason: e.to_string(),
                })?;
                visit(index, frame);
                off += used;
                index += 1;
            }
        }
        Ok(end.saturating_sub(from))
    }

    /// The storage, for tests that crash and reopen.
    pub fn into_storage(self) -> S {
        self.storage
    }
}

/// Opens a node's log: recovers it ([`Log::open`]), then cuts the records
/// after the last one marked as a commit's end (an interrupted batch, never
/// acknowledged) and folds again, and finally verifies each author's last
/// signature, which with the id chain authenticates the log.
///
/// `storage` opens the storage afresh for each pass (the same storage: a
/// pass may have cut it); `fresh` makes an empty
/// accumulator for each pass, and `visit` folds each record's decoded event
/// into it, in log order. A torn tail and the cut are reported together in
/// the returned [`Recovery`].
pub fn open_committed<S: Storage, T>(
    mut storage: impl FnMut() -> Result<S, OpenError>,
    mut fresh: impl FnMut() -> T,
    mut visit: impl FnMut(&mut T, &Frame<'_>, &Event) -> Result<(), String>,
) -> Result<(Log<S>, Recovery, T), OpenError> {
    let mut earlier: Option<TornTail> = None;
    loop {
        let mut acc = fresh();
        // Per author: its last signed record (index, seq, id, sig).
        let mut signed: BTreeMap<NodeId, (u64, u64, EventId, Signature)> = BTreeMap::new();
        // Records up to the last one marked as a commit's end.
        let mut committed = 0u64;
        let mut index = 0u64;
        let (mut log, mut recovery) = Log::open(storage()?, |frame| {
            let event = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            visit(&mut acc, &frame, &event)?;
            if let Some(sig) = frame.sig {
                signed.insert(event.author, (index, event.seq, frame.id, sig));
            }
            index += 1;
            if frame.commit_end {
                committed = index;
            }
            Ok(())
        })?;
        if committed < log.records() {
            let dropped = log.records() - committed;
            let cut = log.cut(committed)?;
            let note = format!("{dropped} records of an interrupted batch had no commit mark");
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
                event: EventRef {
                    id: *id,
                    author: *author,
                    seq: *seq,
                }
                .to_string(),
                reason: format!("head signature: {e}"),
            })?;
        }
        recovery.records = log.records();
        return Ok((log, recovery, acc));
    }
}

/// In-memory storage with a crash model: each segment keeps the bytes that
/// were synced (`durable`) and the writes made since (`pending`).
/// [`MemStorage::crash`] keeps the durable image plus a prefix of the
/// pending writes, as a power cut may.
#[derive(Debug, Clone)]
pub struct MemStorage {
    segments: std::collections::BTreeMap<u64, MemSegment>,
    /// When set, `sync_data` fails (to test that failed fsyncs are fatal).
    pub fail_sync: bool,
    /// The zero-fill step ([`Storage::alloc_step`]); 64 KiB by default, to
    /// keep copies of in-memory segments small.
    pub alloc_step: u64,
    /// Bytes that writes may still store (to test a full disk); `None`
    /// (the default) for no limit. A write that does not fit stores the
    /// part that does, as a short write on a full file system does, and
    /// fails with [`io::ErrorKind::StorageFull`]. Truncating or removing
    /// does not give space back: set it again to free space.
    pub space: Option<u64>,
}

impl Default for MemStorage {
    fn default() -> MemStorage {
        MemStorage {
            segments: Default::default(),
            fail_sync: false,
            alloc_step: 64 * 1024,
            space: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct MemSegment {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let offset = offset as usize;
    if image.len() < offset + data.len() {
        image.resize(offset + data.len(), 0);
    }
    image[offset..offset + data.len()].copy_from_slice(data);
}

impl MemSegment {
    /// Applies at most `budget` bytes of the pending writes, in order.
    fn settle(&mut self, mut budget: usize) {
        for (off, data) in std::mem::take(&mut self.pending) {
            let n = budget.min(data.len());
            if n > 0 {
                write_into(&mut self.durable, off, &data[..n]);
            }
            budget -= n;
        }
    }

    /// `len` bytes of the live image from `offset`, copying only those
    /// (the pending writes laid over the durable image); `None` past its end.
    fn read_at(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let live_len = self
            .pending
            .iter()
            .map(|(off, data)| *off as usize + data.len())
            .fold(self.durable.len(), usize::max);
        let end = offset.checked_add(len).filter(|&end| end <= live_len)?;
        let mut out = vec![0u8; len];
        let overlay = |out: &mut [u8], at: usize, data: &[u8]| {
            let (from, to) = (at.max(offset), (at + data.len()).min(end));
            if from < to {
                out[from - offset..to - offset].copy_from_slice(&data[from - at..to - at]);
            }
        };
        overlay(&mut out, 0, &self.durable);
        for (off, data) in &self.pending {
            overlay(&mut out, *off as usize, data);
        }
        Some(out)
    }

    fn live(&self) -> Vec<u8> {
        let mut out = self.durable.clone();
        for (off, data) in &self.pending {
            write_into(&mut out, *off, data);
        }
        out
    }
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Simulates a crash: writes not yet synced are lost except the first
    /// `keep_pending` bytes of each segment's pending writes (a torn write).
    pub fn crash(&mut self, keep_pending: usize) {
        for s in self.segments.values_mut() {
            s.settle(keep_pending);
        }
    }

    /// A segment's current bytes, for tests that damage them.
    pub fn bytes_mut(&mut self, segment: u64) -> Option<&mut Vec<u8>> {
        self.segments.get_mut(&segment).map(|s| {
            s.settle(usize::MAX);
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
        Ok(s.live())
    }
    fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let s = self.segments.get(&segment).ok_or(io::ErrorKind::NotFound)?;
        s.read_at(offset as usize, len)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
    fn create(&mut self, segment: u64) -> io::Result<()> {
        self.segments.entry(segment).or_default();
        Ok(())
    }
    fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        let fits = self
            .space
            .map_or(data.len(), |left| data.len().min(left as usize));
        if fits > 0 {
            s.pending.push((offset, data[..fits].to_vec()));
        }
        if let Some(left) = &mut self.space {
            *left -= fits as u64;
        }
        if fits < data.len() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on the simulated device",
            ));
        }
        Ok(())
    }
    fn sync_data(&mut self, segment: u64) -> io::Result<()> {
        if self.fail_sync {
            return Err(io::Error::other("injected sync failure"));
        }
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        s.settle(usize::MAX);
        Ok(())
    }
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
        let s = self
            .segments
            .get_mut(&segment)
            .ok_or(io::ErrorKind::NotFound)?;
        s.settle(usize::MAX);
        s.durable.truncate(len as usize);
        Ok(())
    }
    fn remove(&mut self, segment: u64) -> io::Result<()> {
        self.segments.remove(&segment);
        Ok(())
    }
    fn alloc_step(&self) -> u64 {
        self.alloc_step
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    type Disk = Rc<RefCell<MemStorage>>;

    /// `n` frames of `size`-byte events, the last marked as a commit's end.
    /// The events are arbitrary bytes: a log checks framing, not events.
    fn frames(tag: u8, n: usize, size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let event = vec![tag.wrapping_add(i as u8) | 1; size];
            let id = EventId(*blake3::hash(&event).as_bytes());
            encode_frame_with(&mut out, &event, &id, None, i + 1 == n);
        }
        out
    }

    /// What a reopen after a crash right now finds: records and torn tail.
    fn reopen_after_crash(disk: &Disk) -> (u64, Option<TornTail>) {
        let mut copy = disk.borrow().clone();
        copy.crash(0);
        let (log, recovery) = Log::open(copy, |_| Ok(())).unwrap();
        (log.records(), recovery.torn)
    }

    /// A full disk at any point of an append (before the frames, inside
    /// them, inside the zero-fill past them) leaves the log exactly at its
    /// last record, in memory and on disk, and the same append succeeds
    /// once space is freed.
    #[test]
    fn a_full_disk_undoes_the_append_and_the_same_append_succeeds_later() {
        let disk: Disk = Rc::new(RefCell::new(MemStorage {
            alloc_step: 4096,
            ..MemStorage::new()
        }));
        let (mut log, _) = Log::open(disk.clone(), |_| Ok(())).unwrap();
        log.append(&frames(1, 3, 100), 3).unwrap();
        let end = log.bytes() as usize;
        let image = disk.borrow_mut().read(0).unwrap();
        // Smaller than a zero-fill step: once a failed append has cut the
        // allocation back, the retries zero-fill past the frames.
        let batch = frames(2, 20, 100);
        assert!(batch.len() < 4096);
        for budget in [0, 1, 700, batch.len() - 1, batch.len(), batch.len() + 100] {
            disk.borrow_mut().space = Some(budget as u64);
            let e = log.append(&batch, 20).unwrap_err();
            assert!(matches!(&e, AppendError::Full(io) if is_full(io)), "{e}");
            assert_eq!((log.records(), log.bytes() as usize), (3, end));
            let now = disk.borrow_mut().read(0).unwrap();
            assert_eq!(
                now,
                image[..end],
                "budget {budget}: cut back to the last record"
            );
            assert_eq!(reopen_after_crash(&disk), (3, None), "budget {budget}");
        }
        disk.borrow_mut().space = None;
        log.append(&batch, 20).unwrap();
        log.append(&frames(3, 1, 10), 1).unwrap();
        assert_eq!(log.records(), 24);
        assert_eq!(reopen_after_crash(&disk), (24, None));
    }

    /// The same when the append starts a new segment: the segment made for
    /// it is removed, and made again by the retry.
    #[test]
    fn a_full_disk_removes_a_segment_made_for_the_append() {
        let disk: Disk = Rc::new(RefCell::new(MemStorage::new()));
        let (mut log, _) = Log::open(disk.clone(), |_| Ok(())).unwrap();
        let big = frames(1, 1, MAX_EVENT_BYTES);
        let mut n = 0;
        while log.bytes() < SEGMENT_TARGET_BYTES {
            log.append(&big, 1).unwrap();
            n += 1;
        }
        for budget in [0, 8, 100] {
            disk.borrow_mut().space = Some(budget);
            assert!(matches!(log.append(&big, 1), Err(AppendError::Full(_))));
            assert_eq!(disk.borrow_mut().list().unwrap(), vec![0]);
            assert_eq!(log.records(), n);
        }
        assert_eq!(reopen_after_crash(&disk), (n, None));
        disk.borrow_mut().space = None;
        log.append(&big, 1).unwrap();
        let mut segs = disk.borrow_mut().list().unwrap();
        segs.sort();
        assert_eq!(segs, vec![0, n]);
        assert_eq!(reopen_after_crash(&disk), (n + 1, None));
    }

    /// Storage whose syncs fail as a full disk would report it.
    struct FullOnSync(MemStorage);

    impl Storage for FullOnSync {
        fn list(&mut self) -> io::Result<Vec<u64>> {
            self.0.list()
        }
        fn read(&mut self, segment: u64) -> io::Result<Vec<u8>> {
            self.0.read(segment)
        }
        fn create(&mut self, segment: u64) -> io::Result<()> {
            self.0.create(segment)
        }
        fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
            self.0.read_at(segment, offset, len)
        }
        fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write_at(segment, offset, data)
        }
        fn sync_data(&mut self, _: u64) -> io::Result<()> {
            Err(io::ErrorKind::StorageFull.into())
        }
        fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
            self.0.truncate(segment, len)
        }
        fn remove(&mut self, segment: u64) -> io::Result<()> {
            self.0.remove(segment)
        }
    }

    /// A failed sync is fatal even when it says the disk is full: what it
    /// leaves on disk is unknown, so only a reopen (recovery) may decide.
    #[test]
    fn a_failed_sync_is_fatal_even_when_the_disk_is_full() {
        let (made, _) = Log::open(MemStorage::new(), |_| Ok(())).unwrap();
        let (mut log, _) = Log::open(FullOnSync(made.into_storage()), |_| Ok(())).unwrap();
        let e = log.append(&frames(1, 1, 10), 1).unwrap_err();
        assert!(matches!(&e, AppendError::Io(io) if is_full(io)), "{e}");
        assert!(matches!(
            log.append(&frames(1, 1, 10), 1),
            Err(AppendError::Poisoned)
        ));
        assert_eq!(log.records(), 0);
    }

    /// `read_at` copies only the range, and agrees with the whole live
    /// image (durable bytes with the pending writes laid over them).
    #[test]
    fn mem_storage_reads_a_range_of_the_live_image() {
        let mut s = MemStorage::new();
        s.create(0).unwrap();
        s.write_at(0, 0, &[1; 10]).unwrap();
        s.sync_data(0).unwrap();
        s.write_at(0, 6, &[2; 8]).unwrap();
        s.write_at(0, 20, &[3; 4]).unwrap();
        s.write_at(0, 2, &[4; 3]).unwrap();
        let live = s.read(0).unwrap();
        assert_eq!(live.len(), 24);
        for offset in 0..=live.len() {
            for len in 0..=live.len() - offset {
                let got = s.read_at(0, offset as u64, len).unwrap();
                assert_eq!(got, &live[offset..offset + len], "{offset}+{len}");
            }
        }
        let past = s.read_at(0, 20, 5).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            s.read_at(1, 0, 1).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// A range read across segments gives exactly the records `read` gives
    /// one by one, with their indexes, and stops at the end of the log.
    #[test]
    fn a_range_read_spans_segments_and_stops_at_the_end() {
        let (mut log, _) = Log::open(MemStorage::new(), |_| Ok(())).unwrap();
        let big = frames(1, 1, MAX_EVENT_BYTES);
        let mut n = 0u64;
        while log.bytes() < SEGMENT_TARGET_BYTES {
            log.append(&big, 1).unwrap();
            n += 1;
        }
        log.append(&frames(7, 5, 30), 5).unwrap();
        n += 5;
        for (from, max) in [(0, 3), (n - 8, 6), (n - 3, 10), (n, 4), (0, n)] {
            let mut got = Vec::new();
            let read = log
                .read_range(from, max, |i, f| got.push((i, f.id, f.bytes.to_vec())))
                .unwrap();
            assert_eq!(read, max.min(n - from));
            assert_eq!(got.len() as u64, read);
            for (i, id, bytes) in got {
                let frame = log.read(i).unwrap();
                let (one, _) = decode_frame(&frame).unwrap();
                assert_eq!((one.id, one.bytes), (id, &bytes[..]), "record {i}");
            }
        }
    }
}
