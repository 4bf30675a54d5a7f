//! Guards `weftlog import` against tampered and forged export files: each is
//! refused as a whole with a message that names the reason and the event (or
//! the record, for framing errors), and the node's log and state are exactly
//! as they were.

mod common;

use common::weftlog;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use weftlog_proto::event::{Event, Keypair, Meta, Op, MIN_FORMAT_VERSION};
use weftlog_proto::log::{
    decode_frame, encode_frame, header, FrameLayout, EXPORT_MAGIC, HEADER_BYTES, SIG_BYTES,
};
use weftlog_proto::{EventId, Hlc, NodeId, Signature};

fn json(data: &Path, args: &[&str]) -> Value {
    let r = weftlog(data, args);
    assert_eq!(r.code, Some(0), "weftlog {args:?}: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", r.stdout))
}

/// One frame of an export file, decoded by `weftlog_proto::log`: u32 LE
/// length, u8 flags, 64-byte signature if flags == 1, 4-byte header check,
/// event bytes, 32-byte id.
#[derive(Clone, Debug)]
struct Frame {
    start: usize,
    end: usize,
    layout: FrameLayout,
    event: Vec<u8>,
    sig: Option<[u8; 64]>,
    id: [u8; 32],
}

impl Frame {
    fn sig_range(&self) -> std::ops::Range<usize> {
        let r = self.layout.sig.clone().expect("a signed frame");
        assert_eq!(r.len(), SIG_BYTES);
        self.start + r.start..self.start + r.end
    }

    fn id_range(&self) -> std::ops::Range<usize> {
        self.start + self.layout.id.start..self.start + self.layout.id.end
    }

    fn id_hex(&self) -> String {
        EventId(self.id).to_string()
    }

    fn decode(&self) -> Event {
        Event::decode(&self.event)
            .expect("untampered event decodes")
            .0
    }

    /// The frame again, with another signature and its header check
    /// recomputed: validly framed.
    fn with_sig(&self, sig: &Signature) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, &self.event, &EventId(self.id), Some(sig));
        assert_eq!(out.len(), self.end - self.start);
        out
    }
}

fn parse(file: &[u8]) -> Vec<Frame> {
    assert_eq!(&file[..8], &EXPORT_MAGIC);
    let mut out = Vec::new();
    let mut off = HEADER_BYTES;
    while off < file.len() {
        let (f, used) = decode_frame(&file[off..]).expect("an untampered export decodes");
        let layout = FrameLayout::new(f.bytes.len(), f.sig.is_some());
        assert_eq!(layout.len(), used);
        assert_eq!(
            &file[off + layout.event.start..off + layout.event.end],
            f.bytes
        );
        assert_eq!(blake3::hash(f.bytes).as_bytes(), &f.id.0);
        out.push(Frame {
            start: off,
            end: off + used,
            layout,
            event: f.bytes.to_vec(),
            sig: f.sig.map(|s| s.0),
            id: f.id.0,
        });
        off += used;
    }
    out
}

/// An export file of `(event bytes, signature)` records, ids computed.
fn file_of(records: &[(Vec<u8>, Option<Signature>)]) -> Vec<u8> {
    let mut out = header(EXPORT_MAGIC).to_vec();
    for (bytes, sig) in records {
        let id = EventId(*blake3::hash(bytes).as_bytes());
        encode_frame(&mut out, bytes, &id, sig.as_ref());
    }
    out
}

/// The frames of a parsed file as records for [`file_of`].
fn records(frames: &[Frame]) -> Vec<(Vec<u8>, Option<Signature>)> {
    frames
        .iter()
        .map(|f| (f.event.clone(), f.sig.map(Signature)))
        .collect()
}

/// An event by `author`, checked fields valid unless the caller changes them.
fn event(author: NodeId, seq: u64, prev: Option<EventId>, hlc: u64, ops: Vec<Op>) -> Event {
    Event {
        version: MIN_FORMAT_VERSION,
        author,
        seq,
        prev,
        deps: vec![],
        hlc: Hlc(hlc),
        stream: "event/keynote".into(),
        kind: "SeatsSold".into(),
        ops,
        payload: b"{}".to_vec(),
        meta: Meta::default(),
    }
}

/// A sealed event signed by `key`.
fn signed(e: &Event, key: &Keypair) -> (Vec<u8>, Option<Signature>, EventId) {
    let (bytes, id) = e.seal();
    (bytes, Some(key.sign(&id)), id)
}

/// The node's visible state and every byte of its log.
fn snapshot(data: &Path) -> (Value, Vec<(PathBuf, Vec<u8>)>) {
    let mut segs: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    segs.sort();
    (json(data, &["status"]), segs)
}

/// The source node's export, and a target node with events of its own.
struct Setup {
    tmp: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    export: Vec<u8>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (source, target) = (tmp.path().join("source"), tmp.path().join("target"));
    json(&source, &["init"]);
    json(&target, &["init"]);
    let appends: &[&[&str]] = &[
        &[
            "--stream",
            "customer/1",
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
        ],
        &[
            "--stream",
            "event/keynote",
            "--kind",
            "Opened",
            "--escrow-init",
            "seats=10",
        ],
        &[
            "--stream",
            "customer/1",
            "--kind",
            "Visited",
            "--add",
            "visits=1",
        ],
        &[
            "--stream",
            "customer/1",
            "--kind",
            "Renamed",
            "--set",
            "name=\"Ada K\"",
        ],
        &[
            "--stream",
            "event/keynote",
            "--kind",
            "Sold",
            "--escrow-consume",
            "seats=2",
        ],
    ];
    for a in appends {
        let mut args = vec!["append"];
        args.extend_from_slice(a);
        json(&source, &args);
    }
    for i in 0..2 {
        let set = format!("note=\"target {i}\"");
        json(
            &target,
            &[
                "append",
                "--stream",
                "customer/1",
                "--kind",
                "Noted",
                "--set",
                &set,
            ],
        );
    }
    let out = tmp.path().join("source.wexp");
    let v = json(&source, &["export", "--out", out.to_str().unwrap()]);
    assert_eq!(v["exported"], 5);
    let export = fs::read(&out).unwrap();
    Setup {
        tmp,
        source,
        target,
        export,
    }
}

impl Setup {
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.tmp.path().join(format!("{name}.wexp"));
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Imports `bytes` on the target, which must refuse it with a message
    /// holding every `want`, and store nothing. Returns the message.
    fn refused(&self, name: &str, bytes: &[u8], want: &[&str]) -> String {
        let path = self.write(name, bytes);
        let before = snapshot(&self.target);
        let r = weftlog(&self.target, &["import", path.to_str().unwrap()]);
        assert_eq!(
            r.code,
            Some(1),
            "{name}: import was not refused: {}",
            r.stdout
        );
        assert_eq!(r.stdout, "", "{name}");
        assert_eq!(r.stderr.lines().count(), 1, "{name}: {}", r.stderr);
        let msg = r.stderr.trim_end().to_string();
        eprintln!("{name}: {msg}");
        let lead = format!(
            "error: import of {} refused, nothing stored: ",
            path.display()
        );
        assert!(msg.starts_with(&lead), "{name}: {msg}");
        for w in want {
            assert!(msg.contains(w), "{name}: {msg:?} does not say {w:?}");
        }
        assert_eq!(
            snapshot(&self.target),
            before,
            "{name}: the refused import changed the node"
        );
        msg
    }

    fn imported(&self, name: &str, bytes: &[u8]) -> Value {
        let path = self.write(name, bytes);
        json(&self.target, &["import", path.to_str().unwrap()])
    }

    fn source_id(&self) -> NodeId {
        json(&self.source, &["status"])["node"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

#[test]
fn tampered_frames_are_refused_naming_the_event_or_record() {
    let s = setup();
    let frames = parse(&s.export);
    assert_eq!(frames.len(), 5);
    // Each CLI append is its own commit, so the log signed every event, and
    // the export carries every signature the log holds.
    assert!(frames.iter().all(|f| f.sig.is_some()));
    let last = frames.last().unwrap().clone();

    // A flipped byte inside the signature: the header check covers it, so
    // the frame is refused before any signature is verified.
    let mut bad = s.export.clone();
    bad[last.sig_range().start + 17] ^= 0x04;
    s.refused(
        "flipped-signature-byte",
        &bad,
        &[
            "record header check failed",
            &format!("record 4 at byte {}", last.start),
        ],
    );

    // The same signature, validly framed (the header check recomputed):
    // the import reaches verification, which fails.
    let mut sig = Signature(last.sig.expect("signed"));
    sig.0[17] ^= 0x04;
    let mut bad = s.export.clone();
    bad[last.start..last.end].copy_from_slice(&last.with_sig(&sig));
    s.refused(
        "bad-signature",
        &bad,
        &["signature does not verify", &last.id_hex()],
    );

    // A flipped byte in an id: the record's check fails.
    let f = &frames[2];
    let mut bad = s.export.clone();
    bad[f.id_range().start + 5] ^= 0x80;
    let mut flipped = f.id;
    flipped[5] ^= 0x80;
    s.refused(
        "wrong-id",
        &bad,
        &[
            "does not match",
            &format!("record 2 at byte {}", f.start),
            &EventId(flipped).to_string(),
        ],
    );

    // The last (signed) event changed and its id recomputed: the id matches
    // the bytes, the signature does not match the id.
    let mut e = last.decode();
    e.stream = "customer/666".into();
    let (bytes, new_id) = e.seal();
    let mut recs = records(&frames);
    recs[4].0 = bytes;
    s.refused(
        "changed-signed-event",
        &file_of(&recs),
        &["signature does not verify", &new_id.to_string()],
    );

    // A middle (unsigned) event changed, id recomputed: the next event's
    // prev no longer names it.
    let mut e = frames[1].decode();
    e.ops = vec![Op::EscrowInit {
        counter: "seats".into(),
        capacity: 1_000_000,
    }];
    let mut recs = records(&frames);
    recs[1].0 = e.encode();
    s.refused(
        "changed-middle-event",
        &file_of(&recs),
        &["broken chain", &frames[2].id_hex()],
    );

    // A middle event removed: the author's chain has a gap.
    let mut recs = records(&frames);
    recs.remove(2);
    s.refused(
        "gap",
        &file_of(&recs),
        &["chain gap", "seq 2", &frames[3].id_hex()],
    );

    // A future format version, id recomputed.
    let mut recs = records(&frames);
    recs[0].0[0] = 3;
    let v3_id = EventId(*blake3::hash(&recs[0].0).as_bytes());
    s.refused(
        "version-3",
        &file_of(&recs),
        &["unsupported event format version 3", &v3_id.to_string()],
    );

    // A known version that is not the lowest its ops need (format 1 ops
    // written as version 2), id recomputed.
    let mut recs = records(&frames);
    recs[0].0[0] = 2;
    let v2_id = EventId(*blake3::hash(&recs[0].0).as_bytes());
    s.refused(
        "version-2",
        &file_of(&recs),
        &[
            "format version 2, but its ops need version 1",
            &v2_id.to_string(),
        ],
    );

    // A non-canonical encoding of an event (a trailing byte), id recomputed.
    let mut recs = records(&frames);
    recs[0].0.push(0);
    let long_id = EventId(*blake3::hash(&recs[0].0).as_bytes());
    s.refused(
        "trailing-byte",
        &file_of(&recs),
        &["trailing", &long_id.to_string()],
    );

    // The untampered file is fine.
    assert_eq!(
        s.imported("untampered", &s.export),
        serde_json::json!({ "imported": 5, "duplicates": 0 })
    );
    assert_eq!(json(&s.target, &["status"])["events"], 7);
    assert_eq!(
        json(&s.target, &["get", "--stream", "event/keynote"]),
        json(&s.source, &["get", "--stream", "event/keynote"])
    );
}

#[test]
fn damaged_files_are_refused_naming_the_record() {
    let s = setup();
    let frames = parse(&s.export);
    let last = frames.last().unwrap();
    let n = frames.len();

    let cut = &s.export[..last.end - 10];
    s.refused(
        "cut-in-last-record",
        cut,
        &[
            "incomplete",
            &format!("record {} at byte {}", n - 1, last.start),
        ],
    );
    let cut = &s.export[..frames[1].start + 3];
    s.refused(
        "cut-in-length",
        cut,
        &[
            "incomplete",
            &format!("record 1 at byte {}", frames[1].start),
        ],
    );
    // Cut exactly before the last record: what is left is well-formed and
    // ends at a signed event, so it is an authenticated prefix: it imports
    // (into a scratch copy of the target, which must stay untouched here).
    let cut = &s.export[..last.start];
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("copy");
    copy_dir(&s.target, &copy);
    let file = scratch.path().join("prefix.weft");
    std::fs::write(&file, cut).unwrap();
    let r = weftlog(&copy, &["import", file.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(),
        serde_json::json!({ "imported": n - 1, "duplicates": 0 })
    );
    s.refused("empty", &[], &["0 bytes, shorter than its header"]);
    s.refused(
        "cut-in-header",
        &s.export[..10],
        &["10 bytes, shorter than its header"],
    );

    let mut bad = s.export.clone();
    bad[0] = b'W';
    s.refused("wrong-magic", &bad, &["not a weftlog export", "magic"]);
    // A log segment is not an export file.
    let seg = fs::read_dir(s.source.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    s.refused(
        "a-segment",
        &fs::read(seg).unwrap(),
        &["not a weftlog export", "magic"],
    );
    let mut bad = s.export.clone();
    bad[8] = 2;
    s.refused(
        "file-version-2",
        &bad,
        &["not a weftlog export", "format version 2"],
    );

    // Bad framing: zero length, unknown flags.
    let mut bad = s.export.clone();
    bad[frames[3].start..frames[3].start + 4].copy_from_slice(&0u32.to_le_bytes());
    s.refused(
        "zero-length",
        &bad,
        &[
            "record length 0",
            &format!("record 3 at byte {}", frames[3].start),
        ],
    );
    let mut bad = s.export.clone();
    bad[frames[3].start + 4] = 7;
    s.refused(
        "bad-flags",
        &bad,
        &[
            "flags 0x07",
            &format!("record 3 at byte {}", frames[3].start),
        ],
    );
    // A length or flag changed within bounds, or the header check itself
    // damaged: the header check fails.
    let f = &frames[3];
    for (name, at) in [
        ("changed-length", f.start),
        ("changed-flags", f.start + 4),
        ("damaged-header-check", f.start + f.layout.check.start),
    ] {
        let mut bad = s.export.clone();
        bad[at] ^= 0x01;
        s.refused(
            name,
            &bad,
            &[
                "record header check failed",
                &format!("record 3 at byte {}", f.start),
            ],
        );
    }
}

#[test]
fn forged_and_oversized_events_are_refused() {
    let s = setup();
    let mallory = Keypair::from_secret([0x3a; 32]);
    let hlc = 1_800_000_000_000u64 << 16;

    // A 300-byte stream name, properly sealed and signed by its author.
    let mut e = event(mallory.node_id(), 1, None, hlc, vec![]);
    e.stream = "s".repeat(300);
    let (bytes, sig, id) = signed(&e, &mallory);
    s.refused(
        "stream-300",
        &file_of(&[(bytes, sig)]),
        &["stream is 300", "limit is 256", &id.to_string()],
    );

    // An event claiming the source node as author, signed by another key.
    let e = event(
        s.source_id(),
        1,
        None,
        hlc,
        vec![Op::EscrowInit {
            counter: "seats".into(),
            capacity: 1000,
        }],
    );
    let (bytes, sig, id) = signed(&e, &mallory);
    s.refused(
        "impersonation",
        &file_of(&[(bytes, sig)]),
        &["signature does not verify", &id.to_string()],
    );

    // The real export's last signature replaced by another key's signature
    // over the same id, validly framed.
    let frames = parse(&s.export);
    let last = frames.last().unwrap();
    let other = mallory.sign(&EventId(last.id));
    let mut bad = s.export.clone();
    bad[last.start..last.end].copy_from_slice(&last.with_sig(&other));
    s.refused(
        "resigned-by-other-key",
        &bad,
        &["signature does not verify", &last.id_hex()],
    );
    // Spliced in without recomputing the header check: a framing error.
    let mut bad = s.export.clone();
    bad[last.sig_range()].copy_from_slice(&other.0);
    s.refused(
        "resigned-without-header-check",
        &bad,
        &[
            "record header check failed",
            &format!("record {} at byte {}", frames.len() - 1, last.start),
        ],
    );

    // Two events with the same seq (a fork, which a file may carry: both
    // branches are valid history), one of them unsigned: that branch is
    // not authenticated.
    let a = event(mallory.node_id(), 1, None, hlc, vec![]);
    let mut b = a.clone();
    b.kind = "Other".into();
    let (ab, asig, aid) = signed(&a, &mallory);
    let (bb, bid) = b.seal();
    let mut fork = vec![(aid, (ab, asig)), (bid, (bb, None))];
    fork.sort_by_key(|(id, _)| *id);
    let fork: Vec<_> = fork.into_iter().map(|(_, r)| r).collect();
    s.refused(
        "unsigned-branch",
        &file_of(&fork),
        &["not signed", &bid.to_string()],
    );

    // A run whose last event is unsigned, even if an earlier one is signed.
    let first = event(mallory.node_id(), 1, None, hlc, vec![]);
    let (b1, s1, id1) = signed(&first, &mallory);
    let second = event(mallory.node_id(), 2, Some(id1), hlc + 1, vec![]);
    let (b2, id2) = second.seal();
    s.refused(
        "unsigned-head",
        &file_of(&[(b1, s1), (b2, None)]),
        &["not signed", &id2.to_string()],
    );
}

#[test]
fn events_by_or_to_weak_keys_are_refused_naming_the_key() {
    let s = setup();
    let hlc = 1_800_000_000_000u64 << 16;
    // R = the base point, S = 1: under a key of small order A, [S]B - [k]A
    // = B = R for every message, so this "signs" anything with no secret
    // key. ed25519-dalek's lenient `verify` takes it (PROTOCOL.md §8,
    // vector 4).
    let mut forged = [0u8; 64];
    forged[..32].copy_from_slice(&[0x66; 32]);
    forged[0] = 0x58;
    forged[32] = 1;
    let forged = Some(Signature(forged));
    let escrow = vec![Op::EscrowInit {
        counter: "seats".into(),
        capacity: 1000,
    }];

    // The identity point as author, and again encoded with y = p + 1.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut non_canonical = [0xff; 32];
    non_canonical[0] = 0xee;
    non_canonical[31] = 0x7f;
    for (name, key, why) in [
        (
            "weak-author",
            identity,
            "is a weak (small-order) ed25519 key",
        ),
        (
            "non-canonical-author",
            non_canonical,
            "is not a canonical point encoding",
        ),
    ] {
        let author = NodeId(key);
        let (bytes, id) = event(author, 1, None, hlc, escrow.clone()).seal();
        s.refused(
            name,
            &file_of(&[(bytes, forged)]),
            &[
                &id.to_string(),
                &format!("bad author: node id {author} {why}"),
            ],
        );
    }

    // An honest author's signed transfer to the identity point.
    let alice = Keypair::from_secret([0x5e; 32]);
    let first = event(alice.node_id(), 1, None, hlc, escrow.clone());
    let (b1, _, id1) = signed(&first, &alice);
    let to = NodeId(identity);
    let transfer = event(
        alice.node_id(),
        2,
        Some(id1),
        hlc + 1,
        vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to,
            amount: 10,
        }],
    );
    let (b2, s2, id2) = signed(&transfer, &alice);
    s.refused(
        "transfer-to-weak-key",
        &file_of(&[(b1, None), (b2, s2)]),
        &[
            &id2.to_string(),
            &format!("bad recipient: node id {to} is a weak (small-order) ed25519 key"),
        ],
    );
}

#[test]
fn escrow_consumption_beyond_causal_past_rights_is_refused() {
    let s = setup();
    let buyer = Keypair::from_secret([0x5b; 32]);
    let k = buyer.node_id();
    json(
        &s.target,
        &[
            "append",
            "--stream",
            "event/keynote",
            "--kind",
            "Opened",
            "--escrow-init",
            "seats=10",
        ],
    );
    let to = format!("seats={k}:5");
    let transfer = json(
        &s.target,
        &[
            "append",
            "--stream",
            "event/keynote",
            "--kind",
            "Moved",
            "--escrow-transfer",
            &to,
        ],
    );
    let t_id: EventId = transfer["id"].as_str().unwrap().parse().unwrap();
    let t_hlc = transfer["hlc"].as_u64().unwrap();
    let consume = |n: u64| {
        vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: n,
        }]
    };

    // The target holds the transfer, but the buyer's event does not have it
    // in its causal past: it holds no rights there.
    let e = event(k, 1, None, t_hlc + 1, consume(3));
    let (bytes, sig, id) = signed(&e, &buyer);
    s.refused(
        "consume-without-rights-in-past",
        &file_of(&[(bytes, sig)]),
        &[
            "escrow \"seats\"",
            "rights to 0 in its causal past",
            "needs 3",
            &id.to_string(),
        ],
    );

    // With the transfer as a dep it holds 5, not 6.
    let mut e = event(k, 1, None, t_hlc + 1, consume(6));
    e.deps = vec![t_id];
    let (bytes, sig, id) = signed(&e, &buyer);
    s.refused(
        "consume-beyond-rights",
        &file_of(&[(bytes, sig)]),
        &["rights to 5 in its causal past", "needs 6", &id.to_string()],
    );

    // 3 then 3 more in one file: the second is refused, and so is the first
    // (an import is all or nothing).
    let mut e1 = event(k, 1, None, t_hlc + 1, consume(3));
    e1.deps = vec![t_id];
    let (b1, id1) = e1.seal();
    let e2 = event(k, 2, Some(id1), t_hlc + 2, consume(3));
    let (b2, sig2, id2) = signed(&e2, &buyer);
    s.refused(
        "second-consume-beyond-rights",
        &file_of(&[(b1.clone(), None), (b2, sig2)]),
        &[
            "rights to 2 in its causal past",
            "needs 3",
            &id2.to_string(),
        ],
    );

    // Within its rights it is accepted.
    let e2 = event(k, 2, Some(id1), t_hlc + 2, consume(2));
    let (b2, sig2, _) = signed(&e2, &buyer);
    assert_eq!(
        s.imported("within-rights", &file_of(&[(b1, None), (b2, sig2)])),
        serde_json::json!({ "imported": 2, "duplicates": 0 })
    );
    let seats = &json(&s.target, &["get", "--stream", "event/keynote"])["escrow"]["seats"];
    assert_eq!(seats["capacity"], 10);
    assert_eq!(seats["consumed"], 5);
    assert_eq!(seats["rights"][k.to_string()], 0);
}

/// An event stamped at the very end of the clock's range must not be
/// accepted in a way that stops the node from appending: every later local
/// event needs a greater hlc, and there is none.
#[test]
fn an_event_at_the_end_of_the_clock_range_does_not_stop_local_appends() {
    let s = setup();
    let mallory = Keypair::from_secret([0x4c; 32]);
    let e = event(mallory.node_id(), 1, None, u64::MAX, vec![]);
    let (bytes, sig, _) = signed(&e, &mallory);
    let path = s.write("hlc-max", &file_of(&[(bytes, sig)]));
    let before = snapshot(&s.target);
    let r = weftlog(&s.target, &["import", path.to_str().unwrap()]);
    if r.code != Some(0) {
        // Refused: then with a message about the clock, storing nothing.
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(r.stderr.contains("hlc"), "{}", r.stderr);
        assert_eq!(snapshot(&s.target), before);
        return;
    }
    // Accepted: the node must still append.
    let r = weftlog(
        &s.target,
        &[
            "append",
            "--stream",
            "customer/1",
            "--kind",
            "Noted",
            "--add",
            "n=1",
        ],
    );
    assert_eq!(
        r.code,
        Some(0),
        "after importing an event with hlc u64::MAX, append fails: {}",
        r.stderr.lines().take(2).collect::<Vec<_>>().join(" / ")
    );
}

/// Copies a data directory (files one level deep and in `log/`).
fn copy_dir(from: &Path, to: &Path) {
    for sub in ["", "log"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() && e.file_name() != "LOCK" {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
}
