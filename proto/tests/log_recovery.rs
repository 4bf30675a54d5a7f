//! Guards log recovery (`DESIGN.md` §4): every acknowledged (synced) record
//! survives a crash; a torn tail is reported and truncated, after which the
//! log reopens clean; damage followed by a valid record, or in any segment
//! but the last, is corruption that fails the open and names where it is;
//! after a failed sync the log accepts no more appends.
//!
//! Everything runs on `MemStorage`, whose crash model keeps the synced bytes
//! and a prefix of the unsynced ones.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use weftlog_proto::event::{verify, MAX_EVENT_BYTES};
use weftlog_proto::log::{
    encode_frame, header, AppendError, Log, MemStorage, OpenError, Recovery, Storage, TornTail,
    FRAME_OVERHEAD, HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_TARGET_BYTES, SIG_BYTES,
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
    fn frame_len(&self) -> usize {
        FRAME_OVERHEAD + self.bytes.len() + if self.sig.is_some() { SIG_BYTES } else { 0 }
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

fn last_segment(storage: &mut MemStorage) -> u64 {
    storage
        .list()
        .expect("list")
        .into_iter()
        .max()
        .expect("a segment")
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
    /// truncated, and the next open is clean.
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
                    let base = log.bytes();
                    let data = frames(&batch);
                    let mut storage = log.into_storage();
                    let seg = last_segment(&mut storage);
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
                        storage.append(seg, &data).unwrap();
                    }
                    let keep = keep.index(data.len() + 1);
                    storage.crash(keep);
                    let (reopened, recovery, read) = open(storage).unwrap();
                    let (whole, boundary) = whole_frames(&batch, keep);
                    durable.extend_from_slice(&batch[..whole]);
                    assert_same_records(&read, &durable);
                    let torn = recovery.torn.clone().map(|t| TornTail { reason: String::new(), ..t });
                    if keep == boundary {
                        prop_assert_eq!(torn, None);
                    } else {
                        prop_assert_eq!(torn, Some(TornTail {
                            segment: seg,
                            offset: base + boundary as u64,
                            dropped_bytes: (keep - boundary) as u64,
                            reason: String::new(),
                        }));
                    }
                    prop_assert_eq!(reopened.bytes(), base + boundary as u64);
                    // Reopening again is clean.
                    log = open_clean(reopened.into_storage(), &durable);
                }
            }
        }
        // The log still takes appends, and they are durable.
        let last = pool()[0].clone();
        log.append(&frames(std::slice::from_ref(&last)), 1).unwrap();
        durable.push(last);
        let mut storage = log.into_storage();
        storage.crash(0);
        open_clean(storage, &durable);
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

// ---------------------------------------------------------------------------
// Truncation at every offset.

/// A log of two segments written by hand: segment 0 with records 0..5,
/// segment 5 with records 5..11 (segments are 64 MiB before they roll).
fn two_segments() -> (MemStorage, Vec<Rec>) {
    let recs: Vec<Rec> = pool()[..11].to_vec();
    let mut s = MemStorage::new();
    for (base, part) in [(0u64, &recs[..5]), (5, &recs[5..])] {
        s.create(base).unwrap();
        let mut data = header(SEGMENT_MAGIC).to_vec();
        data.extend(frames(part));
        s.append(base, &data).unwrap();
        s.sync(base).unwrap();
    }
    (s, recs)
}

/// Cuts the last segment of `storage` (base `seg`, holding `in_last`
/// records after `before` records) at every byte offset from `from`, and
/// checks recovery at each.
fn cut_everywhere(storage: &MemStorage, seg: u64, recs: &[Rec], before: usize, from: usize) {
    let len = storage.clone().read(seg).unwrap().len();
    let in_last = &recs[before..];
    for cut in from..=len {
        let mut s = storage.clone();
        s.bytes_mut(seg).unwrap().truncate(cut);
        let (log, recovery, read) =
            open(s).unwrap_or_else(|e| panic!("cut at {cut}: open failed: {e}"));
        let body = cut.saturating_sub(HEADER_BYTES);
        let (whole, boundary) = whole_frames(in_last, body);
        let expect = &recs[..before + whole];
        assert_same_records(&read, expect);
        let on_boundary = cut >= HEADER_BYTES && body == boundary;
        match &recovery.torn {
            None => assert!(on_boundary, "cut at {cut} inside a record is not reported"),
            Some(t) => {
                assert!(
                    !on_boundary,
                    "cut at {cut} on a boundary reported torn: {t:?}"
                );
                assert_eq!(t.segment, seg, "cut at {cut}");
                if cut < HEADER_BYTES {
                    assert_eq!((t.offset, t.dropped_bytes), (0, cut as u64), "cut at {cut}");
                } else {
                    let offset = (HEADER_BYTES + boundary) as u64;
                    assert_eq!((t.offset, t.dropped_bytes), (offset, (cut as u64) - offset));
                }
                assert!(!t.reason.is_empty());
            }
        }
        assert_eq!(recovery.segments, storage.clone().list().unwrap().len());
        // Clean on the next open, and appends continue where the log ends.
        let mut log = open_clean(log.into_storage(), expect);
        let extra = pool()[POOL - 1].clone();
        log.append(&frames(std::slice::from_ref(&extra)), 1)
            .unwrap();
        let mut all = expect.to_vec();
        all.push(extra);
        open_clean(log.into_storage(), &all);
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
    // One segment, written through the log in batches.
    let recs: Vec<Rec> = pool()[..9].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    for batch in recs.chunks(4) {
        log.append(&frames(batch), batch.len() as u64).unwrap();
    }
    let storage = log.into_storage();
    cut_everywhere(&storage, 0, &recs, 0, start_of_last(&recs, 0, 3));

    // Two segments: only the last may have a torn tail, including a torn
    // header (a segment created, its header not yet durable).
    let (storage, recs) = two_segments();
    open_clean(storage.clone(), &recs);
    cut_everywhere(&storage, 5, &recs, 5, 0);
}

#[test]
fn a_torn_tail_in_an_earlier_segment_is_corruption() {
    let (storage, _) = two_segments();
    let len0 = storage.clone().read(0).unwrap().len();
    let last0 = start_of_last(&pool()[..5], 0, 1);
    for cut in [len0 - 1, last0 + 3, HEADER_BYTES + 2, 4] {
        let mut s = storage.clone();
        s.bytes_mut(0).unwrap().truncate(cut);
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
                assert_eq!(offset as usize, expect, "cut at {cut}: {reason}");
            }
            other => panic!("cut at {cut}: {:?}", other.map(|(_, r, _)| r)),
        }
    }
}

// ---------------------------------------------------------------------------
// Garbage and damage.

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..512),
        (1usize..512).prop_map(|n| vec![0u8; n]),
        // A frame header announcing more than follows.
        (1u32..5000, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(n, rest)| {
            let mut g = n.to_le_bytes().to_vec();
            g.push(0);
            g.extend(rest);
            g
        }),
    ]
}

/// A byte of `r`'s frame that its check covers: any but the signature's,
/// which verification covers instead (`PROTOCOL.md` §4).
fn checked_byte(r: &Rec, i: Index) -> usize {
    let sig = if r.sig.is_some() { SIG_BYTES } else { 0 };
    let k = i.index(r.frame_len() - sig);
    if k < 5 + r.bytes.len() {
        k
    } else {
        k + sig
    }
}

/// Where a flipped byte lands: in a single segment, or in a two-segment log.
#[derive(Clone, Debug)]
struct Damage {
    recs: Vec<Rec>,
    /// Records in segment 0 when the log has two segments.
    split: Option<Index>,
    victim: Index,
    byte: Index,
    xor: u8,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        prop::collection::vec(rec(), 2..10),
        prop::option::of(any::<Index>()),
        any::<Index>(),
        any::<Index>(),
        1u8..=255,
    )
        .prop_map(|(recs, split, victim, byte, xor)| Damage {
            recs,
            split,
            victim,
            byte,
            xor,
        })
}

proptest! {
    #![proptest_config(config("proptest-regressions/log_recovery.txt"))]

    /// Bytes after the last valid record (random, zeros, or the start of a
    /// frame) are a torn tail: open succeeds, reports it, keeps every record.
    #[test]
    fn garbage_after_the_records_is_a_torn_tail(
        recs in prop::collection::vec(rec(), 1..8),
        junk in garbage(),
    ) {
        let (mut log, _, _) = open(MemStorage::new()).unwrap();
        log.append(&frames(&recs), recs.len() as u64).unwrap();
        let end = log.bytes();
        let mut storage = log.into_storage();
        storage.bytes_mut(0).unwrap().extend_from_slice(&junk);
        let (log, recovery, read) = open(storage).unwrap();
        assert_same_records(&read, &recs);
        let torn = recovery.torn.expect("garbage is reported");
        prop_assert_eq!((torn.segment, torn.offset, torn.dropped_bytes), (0, end, junk.len() as u64));
        let mut log = open_clean(log.into_storage(), &recs);
        log.append(&frames(&recs[..1]), 1).unwrap();
        let mut all = recs.clone();
        all.push(recs[0].clone());
        open_clean(log.into_storage(), &all);
    }

    /// A flipped byte (outside the signature) in a record followed by a
    /// valid record, or anywhere in a segment before the last, fails the open, naming the segment and the
    /// offset of the damaged record; nothing is served.
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
            storage.create(base).unwrap();
            let mut data = header(SEGMENT_MAGIC).to_vec();
            data.extend(frames(part));
            storage.append(base, &data).unwrap();
            storage.sync(base).unwrap();
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

/// The limit of what a log can tell: damage inside the very last record
/// looks like a torn write, so it is dropped as a torn tail, not served.
#[test]
fn damage_in_the_last_record_is_dropped_as_torn() {
    let recs: Vec<Rec> = pool()[..3].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 3).unwrap();
    let mut storage = log.into_storage();
    let at = start_of_last(&recs, 0, 1) + 7;
    storage.bytes_mut(0).unwrap()[at] ^= 0x40;
    let (_, recovery, read) = open(storage).unwrap();
    assert_same_records(&read, &recs[..2]);
    assert_eq!(
        recovery.torn.map(|t| t.offset),
        Some(start_of_last(&recs, 0, 1) as u64)
    );
}

/// The signature is outside the frame check (`PROTOCOL.md` §4): a damaged
/// one is served as stored, and it is verification that rejects it.
#[test]
fn a_damaged_signature_is_left_to_verification() {
    let recs: Vec<Rec> = pool()[..4].to_vec();
    assert!(recs[2].sig.is_some());
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 4).unwrap();
    let mut storage = log.into_storage();
    let at = start_of_last(&recs, 0, 2) + 5 + recs[2].bytes.len() + 10;
    storage.bytes_mut(0).unwrap()[at] ^= 0x01;
    let (_, recovery, read) = open(storage).unwrap();
    assert_eq!(recovery.torn, None);
    assert_eq!(read[2].id, recs[2].id);
    let key = Keypair::from_secret([42; 32]).node_id();
    let sig = read[2].sig.expect("still a signed frame");
    assert_ne!(Some(sig), recs[2].sig);
    assert!(verify(&key, &read[2].id, &sig).is_err());
}

/// A segment rolls over once it reaches `SEGMENT_TARGET_BYTES`; the new one
/// is named by the index of its first record, and a crash before its header
/// is durable (or inside its first records) is a torn tail of the new
/// segment that recovery repairs.
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
/// end of the segment swallows the records after it; they are valid, so
/// this is corruption, never a torn tail (which would drop acknowledged
/// records).
#[test]
fn a_damaged_length_before_valid_records_is_corruption() {
    let recs: Vec<Rec> = pool()[..5].to_vec();
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&recs), 5).unwrap();
    let mut storage = log.into_storage();
    let at = start_of_last(&recs, 0, 3);
    // Length 0x0100_00xx: still within the limit, beyond the segment's end.
    storage.bytes_mut(0).unwrap()[at + 2] ^= 0x01;
    match open(storage) {
        Err(OpenError::Corrupt {
            segment: 0, offset, ..
        }) => assert_eq!(offset as usize, at),
        other => panic!("{:?}", other.map(|(_, r, _)| r)),
    }
}

/// Known gap (reported to the lead, not fixed here): `DESIGN.md` §4 calls
/// the last record a torn tail when it is incomplete with "nothing valid
/// after it", but recovery looks for a valid frame from the byte after the
/// record's start, so a frame carried inside the torn record's own event
/// bytes (a payload holding log or export frames, which a peer can send)
/// turns a power cut into `OpenError::Corrupt`, and the node cannot open.
/// Telling this apart from `a_damaged_length_before_valid_records_is_corruption`
/// needs a check over the frame header (a format change), so this test is
/// ignored until that decision is made.
#[test]
#[ignore = "known gap: a frame embedded in a torn record reads as corruption; needs a frame-header check (format change)"]
fn a_torn_record_carrying_a_frame_in_its_payload_is_a_torn_tail() {
    let inner = pool()[0].clone();
    let mut payload = b"export chunk: ".to_vec();
    payload.extend(frames(std::slice::from_ref(&inner)));
    payload.extend_from_slice(&[7; 100]);
    let outer = raw(payload, None);
    let (mut log, _, _) = open(MemStorage::new()).unwrap();
    log.append(&frames(&pool()[1..3]), 2).unwrap();
    let mut storage = log.into_storage();
    storage
        .append(0, &frames(std::slice::from_ref(&outer)))
        .unwrap();
    // The power cut keeps the record up to past the embedded frame.
    storage.crash(outer.frame_len() - 50);
    let (_, recovery, read) = open(storage).expect("a torn tail, not corruption");
    assert_same_records(&read, &pool()[1..3]);
    assert!(recovery.torn.is_some());
}
