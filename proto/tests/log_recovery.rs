//! Guards log recovery (`DESIGN.md` §4): every acknowledged (synced) record
//! survives a crash; a torn tail is reported and truncated, after which the
//! log reopens clean; damage followed by a valid record, or in any segment
//! but the last, is corruption that fails the open and names where it is;
//! after a failed sync the log accepts no more appends. Segments are
//! zero-filled ahead of their records: an all-zero tail is the clean end,
//! and appends go right after the records.
//!
//! Everything runs on `MemStorage`, whose crash model keeps the synced bytes
//! and a prefix of the unsynced writes.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use weftlog_proto::event::{verify, MAX_EVENT_BYTES};
use weftlog_proto::log::{
    decode_frame, encode_frame, header, AppendError, FrameError, FrameLayout, Log, MemStorage,
    OpenError, Recovery, Storage, TornTail, FRAME_OVERHEAD, HEADER_BYTES, SEGMENT_ALLOC_BYTES,
    SEGMENT_MAGIC, SEGMENT_TARGET_BYTES, SIG_BYTES,
};
use weftlog_proto::state::{Draft, Prepared};
use weftlog_proto::{EventId, HlcClock, Keypair, Meta, Op, Signature, State};

/// Real events in the pool the tests draw from.
const POOL: usize = 40;

fn config(file: &'static str) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        // Integration tests run with the package root as working directory.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..ProptestConfig::default()
    }
}

/// One log record: event bytes, their id, and maybe a signature.
#[derive(Clone, Debug, PartialEq)]
struct Rec {
    bytes: Vec<u8>,
    id: EventId,
    sig: Option<Signature>,
}

impl Rec {
    fn layout(&self) -> FrameLayout {
        FrameLayout::new(self.bytes.len(), self.sig.is_some())
    }

    fn frame_len(&self) -> usize {
        self.layout().len()
    }
}

/// A chain of real events by one node, made as the node makes them, every
/// third one signed (as the last of a batch would be).
fn pool() -> &'static [Rec] {
    static POOL_RECS: OnceLock<Vec<Rec>> = OnceLock::new();
    POOL_RECS.get_or_init(|| {
        let key = Keypair::from_secret([42; 32]);
        let mut state = State::new();
        let mut clock = HlcClock::default();
        (0..POOL)
            .map(|i| {
                let draft = Draft {
                    stream: format!("customer/{}", i % 3),
                    kind: "Noted".into(),
                    ops: vec![Op::Add {
                        counter: "notes".into(),
                        delta: 1,
                    }],
                    payload: vec![b'x'; (i * 37) % 400],
                    meta: Meta::default(),
                    expected_version: None,
                    texts: Vec::new(),
                };
                let event = match state.prepare(key.node_id(), &mut clock, 1_000 + i as u64, draft)
                {
                    Ok(Prepared::New(e)) => e,
                    other => panic!("{other:?}"),
                };
                let (bytes, id) = event.seal();
                state.insert(&event, id).expect("own event");
                let sig = (i % 3 == 2).then(|| key.sign(&id));
                if let Some(sig) = &sig {
                    assert_eq!(verify(&key.node_id(), &id, sig), Ok(()));
                }
                Rec { bytes, id, sig }
            })
            .collect()
    })
}

/// Non-empty bytes with id = blake3(bytes): the log does not decode events.
fn raw(bytes: Vec<u8>, sig: Option<u8>) -> Rec {
    let id = EventId(*blake3::hash(&bytes).as_bytes());
    Rec {
        bytes,
        id,
        sig: sig.map(|b| Signature([b; 64])),
    }
}

fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        2 => (0..POOL).prop_map(|i| pool()[i].clone()),
        1 => (prop::collection::vec(any::<u8>(), 1..300), prop::option::of(any::<u8>()))
            .prop_map(|(b, s)| raw(b, s)),
    ]
}

fn frames(recs: &[Rec]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in recs {
        encode_frame(&mut out, &r.bytes, &r.id, r.sig.as_ref());
    }
    out
}

/// Opens the log and returns what recovery read, checking each frame's id
/// and, for the real events, its signature.
fn open(storage: MemStorage) -> Result<(Log<MemStorage>, Recovery, Vec<Rec>), OpenError> {
    let mut read = Vec::new();
    let (log, recovery) = Log::open(storage, |f| {
        assert_eq!(
            blake3::hash(f.bytes).as_bytes(),
            &f.id.0,
            "frame id checked"
        );
        read.push(Rec {
            bytes: f.bytes.to_vec(),
            id: f.id,
            sig: f.sig,
        });
        Ok(())
    })?;
    assert_eq!(recovery.records, read.len() as u64);
    assert_eq!(log.records(), read.len() as u64);
    Ok((log, recovery, read))
}

/// Opens a log that must be clean and hold exactly `expect`.
fn open_clean(storage: MemStorage, expect: &[Rec]) -> Log<MemStorage> {
    let (mut log, recovery, read) = open(storage).expect("clean log opens");
    assert_eq!(recovery.torn, None, "clean log reports no torn tail");
    assert_same_records(&read, expect);
    // A rescan reads the same.
    let mut again = Vec::new();
    log.scan(|f| {
        again.push(f.id);
        Ok(())
    })
    .expect("scan");
    assert_eq!(again, expect.iter().map(|r| r.id).collect::<Vec<_>>());
    log
}

fn assert_same_records(read: &[Rec], expect: &[Rec]) {
    assert_eq!(read.len(), expect.len(), "record count");
    // Bytes, id and signature as written (the pool's signatures verify, so
    // the ones read back do too).
    for (i, (r, e)) in read.iter().zip(expect).enumerate() {
        assert_eq!(r, e, "record {i}");
    }
}

/// How many whole frames of `recs` fit in `len` bytes, and their bytes.
/// The frames of `recs`, written as `data`, that are whole in an image
/// holding `data[..keep]` and then zeros up to `avail` bytes: a frame cut
/// short is still whole when the bytes it lost were zeros (the zero-filled
/// allocation restores them). Returns their count and byte length.
fn durable_frames(recs: &[Rec], data: &[u8], keep: usize, avail: usize) -> (usize, usize) {
    let mut used = 0;
    for (i, r) in recs.iter().enumerate() {
        let end = used + r.frame_len();
        let whole =
            end <= avail && (end <= keep || data[keep.max(used)..end].iter().all(|&b| b == 0));
        if !whole {
            return (i, used);
        }
        used = end;
    }
    (recs.len(), used)
}

fn whole_frames(recs: &[Rec], len: usize) -> (usize, usize) {
    let mut used = 0;
    for (i, r) in recs.iter().enumerate() {
        if used + r.frame_len() > len {
            return (i, used);
        }
        used += r.frame_len();
    }
    (recs.len(), used)
}

/// Where the records of a segment end, found by decoding its frames from
/// the header on; asserts that only zeros (the allocation) follow them.
fn records_end(data: &[u8]) -> usize {
    let mut off = HEADER_BYTES;
    while let Ok((_, used)) = decode_frame(&data[off..]) {
        off += used;
    }
    assert!(
        data[off..].iter().all(|&b| b == 0),
        "the bytes after the records (from byte {off} of {}) are not zeros",
        data.len()
    );
    off
}

/// Appends `extra` to a log that must be clean and hold `expect`, and checks
/// that its frame lands right after the last segment's records (not after
/// their zero-filled allocation), is durable, and reads back.
fn append_lands_after_the_records(mut storage: MemStorage, expect: &[Rec], extra: &Rec) {
    let seg = last_segment(&mut storage);
    // (Nothing is pending: `bytes_mut` reads the synced image.)
    let end = records_end(storage.bytes_mut(seg).unwrap());
    let mut log = open_clean(storage, expect);
    let data = frames(std::slice::from_ref(extra));
    let bytes = log.bytes();
    log.append(&data, 1).unwrap();
    assert_eq!(log.bytes(), bytes + data.len() as u64);
    let mut storage = log.into_storage();
    storage.crash(0);
    let image = storage.bytes_mut(seg).unwrap();
    assert_eq!(
        &image[end..end + data.len()],
        &data[..],
        "the appended frame"
    );
    assert_eq!(records_end(image), end + data.len());
    let mut all = expect.to_vec();
    all.push(extra.clone());
    open_clean(storage, &all);
}

fn last_segment(storage: &mut MemStorage) -> u64 {
    storage
        .list()
        .expect("list")
        .into_iter()
        .max()
        .expect("a segment")
}

/// A segment written by hand: the header, `recs`, then `zeros` zero bytes
/// (as the allocation ahead of the records), each written where the bytes
/// before it end, and synced.
fn write_segment(s: &mut MemStorage, base: u64, recs: &[Rec], zeros: usize) {
    s.create(base).unwrap();
    let mut data = header(SEGMENT_MAGIC).to_vec();
    data.extend(frames(recs));
    s.write_at(base, 0, &data).unwrap();
    s.write_at(base, data.len() as u64, &vec![0; zeros])
        .unwrap();
    s.sync_data(base).unwrap();
}

/// Frames are laid out as `FrameLayout` says, and each part of a frame is
/// covered by a check: the header check covers the length, the flags and
/// the signature; the id covers the event.
#[test]
fn frames_are_laid_out_as_frame_layout_says() {
    let mut recs: Vec<Rec> = pool().to_vec();
    recs.push(raw(vec![7], None));
    recs.push(raw(vec![7], Some(9)));
    for (i, r) in recs.iter().enumerate() {
        let buf = frames(std::slice::from_ref(r));
        let l = r.layout();
        let sig = if r.sig.is_some() { SIG_BYTES } else { 0 };
        assert_eq!(l.len(), FRAME_OVERHEAD + r.bytes.len() + sig, "record {i}");
        assert_eq!(buf.len(), l.len(), "record {i}");
        assert_eq!(
            &buf[..4],
            &(r.bytes.len() as u32).to_le_bytes(),
            "record {i}"
        );
        assert_eq!(buf[4], r.sig.is_some() as u8, "record {i}");
        assert_eq!(
            l.sig.clone().map(|s| buf[s].to_vec()),
            r.sig.map(|s| s.0.to_vec())
        );
        assert_eq!(l.check.len(), 4);
        assert_eq!(&buf[l.event.clone()], &r.bytes[..], "record {i}");
        assert_eq!(&buf[l.id.clone()], &r.id.0, "record {i}");
        let (f, used) = decode_frame(&buf).expect("a frame decodes");
        assert_eq!(
            (f.bytes, f.id, f.sig, used),
            (&r.bytes[..], r.id, r.sig, l.len())
        );
        // Damage to the length, flags, signature or check: the header is
        // not trusted.
        let header = l
            .sig
            .clone()
            .unwrap_or(5..5)
            .chain(l.check.clone())
            .chain(0..5);
        for at in header {
            let mut bad = buf.clone();
            bad[at] ^= 0x01;
            let e = decode_frame(&bad).expect_err("damage in the header");
            assert_eq!(e.trusted_len(), None, "record {i}, byte {at}: {e}");
        }
        let mut bad = buf.clone();
        bad[l.check.start] ^= 0x01;
        assert_eq!(decode_frame(&bad).unwrap_err(), FrameError::HeaderCheck);
        // Damage to the event or the id: the header vouches for the length.
        for at in [l.event.start, l.event.end - 1, l.id.start, l.id.end - 1] {
            let mut bad = buf.clone();
            bad[at] ^= 0x01;
            let e = decode_frame(&bad).expect_err("damage after the header");
            assert!(matches!(e, FrameError::IdMismatch { .. }), "{e}");
            assert_eq!(e.trusted_len(), Some(l.len()), "record {i}, byte {at}");
        }
        // Cut short: inside the header, or after it.
        for cut in 0..l.len() {
            let e = decode_frame(&buf[..cut]).expect_err("a cut frame");
            if cut < l.event.start {
                assert!(
                    matches!(e, FrameError::ShortHeader { .. }),
                    "cut {cut}: {e}"
                );
                assert!(e.to_string().contains("incomplete"), "{e}");
            } else {
                let need = l.len();
                assert_eq!(e, FrameError::Incomplete { have: cut, need });
                assert_eq!(e.trusted_len(), Some(need));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Crashes.

#[derive(Clone, Debug)]
enum Action {
    /// An acknowledged append.
    Append(Vec<Rec>),
    /// Power cut with nothing pending.
    PowerCut(Index),
    /// A batch written but not synced, then a crash keeping a prefix of it;
    /// with `fail_sync` the batch goes through `Log::append`, whose sync fails.
    TornAppend {
        batch: Vec<Rec>,
        keep: Index,
        fail_sync: bool,
    },
    /// Close and reopen.
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    let batch = || prop::collection::vec(rec(), 1..6);
    prop_oneof![
        4 => batch().prop_map(Action::Append),
        1 => any::<Index>().prop_map(Action::PowerCut),
        3 => (batch(), any::<Index>(), any::<bool>())
            .prop_map(|(batch, keep, fail_sync)| Action::TornAppend { batch, keep, fail_sync }),
        1 => Just(Action::Reopen),
    ]
}

proptest! {
    #![proptest_config(config("proptest-regressions/log_recovery.txt"))]

    /// Appends in batches with crashes at random points that keep random
    /// prefixes of the unsynced bytes: every acknowledged record survives, in
    /// order; whole records of an unacknowledged batch may survive; a cut
    /// inside a record is reported as a torn tail exactly where it starts,
    /// truncated there (the zero-filled allocation after it included), and
    /// the next open is clean.
    #[test]
    fn crashes_keep_every_acknowledged_record(actions in prop::collection::vec(action(), 1..24)) {
        let (mut log, recovery, read) = open(MemStorage::new()).unwrap();
        prop_assert_eq!(recovery, Recovery { records: 0, segments: 1, torn: None });
        prop_assert!(read.is_empty());
        // The records the log must hold, in order.
        let mut durable: Vec<Rec> = Vec::new();
        for action in actions {
            match action {
                Action::Append(batch) => {
                    let before = log.bytes();
                    let data = frames(&batch);
                    log.append(&data, batch.len() as u64).unwrap();
                    durable.extend(batch);
                    prop_assert_eq!(log.records(), durable.len() as u64);
                    prop_assert_eq!(log.bytes(), before + data.len() as u64);
                }
                Action::PowerCut(keep) => {
                    let mut storage = log.into_storage();
                    storage.crash(keep.index(1 << 16));
                    log = open_clean(storage, &durable);
                }
                Action::Reopen => {
                    log = open_clean(log.into_storage(), &durable);
                }
                Action::TornAppend { batch, keep, fail_sync } => {
                    // These batches never fill a segment: the log is one
                    // segment, whose records end at `base`.
                    let base = log.bytes();
                    let data = frames(&batch);
                    let mut storage = log.into_storage();
                    let seg = last_segment(&mut storage);
                    prop_assert_eq!(seg, 0);
                    if fail_sync {
                        storage.fail_sync = true;
                        // Opening a clean log needs no sync.
                        let mut failing = open_clean(storage, &durable);
                        let n = batch.len() as u64;
                        prop_assert!(matches!(failing.append(&data, n), Err(AppendError::Io(_))));
                        prop_assert!(matches!(failing.append(&data, n), Err(AppendError::Poisoned)));
                        prop_assert_eq!(failing.records(), durable.len() as u64);
                        storage = failing.into_storage();
                        storage.fail_sync = false;
                    } else {
                        storage.write_at(seg, base, &data).unwrap();
                    }
                    let keep = keep.index(data.len() + 1);
                    storage.crash(keep);
                    // The crash kept the first `keep` bytes of the batch,
                    // then zeros of the allocation, if the file has any.
                    // (After the crash nothing is pending: `bytes_mut`
                    // reads the image.)
                    let image = storage.bytes_mut(seg).unwrap();
                    let at = base as usize;
                    prop_assert_eq!(&image[at..at + keep], &data[..keep]);
                    prop_assert!(image[at + keep..].iter().all(|&b| b == 0));
                    let len = image.len();
                    let (reopened, recovery, read) = open(storage).unwrap();
                    let (whole, boundary) = durable_frames(&batch, &data, keep, len - at);
                    durable.extend_from_slice(&batch[..whole]);
                    assert_same_records(&read, &durable);
                    let torn = recovery.torn.clone().map(|t| TornTail { reason: String::new(), ..t });
                    let end = base + boundary as u64;
                    // Clean when nothing but zeros follows the whole frames.
                    let clean = keep <= boundary || data[boundary..keep].iter().all(|&b| b == 0);
                    if clean {
                        prop_assert_eq!(torn, None);
                    } else {
                        prop_assert_eq!(torn, Some(TornTail {
                            segment: seg,
                            offset: end,
                            dropped_bytes: (len as u64) - end,
                            reason: String::new(),
                        }));
                    }
                    prop_assert_eq!(reopened.bytes(), end);
                    // A torn tail is cut off where it starts; a clean end
                    // keeps its zeros.
                    let mut storage = reopened.into_storage();
                    let after = storage.bytes_mut(seg).unwrap().len();
                    prop_assert_eq!(after, if clean { len } else { end as usize });
                    // Reopening again is clean.
                    log = open_clean(storage, &durable);
                }
            }
        }
        // The log still takes appends, right after its records, and they
        // are durable.
        append_lands_after_the_records(log.into_storage(), &durable, &pool()[0]);
    }
}

/// A failed sync is fatal: the append fails, every later append is refused
/// as poisoned, and a reopen recovers the acknowledged records.
#[test]
fn a_failed_sync_poisons_the_log() {
    let first: Vec<Rec> = pool()[..4].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&first), 4).unwrap();
    let mut storage = log.into_storage();
    storage.fail_sync = true;
    let mut log = open_clean(storage, &first);
    let second: Vec<Rec> = pool()[4..7].to_vec();
    let err = log.append(&frames(&second), 3).unwrap_err();
    assert!(matches!(err, AppendError::Io(_)), "{err:?}");
    for _ in 0..3 {
        let err = log.append(&frames(&second), 3).unwrap_err();
        assert!(matches!(err, AppendError::Poisoned), "{err:?}");
        assert!(err.to_string().contains("reopen"), "{err}");
    }
    assert!(matches!(log.append(&[], 0), Err(AppendError::Poisoned)));
    assert_eq!(log.records(), 4);

    // The unsynced batch is lost in a crash...
    let mut storage = log.into_storage();
    storage.fail_sync = false;
    let mut lost = storage.clone();
    lost.crash(0);
    let mut log = open_clean(lost, &first);
    log.append(&frames(&second), 3).unwrap();
    // ...or survives whole if the bytes happened to reach the disk; the
    // first failure was written once, later poisoned appends wrote nothing.
    storage.crash(usize::MAX);
    let all: Vec<Rec> = pool()[..7].to_vec();
    open_clean(storage, &all);

    // A fresh log cannot even be created without a working sync.
    let mut storage = MemStorage::new();
    storage.fail_sync = true;
    assert!(matches!(open(storage), Err(OpenError::Io(_))));
}

/// The crash model keeps a prefix of the pending writes, in order
/// (`MemStorage::crash`): after `crash(keep)` a segment is its synced image
/// with the first `keep` pending bytes written, and no longer than that: a
/// write of which no byte was kept does not grow the file.
#[test]
fn a_crash_keeps_exactly_a_prefix_of_the_pending_writes() {
    let recs: Vec<Rec> = pool()[..2].to_vec();
    let data = frames(&recs);
    let hdr = header(SEGMENT_MAGIC);
    // A new segment: the header, the frames, then zeros ahead, as the log
    // writes them (none synced).
    let mut s = MemStorage::new();
    s.create(7).unwrap();
    s.write_at(7, 0, &hdr).unwrap();
    s.write_at(7, HEADER_BYTES as u64, &data).unwrap();
    s.write_at(7, (HEADER_BYTES + data.len()) as u64, &[0; 1000])
        .unwrap();
    let mut written = hdr.to_vec();
    written.extend_from_slice(&data);
    written.extend_from_slice(&[0; 1000]);
    for keep in [
        0,
        1,
        HEADER_BYTES - 1,
        HEADER_BYTES,
        HEADER_BYTES + 3,
        HEADER_BYTES + data.len(),
        HEADER_BYTES + data.len() + 1,
        written.len(),
        usize::MAX,
    ] {
        let mut c = s.clone();
        c.crash(keep);
        let kept = keep.min(written.len());
        assert_eq!(c.read(7).unwrap(), &written[..kept], "keep {keep}");
    }
}

// ---------------------------------------------------------------------------
// Truncation at every offset.

/// A log of two segments written by hand: segment 0 with records 0..5,
/// segment 5 with records 5..11 (segments are 64 MiB before they roll),
/// each followed by `zeros` zero bytes.
fn two_segments(zeros: usize) -> (MemStorage, Vec<Rec>) {
    let recs: Vec<Rec> = pool()[..11].to_vec();
    let mut s = MemStorage::new();
    write_segment(&mut s, 0, &recs[..5], zeros);
    write_segment(&mut s, 5, &recs[5..], zeros);
    (s, recs)
}

/// How a crash leaves the bytes of a segment from some offset on: cut off
/// (an append that grew the file), or zeros up to where the records ended
/// (an append into the zero-filled allocation: the file keeps its length).
#[derive(Clone, Copy, Debug)]
enum Cut {
    Truncate,
    Zero,
}

/// Cuts the last segment of `storage` (base `seg`, holding `in_last`
/// records after `before` records) at every byte offset from `from` to the
/// end of its records, in each way of `hows`, and checks recovery at each.
fn cut_everywhere(
    storage: &MemStorage,
    seg: u64,
    recs: &[Rec],
    before: usize,
    from: usize,
    hows: &[Cut],
) {
    let in_last = &recs[before..];
    let full = storage.clone().read(seg).unwrap();
    let end = records_end(&full);
    assert_eq!(
        end,
        HEADER_BYTES + in_last.iter().map(Rec::frame_len).sum::<usize>()
    );
    let segments = storage.clone().list().unwrap().len();
    for cut in from..=end {
        for &how in hows {
            // The log writes a segment's header before any frame.
            if matches!(how, Cut::Zero) && cut < HEADER_BYTES {
                continue;
            }
            let mut s = storage.clone();
            let bytes = s.bytes_mut(seg).unwrap();
            let cut = match how {
                Cut::Truncate => {
                    bytes.truncate(cut);
                    cut
                }
                Cut::Zero => {
                    // Zeroing bytes that are zeros changes nothing: the cut
                    // is in effect at the first byte it changes.
                    bytes[cut..end].fill(0);
                    let changed = full[cut..end].iter().position(|&b| b != 0);
                    cut + changed.unwrap_or(end - cut)
                }
            };
            let ctx = format!("cut at {cut} ({how:?})");
            let len = bytes.len();
            let body = cut.saturating_sub(HEADER_BYTES);
            let (whole, boundary) = whole_frames(in_last, body);
            let expect = &recs[..before + whole];
            let on_boundary = cut >= HEADER_BYTES && body == boundary;
            // Where the bad frame starts, and what is wrong with it.
            let offset = HEADER_BYTES + boundary;
            let reason = (cut >= HEADER_BYTES && !on_boundary).then(|| {
                decode_frame(&bytes[offset..])
                    .expect_err("a bad frame")
                    .to_string()
            });
            let (log, recovery, read) =
                open(s).unwrap_or_else(|e| panic!("{ctx}: open failed: {e}"));
            assert_same_records(&read, expect);
            // Where the file ends after recovery.
            let mut after = len;
            match &recovery.torn {
                None => assert!(on_boundary, "{ctx}: inside a record, not reported"),
                Some(t) => {
                    assert!(!on_boundary, "{ctx}: on a boundary, reported torn: {t:?}");
                    assert_eq!(t.segment, seg, "{ctx}");
                    if cut < HEADER_BYTES {
                        assert_eq!((t.offset, t.dropped_bytes), (0, cut as u64), "{ctx}");
                        after = HEADER_BYTES;
                    } else {
                        // Dropped: from the bad frame to the end of the file.
                        assert_eq!(
                            (t.offset, t.dropped_bytes),
                            (offset as u64, (len - offset) as u64),
                            "{ctx}"
                        );
                        after = offset;
                        // The reason is the frame's own error there.
                        assert_eq!(Some(&t.reason), reason.as_ref(), "{ctx}");
                    }
                    assert!(!t.reason.is_empty());
                }
            }
            assert_eq!(recovery.segments, segments);
            let mut s = log.into_storage();
            assert_eq!(
                s.read(seg).unwrap().len(),
                after,
                "{ctx}: file after recovery"
            );
            // Clean on the next open, and appends continue right after the
            // records.
            append_lands_after_the_records(s, expect, &pool()[POOL - 1]);
        }
    }
}

/// Start of the `k`-th last record of the last segment.
fn start_of_last(recs: &[Rec], before: usize, k: usize) -> usize {
    HEADER_BYTES
        + recs[before..recs.len() - k]
            .iter()
            .map(Rec::frame_len)
            .sum::<usize>()
}

#[test]
fn truncating_the_last_record_at_every_offset_recovers() {
    // One segment, written through the log in batches (so zero-filled
    // after its records).
    let recs: Vec<Rec> = pool()[..9].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    for batch in recs.chunks(4) {
        log.append(&frames(batch), batch.len() as u64).unwrap();
    }
    let mut storage = log.into_storage();
    assert!(storage.read(0).unwrap().len() > start_of_last(&recs, 0, 0));
    let hows = [Cut::Truncate, Cut::Zero];
    cut_everywhere(&storage, 0, &recs, 0, start_of_last(&recs, 0, 3), &hows);

    // Two segments: only the last may have a torn tail, including a torn
    // header (a segment created, its header not yet durable).
    let (storage, recs) = two_segments(0);
    open_clean(storage.clone(), &recs);
    cut_everywhere(&storage, 5, &recs, 5, 0, &hows);
}

#[test]
fn a_torn_tail_in_an_earlier_segment_is_corruption() {
    for zeros in [0, 4096] {
        let (storage, _) = two_segments(zeros);
        let end0 = records_end(&storage.clone().read(0).unwrap());
        let last0 = start_of_last(&pool()[..5], 0, 1);
        for cut in [end0 - 1, last0 + 3, HEADER_BYTES + 2, 4] {
            for how in [Cut::Truncate, Cut::Zero] {
                let ctx = format!("{zeros} zeros, cut at {cut} ({how:?})");
                let mut s = storage.clone();
                let bytes = s.bytes_mut(0).unwrap();
                match how {
                    Cut::Truncate => bytes.truncate(cut),
                    Cut::Zero => {
                        // Only a cut that changes bytes damages a record.
                        if bytes[cut..end0].iter().all(|&b| b == 0) {
                            continue;
                        }
                        bytes[cut..end0].fill(0);
                    }
                }
                match open(s) {
                    Err(OpenError::Corrupt {
                        segment: 0,
                        offset,
                        reason,
                    }) => {
                        // The header, or the record the cut falls in.
                        let expect = match cut.checked_sub(HEADER_BYTES) {
                            None => 0,
                            Some(body) => HEADER_BYTES + whole_frames(&pool()[..5], body).1,
                        };
                        assert_eq!(offset as usize, expect, "{ctx}: {reason}");
                    }
                    other => panic!("{ctx}: {:?}", other.map(|(_, r, _)| r)),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Zero-filled tails.

/// A log's segment is zero-filled ahead of its records in steps of
/// the storage's `alloc_step`; the zeros are its clean end: it reopens with no
/// torn tail, and appends after the reopen land right after the records,
/// overwriting zeros, not after them.
#[test]
fn a_zero_filled_tail_is_the_clean_end_and_appends_go_after_the_records() {
    let recs: Vec<Rec> = pool()[..8].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs[..4]), 4).unwrap();
    let end = log.bytes() as usize;
    assert_eq!(end, start_of_last(&recs[..4], 0, 0));
    let mut storage = log.into_storage();
    storage.crash(0);
    let image = storage.read(0).unwrap();
    assert_eq!(
        image.len() as u64,
        HEADER_BYTES as u64 + MemStorage::new().alloc_step
    );
    assert_eq!(records_end(&image), end);

    let mut log = open_clean(storage, &recs[..4]);
    assert_eq!(log.bytes() as usize, end);
    let more = frames(&recs[4..6]);
    log.append(&more, 2).unwrap();
    assert_eq!(log.bytes() as usize, end + more.len());
    let mut storage = log.into_storage();
    storage.crash(0);
    let after = storage.read(0).unwrap();
    assert_eq!(after.len(), image.len(), "within the allocation: no growth");
    assert_eq!(&after[..end], &image[..end]);
    assert_eq!(&after[end..end + more.len()], &more[..]);
    assert_eq!(records_end(&after), end + more.len());
    let storage = open_clean(storage, &recs[..6]).into_storage();
    append_lands_after_the_records(storage, &recs[..6], &recs[6]);

    // A segment of only zeros after its header, and one written by hand
    // with zeros after its records, in an earlier segment too.
    let mut s = MemStorage::new();
    write_segment(&mut s, 0, &[], 1000);
    let log = open_clean(s, &[]);
    assert_eq!(log.bytes(), HEADER_BYTES as u64);
    append_lands_after_the_records(log.into_storage(), &[], &recs[0]);
    let mut s = MemStorage::new();
    write_segment(&mut s, 0, &recs[..3], 100);
    write_segment(&mut s, 3, &recs[3..5], 1);
    let log = open_clean(s, &recs[..5]);
    assert_eq!(
        log.bytes() as usize,
        start_of_last(&recs[..3], 0, 0) + start_of_last(&recs[..5], 3, 0)
    );
    append_lands_after_the_records(log.into_storage(), &recs[..5], &recs[5]);

    // Appends past the allocation zero-fill another step ahead (with the
    // file storage's step, larger than a record).
    let big = raw(vec![0x5a; MAX_EVENT_BYTES], None);
    let mut storage = MemStorage::new();
    storage.alloc_step = SEGMENT_ALLOC_BYTES;
    let (mut log, _, _) = open(storage).unwrap();
    let mut all = Vec::new();
    let steps = SEGMENT_ALLOC_BYTES.div_ceil(big.frame_len() as u64);
    for _ in 0..=steps {
        log.append(&frames(std::slice::from_ref(&big)), 1).unwrap();
        all.push(big.clone());
    }
    let end = log.bytes();
    assert!(end > HEADER_BYTES as u64 + SEGMENT_ALLOC_BYTES);
    let mut storage = log.into_storage();
    let image = storage.read(0).unwrap();
    assert_eq!(
        image.len() as u64,
        HEADER_BYTES as u64 + 2 * SEGMENT_ALLOC_BYTES
    );
    assert_eq!(records_end(&image) as u64, end);
    let log = open_clean(storage, &all);
    assert_eq!(log.bytes(), end);
}

/// A flipped byte in the zero-filled tail after the last record is a torn
/// tail: every record is kept, the segment is cut right after them, and
/// appends go on there. In an earlier segment it is corruption.
#[test]
fn a_flipped_byte_in_the_zero_filled_tail_is_a_torn_tail() {
    let recs: Vec<Rec> = pool()[..5].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 5).unwrap();
    let end = log.bytes() as usize;
    let mut storage = log.into_storage();
    let len = storage.read(0).unwrap().len();
    assert!(len > end + 1000);
    for at in [
        end,
        end + 1,
        end + 4,
        end + 5,
        end + 8,
        end + 9,
        end + FRAME_OVERHEAD,
        end + 1000,
        (end + len) / 2,
        len - FRAME_OVERHEAD - 1,
        len - 1,
    ] {
        for x in [0x01u8, 0x80, 0xff] {
            let ctx = format!("byte {at} ^ {x:#04x}");
            let mut s = storage.clone();
            s.bytes_mut(0).unwrap()[at] ^= x;
            let (log, recovery, read) = open(s).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_same_records(&read, &recs);
            let t = recovery
                .torn
                .unwrap_or_else(|| panic!("{ctx}: not reported"));
            assert_eq!(
                (t.segment, t.offset, t.dropped_bytes),
                (0, end as u64, (len - end) as u64),
                "{ctx}"
            );
            assert!(!t.reason.is_empty());
            let mut s = log.into_storage();
            assert_eq!(s.read(0).unwrap().len(), end, "{ctx}: file after recovery");
            append_lands_after_the_records(s, &recs, &pool()[POOL - 1]);
        }
    }

    // In an earlier segment: corruption, at the end of its records.
    let (storage, _) = two_segments(4096);
    let end0 = records_end(&storage.clone().read(0).unwrap());
    for at in [end0, end0 + 1, end0 + 4095] {
        let mut s = storage.clone();
        s.bytes_mut(0).unwrap()[at] ^= 0x01;
        match open(s) {
            Err(OpenError::Corrupt {
                segment: 0, offset, ..
            }) => assert_eq!(offset as usize, end0, "byte {at}"),
            other => panic!("byte {at}: {:?}", other.map(|(_, r, _)| r)),
        }
    }
}

// ---------------------------------------------------------------------------
// Garbage and damage.

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..512),
        (1usize..512).prop_map(|n| vec![0u8; n]),
        // A frame header announcing more than follows (its header check
        // does not hold).
        (1u32..5000, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(n, rest)| {
            let mut g = n.to_le_bytes().to_vec();
            g.push(0);
            g.extend(rest);
            g
        }),
        // The start of a real frame: its header check holds, and it
        // announces more than follows.
        (1usize..5000, any::<u8>(), any::<bool>(), 0usize..64).prop_map(|(n, b, signed, k)| {
            let r = raw(vec![b; n], signed.then_some(b));
            let f = frames(std::slice::from_ref(&r));
            f[..r.layout().event.start + k.min(n)].to_vec()
        }),
    ]
}

/// A byte of `r`'s frame: every one is covered by a check (the signature
/// by the header check, `PROTOCOL.md` §4).
fn checked_byte(r: &Rec, i: Index) -> usize {
    i.index(r.frame_len())
}

/// Where a flipped byte lands: in a single segment, or in a two-segment log.
#[derive(Clone, Debug)]
struct Damage {
    recs: Vec<Rec>,
    /// Records in segment 0 when the log has two segments.
    split: Option<Index>,
    /// Zero bytes after each segment's records.
    zeros: usize,
    victim: Index,
    byte: Index,
    xor: u8,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        prop::collection::vec(rec(), 2..10),
        prop::option::of(any::<Index>()),
        prop_oneof![Just(0usize), 1usize..2048],
        any::<Index>(),
        any::<Index>(),
        1u8..=255,
    )
        .prop_map(|(recs, split, zeros, victim, byte, xor)| Damage {
            recs,
            split,
            zeros,
            victim,
            byte,
            xor,
        })
}

proptest! {
    #![proptest_config(config("proptest-regressions/log_recovery.txt"))]

    /// Bytes after the last valid record (random, the start of a frame, or
    /// zeros), written right after it over the zero-filled allocation or
    /// after the allocation, are a torn tail unless they are zeros (the
    /// clean end): open succeeds, reports it, keeps every record, and cuts
    /// the segment right after them.
    #[test]
    fn garbage_after_the_records_is_a_torn_tail(
        recs in prop::collection::vec(rec(), 1..8),
        junk in garbage(),
        past_the_zeros in any::<bool>(),
    ) {
        let (mut log, _, _) = open(MemStorage::new()).unwrap();
        log.append(&frames(&recs), recs.len() as u64).unwrap();
        let end = log.bytes() as usize;
        let mut storage = log.into_storage();
        let bytes = storage.bytes_mut(0).unwrap();
        let alloc = bytes.len();
        prop_assert!(alloc > end + 512, "zero-filled ahead of the records");
        let at = if past_the_zeros { alloc } else { end };
        if bytes.len() < at + junk.len() {
            bytes.resize(at + junk.len(), 0);
        }
        bytes[at..at + junk.len()].copy_from_slice(&junk);
        let len = bytes.len();
        let (log, recovery, read) = open(storage).unwrap();
        assert_same_records(&read, &recs);
        let mut storage = log.into_storage();
        if junk.iter().all(|&b| b == 0) {
            prop_assert_eq!(recovery.torn, None);
            prop_assert_eq!(storage.read(0).unwrap().len(), len);
        } else {
            let torn = recovery.torn.expect("garbage is reported");
            prop_assert_eq!(
                (torn.segment, torn.offset, torn.dropped_bytes),
                (0, end as u64, (len - end) as u64)
            );
            prop_assert_eq!(storage.read(0).unwrap().len(), end);
        }
        append_lands_after_the_records(storage, &recs, &recs[0]);
    }

    /// A flipped byte (the signature's included) in a record followed by a
    /// valid record, or anywhere in a segment before the last, fails the
    /// open, naming the segment and the offset of the damaged record;
    /// nothing is served.
    #[test]
    fn a_damaged_record_before_valid_ones_is_corruption(d in damage()) {
        let n = d.recs.len();
        let split = d.split.map(|i| 1 + i.index(n - 1)); // 1..n
        let mut storage = MemStorage::new();
        let parts: Vec<(u64, &[Rec])> = match split {
            None => vec![(0, &d.recs[..])],
            Some(s) => vec![(0, &d.recs[..s]), (s as u64, &d.recs[s..])],
        };
        for &(base, part) in &parts {
            write_segment(&mut storage, base, part, d.zeros);
        }
        open_clean(storage.clone(), &d.recs);
        // The victim: any record but the very last, so any record of an
        // earlier segment (its last one included), or a record of the last
        // segment that a valid one follows.
        let last_seg_start = split.unwrap_or(0);
        let victim = d.victim.index(n - 1);
        let (seg, first) = if victim < last_seg_start {
            (0u64, 0)
        } else {
            (last_seg_start as u64, last_seg_start)
        };
        let offset = HEADER_BYTES + d.recs[first..victim].iter().map(Rec::frame_len).sum::<usize>();
        let at = offset + checked_byte(&d.recs[victim], d.byte);
        storage.bytes_mut(seg).unwrap()[at] ^= d.xor;
        match open(storage) {
            Err(OpenError::Corrupt { segment, offset: got, reason }) => {
                prop_assert_eq!((segment, got as usize), (seg, offset), "{}", reason);
                let msg = OpenError::Corrupt { segment, offset: got, reason }.to_string();
                let expect = format!("segment {seg} at byte {offset}");
                prop_assert!(msg.contains(&expect), "{}", msg);
            }
            Err(e) => prop_assert!(false, "wrong error: {e}"),
            Ok((_, r, _)) => prop_assert!(false, "damage at byte {at} of segment {seg} served: {r:?}"),
        }
    }
}

/// The limit of what a log can tell: damage anywhere inside the very last
/// record looks like a torn write, so it is dropped as a torn tail, not
/// served.
#[test]
fn damage_in_the_last_record_is_dropped_as_torn() {
    let recs: Vec<Rec> = pool()[..3].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 3).unwrap();
    let storage = log.into_storage();
    let start = start_of_last(&recs, 0, 1);
    for k in 0..recs[2].frame_len() {
        let mut s = storage.clone();
        let bytes = s.bytes_mut(0).unwrap();
        bytes[start + k] ^= 0x40;
        let len = bytes.len();
        let (log, recovery, read) = open(s).unwrap();
        assert_same_records(&read, &recs[..2]);
        let t = recovery.torn.expect("reported");
        assert_eq!(
            (t.offset, t.dropped_bytes),
            (start as u64, (len - start) as u64),
            "byte {k} of the last record"
        );
        open_clean(log.into_storage(), &recs[..2]);
    }
}

/// The header check covers the signature (`PROTOCOL.md` §4): a damaged
/// signature byte makes a bad frame, so it is corruption when valid
/// records follow and a torn tail in the last record. A signature that is
/// wrong but framed as such is served as stored, and it is verification
/// that rejects it.
#[test]
fn a_damaged_signature_fails_the_header_check() {
    let recs: Vec<Rec> = pool()[..4].to_vec();
    assert!(recs[2].sig.is_some());
    let sig = recs[2].layout().sig.expect("a signed frame");
    assert_eq!(sig.len(), SIG_BYTES);

    // Record 2, followed by record 3: corruption.
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 4).unwrap();
    let storage = log.into_storage();
    let start = start_of_last(&recs, 0, 2);
    for k in sig.clone() {
        let mut s = storage.clone();
        s.bytes_mut(0).unwrap()[start + k] ^= 0x01;
        match open(s) {
            Err(OpenError::Corrupt {
                segment: 0,
                offset,
                reason,
            }) => {
                assert_eq!(offset as usize, start, "signature byte {k}: {reason}");
                assert!(reason.contains("record header check failed"), "{reason}");
                assert!(reason.contains("a valid record follows"), "{reason}");
            }
            other => panic!("signature byte {k}: {:?}", other.map(|(_, r, _)| r)),
        }
    }

    // Record 2 as the last record: a torn tail.
    let last = &recs[..3];
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(last), 3).unwrap();
    let storage = log.into_storage();
    let start = start_of_last(last, 0, 1);
    for k in sig {
        let mut s = storage.clone();
        let bytes = s.bytes_mut(0).unwrap();
        bytes[start + k] ^= 0x01;
        let len = bytes.len();
        let (log, recovery, read) = open(s).unwrap();
        assert_same_records(&read, &last[..2]);
        assert_eq!(
            recovery.torn,
            Some(TornTail {
                segment: 0,
                offset: start as u64,
                dropped_bytes: (len - start) as u64,
                reason: FrameError::HeaderCheck.to_string(),
            }),
            "signature byte {k}"
        );
        open_clean(log.into_storage(), &last[..2]);
    }

    // A wrong signature, framed with its header check: served as stored,
    // refused by verification.
    let mut wrong = recs.clone();
    let mut bad = recs[2].sig.expect("signed");
    bad.0[10] ^= 0x01;
    wrong[2].sig = Some(bad);
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&wrong), 4).unwrap();
    let (_, _, read) = open(log.into_storage()).unwrap();
    assert_same_records(&read, &wrong);
    let key = Keypair::from_secret([42; 32]).node_id();
    assert!(verify(&key, &read[2].id, &bad).is_err());
    assert_eq!(verify(&key, &recs[2].id, &recs[2].sig.unwrap()), Ok(()));
}

/// A segment rolls over once it reaches `SEGMENT_TARGET_BYTES`; the new one
/// is named by the index of its first record, and a crash before its header
/// is durable (or inside its first records) is a torn tail of the new
/// segment that recovery repairs. The old segment keeps its zero-filled
/// allocation, which is its clean end.
#[test]
fn a_crash_right_after_a_segment_roll_recovers() {
    // Opens reading ids only: the log is 64 MiB.
    fn open_ids(storage: MemStorage) -> (Log<MemStorage>, Recovery, Vec<EventId>) {
        let mut ids = Vec::new();
        let (log, recovery) = Log::open(storage, |f| {
            ids.push(f.id);
            Ok(())
        })
        .expect("open");
        (log, recovery, ids)
    }
    // One big record, repeated: the log does not care that ids repeat.
    let big = raw(vec![0xa5; MAX_EVENT_BYTES], None);
    let per = big.frame_len() as u64;
    let count = SEGMENT_TARGET_BYTES.div_ceil(per);
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    let batch = frames(&vec![big.clone(); 8]);
    let mut written = 0;
    while written < count {
        log.append(&batch, 8).unwrap();
        written += 8;
    }
    let before = vec![big.id; written as usize];
    let small: Vec<Rec> = pool()[..3].to_vec();
    let data = frames(&small);
    let storage = log.into_storage();
    // Cuts inside the new segment's header, right after it, inside its
    // first record, and on a record boundary.
    let cuts = [
        0,
        HEADER_BYTES - 1,
        HEADER_BYTES,
        HEADER_BYTES + 3,
        HEADER_BYTES + small[0].frame_len(),
    ];
    for keep in cuts {
        let mut s = storage.clone();
        s.fail_sync = true;
        let (mut failing, recovery, ids) = open_ids(s);
        assert_eq!((recovery.torn, ids.len()), (None, before.len()));
        assert!(matches!(failing.append(&data, 3), Err(AppendError::Io(_))));
        let mut s = failing.into_storage();
        s.fail_sync = false;
        s.crash(keep);
        assert_eq!(
            s.list().unwrap(),
            vec![0, written],
            "the new segment is named by its first record"
        );
        // The crash kept the first `keep` bytes written to the new segment:
        // its header, then its frames.
        let mut expect_image = header(SEGMENT_MAGIC).to_vec();
        expect_image.extend_from_slice(&data);
        expect_image.truncate(keep);
        assert!(
            s.read(written).unwrap() == expect_image,
            "keep {keep}: the crash kept more than the first {keep} bytes written \
             to the new segment ({} bytes)",
            s.read(written).unwrap().len()
        );
        let (log, recovery, ids) = open_ids(s);
        let (whole, boundary) = whole_frames(&small, keep.saturating_sub(HEADER_BYTES));
        let mut expect = before.clone();
        expect.extend(small[..whole].iter().map(|r| r.id));
        assert_eq!(ids, expect, "keep {keep}");
        assert_eq!(recovery.segments, 2);
        let torn = keep < HEADER_BYTES || keep - HEADER_BYTES != boundary;
        assert_eq!(
            recovery.torn.is_some(),
            torn,
            "keep {keep}: {:?}",
            recovery.torn
        );
        if let Some(t) = &recovery.torn {
            let offset = if keep < HEADER_BYTES {
                0
            } else {
                HEADER_BYTES + boundary
            };
            // The new segment's file is `keep` bytes long.
            assert_eq!(
                (t.segment, t.offset, t.dropped_bytes),
                (written, offset as u64, (keep - offset) as u64)
            );
        }
        // Clean on the next open; appends go on in the new segment.
        let (mut log, recovery, ids) = open_ids(log.into_storage());
        assert_eq!((recovery.torn, &ids), (None, &expect));
        log.append(&frames(&small[..1]), 1).unwrap();
        expect.push(small[0].id);
        let (_, recovery, ids) = open_ids(log.into_storage());
        assert_eq!((recovery.torn, recovery.segments, ids), (None, 2, expect));
    }
}

/// A record whose length field is damaged so that it seems to run past the
/// end of the segment would swallow the records after it; the header check
/// catches the damaged length, and the records after it are valid, so this
/// is corruption, never a torn tail (which would drop acknowledged
/// records).
#[test]
fn a_damaged_length_before_valid_records_is_corruption() {
    let recs: Vec<Rec> = pool()[..5].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 5).unwrap();
    let mut storage = log.into_storage();
    let at = start_of_last(&recs, 0, 3);
    // Length 0x0100_00xx: still within the limit, beyond the records' end.
    storage.bytes_mut(0).unwrap()[at + 2] ^= 0x01;
    match open(storage) {
        Err(OpenError::Corrupt {
            segment: 0,
            offset,
            reason,
        }) => {
            assert_eq!(offset as usize, at);
            assert!(reason.contains("record header check failed"), "{reason}");
        }
        other => panic!("{:?}", other.map(|(_, r, _)| r)),
    }
}

/// `DESIGN.md` §4 calls the last record a torn tail when it is incomplete
/// with "nothing valid after it". A frame carried inside the torn record's
/// own event bytes (a payload holding log or export frames, which a peer
/// can send) is not "after it": the torn record's header check holds, so
/// its length is trusted and the search for later frames starts where it
/// ends. A power cut there is a torn tail, not corruption; both when the
/// zero-filled allocation follows the torn bytes and when the file ends in
/// them.
#[test]
fn a_torn_record_carrying_a_frame_in_its_payload_is_a_torn_tail() {
    let inner = pool()[0].clone();
    let mut payload = b"export chunk: ".to_vec();
    let embedded = payload.len();
    payload.extend(frames(std::slice::from_ref(&inner)));
    payload.extend_from_slice(&[7; 100]);
    let outer = raw(payload, None);
    let outer_frame = frames(std::slice::from_ref(&outer));
    let keep = outer.frame_len() - 50;
    let embedded = outer.layout().event.start + embedded;
    assert!(
        embedded + inner.frame_len() <= keep,
        "the cut keeps the frame"
    );

    for zero_filled in [true, false] {
        let ctx = if zero_filled {
            "zero-filled segment"
        } else {
            "file ending in the torn record"
        };
        let (mut log, _, _) = open(MemStorage::new()).unwrap();
        let before: &[Rec] = if zero_filled { &pool()[1..3] } else { &[] };
        if zero_filled {
            log.append(&frames(before), 2).unwrap();
        }
        let end = log.bytes();
        let mut storage = log.into_storage();
        storage.write_at(0, end, &outer_frame).unwrap();
        // The power cut keeps the record up to past the embedded frame.
        storage.crash(keep);
        let image = storage.read(0).unwrap();
        let len = image.len();
        assert_eq!(len > end as usize + keep, zero_filled, "{ctx}");
        let at = end as usize + embedded;
        let (f, _) = decode_frame(&image[at..]).expect("the embedded frame is whole");
        assert_eq!(f.id, inner.id);

        let (log, recovery, read) = open(storage).expect("a torn tail, not corruption");
        assert_same_records(&read, before);
        let t = recovery.torn.expect("reported");
        assert_eq!(
            (t.segment, t.offset, t.dropped_bytes),
            (0, end, len as u64 - end),
            "{ctx}"
        );
        let why = if zero_filled {
            "does not match"
        } else {
            "incomplete"
        };
        assert!(t.reason.contains(why), "{ctx}: {}", t.reason);
        open_clean(log.into_storage(), before);
    }
}

/// The commit mark (flag bit 1) round-trips, is covered by the header
/// check, and unknown flag bits are refused.
#[test]
fn the_commit_mark_round_trips_and_unknown_flags_are_refused() {
    use weftlog_proto::log::{encode_frame_with, FrameError};
    let bytes = b"an event".to_vec();
    let id = weftlog_proto::EventId(*blake3::hash(&bytes).as_bytes());
    for (sig, end) in [
        (None, false),
        (None, true),
        (Some(Signature([5; 64])), true),
    ] {
        let mut f = Vec::new();
        encode_frame_with(&mut f, &bytes, &id, sig.as_ref(), end);
        let (frame, used) = decode_frame(&f).unwrap();
        assert_eq!((frame.commit_end, frame.sig, used), (end, sig, f.len()));
        // Clearing the mark without recomputing the check is caught.
        if end {
            let mut bad = f.clone();
            bad[4] &= !2;
            assert_eq!(decode_frame(&bad).unwrap_err(), FrameError::HeaderCheck);
        }
    }
    let mut f = Vec::new();
    encode_frame_with(&mut f, &bytes, &id, None, false);
    f[4] = 4;
    assert_eq!(decode_frame(&f).unwrap_err(), FrameError::BadFlags(4));
}
