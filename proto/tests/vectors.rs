//! The test vectors printed in `PROTOCOL.md`: if the encoding, the id or the
//! signature scheme changes, this test fails and the document must change
//! (with a new format version). The key and signature vectors are each
//! refused, for the reason the document gives. Run with
//! `WEFTLOG_PRINT_VECTORS=1` (and `--nocapture`) to print the read-model
//! vector's bytes after a format change.

use weftlog_proto::event::{
    verify, Event, EventError, Keypair, Meta, Op, Signature, SignatureError, MIN_FORMAT_VERSION,
};
use weftlog_proto::id::PointFault;
use weftlog_proto::log::encode_frame;
use weftlog_proto::{Dot, EventId, Hlc, KeyError, NodeId};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key(n: u8) -> Keypair {
    Keypair::from_secret([n; 32])
}

/// Vector 1: a first event with one register write.
fn v1() -> Event {
    Event {
        version: MIN_FORMAT_VERSION,
        author: key(1).node_id(),
        seq: 1,
        prev: None,
        deps: vec![],
        hlc: Hlc::from_ms(1_700_000_000_000),
        stream: "customer/20".into(),
        kind: "CustomerRegistered".into(),
        ops: vec![Op::Set {
            field: "name".into(),
            value: b"\"Ada\"".to_vec(),
            supersedes: vec![],
        }],
        payload: vec![],
        meta: Meta::default(),
    }
}

/// Vector 2: a second event with a dep, a superseding write, a counter,
/// a payload and meta.
fn v2() -> Event {
    let (_, id1) = v1().seal();
    Event {
        version: MIN_FORMAT_VERSION,
        author: key(2).node_id(),
        seq: 2,
        prev: Some(EventId([0x11; 32])),
        deps: vec![id1],
        hlc: Hlc(Hlc::from_ms(1_700_000_000_001).0 + 3),
        stream: "customer/20".into(),
        kind: "NameCorrected".into(),
        ops: vec![
            Op::Set {
                field: "name".into(),
                value: b"\"Ada King\"".to_vec(),
                supersedes: vec![Dot {
                    author: key(1).node_id(),
                    seq: 1,
                }],
            },
            Op::Add {
                counter: "edits".into(),
                delta: -2,
            },
        ],
        payload: b"{\"by\":\"desk-b\"}".to_vec(),
        meta: Meta {
            command_id: Some("cmd-7".into()),
            user: Some("sam".into()),
        },
    }
}

/// Vector 3: escrow ops.
fn v3() -> Event {
    Event {
        version: MIN_FORMAT_VERSION,
        author: key(1).node_id(),
        seq: 2,
        prev: Some(v1().seal().1),
        deps: vec![],
        hlc: Hlc::from_ms(1_700_000_000_002),
        stream: "event/keynote".into(),
        kind: "SeatsOpened".into(),
        ops: vec![
            Op::EscrowInit {
                counter: "seats".into(),
                capacity: 300,
            },
            Op::EscrowTransfer {
                counter: "seats".into(),
                to: key(2).node_id(),
                amount: 100,
            },
            Op::EscrowConsume {
                counter: "seats".into(),
                amount: 1,
            },
        ],
        payload: vec![],
        meta: Meta::default(),
    }
}

const V1_BYTES: &str =
    "018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c010000808080c0d6fcf3c5010b637573746f6d65722f323012437573746f6d6572526567697374657265640100046e616d6505224164612200000000";
const V1_ID: &str = "389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f12";
const V2_BYTES: &str =
    "018139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b3940201111111111111111111111111111111111111111111111111111111111111111101389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f12838084c0d6fcf3c5010b637573746f6d65722f32300d4e616d65436f727265637465640200046e616d650a22416461204b696e6722018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0101056564697473030f7b226279223a226465736b2d62227d0105636d642d37010373616d";
const V2_ID: &str = "202164440980d90d8f67bf39d855503ead68d91b342e42fc45edbb109d63d801";
const V3_BYTES: &str =
    "018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f1200808088c0d6fcf3c5010d6576656e742f6b65796e6f74650b53656174734f70656e65640302057365617473ac02030573656174738139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394640405736561747301000000";
const V3_ID: &str = "6bd39320d11d400b2ba3554f7a5fda1aa0501fdcdbc46ca0dd36e51dc012c570";
const V3_FRAME: &str =
    "a400000001b3b321215088be25e75e54fcb729297fdb5d6a71c7cebb06ef2a90c214b9deab7eaec4b239d4e7099ec6ab3f388f81371daa476764dc0f81c686c8dfaa40800cf2304bf1018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f1200808088c0d6fcf3c5010d6576656e742f6b65796e6f74650b53656174734f70656e65640302057365617473ac02030573656174738139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b3946404057365617473010000006bd39320d11d400b2ba3554f7a5fda1aa0501fdcdbc46ca0dd36e51dc012c570";

#[test]
fn vectors_match_protocol_md() {
    let cases = [
        ("v1", v1(), V1_BYTES, V1_ID),
        ("v2", v2(), V2_BYTES, V2_ID),
        ("v3", v3(), V3_BYTES, V3_ID),
    ];
    let mut printed = String::new();
    for (name, e, bytes, id) in &cases {
        let (b, i) = e.seal();
        printed += &format!("{name}\nbytes {}\nid {}\n", hex(&b), i);
        if !bytes.is_empty() {
            assert_eq!(hex(&b), *bytes, "{name} bytes");
            assert_eq!(i.to_string(), *id, "{name} id");
            let (back, id2) = Event::decode(&b).unwrap();
            assert_eq!(&back, e);
            assert_eq!(id2, i);
        }
    }
    let (b3, id3) = v3().seal();
    let sig = key(1).sign(&id3);
    let mut frame = Vec::new();
    encode_frame(&mut frame, &b3, &id3, Some(&sig));
    printed += &format!("v3 frame {}\n", hex(&frame));
    println!("{printed}");
    assert!(!V3_FRAME.is_empty() && hex(&frame) == V3_FRAME, "{printed}");
}

// Key and signature vectors (PROTOCOL.md §3 and §8, vectors 4 to 9): each is
// refused, for the reason given.

/// The identity point (order 1), canonically encoded.
const WEAK_KEY: &str = "0100000000000000000000000000000000000000000000000000000000000000";
/// The identity again, encoded with y = p + 1.
const NON_CANONICAL_WEAK_KEY: &str =
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";
/// The point with y = 3, of large order, encoded with y = p + 3.
const NON_CANONICAL_KEY: &str = "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";
/// R = the base point B, S = 1: for a key A of small order, [S]B - [k]A = B
/// = R whatever the message, so no secret key is needed.
const FORGED_SIG: &str = "58666666666666666666666666666666666666666666666666666666666666660100000000000000000000000000000000000000000000000000000000000000";
const V4_BYTES: &str =
    "010100000000000000000000000000000000000000000000000000000000000000010000808080c0d6fcf3c5010b637573746f6d65722f323012437573746f6d6572526567697374657265640100046e616d6505224164612200000000";
const V4_ID: &str = "08a66af9820b8d833d6e3411e2caf34c1fa9076cf74e7722998646ed7db31620";
const V5_BYTES: &str =
    "01eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f010000808080c0d6fcf3c5010b637573746f6d65722f323012437573746f6d6572526567697374657265640100046e616d6505224164612200000000";
const V5_ID: &str = "b797fef5ee3dde16471ca5a4b3f2472c37c5f2ddca6fa8f84c3daad687f1a8be";
/// Vector 3's signature with S + L.
const V6_SIG: &str = "b3b321215088be25e75e54fcb729297fdb5d6a71c7cebb06ef2a90c214b9deab6b82ba0f5437fa617463a3e21689604c1daa476764dc0f81c686c8dfaa40801c";
/// Key 1 over vector 1's id with R = the identity: S = k·a, so that
/// [S]B - [k]A is the identity.
const V7_SIG: &str = "0100000000000000000000000000000000000000000000000000000000000000774fb258f078b99362c6dd193a2603a0f460d388b731871767b946734ca7a602";
/// Key 1 over vector 1's id with R = the identity with the sign bit set
/// (x = 0): S = k·a for that R.
const V8_SIG: &str = "01000000000000000000000000000000000000000000000000000000000000805190e8bdfc1ba5e55772552e7fb49f0a18a92427180748b961117841da3e9f00";

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    assert_eq!(s.len(), 2 * N, "{s}");
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// Whether ed25519-dalek's lenient `verify` takes the signature: the check
/// that these vectors are what they claim to be.
fn lenient(key: &NodeId, id: &EventId, sig: &Signature) -> bool {
    use ed25519_dalek::Verifier;
    let mut msg = b"weftlog/v1/event-id".to_vec();
    msg.extend_from_slice(&id.0);
    let Ok(k) = ed25519_dalek::VerifyingKey::from_bytes(&key.0) else {
        return false;
    };
    k.verify(&msg, &ed25519_dalek::Signature::from_bytes(&sig.0))
        .is_ok()
}

/// Vector 1 by another author.
fn v1_by(author: NodeId) -> Event {
    Event { author, ..v1() }
}

#[test]
fn key_and_signature_vectors_match_protocol_md() {
    let mut printed = String::new();
    let forged = Signature(unhex(FORGED_SIG));

    // Vectors 4 and 5: an event by a small-order key, with the forgery.
    for (name, key, bytes, id, fault) in [
        ("v4", WEAK_KEY, V4_BYTES, V4_ID, PointFault::SmallOrder),
        (
            "v5",
            NON_CANONICAL_WEAK_KEY,
            V5_BYTES,
            V5_ID,
            PointFault::NonCanonical,
        ),
    ] {
        let author = NodeId(unhex(key));
        let (b, i) = v1_by(author).seal();
        printed += &format!("{name}\nbytes {}\nid {}\n", hex(&b), i);
        if bytes.is_empty() {
            continue;
        }
        assert_eq!(hex(&b), bytes, "{name} bytes");
        assert_eq!(i.to_string(), id, "{name} id");
        assert!(lenient(&author, &i, &forged), "{name}: not a forgery");
        let refused = |e: &KeyError| e.key == author && e.fault == fault;
        assert!(
            matches!(Event::decode(&b), Err(EventError::BadAuthor(e)) if refused(&e)),
            "{name}"
        );
        assert!(
            matches!(verify(&author, &i, &forged), Err(SignatureError::BadKey(e)) if refused(&e)),
            "{name}"
        );
    }

    // Vector 6: vector 3's signature with S + L.
    let (_, id3) = v3().seal();
    let good = key(1).sign(&id3);
    let s_plus_l = Signature(unhex(V6_SIG));
    assert_eq!(s_plus_l.0[..32], good.0[..32]);
    assert_eq!(verify(&key(1).node_id(), &id3, &good), Ok(()));
    assert_eq!(
        verify(&key(1).node_id(), &id3, &s_plus_l),
        Err(SignatureError::NonCanonicalS)
    );

    // Vector 7: an R of small order, which the lenient check takes.
    let (_, id1) = v1().seal();
    let k1 = key(1).node_id();
    let small_r = Signature(unhex(V7_SIG));
    assert!(lenient(&k1, &id1, &small_r));
    assert_eq!(
        verify(&k1, &id1, &small_r),
        Err(SignatureError::BadR(PointFault::SmallOrder))
    );

    // Vector 8: a non-canonical R.
    let non_canonical_r = Signature(unhex(V8_SIG));
    assert_eq!(
        verify(&k1, &id1, &non_canonical_r),
        Err(SignatureError::BadR(PointFault::NonCanonical))
    );

    // Vector 9: a non-canonical key of large order, which ed25519-dalek
    // decodes and does not call weak; refused wherever a key is read.
    let k9 = NodeId(unhex(NON_CANONICAL_KEY));
    let lenient_key = ed25519_dalek::VerifyingKey::from_bytes(&k9.0).unwrap();
    assert!(!lenient_key.is_weak());
    let e = k9.check_key().unwrap_err();
    assert_eq!((e.key, e.fault), (k9, PointFault::NonCanonical));
    assert!(NON_CANONICAL_KEY.parse::<NodeId>().is_err());

    println!("{printed}");
    assert!(!V4_BYTES.is_empty() && !V5_BYTES.is_empty(), "{printed}");
}

// The read-model vector (PROTOCOL.md §7 and §8, vector 10): a small state,
// its canonical read model and its state hash.

/// Whether to print the vectors' bytes (`WEFTLOG_PRINT_VECTORS=1`), to
/// update `PROTOCOL.md` and the constants here after a format change.
fn print_vectors() -> bool {
    std::env::var_os("WEFTLOG_PRINT_VECTORS").is_some_and(|v| v == "1")
}

/// An event of vector 10: stream `event/keynote`, kind `Changed`, no
/// payload, hlc = (1,700,000,000,000 + `ms`) << 16.
fn v10_event(
    author: u8,
    seq: u64,
    prev: Option<EventId>,
    deps: Vec<EventId>,
    ms: u64,
    ops: Vec<Op>,
    command_id: Option<&str>,
) -> Event {
    Event {
        version: MIN_FORMAT_VERSION,
        author: key(author).node_id(),
        seq,
        prev,
        deps,
        hlc: Hlc::from_ms(1_700_000_000_000 + ms),
        stream: "event/keynote".into(),
        kind: "Changed".into(),
        ops,
        payload: vec![],
        meta: Meta {
            command_id: command_id.map(String::from),
            user: None,
        },
    }
}

/// Vector 10's four events, in an order a replica may insert them:
/// 1. key 1, seq 1, +0 ms, command `open-1`: `EscrowInit { seats, 10 }`,
///    `EscrowTransfer { seats, to: key 2, 4 }`, `Add { views, 3 }`;
/// 2. key 2, seq 1, +1 ms, no deps, command `open-1` (the same command
///    carried out at another node: a duplicate, 1 sorts first):
///    `EscrowInit { seats, 10 }`, `Add { views, 3 }`;
/// 3. key 1, seq 2, +2 ms, prev 1: `Set { title, "\"Keynote\"", [] }`;
/// 4. key 2, seq 2, +3 ms, prev 2, deps [1]: `Set { title,
///    "\"Opening keynote\"", [] }` (concurrent with 3: a conflict),
///    `EscrowConsume { seats, 1 }` (rights key 2 received in 1),
///    `Add { views, -1 }`.
fn v10_events() -> Vec<Event> {
    let seats = || "seats".to_string();
    let views = || "views".to_string();
    let title = |v: &str| Op::Set {
        field: "title".into(),
        value: v.as_bytes().to_vec(),
        supersedes: vec![],
    };
    let e1 = v10_event(
        1,
        1,
        None,
        vec![],
        0,
        vec![
            Op::EscrowInit {
                counter: seats(),
                capacity: 10,
            },
            Op::EscrowTransfer {
                counter: seats(),
                to: key(2).node_id(),
                amount: 4,
            },
            Op::Add {
                counter: views(),
                delta: 3,
            },
        ],
        Some("open-1"),
    );
    let id1 = e1.seal().1;
    let e2 = v10_event(
        2,
        1,
        None,
        vec![],
        1,
        vec![
            Op::EscrowInit {
                counter: seats(),
                capacity: 10,
            },
            Op::Add {
                counter: views(),
                delta: 3,
            },
        ],
        Some("open-1"),
    );
    let id2 = e2.seal().1;
    let e3 = v10_event(1, 2, Some(id1), vec![], 2, vec![title("\"Keynote\"")], None);
    let e4 = v10_event(
        2,
        2,
        Some(id2),
        vec![id1],
        3,
        vec![
            title("\"Opening keynote\""),
            Op::EscrowConsume {
                counter: seats(),
                amount: 1,
            },
            Op::Add {
                counter: views(),
                delta: -1,
            },
        ],
        None,
    );
    vec![e1, e2, e3, e4]
}

const V10_READ_MODEL: &str = "010d6576656e742f6b65796e6f74650401057469746c65028139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b3940219684c6de62556d1f8e03e726dc40a3f87ccde263a809729dc53c41c31576a5580808cc0d6fcf3c50111224f70656e696e67206b65796e6f7465228a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c02ebf494997c111f15b96d66a9ee5538a66ceeb85bdaa8fc59c9bbbe96b1acfde6808088c0d6fcf3c50109224b65796e6f7465220105766965777304010573656174730a01028139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394000400018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0a0004000000000000000001066f70656e2d311fe7061c0295447edea36eb5436916447c531816244533e17a1d7bd43388680e015e93049affc9f6e72ad5a4c3bc5d70f71feeea15e9d5ff20524feda336e01795";
/// The ids of vector 10's events, in the order listed.
const V10_IDS: [&str; 4] = [
    "1fe7061c0295447edea36eb5436916447c531816244533e17a1d7bd43388680e",
    "5e93049affc9f6e72ad5a4c3bc5d70f71feeea15e9d5ff20524feda336e01795",
    "ebf494997c111f15b96d66a9ee5538a66ceeb85bdaa8fc59c9bbbe96b1acfde6",
    "19684c6de62556d1f8e03e726dc40a3f87ccde263a809729dc53c41c31576a55",
];
const V10_STATE_HASH: &str = "7c8744ecaf4cb000b8637f9c471577bfd6b1cb36308ddfce2003f17972bb7387";

#[test]
fn read_model_vector_matches_protocol_md() {
    use weftlog_proto::state::Inserted;
    use weftlog_proto::State;

    let events = v10_events();
    let sealed: Vec<(Event, EventId)> = events.iter().map(|e| (e.clone(), e.seal().1)).collect();
    // Two causal orders give the same bytes.
    let mut hashes = Vec::new();
    let mut model = Vec::new();
    for order in [[0, 1, 2, 3], [1, 0, 3, 2]] {
        let mut state = State::new();
        for i in order {
            let (e, id) = &sealed[i];
            assert_eq!(state.insert(e, *id), Ok(Inserted::New), "event {}", i + 1);
        }
        model = state.canonical_read_model();
        hashes.push(state.state_hash());
    }
    assert_eq!(hashes[0], hashes[1]);
    let printed = format!(
        "v10\nevents {}\nread-model {}\nstate-hash {}\n",
        sealed
            .iter()
            .map(|(_, id)| id.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        hex(&model),
        hex(&hashes[0])
    );
    if print_vectors() {
        println!("{printed}");
    }
    for ((_, id), want) in sealed.iter().zip(V10_IDS) {
        assert_eq!(id.to_string(), want, "{printed}");
    }
    assert_eq!(hex(&model), V10_READ_MODEL, "{printed}");
    assert_eq!(hex(&hashes[0]), V10_STATE_HASH, "{printed}");
    assert_eq!(*blake3::hash(&model).as_bytes(), hashes[0]);
}

// The fork proof vectors (PROTOCOL.md §9.6.1): key 1 forks at seq 2.

/// Key 1's events on the second branch: seq 2 after vector 1 (unsigned),
/// and seq 3 after it (signed).
fn fork_branch() -> [Event; 2] {
    let (_, id1) = v1().seal();
    let phone = |seq: u64, prev: EventId, ms: u64, v: &str| Event {
        version: MIN_FORMAT_VERSION,
        author: key(1).node_id(),
        seq,
        prev: Some(prev),
        deps: vec![],
        hlc: Hlc::from_ms(1_700_000_000_000 + ms),
        stream: "customer/20".into(),
        kind: "PhoneAdded".into(),
        ops: vec![Op::Set {
            field: "phone".into(),
            value: format!("{v:?}").into_bytes(),
            supersedes: vec![],
        }],
        payload: vec![],
        meta: Meta::default(),
    };
    let b2 = phone(2, id1, 3, "555");
    let b3 = phone(3, b2.seal().1, 4, "556");
    [b2, b3]
}

const FORK_PROOF: &str = "018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201a401018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f1200808088c0d6fcf3c5010d6576656e742f6b65796e6f74650b53656174734f70656e65640302057365617473ac02030573656174738139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394640405736561747301000000b3b321215088be25e75e54fcb729297fdb5d6a71c7cebb06ef2a90c214b9deab7eaec4b239d4e7099ec6ab3f388f81371daa476764dc0f81c686c8dfaa40800c0276018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f120080808cc0d6fcf3c5010b637573746f6d65722f32300a50686f6e65416464656401000570686f6e650522353535220000000076018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c03016f81202080057d9159489b9c476752ef5873173a569751f810b128ed5dc80b8600808090c0d6fcf3c5010b637573746f6d65722f32300a50686f6e65416464656401000570686f6e650522353536220000000041e7ce8f6164c76bb219dcf328c84eaefcfa740d8c7f16252e07ea5261ef840de98488fca27a1e7b8f610c46ffad68c06d0b803cd532da139d7bbebab93fdf03";
const FORK_PROOF_REFUSED: &str = "018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201a401018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f1200808088c0d6fcf3c5010d6576656e742f6b65796e6f74650b53656174734f70656e65640302057365617473ac02030573656174738139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394640405736561747301000000b3b321215088be25e75e54fcb729297fdb5d6a71c7cebb06ef2a90c214b9deab7eaec4b239d4e7099ec6ab3f388f81371daa476764dc0f81c686c8dfaa40800c01a401018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c0201389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f1200808088c0d6fcf3c5010d6576656e742f6b65796e6f74650b53656174734f70656e65640302057365617473ac02030573656174738139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394640405736561747301000000b3b321215088be25e75e54fcb729297fdb5d6a71c7cebb06ef2a90c214b9deab7eaec4b239d4e7099ec6ab3f388f81371daa476764dc0f81c686c8dfaa40800c";

#[test]
fn fork_proof_vectors_match_protocol_md() {
    use weftlog_proto::fork_proof::{Branch, ForkProof, ForkProofError};
    let k = key(1);
    let (b3, id3) = v3().seal();
    let [x2, x3] = fork_branch();
    let (x2b, x2id) = x2.seal();
    let (x3b, x3id) = x3.seal();
    let short = Branch {
        events: vec![b3],
        signature: k.sign(&id3),
    };
    let long = Branch {
        events: vec![x2b, x3b],
        signature: k.sign(&x3id),
    };
    let branches = if id3 < x2id {
        [short, long]
    } else {
        [long, short]
    };
    let proof = ForkProof {
        author: k.node_id(),
        seq: 2,
        branches,
    };
    let bytes = proof.encode();
    let v = proof.verify().unwrap();
    let mut refused = proof.clone();
    refused.branches[1] = refused.branches[0].clone();
    let refused_bytes = refused.encode();
    let printed = format!(
        "fork-proof {}\nevents {} {}\nheads {} {} {} {}\nfork-proof-refused {}\n",
        hex(&bytes),
        v.events[0],
        v.events[1],
        v.heads[0].0,
        v.heads[0].1,
        v.heads[1].0,
        v.heads[1].1,
        hex(&refused_bytes)
    );
    if print_vectors() {
        println!("{printed}");
    }
    assert_eq!(hex(&bytes), FORK_PROOF, "{printed}");
    assert_eq!(ForkProof::decode(&bytes).unwrap(), proof);
    assert_eq!(hex(&refused_bytes), FORK_PROOF_REFUSED, "{printed}");
    let back = ForkProof::decode(&refused_bytes).unwrap();
    assert_eq!(back.verify(), Err(ForkProofError::SameEvent(v.events[0])));
}

// The text vector (PROTOCOL.md §8, vector 11): notes typed at two desks.

/// A text draft on `attendee/7`'s `notes`: one splice.
fn v11_draft(pos: u64, delete: u64, insert: &str) -> weftlog_proto::Draft {
    use weftlog_proto::text::{Splice, TextEdit};
    weftlog_proto::Draft {
        stream: "attendee/7".into(),
        kind: "NotesEdited".into(),
        texts: vec![TextEdit {
            field: "notes".into(),
            splices: vec![Splice {
                pos,
                delete,
                insert: insert.into(),
            }],
            base: None,
        }],
        ..Default::default()
    }
}

/// Vector 11's events, made as desks make them (`State::prepare`):
/// 1. key 1, seq 1, at 1,700,000,000,000 ms: insert "hi" at 0;
/// 2. key 2, seq 1, at +1 ms, no deps (concurrent): insert "yo" at 0;
/// 3. key 1, seq 2, at +3 ms, prev 1, deps [2]: insert "!" at 4, the end
///    of the merged text.
fn v11_events() -> Vec<(Event, EventId)> {
    use weftlog_proto::state::{Inserted, Prepared};
    use weftlog_proto::{HlcClock, State};
    const T: u64 = 1_700_000_000_000;
    let make = |s: &State, k: u8, clock: &mut HlcClock, ms: u64, d| match s.prepare(
        key(k).node_id(),
        clock,
        T + ms,
        d,
    ) {
        Ok(Prepared::New(e)) => {
            let id = e.seal().1;
            (e, id)
        }
        other => panic!("{other:?}"),
    };
    let mut c1 = HlcClock::default();
    let e1 = make(&State::new(), 1, &mut c1, 0, v11_draft(0, 0, "hi"));
    let e2 = make(
        &State::new(),
        2,
        &mut HlcClock::default(),
        1,
        v11_draft(0, 0, "yo"),
    );
    let mut s = State::new();
    for (e, id) in [&e1, &e2] {
        assert_eq!(s.insert(e, *id), Ok(Inserted::New));
    }
    let e3 = make(&s, 1, &mut c1, 3, v11_draft(4, 0, "!"));
    vec![e1, e2, e3]
}

const V11_GENESIS: &str =
    "856f4a836927a0c3012f00105a63b8def88a8ae729ad25d6e2f8f792010100000005150634014202560270027f0474657874017f047f007f00";
const V11_BYTES: &str =
    "028a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c010000808080c0d6fcf3c5010a617474656e6465652f370b4e6f7465734564697465640107056e6f7465737a856f4a833de10dfb0170016927a0c360a1e1933653ec905be504bb59bc2bdfd00be03cdced7ac5c5ff8f55102761f330951780dd9eef93e6ad9b72640102000001105a63b8def88a8ae729ad25d6e2f8f792090102020211041303340242025602570270020201020100017f007e000200020201021668690200000000";
const V11_ID: &str = "8b1391e235d317e5e51ee3eab9429ca63947d26108abea2343ab02ddcd37d179";
const V11_READ_MODEL_TAIL: &str =
    "010a617474656e6465652f3701056e6f74657305796f68692101a007a32a55bb69c4a482dad012698c873a99fcd705585bbb73e3b078e9d50733";
const V11_STATE_HASH: &str = "a4e35a95f2d44cc474d31ad2ad2cf72aec6fce2b292d29a8c11b8615ee0299c7";

#[test]
fn text_vector_matches_protocol_md() {
    use weftlog_proto::state::Inserted;
    use weftlog_proto::text::{genesis_bytes, genesis_hash};
    use weftlog_proto::State;

    let events = v11_events();
    assert_eq!(events[0].0.hlc, Hlc::from_ms(1_700_000_000_000));
    assert_eq!(events[2].0.deps, vec![events[1].1]);
    let mut hashes = Vec::new();
    let mut model = Vec::new();
    let mut shown = Vec::new();
    for order in [[0, 1, 2], [1, 0, 2]] {
        let mut state = State::new();
        for i in order {
            let (e, id) = &events[i];
            assert_eq!(state.insert(e, *id), Ok(Inserted::New), "event {}", i + 1);
        }
        model = state.canonical_read_model();
        hashes.push(state.state_hash());
        shown.push(state.stream("attendee/7").unwrap().text("notes").cloned());
    }
    assert_eq!(hashes[0], hashes[1]);
    assert_eq!(shown[0], shown[1]);
    let text = shown[0].clone().unwrap();
    // The streams' part, then the texts' part: where the texts start.
    let mut streams_only = model.clone();
    let tail_len = {
        let t = text.text.len();
        // 01, "attendee/7", 01, "notes", the text, 01 and one head.
        1 + (1 + 10) + 1 + (1 + 5) + (1 + t) + 1 + 32
    };
    let tail = streams_only.split_off(model.len() - tail_len);
    let (e1, id1) = &events[0];
    let printed = format!(
        "v11\ngenesis {} (hash {})\nbytes {}\nid {}\nids {} {} {}\ntext {:?}\nread-model-tail {}\nstate-hash {}\n",
        hex(genesis_bytes()),
        hex(&genesis_hash()),
        hex(&e1.encode()),
        id1,
        events[0].1,
        events[1].1,
        events[2].1,
        text.text,
        hex(&tail),
        hex(&hashes[0]),
    );
    if print_vectors() {
        println!("{printed}");
    }
    assert_eq!(text.text, "yohi!", "{printed}");
    assert_eq!(text.heads.len(), 1, "event 3's change names both others");
    assert_eq!(hex(genesis_bytes()), V11_GENESIS, "{printed}");
    assert_eq!(hex(&e1.encode()), V11_BYTES, "{printed}");
    assert_eq!(id1.to_string(), V11_ID, "{printed}");
    assert_eq!(hex(&tail), V11_READ_MODEL_TAIL, "{printed}");
    assert_eq!(hex(&hashes[0]), V11_STATE_HASH, "{printed}");
    assert_eq!(*blake3::hash(&model).as_bytes(), hashes[0]);
}
