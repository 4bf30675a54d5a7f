//! The test vectors printed in `PROTOCOL.md`: if the encoding, the id or the
//! signature scheme changes, this test fails and the document must change
//! (with a new format version).

use weftlog_proto::event::{Event, Keypair, Meta, Op, FORMAT_VERSION};
use weftlog_proto::log::encode_frame;
use weftlog_proto::{Dot, EventId, Hlc};

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
