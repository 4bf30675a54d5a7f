//! The test vectors printed in `PROTOCOL.md`: if the encoding, the id or the
//! signature scheme changes, this test fails and the document must change
//! (with a new format version). The key and signature vectors are each
//! refused, for the reason the document gives.

use weftlog_proto::event::{
    verify, Event, EventError, Keypair, Meta, Op, Signature, SignatureError, FORMAT_VERSION,
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
        version: FORMAT_VERSION,
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
        version: FORMAT_VERSION,
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
        version: FORMAT_VERSION,
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
