//! Offline exchange: export files and the checks an import makes.
//!
//! An export file is a 16-byte header (magic `weftexp\0`, version) followed by
//! log frames (see [`crate::log`]) in canonical order, ascending
//! `(hlc, author, seq)`, which is a linear extension of causality. For each
//! author, the file holds a contiguous run of its chain (or, of an author
//! that forked, runs of its branches), and the last event of each run
//! carries the author's signature, which covers the run through `prev`. Earlier events carry the signatures the log stored for them (the
//! ends of the author's group commits), so a run never has to be held whole
//! before it can be checked, and every signature present is verified.
//!
//! An import is all or nothing: [`read_export`] checks framing, ids, the
//! canonical encoding and limits of every event; [`authenticate`] checks the
//! chains and signatures; the node then inserts the events into a copy of
//! its state (which checks deps, clocks and validity) and stores them only
//! if every one passed.

use std::collections::BTreeMap;

use crate::event::{verify, Event, Signature};
use crate::hlc::Hlc;
use crate::id::{EventId, EventRef, NodeId};
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
    /// How messages name it ([`EventRef`]).
    pub fn eref(&self) -> EventRef {
        EventRef {
            id: self.id,
            author: self.event.author,
            seq: self.event.seq,
        }
    }

    /// `event <id> (author <short> seq <n>)`, for messages.
    pub fn describe(&self) -> String {
        self.eref().to_string()
    }
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
        /// The event, as [`EventRef`] shows it.
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
/// author's events must be a contiguous run (or, of an author that forked,
/// runs of its branches), each ending at a signed event.
///
/// # Panics
/// If an author's last event has no signature (callers check this first:
/// it is a fact about their log, not about any input).
pub fn write_export(mut events: Vec<Outgoing>) -> Vec<u8> {
    events.sort_unstable_by_key(|e| (e.hlc, e.author, e.seq, e.id));
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

/// Reads an export file: every frame, id, encoding and limit is checked,
/// and the frames must be what [`write_export`] writes (`PROTOCOL.md` §5):
/// no commit-end flag, and events strictly ascending in canonical order
/// (so none twice), whatever an import would make of other files.
pub fn read_export(data: &[u8]) -> Result<Vec<Incoming>, ImportError> {
    check_header(data, EXPORT_MAGIC, "the file").map_err(ImportError::Header)?;
    let mut off = HEADER_BYTES;
    let mut out: Vec<Incoming> = Vec::new();
    while off < data.len() {
        let index = out.len();
        let bad_frame = |reason: String| ImportError::Frame {
            index,
            offset: off,
            reason,
        };
        let (frame, used) = decode_frame(&data[off..]).map_err(|e| bad_frame(e.to_string()))?;
        if frame.commit_end {
            return Err(bad_frame(
                "flag bit 1 (a log commit's end) is set; export files never carry it".into(),
            ));
        }
        let (event, id) = Event::decode(frame.bytes).map_err(|e| ImportError::Event {
            event: EventRef::describe_bytes(frame.id, frame.bytes),
            reason: e.to_string(),
        })?;
        debug_assert_eq!(id, frame.id);
        let item = Incoming {
            event,
            id,
            bytes: frame.bytes.to_vec(),
            sig: frame.sig,
        };
        if let Some(before) = out.last() {
            let (a, b) = (canonical_key(before), canonical_key(&item));
            if b <= a {
                let why = if a == b {
                    format!("record {index} repeats the record before it")
                } else {
                    format!(
                        "record {index} is out of canonical order: it sorts before {}",
                        before.describe()
                    )
                };
                return Err(ImportError::event(&item, why));
            }
        }
        out.push(item);
        off += used;
    }
    Ok(out)
}

/// An event's place in canonical order: `(hlc, author, seq, id)`.
fn canonical_key(item: &Incoming) -> (Hlc, NodeId, u64, EventId) {
    (item.event.hlc, item.event.author, item.event.seq, item.id)
}

/// Checks each author's chains in `items` and sorts `items` into canonical
/// order. An author with one event per seq in the file: a contiguous run,
/// seqs linked by `prev`. An author that forked (two events at one seq,
/// possible only when the file carries both branches): runs of its chains,
/// each event whose `prev` is in the file one seq above it, and every run's
/// end (an event no other in the file continues) signed, so that every
/// event is covered by a signature through `prev`; where a run starts, the
/// importer's state checks that it holds the `prev`. Either way every
/// signature present must verify and an author's last event be signed.
pub fn authenticate(items: &mut [Incoming]) -> Result<(), ImportError> {
    items.sort_unstable_by_key(|i| (i.event.author, i.event.seq, i.id));
    let mut i = 0;
    while i < items.len() {
        let author = items[i].event.author;
        let mut j = i;
        while j + 1 < items.len() && items[j + 1].event.author == author {
            j += 1;
        }
        let run = &items[i..=j];
        if run.windows(2).any(|w| w[0].event.seq == w[1].event.seq) {
            check_branches(run)?;
        } else {
            check_run(run)?;
        }
        for item in run {
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
    items.sort_unstable_by_key(|i| (i.event.hlc, i.event.author, i.event.seq, i.id));
    Ok(())
}

/// One author's events, ascending by seq, one per seq: contiguous and
/// linked by `prev`.
fn check_run(run: &[Incoming]) -> Result<(), ImportError> {
    for w in run.windows(2) {
        let (a, b) = (&w[0], &w[1]);
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
    }
    Ok(())
}

/// One author's events, ascending by `(seq, id)`, holding a fork: each
/// event whose `prev` is in the file sits one seq above it, and each run's
/// end is signed.
fn check_branches(run: &[Incoming]) -> Result<(), ImportError> {
    let at: BTreeMap<EventId, usize> = run.iter().enumerate().map(|(k, e)| (e.id, k)).collect();
    let mut continued = vec![false; run.len()];
    for e in run {
        let Some(k) = e.event.prev.and_then(|p| at.get(&p).copied()) else {
            continue;
        };
        if e.event.seq != run[k].event.seq + 1 {
            return Err(ImportError::event(
                e,
                format!(
                    "broken chain: prev is the author's seq {} in the file",
                    run[k].event.seq
                ),
            ));
        }
        continued[k] = true;
    }
    match run
        .iter()
        .zip(&continued)
        .find(|(e, &c)| !c && e.sig.is_none())
    {
        Some((e, _)) => Err(ImportError::event(
            e,
            "the last event of one of the author's branches in the file is not signed",
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Keypair, Meta, Op, MIN_FORMAT_VERSION};
    use crate::log::{encode_frame_with, SEGMENT_MAGIC};

    /// Two signed events by each of two authors, as [`write_export`] takes
    /// them.
    fn outgoing() -> Vec<Outgoing> {
        let mut out = Vec::new();
        for k in [1u8, 2] {
            let key = Keypair::from_secret([k; 32]);
            let mut prev = None;
            for seq in 1..=2u64 {
                let e = Event {
                    version: MIN_FORMAT_VERSION,
                    author: key.node_id(),
                    seq,
                    prev,
                    deps: vec![],
                    hlc: Hlc::from_ms(1_700_000_000_000 + 10 * seq + u64::from(k)),
                    stream: "s".into(),
                    kind: "K".into(),
                    ops: vec![Op::Add {
                        counter: "n".into(),
                        delta: 1,
                    }],
                    payload: vec![],
                    meta: Meta::default(),
                };
                let (bytes, id) = e.seal();
                prev = Some(id);
                out.push(Outgoing {
                    bytes,
                    id,
                    author: e.author,
                    seq,
                    hlc: e.hlc,
                    sig: Some(key.sign(&id)),
                });
            }
        }
        out
    }

    /// An export file of `events` in the order given, frames as `frame`
    /// writes them.
    fn file(events: &[Outgoing], commit_end: bool) -> Vec<u8> {
        let mut out = header(EXPORT_MAGIC).to_vec();
        for e in events {
            encode_frame_with(&mut out, &e.bytes, &e.id, e.sig.as_ref(), commit_end);
        }
        out
    }

    fn refused(data: &[u8]) -> String {
        read_export(data).unwrap_err().to_string()
    }

    /// An author's event at `seq` after `prev`, `tag` telling branches apart.
    fn by(key: &Keypair, seq: u64, prev: Option<EventId>, tag: u64, signed: bool) -> Outgoing {
        let e = Event {
            version: MIN_FORMAT_VERSION,
            author: key.node_id(),
            seq,
            prev,
            deps: vec![],
            hlc: Hlc::from_ms(1_700_000_000_000 + 10 * seq + tag),
            stream: "s".into(),
            kind: "K".into(),
            ops: vec![],
            payload: vec![],
            meta: Meta::default(),
        };
        let (bytes, id) = e.seal();
        Outgoing {
            bytes,
            id,
            author: e.author,
            seq,
            hlc: e.hlc,
            sig: signed.then(|| key.sign(&id)),
        }
    }

    #[test]
    fn a_file_may_carry_both_branches_of_a_fork_each_ending_signed() {
        let key = Keypair::from_secret([3; 32]);
        let c1 = by(&key, 1, None, 0, false);
        let x2 = by(&key, 2, Some(c1.id), 1, false);
        let x3 = by(&key, 3, Some(x2.id), 1, true);
        let y2 = by(&key, 2, Some(c1.id), 2, true);
        let both = vec![c1.clone(), x2.clone(), x3.clone(), y2.clone()];
        let mut items = read_export(&write_export(both)).unwrap();
        authenticate(&mut items).unwrap();
        assert_eq!(items.len(), 4);
        // A branch whose end is unsigned is not authenticated, even though
        // the author's highest event is signed.
        let y2_unsigned = Outgoing {
            sig: None,
            ..y2.clone()
        };
        let mut items =
            read_export(&write_export(vec![c1.clone(), x2.clone(), x3, y2_unsigned])).unwrap();
        let e = authenticate(&mut items).unwrap_err().to_string();
        assert!(
            e.contains("not signed") && e.contains(&y2.id.to_string()),
            "{e}"
        );
        // A run's event must sit one seq above its prev in the file.
        let skip = by(&key, 3, Some(c1.id), 3, true);
        let mut items = read_export(&write_export(vec![c1, x2, y2, skip.clone()])).unwrap();
        let e = authenticate(&mut items).unwrap_err().to_string();
        assert!(
            e.contains("broken chain") && e.contains(&skip.id.to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_written_file_reads_back_in_canonical_order() {
        let data = write_export(outgoing());
        let mut items = read_export(&data).unwrap();
        assert_eq!(items.len(), 4);
        authenticate(&mut items).unwrap();
        assert!(items
            .windows(2)
            .all(|w| canonical_key(&w[0]) < canonical_key(&w[1])));
    }

    /// A reader refuses what no writer makes (`PROTOCOL.md` §5), so that two
    /// readers never disagree on a file.
    #[test]
    fn frames_no_writer_makes_are_refused() {
        let mut events = outgoing();
        events.sort_by_key(|e| (e.hlc, e.author, e.seq, e.id));
        assert!(read_export(&file(&events, false)).is_ok());

        // Reserved header bytes, in an export and in a segment.
        let mut bad = file(&events, false);
        bad[13] = 1;
        assert_eq!(
            refused(&bad),
            "not a weftlog export: the file has non-zero reserved header bytes (12 to 15)"
        );
        let mut seg = header(SEGMENT_MAGIC).to_vec();
        seg[15] = 0x80;
        assert!(check_header(&seg, SEGMENT_MAGIC, "segment")
            .unwrap_err()
            .contains("reserved"));

        // The commit-end flag of a log.
        let err = refused(&file(&events, true));
        assert_eq!(
            err,
            format!(
                "record 0 at byte {HEADER_BYTES}: flag bit 1 (a log commit's end) is set; export files never carry it"
            )
        );

        // Out of canonical order.
        let mut swapped = events.clone();
        swapped.swap(1, 2);
        let err = refused(&file(&swapped, false));
        let second = &swapped[2];
        let second_ref = EventRef {
            id: second.id,
            author: second.author,
            seq: second.seq,
        };
        assert!(err.starts_with(&second_ref.to_string()));
        assert!(err.contains("record 2 is out of canonical order"), "{err}");

        // An event twice.
        let mut twice = events.clone();
        twice.insert(2, events[1].clone());
        let err = refused(&file(&twice, false));
        assert!(
            err.contains("record 2 repeats the record before it"),
            "{err}"
        );
    }

    #[test]
    fn an_event_that_does_not_decode_is_named_by_author_and_seq() {
        let events = outgoing();
        let e = &events[0];
        // A trailing byte: it decodes, but is not canonical.
        let mut bytes = e.bytes.clone();
        bytes.push(0);
        let id = EventId(*blake3::hash(&bytes).as_bytes());
        let mut data = header(EXPORT_MAGIC).to_vec();
        encode_frame(&mut data, &bytes, &id, None);
        assert_eq!(
            refused(&data),
            format!(
                "{}: 1 trailing bytes after the event",
                EventRef {
                    id,
                    author: e.author,
                    seq: 1
                }
            )
        );
        assert_eq!(EventRef::describe_bytes(id, &[1, 2]), format!("event {id}"));
    }
}
