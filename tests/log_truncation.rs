//! Guards log recovery on open: a segment cut at any byte of its last
//! records (the file cut there, or the bytes from there zeroed, as a torn
//! write into the zero-filled allocation leaves them), or followed by
//! garbage, opens with exactly the whole records before the damage and
//! reports the torn tail; damage followed by valid records is corruption,
//! which is reported with its segment and offset and never served.
//!
//! Segment files are zero-filled ahead of their records, so they are longer
//! than the records: record offsets come from decoding the frames.

mod common;

use common::Rng;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use weftlog::node::{self, Node, NodeOpenError};
use weftlog_proto::log::{
    decode_frame, encode_frame, encode_frame_with, FrameLayout, Recovery, HEADER_BYTES,
};
use weftlog_proto::state::Draft;
use weftlog_proto::{EventId, Meta, NodeId, Op, Signature};

/// Records in the base log; each is its own `Node::append`, so each is its
/// own signed batch.
const RECORDS: usize = 10;
/// Seed of the garbage bytes.
const SEED: u64 = 0x7041_1ca7_e5ee_d001;

fn draft(i: usize) -> Draft {
    Draft {
        stream: format!("customer/{}", i % 3),
        kind: "Edited".into(),
        ops: vec![
            Op::Set {
                field: "name".into(),
                value: format!("\"name {i}\"").into_bytes(),
                supersedes: vec![],
            },
            Op::Add {
                counter: "edits".into(),
                delta: 1,
            },
        ],
        // Records of different sizes.
        payload: format!("{{\"pad\":\"{}\"}}", "p".repeat(i % 4 * 20)).into_bytes(),
        meta: Meta {
            command_id: Some(format!("cmd-{i}")),
            user: None,
        },
        expected_version: None,
        texts: Vec::new(),
    }
}

/// A node whose log holds `RECORDS` appended events.
struct Base {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    author: NodeId,
    ids: Vec<EventId>,
}

fn base() -> Base {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    let author = node::init(&dir).unwrap();
    let (n, _) = open(&dir).unwrap();
    let ids = (0..RECORDS)
        .map(|i| n.append(draft(i)).unwrap().id)
        .collect();
    drop(n);
    Base {
        _tmp: tmp,
        dir,
        author,
        ids,
    }
}

/// The one segment file of a data directory.
fn segment(dir: &Path) -> PathBuf {
    let segs: Vec<PathBuf> = fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.into_iter().next().unwrap()
}

/// One frame of a segment: where it starts and ends, and its signature.
#[derive(Clone, Copy, Debug)]
struct FrameAt {
    start: usize,
    end: usize,
    sig: Option<(usize, usize)>,
}

/// The frames of a segment, decoded from its header on; only zeros (the
/// allocation ahead of the records) may follow them.
fn frames(seg: &[u8]) -> Vec<FrameAt> {
    let mut out = Vec::new();
    let mut off = HEADER_BYTES;
    loop {
        match decode_frame(&seg[off..]) {
            Ok((f, used)) => {
                let layout = FrameLayout::new(f.bytes.len(), f.sig.is_some());
                assert_eq!(layout.len(), used);
                out.push(FrameAt {
                    start: off,
                    end: off + used,
                    sig: layout.sig.map(|r| (off + r.start, off + r.end)),
                });
                off += used;
            }
            Err(e) => {
                assert!(
                    seg[off..].iter().all(|&b| b == 0),
                    "base log is intact: {e} at byte {off}"
                );
                return out;
            }
        }
    }
}

/// How a crash leaves the bytes of a segment from `cut` on: the file cut
/// there (an append that grew the file), or zeros up to `end`, where the
/// records ended (an append into the zero-filled allocation: the file keeps
/// its length).
#[derive(Clone, Copy, Debug)]
enum Cut {
    Truncate,
    Zero,
}

impl Cut {
    /// The damaged segment, and the offset the damage starts at in effect
    /// (zeroing bytes that are zeros changes nothing).
    fn apply(self, full: &[u8], cut: usize, end: usize) -> (Vec<u8>, usize) {
        match self {
            Cut::Truncate => (full[..cut].to_vec(), cut),
            Cut::Zero => {
                let mut d = full.to_vec();
                d[cut..end].fill(0);
                let changed = full[cut..end].iter().position(|&b| b != 0);
                (d, cut + changed.unwrap_or(end - cut))
            }
        }
    }
}

/// A scratch data directory holding the base key and the given segment.
struct Scratch {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    seg: PathBuf,
}

fn scratch(base: &Path) -> Scratch {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    fs::create_dir_all(dir.join("log")).unwrap();
    fs::copy(base.join(node::KEY_FILE), dir.join(node::KEY_FILE)).unwrap();
    let seg = dir.join("log").join(segment(base).file_name().unwrap());
    Scratch {
        _tmp: tmp,
        dir,
        seg,
    }
}

/// Asserts `node` holds exactly the first `n` of `author`'s `ids`, and
/// `others` events of other authors.
fn holds_prefix(node: &Node, author: &NodeId, ids: &[EventId], n: usize, others: usize, ctx: &str) {
    node.with_state(|s| {
        assert_eq!(s.len(), (n + others) as u64, "{ctx}: events");
        for (i, id) in ids.iter().enumerate() {
            let got = s.event_id(author, i as u64 + 1);
            if i < n {
                assert_eq!(got, Some(*id), "{ctx}: event seq {}", i + 1);
            } else {
                assert_eq!(got, None, "{ctx}: event seq {} is served", i + 1);
            }
        }
    });
    let mut scanned = 0;
    node.scan(|_, _| scanned += 1).unwrap();
    assert_eq!(scanned, n + others, "{ctx}: scan");
}

/// Held while a test opens a node or spawns the CLI. A child forked by one
/// test thread inherits, until it execs, the descriptor that holds another
/// thread's directory lock (`flock`), so a node dropped and reopened in that
/// window would find its directory "in use by another weftlog process".
static SPAWN_OR_OPEN: Mutex<()> = Mutex::new(());

fn open(dir: &Path) -> Result<(Node, Recovery), NodeOpenError> {
    let _g = SPAWN_OR_OPEN.lock().unwrap_or_else(|e| e.into_inner());
    Node::open(dir)
}

fn weftlog_status(dir: &Path) -> (bool, String, String) {
    let out = {
        let _g = SPAWN_OR_OPEN.lock().unwrap_or_else(|e| e.into_inner());
        Command::new(env!("CARGO_BIN_EXE_weftlog"))
            .arg("--data")
            .arg(dir)
            .arg("status")
            .output()
            .unwrap()
    };
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_cut_at_every_byte_of_the_last_three_records_keeps_exactly_the_whole_records() {
    let b = base();
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    assert_eq!(fr.len(), RECORDS);
    let end = fr[RECORDS - 1].end;
    assert!(
        full.len() > end,
        "the segment is zero-filled after its records"
    );
    let s = scratch(&b.dir);
    let first = fr[RECORDS - 3].start;
    for cut in first..=end {
        for how in [Cut::Truncate, Cut::Zero] {
            let (damaged, cut) = how.apply(&full, cut, end);
            let ctx = format!(
                "cut at byte {cut} ({how:?}) of {} (records end at {end})",
                full.len()
            );
            fs::write(&s.seg, &damaged).unwrap();
            let (n, rec) = open(&s.dir).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            let whole = fr.iter().filter(|f| f.end <= cut).count();
            let kept_bytes = fr
                .iter()
                .map(|f| f.end)
                .filter(|&e| e <= cut)
                .max()
                .unwrap();
            holds_prefix(&n, &b.author, &b.ids, whole, 0, &ctx);
            assert_eq!(rec.records, whole as u64, "{ctx}");
            let mid_record = kept_bytes != cut;
            match &rec.torn {
                Some(t) => {
                    assert!(
                        mid_record,
                        "{ctx}: a torn tail reported at a record boundary: {t:?}"
                    );
                    assert_eq!(t.segment, 0, "{ctx}");
                    assert_eq!(t.offset, kept_bytes as u64, "{ctx}");
                    // From the bad frame to the end of the file.
                    assert_eq!(
                        t.dropped_bytes,
                        (damaged.len() - kept_bytes) as u64,
                        "{ctx}"
                    );
                    match how {
                        Cut::Truncate => {
                            assert!(t.reason.contains("incomplete"), "{ctx}: {}", t.reason)
                        }
                        Cut::Zero => {
                            let e = decode_frame(&damaged[kept_bytes..]).unwrap_err();
                            assert_eq!(t.reason, e.to_string(), "{ctx}");
                        }
                    }
                }
                None => assert!(!mid_record, "{ctx}: a torn tail went unreported"),
            }
            drop(n);
            // Cut at the bad frame; a clean end keeps its zeros.
            let after = if mid_record {
                &full[..kept_bytes]
            } else {
                &damaged[..]
            };
            assert!(
                fs::read(&s.seg).unwrap() == after,
                "{ctx}: file after recovery"
            );
            // Recovery is durable and done once; the log takes appends again,
            // right after its records. (A sample: each open verifies a
            // signature, slow in debug builds.)
            if cut % 11 == 0 || !mid_record {
                let (n, rec) = open(&s.dir).unwrap();
                assert_eq!(rec.torn, None, "{ctx}: second open");
                holds_prefix(&n, &b.author, &b.ids, whole, 0, &ctx);
            }
            if cut % 97 == 0 {
                let (n, _) = open(&s.dir).unwrap();
                let a = n.append(draft(99)).unwrap();
                assert_eq!(a.seq, whole as u64 + 1, "{ctx}");
                drop(n);
                let (n, rec) = open(&s.dir).unwrap();
                assert_eq!(rec.torn, None);
                assert_eq!(n.with_state(|s| s.len()), whole as u64 + 1, "{ctx}");
                let now = frames(&fs::read(&s.seg).unwrap());
                assert_eq!(now.len(), whole + 1, "{ctx}");
                assert_eq!(now[whole].start, kept_bytes, "{ctx}: where the append went");
            }
        }
    }

    // The CLI reports the recovery and serves the whole records.
    let cut = fr[RECORDS - 1].start + 7;
    fs::write(&s.seg, &full[..cut]).unwrap();
    let (ok, out, err) = weftlog_status(&s.dir);
    assert!(ok, "{err}");
    assert!(
        err.contains("torn tail") && err.contains("segment 0"),
        "{err}"
    );
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["events"], RECORDS - 1);
}

#[test]
fn garbage_after_the_last_record_is_cut_as_a_torn_tail() {
    let b = base();
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    let end = fr[RECORDS - 1].end;
    assert!(full.len() > end + 4096, "the segment is zero-filled ahead");
    let s = scratch(&b.dir);
    let mut rng = Rng(SEED);
    // Tails, and whether they may go right after the records, over the
    // zeros (a tail cut short there would be completed by the zeros).
    let mut tails: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for len in [1, 3, 4, 5, 16, 37, 64, 200, 4096] {
        tails.push((format!("{len} seeded random bytes"), rng.bytes(len), true));
    }
    for len in [1, 4, 5, 40, 4096] {
        tails.push((format!("{len} zero bytes"), vec![0; len], true));
    }
    for k in [0, RECORDS / 2, RECORDS - 1] {
        let f = fr[k];
        let half = &full[f.start..f.start + (f.end - f.start) / 2];
        tails.push((format!("the first half of record {k}"), half.to_vec(), true));
        // A whole record's bytes less its last: fails its check.
        tails.push((
            format!("record {k} less its last byte"),
            full[f.start..f.end - 1].to_vec(),
            false,
        ));
        // A whole record with its last byte changed: fails its check.
        let mut changed = full[f.start..f.end].to_vec();
        *changed.last_mut().unwrap() ^= 0x01;
        tails.push((
            format!("record {k} with its last byte changed"),
            changed,
            true,
        ));
    }
    for (what, tail, over_zeros) in &tails {
        // Right after the last record, over the zero-filled allocation; and
        // after the allocation, at the end of the file.
        let mut places = vec![("after the zero-filled tail", full.len())];
        if *over_zeros {
            places.push(("right after the last record", end));
        }
        for (place, at) in places {
            let ctx = format!("log followed by {what}, {place} (seed {SEED:#x})");
            let mut damaged = full.clone();
            if damaged.len() < at + tail.len() {
                damaged.resize(at + tail.len(), 0);
            }
            damaged[at..at + tail.len()].copy_from_slice(tail);
            fs::write(&s.seg, &damaged).unwrap();
            let (n, rec) = open(&s.dir).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            holds_prefix(&n, &b.author, &b.ids, RECORDS, 0, &ctx);
            if tail.iter().all(|&b| b == 0) {
                // Zeros are the clean end of a segment, however many.
                assert_eq!(rec.torn, None, "{ctx}");
                drop(n);
                assert!(fs::read(&s.seg).unwrap() == damaged, "{ctx}: file changed");
                continue;
            }
            let t = rec
                .torn
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: no torn tail reported"));
            assert_eq!(t.offset, end as u64, "{ctx}");
            assert_eq!(t.dropped_bytes, (damaged.len() - end) as u64, "{ctx}");
            assert!(!t.reason.is_empty(), "{ctx}");
            drop(n);
            assert!(
                fs::read(&s.seg).unwrap() == full[..end],
                "{ctx}: file after recovery"
            );
        }
    }

    // A flipped byte anywhere in the zero-filled tail.
    for at in [
        end,
        end + 1,
        end + 100,
        (end + full.len()) / 2,
        full.len() - 1,
    ] {
        let ctx = format!("byte {at} of the zero-filled tail flipped");
        let mut damaged = full.clone();
        damaged[at] ^= 0x01;
        fs::write(&s.seg, &damaged).unwrap();
        let (n, rec) = open(&s.dir).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
        holds_prefix(&n, &b.author, &b.ids, RECORDS, 0, &ctx);
        let t = rec.torn.unwrap_or_else(|| panic!("{ctx}: not reported"));
        assert_eq!(
            (t.segment, t.offset, t.dropped_bytes),
            (0, end as u64, (full.len() - end) as u64),
            "{ctx}"
        );
        drop(n);
        assert!(
            fs::read(&s.seg).unwrap() == full[..end],
            "{ctx}: file after recovery"
        );
        // Appends go on right after the records.
        let (n, _) = open(&s.dir).unwrap();
        n.append(draft(99)).unwrap();
        drop(n);
        let (n, rec) = open(&s.dir).unwrap();
        assert_eq!(rec.torn, None, "{ctx}");
        assert_eq!(n.with_state(|s| s.len()), RECORDS as u64 + 1, "{ctx}");
        let now = frames(&fs::read(&s.seg).unwrap());
        assert_eq!(now[RECORDS].start, end, "{ctx}: where the append went");
    }
}

#[test]
fn a_flipped_byte_in_a_middle_record_is_corruption_and_nothing_is_served() {
    let b = base();
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    let s = scratch(&b.dir);
    for k in [1, RECORDS / 2, RECORDS - 2] {
        let f = fr[k];
        assert!(f.sig.is_some(), "each append signs its record");
        // Every byte, the signature's included: the header check covers
        // the length, the flags and the signature, the id the event.
        for at in f.start..f.end {
            for mask in [0x01u8, 0xff] {
                let ctx = format!(
                    "record {k} (bytes {}..{}), byte {at} ^ {mask:#04x}",
                    f.start, f.end
                );
                let mut damaged = full.clone();
                damaged[at] ^= mask;
                fs::write(&s.seg, &damaged).unwrap();
                let err = match open(&s.dir) {
                    Ok((n, rec)) => panic!(
                        "{ctx}: opened with {} events, recovery {rec:?}",
                        n.with_state(|s| s.len())
                    ),
                    Err(e) => e.to_string(),
                };
                assert!(err.contains("corrupt"), "{ctx}: {err}");
                assert!(err.contains("segment 0"), "{ctx}: {err}");
                assert!(
                    err.contains(&format!("at byte {}", f.start)),
                    "{ctx}: {err}"
                );
                assert_eq!(
                    fs::read(&s.seg).unwrap(),
                    damaged,
                    "{ctx}: a failed open changed the log"
                );
            }
        }
    }

    // Through the CLI: non-zero exit, the same message, no output.
    let f = fr[RECORDS / 2];
    let mut damaged = full.clone();
    damaged[(f.start + f.end) / 2 + 3] ^= 0x20;
    damaged[f.end - 1] ^= 0x20;
    fs::write(&s.seg, &damaged).unwrap();
    let (ok, out, err) = weftlog_status(&s.dir);
    assert!(!ok, "status served a corrupt log: {out}");
    assert_eq!(out, "");
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        err.contains(&format!("segment 0 at byte {}", f.start)),
        "{err}"
    );
    assert!(err.contains("a valid record follows"), "{err}");
    assert_eq!(fs::read(&s.seg).unwrap(), damaged);
}

/// A node whose log ends with an imported batch (several events of another
/// author, only the last one signed): the layout an interrupted import leaves.
struct WithBatch {
    base: Base,
    other: NodeId,
    other_ids: Vec<EventId>,
}

/// The export file with every signature but the last dropped: still a valid
/// export (the last signature covers the run through `prev`), as one of a
/// node whose batch was a single group commit would be.
fn only_last_signed(file: &[u8]) -> Vec<u8> {
    let mut frames = Vec::new();
    let mut off = HEADER_BYTES;
    while off < file.len() {
        let (f, used) = decode_frame(&file[off..]).unwrap();
        frames.push(f);
        off += used;
    }
    let mut out = file[..HEADER_BYTES].to_vec();
    for (i, f) in frames.iter().enumerate() {
        let sig = if i + 1 == frames.len() { f.sig } else { None };
        encode_frame(&mut out, f.bytes, &f.id, sig.as_ref());
    }
    out
}

fn with_imported_batch() -> WithBatch {
    let b = base();
    let tmp = tempfile::tempdir().unwrap();
    let odir = tmp.path().join("other");
    let other = node::init(&odir).unwrap();
    let (o, _) = open(&odir).unwrap();
    let other_ids: Vec<EventId> = (0..4)
        .map(|i| o.append(draft(50 + i)).unwrap().id)
        .collect();
    let (file, n) = o.export(&[]).unwrap();
    assert_eq!(n, 4);
    let (a, _) = open(&b.dir).unwrap();
    let r = a.import(&only_last_signed(&file)).unwrap();
    assert_eq!(r.imported, 4);
    WithBatch {
        base: b,
        other,
        other_ids,
    }
}

#[test]
fn a_cut_inside_an_imported_batch_drops_the_whole_batch() {
    let w = with_imported_batch();
    let b = &w.base;
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    assert_eq!(fr.len(), RECORDS + 4);
    assert!(fr[RECORDS..RECORDS + 3].iter().all(|f| f.sig.is_none()));
    assert!(fr[RECORDS + 3].sig.is_some());
    let batch_start = fr[RECORDS].start;
    let end = fr[RECORDS + 3].end;
    let s = scratch(&b.dir);
    for cut in batch_start..=end {
        for how in [Cut::Truncate, Cut::Zero] {
            let (damaged, cut) = how.apply(&full, cut, end);
            let ctx = format!("cut at byte {cut} ({how:?}; batch is bytes {batch_start}..{end})");
            fs::write(&s.seg, &damaged).unwrap();
            let (n, rec) = open(&s.dir).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            let whole_in_batch = fr[RECORDS..].iter().filter(|f| f.end <= cut).count();
            if cut == end {
                holds_prefix(&n, &b.author, &b.ids, RECORDS, 4, &ctx);
                holds_prefix(&n, &w.other, &w.other_ids, 4, RECORDS, &ctx);
                assert_eq!(rec.torn, None, "{ctx}");
                continue;
            }
            // No part of a batch without its signature is served.
            holds_prefix(&n, &b.author, &b.ids, RECORDS, 0, &ctx);
            holds_prefix(&n, &w.other, &w.other_ids, 0, RECORDS, &ctx);
            assert_eq!(rec.records, RECORDS as u64, "{ctx}");
            let mid_record = !fr.iter().any(|f| f.end == cut) && cut != batch_start;
            match &rec.torn {
                None => assert!(cut == batch_start, "{ctx}: nothing reported"),
                Some(t) => {
                    assert!(cut != batch_start, "{ctx}: {t:?}");
                    assert_eq!((t.segment, t.offset), (0, batch_start as u64), "{ctx}");
                    if mid_record {
                        match how {
                            Cut::Truncate => {
                                assert!(t.reason.contains("incomplete"), "{ctx}: {}", t.reason)
                            }
                            Cut::Zero => {
                                // The frame error where the cut falls.
                                let at = fr.iter().rev().find(|f| f.start < cut).unwrap().start;
                                let e = decode_frame(&damaged[at..]).unwrap_err();
                                let why = e.to_string();
                                assert!(t.reason.starts_with(&why), "{ctx}: {}", t.reason);
                            }
                        }
                    }
                    if whole_in_batch > 0 {
                        let note = format!("{whole_in_batch} records of an interrupted batch");
                        assert!(t.reason.contains(&note), "{ctx}: {}", t.reason);
                    }
                }
            }
            drop(n);
            // Cut at the batch's start; zeros there are a clean end, kept.
            let after = if cut == batch_start {
                &damaged[..]
            } else {
                &full[..batch_start]
            };
            assert!(
                fs::read(&s.seg).unwrap() == after,
                "{ctx}: file after recovery"
            );
            if cut % 11 == 0 {
                let (n, rec) = open(&s.dir).unwrap();
                assert_eq!(rec.torn, None, "{ctx}: second open");
                holds_prefix(&n, &b.author, &b.ids, RECORDS, 0, &ctx);
            }
        }
    }
}

/// The recovery report says where the cut began and how many bytes it
/// removed, also when the cut is of an interrupted batch.
#[test]
fn the_report_of_an_interrupted_batch_cut_says_where_and_how_much() {
    let w = with_imported_batch();
    let b = &w.base;
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    let batch_start = fr[RECORDS].start;
    let s = scratch(&b.dir);
    // At a record boundary inside the batch, and inside a record of it.
    for cut in [fr[RECORDS + 1].end, fr[RECORDS + 2].start + 9] {
        let ctx = format!("cut at byte {cut} (batch starts at byte {batch_start})");
        fs::write(&s.seg, &full[..cut]).unwrap();
        let (_n, rec) = open(&s.dir).unwrap();
        let t = rec
            .torn
            .unwrap_or_else(|| panic!("{ctx}: nothing reported"));
        assert_eq!(t.segment, 0, "{ctx}: {t:?}");
        assert_eq!(t.offset, batch_start as u64, "{ctx}: {t:?}");
        assert_eq!(t.dropped_bytes, (cut - batch_start) as u64, "{ctx}: {t:?}");
    }
}

/// As above, with the crash inside the zero-filled allocation: the bytes
/// from the cut to the end of the batch are zeros, and the file keeps its
/// length. Recovery cuts the file at the batch's start, so it removes every
/// byte from there to the end of the file (a torn tail's `dropped_bytes`
/// counts the zero-filled allocation after the damage), wherever in the
/// batch the crash fell.
#[test]
fn the_report_of_an_interrupted_batch_cut_counts_the_zero_filled_tail() {
    let w = with_imported_batch();
    let b = &w.base;
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    let batch_start = fr[RECORDS].start;
    let end = fr[RECORDS + 3].end;
    let s = scratch(&b.dir);
    // Inside a record of the batch, and at a record boundary inside it.
    for cut in [fr[RECORDS + 2].start + 9, fr[RECORDS + 1].end] {
        let (damaged, cut) = Cut::Zero.apply(&full, cut, end);
        let ctx = format!("zeros from byte {cut} (batch starts at byte {batch_start})");
        fs::write(&s.seg, &damaged).unwrap();
        let (n, rec) = open(&s.dir).unwrap();
        holds_prefix(&n, &b.author, &b.ids, RECORDS, 0, &ctx);
        drop(n);
        assert!(fs::read(&s.seg).unwrap() == full[..batch_start], "{ctx}");
        let t = rec
            .torn
            .unwrap_or_else(|| panic!("{ctx}: nothing reported"));
        assert_eq!(t.segment, 0, "{ctx}: {t:?}");
        assert_eq!(t.offset, batch_start as u64, "{ctx}: {t:?}");
        assert_eq!(
            t.dropped_bytes,
            (full.len() - batch_start) as u64,
            "{ctx}: the file was cut from {} to {batch_start} bytes: {t:?}",
            full.len()
        );
    }
}

/// A last record whose signature is damaged fails its header check (the
/// check covers the signature): it is cut as a torn tail, never served. A
/// last record whose signature is framed correctly but does not verify is
/// refused with a message that names that record.
#[test]
fn a_bad_signature_on_the_last_record_is_never_served_and_is_named() {
    let b = base();
    let full = fs::read(segment(&b.dir)).unwrap();
    let fr = frames(&full);
    let last = fr[RECORDS - 1];
    let (sig_start, _) = last.sig.expect("each append signs its record");
    let s = scratch(&b.dir);

    // A flipped signature byte: a torn tail.
    let mut damaged = full.clone();
    damaged[sig_start + 9] ^= 0x10;
    fs::write(&s.seg, &damaged).unwrap();
    let (n, rec) = open(&s.dir).unwrap_or_else(|e| panic!("damaged last signature: {e}"));
    holds_prefix(
        &n,
        &b.author,
        &b.ids,
        RECORDS - 1,
        0,
        "damaged last signature",
    );
    let t = rec.torn.expect("a damaged signature was cut silently");
    assert_eq!(
        (t.segment, t.offset, t.dropped_bytes),
        (0, last.start as u64, (full.len() - last.start) as u64)
    );
    assert!(t.reason.contains("header check failed"), "{}", t.reason);
    drop(n);
    assert!(fs::read(&s.seg).unwrap() == full[..last.start]);

    // A wrong signature, framed with its header check: refused, named.
    let (f, used) = decode_frame(&full[last.start..]).unwrap();
    let mut sig: Signature = f.sig.expect("signed");
    sig.0[9] ^= 0x10;
    let mut frame = Vec::new();
    encode_frame_with(&mut frame, f.bytes, &f.id, Some(&sig), f.commit_end);
    assert_eq!(frame.len(), used);
    let mut damaged = full.clone();
    damaged[last.start..last.end].copy_from_slice(&frame);
    fs::write(&s.seg, &damaged).unwrap();
    let msg = match open(&s.dir) {
        Ok((n, rec)) => panic!(
            "a last record with a bad signature opened: {} events, {rec:?}",
            n.with_state(|s| s.len())
        ),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("signature does not verify"), "{msg}");
    assert!(msg.contains(&b.ids[RECORDS - 1].to_string()), "{msg}");
    assert!(
        msg.contains(&format!("log record {} ", RECORDS - 1)),
        "the message names the wrong record: {msg}"
    );
    assert!(
        fs::read(&s.seg).unwrap() == damaged,
        "a failed open changed the log"
    );
}
