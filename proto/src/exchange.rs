//! Offline exchange: export files and the checks an import makes.
//!
//! An export file is a 16-byte header (magic `weftexp\0`, version) followed by
//! log frames (see [`crate::log`]) in canonical order, ascending
//! `(hlc, author, seq)`, which is a linear extension of causality. For each
//! author, the file holds a contiguous run of its chain, and the last event
//! of each run carries the author's signature, which covers the run through
//! `prev`. Earlier events carry the signatures the log stored for them (the
//! ends of the author's group commits), so a run never has to be held whole
//! before it can be checked, and every signature present is verified.
//!
//! An import is all or nothing: [`read_export`] checks framing, ids, the
//! canonical encoding and limits of every event; [`authenticate`] checks the
//! chains and signatures; the node then inserts the events into a copy of
//! its state (which checks deps, clocks and validity) and stores them only
//! if every one passed.

use std::collections::{BTreeMap, HashSet};

use crate::event::{verify, Event, Signature};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::log::{check_header, decode_frame, encode_frame, header, EXPORT_MAGIC, HEADER_BYTES};

/// Largest export file an import reads.
pub const MAX_EXPORT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// An event read from an export file.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The decoded event.
    pub event: Event,
    /// Its id.
    pub id: EventId,
    /// Its canonical encoding.
    pub bytes: Vec<u8>,
    /// Its author's signature, if the file carries one for it.
    pub sig: Option<Signature>,
}

impl Incoming {
    /// "event <id> (author <short> seq <n>)", for messages.
    pub fn describe(&self) -> String {
        describe(&self.id, &self.event.author, self.event.seq)
    }
}

/// How messages name an event.
pub fn describe(id: &EventId, author: &NodeId, seq: u64) -> String {
    format!("event {id} (author {} seq {seq})", author.short())
}

/// Why an import is refused. Nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// Not an export file of a version this build reads.
    #[error("not a weftlog export: {0}")]
    Header(String),
    /// A record's framing or check failed.
    #[error("record {index} at byte {offset}: {reason}")]
    Frame {
        /// Record index in the file.
        index: usize,
        /// Byte offset in the file.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// An event is refused.
    #[error("{event}: {reason}")]
    Event {
        /// The event, as [`describe`] names it.
        event: String,
        /// Why.
        reason: String,
    },
}

impl ImportError {
    /// An [`ImportError::Event`] for `item`.
    pub fn event(item: &Incoming, reason: impl ToString) -> ImportError {
        ImportError::Event {
            event: item.describe(),
            reason: reason.to_string(),
        }
    }
}

/// One event to export: its encoding, id, position, and signature if any.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Canonical encoding.
    pub bytes: Vec<u8>,
    /// Id.
    pub id: EventId,
    /// Author.
    pub author: NodeId,
    /// Seq.
    pub seq: u64,
    /// Hlc.
    pub hlc: Hlc,
    /// The stored signature of this event, if any.
    pub sig: Option<Signature>,
}

/// Writes an export file of `events`, with the signatures given. Each
/// author's events must be a contiguous run ending at a signed event.
///
/// # Panics
/// If an author's last event has no signature (callers check this first:
/// it is a fact about their log, not about any input).
pub fn write_export(mut events: Vec<Outgoing>) -> Vec<u8> {
    events.sort_unstable_by_key(|e| (e.hlc, e.author, e.seq));
    let mut last: BTreeMap<NodeId, u64> = BTreeMap::new();
    for e in &events {
        let s = last.entry(e.author).or_insert(0);
        *s = (*s).max(e.seq);
    }
    let mut out = header(EXPORT_MAGIC).to_vec();
    for e in &events {
        assert!(
            e.sig.is_some() || last[&e.author] != e.seq,
            "run of {} exported without its signature",
            e.author
        );
        encode_frame(&mut out, &e.bytes, &e.id, e.sig.as_ref());
    }
    out
}

/// Reads an export file: every frame, id, encoding and limit is checked.
/// Repeated events are kept once.
pub fn read_export(data: &[u8]) -> Result<Vec<Incoming>, ImportError> {
    check_header(data, EXPORT_MAGIC, "the file").map_err(ImportError::Header)?;
    let mut off = HEADER_BYTES;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    while off < data.len() {
        let index = out.len();
        let (frame, used) = decode_frame(&data[off..]).map_err(|e| ImportError::Frame {
            index,
            offset: off,
            reason: e.to_string(),
        })?;
        let (event, id) = Event::decode(frame.bytes).map_err(|e| ImportError::Event {
            event: format!("event {}", frame.id),
            reason: e.to_string(),
        })?;
        debug_assert_eq!(id, frame.id);
        if seen.insert(id) {
            out.push(Incoming {
                event,
                id,
                bytes: frame.bytes.to_vec(),
                sig: frame.sig,
            });
        }
        off += used;
    }
    Ok(out)
}

/// Checks each author's run in `items`: contiguous seqs linked by `prev`,
/// every signature present verifying, and the last event signed. Sorts
/// `items` into canonical order.
pub fn authenticate(items: &mut [Incoming]) -> Result<(), ImportError> {
    items.sort_unstable_by_key(|i| (i.event.author, i.event.seq));
    let mut i = 0;
    while i < items.len() {
        let author = items[i].event.author;
        let mut j = i;
        while j + 1 < items.len() && items[j + 1].event.author == author {
            let (a, b) = (&items[j], &items[j + 1]);
            if b.event.seq == a.event.seq {
                return Err(ImportError::event(
                    b,
                    format!(
                        "equivocation: the file holds two events with seq {}",
                        b.event.seq
                    ),
                ));
            }
            if b.event.seq != a.event.seq + 1 {
                return Err(ImportError::event(
                    b,
                    format!(
                        "chain gap: the author's previous event in the file is seq {}",
                        a.event.seq
                    ),
                ));
            }
            if b.event.prev != Some(a.id) {
                return Err(ImportError::event(
                    b,
                    format!(
                        "broken chain: prev is not the id of seq {} in the file",
                        a.event.seq
                    ),
                ));
            }
            j += 1;
        }
        for item in &items[i..=j] {
            if let Some(sig) = &item.sig {
                verify(&author, &item.id, sig).map_err(|e| ImportError::event(item, e))?;
            }
        }
        if items[j].sig.is_none() {
            return Err(ImportError::event(
                &items[j],
                "the author's last event in the file is not signed",
            ));
        }
        i = j + 1;
    }
    items.sort_unstable_by_key(|i| (i.event.hlc, i.event.author, i.event.seq));
    Ok(())
}
