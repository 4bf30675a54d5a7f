//! Identifiers: [`NodeId`], [`EventId`] and [`Dot`], and [`EventRef`], how
//! messages and errors name an event.
//!
//! Both ids are 32 bytes, compared and ordered as unsigned bytes from the
//! first to the last (big-endian), and shown as 64 lowercase hex digits.
//!
//! A node id is an ed25519 public key, and not every 32 bytes are a usable
//! one. [`NodeId::check_key`] is the one copy of the rule (`PROTOCOL.md` §3,
//! "Keys"): the bytes must be the canonical encoding of a curve point that is
//! not of small order. A small-order ("weak") key signs nothing of its own:
//! anyone can make a signature under it that a lenient verifier accepts, with
//! no secret key. Every place that reads a key from outside (an event's
//! author, an escrow transfer's recipient, a node id in text, a peer's
//! certificate) checks it with that function.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// A node (event author): the 32-byte ed25519 public key of the node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

/// An event's id: blake3 of the event's canonical encoding (see `PROTOCOL.md`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId(pub [u8; 32]);

/// One write by one author: `(author, seq)`. A register write is named by
/// the dot of the event that made it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Dot {
    /// The author of the event.
    pub author: NodeId,
    /// The event's sequence number in its author's chain.
    pub seq: u64,
}

/// Error from parsing a hex id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 64 hex digits, got {got:?}")]
pub struct ParseIdError {
    what: &'static str,
    got: String,
}

/// What is wrong with 32 bytes read as an ed25519 point (a key, or a
/// signature's R).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PointFault {
    /// No curve point has this encoding, even read leniently.
    NotOnCurve,
    /// A point, but not its canonical encoding: y is not below
    /// p = 2^255 - 19, or x = 0 with the sign bit set.
    NonCanonical,
    /// A point of small order (8P is the identity): one of the eight
    /// points of the torsion subgroup, the identity among them.
    SmallOrder,
}

impl PointFault {
    /// What is wrong, said of a point.
    fn of_point(self) -> &'static str {
        match self {
            PointFault::NotOnCurve => "is not the encoding of a curve point",
            PointFault::NonCanonical => NON_CANONICAL,
            PointFault::SmallOrder => "is a point of small order",
        }
    }

    /// What is wrong, said of a key.
    fn of_key(self) -> &'static str {
        match self {
            PointFault::NotOnCurve => "is not an ed25519 public key (not a curve point)",
            PointFault::NonCanonical => NON_CANONICAL,
            PointFault::SmallOrder => "is a weak (small-order) ed25519 key",
        }
    }
}

const NON_CANONICAL: &str =
    "is not a canonical point encoding (y is not below 2^255 - 19, or x = 0 with the sign bit set)";

impl fmt::Display for PointFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.of_point())
    }
}

/// The canonical encodings of the eight points of small order (8P is the
/// identity): the identity, the point of order 2, two of order 4 and four
/// of order 8. Every other point of small order encoding is non-canonical.
pub const SMALL_ORDER_POINTS: [[u8; 32]; 8] = [
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0000000000000000000000000000000000000000000000000000000000000080"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
];

/// 64 hex digits as 32 bytes, at compile time.
const fn hex32(s: &str) -> [u8; 32] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = digit(s[2 * i]) << 4 | digit(s[2 * i + 1]);
        i += 1;
    }
    out
}

/// Checks the encoding of a point without decoding it: canonical, and not
/// one of [`SMALL_ORDER_POINTS`]. Byte comparisons only, so cheap enough
/// for every event's author; [`check_point`] adds the decoding.
pub fn check_encoding(bytes: &[u8; 32]) -> Result<(), PointFault> {
    // y is the low 255 bits, little-endian; p = 2^255 - 19 is ed ff … ff 7f.
    let top_y = bytes[31] & 0x7f;
    let middle_ones = bytes[1..31].iter().all(|&b| b == 0xff);
    if top_y == 0x7f && middle_ones && bytes[0] >= 0xed {
        return Err(PointFault::NonCanonical);
    }
    // x = 0 exactly when y = 1 or y = p - 1 (x^2 = (y^2 - 1) / (d y^2 + 1)),
    // and then the sign bit must be 0.
    if bytes[31] & 0x80 != 0 {
        let y_is_one = bytes[0] == 1 && bytes[1..31].iter().all(|&b| b == 0) && top_y == 0;
        let y_is_minus_one = bytes[0] == 0xec && middle_ones && top_y == 0x7f;
        if y_is_one || y_is_minus_one {
            return Err(PointFault::NonCanonical);
        }
    }
    if SMALL_ORDER_POINTS.contains(bytes) {
        return Err(PointFault::SmallOrder);
    }
    Ok(())
}

/// Checks 32 bytes as an ed25519 point by the rule of `PROTOCOL.md` §3 for
/// keys and for a signature's R: the canonical encoding of a curve point not
/// of small order. Returns the point as a key.
pub fn check_point(bytes: &[u8; 32]) -> Result<VerifyingKey, PointFault> {
    check_encoding(bytes)?;
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| PointFault::NotOnCurve)?;
    debug_assert!(!key.is_weak(), "SMALL_ORDER_POINTS is incomplete");
    Ok(key)
}

/// Why a [`NodeId`] is not a usable ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node id {key} {}", .fault.of_key())]
#[non_exhaustive]
pub struct KeyError {
    /// The key refused.
    pub key: NodeId,
    /// What is wrong with it.
    pub fault: PointFault,
}

/// Error from parsing a node id from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseNodeIdError {
    /// Not 64 hex digits.
    #[error(transparent)]
    Hex(#[from] ParseIdError),
    /// 32 bytes, but not a usable key.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Lowercase hex of up to 32 bytes, written at once (ids are printed per
/// event in logs and feeds; the formatter's cost per byte shows there).
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 64];
    let n = bytes.len().min(32);
    for (i, b) in bytes[..n].iter().enumerate() {
        buf[2 * i] = DIGITS[usize::from(b >> 4)];
        buf[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    // Invariant: only ASCII hex digits were written.
    f.write_str(std::str::from_utf8(&buf[..2 * n]).expect("hex is ASCII"))
}

fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32], ParseIdError> {
    let err = || ParseIdError {
        what,
        got: s.chars().take(80).collect(),
    };
    let s = s.as_bytes();
    if s.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(err)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(err)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

macro_rules! hex_id {
    ($t:ident) => {
        impl $t {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The first 8 hex digits, for messages meant for people.
            pub fn short(&self) -> String {
                self.to_string()[..8].to_string()
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "("))?;
                write_hex(f, &self.0[..4])?;
                write!(f, "…)")
            }
        }
    };
}

hex_id!(NodeId);
hex_id!(EventId);

impl NodeId {
    /// The key, if these bytes are a usable ed25519 public key: the
    /// canonical encoding of a curve point not of small order (`PROTOCOL.md`
    /// §3, "Keys"). Every key read from outside is checked with this.
    pub fn check_key(&self) -> Result<VerifyingKey, KeyError> {
        check_point(&self.0).map_err(|fault| KeyError { key: *self, fault })
    }

    /// [`NodeId::check_key`] without decoding the point: the encoding is
    /// canonical and not of small order. What it leaves out (that the bytes
    /// are a curve point at all) fails [`crate::event::verify`] with the
    /// same error, so where a signature is verified anyway this suffices.
    pub fn check_encoding(&self) -> Result<(), KeyError> {
        check_encoding(&self.0).map_err(|fault| KeyError { key: *self, fault })
    }
}

/// 64 hex digits that are a usable key ([`NodeId::check_key`]).
impl FromStr for NodeId {
    type Err = ParseNodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = NodeId(parse_hex32(s.trim(), "a node id")?);
        id.check_key()?;
        Ok(id)
    }
}

impl FromStr for EventId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s.trim(), "an event id").map(EventId)
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.author.short(), self.seq)
    }
}

/// How messages and errors name an event: by id, with its author and seq,
/// shown as `event <id> (author <short> seq <n>)`. The log, imports and
/// sync sessions all name events this way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRef {
    /// Its id.
    pub id: EventId,
    /// Its author.
    pub author: NodeId,
    /// Its seq.
    pub seq: u64,
}

impl EventRef {
    /// The event `id` whose encoding is `bytes`, with the author and seq
    /// read from the start of the encoding (`PROTOCOL.md` §2: the version
    /// byte, the author, the seq) and the rest left unread: for bytes that
    /// are not decoded (a duplicate known by its id, or an event that does
    /// not decode). `None` when the start does not read as them.
    pub fn peek(id: EventId, bytes: &[u8]) -> Option<EventRef> {
        let (author, rest): (NodeId, _) = postcard::take_from_bytes(bytes.get(1..)?).ok()?;
        let (seq, _): (u64, _) = postcard::take_from_bytes(rest).ok()?;
        Some(EventRef { id, author, seq })
    }

    /// How messages name the event `id` whose bytes did not decode: as its
    /// [`EventRef`] when the start of the encoding reads as one
    /// ([`EventRef::peek`]), else by id alone.
    pub fn describe_bytes(id: EventId, bytes: &[u8]) -> String {
        match EventRef::peek(id, bytes) {
            Some(r) => r.to_string(),
            None => format!("event {id}"),
        }
    }
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event {} (author {} seq {})",
            self.id,
            self.author.short(),
            self.seq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = EventId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<EventId>().unwrap(), id);
        assert!("abc".parse::<EventId>().is_err());
        assert!("zz".repeat(32).parse::<NodeId>().is_err());
        let e = "x".parse::<NodeId>().unwrap_err().to_string();
        assert!(e.contains("node id"), "{e}");
    }

    fn id(hex: &str) -> NodeId {
        NodeId(hex32(hex))
    }

    #[test]
    fn an_honest_key_passes() {
        let key = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
        let k = id(key).check_key().unwrap();
        assert_eq!(k.to_bytes(), id(key).0);
        assert_eq!(key.parse::<NodeId>().unwrap(), id(key));
    }

    #[test]
    fn weak_keys_are_refused() {
        for bytes in SMALL_ORDER_POINTS {
            let hex = NodeId(bytes).to_string();
            // Each is a point of small order, as ed25519-dalek finds it; eight
            // distinct ones are the whole torsion subgroup.
            assert!(VerifyingKey::from_bytes(&bytes).unwrap().is_weak());
            let err = NodeId(bytes).check_key().unwrap_err();
            assert_eq!(err.fault, PointFault::SmallOrder, "{hex}");
            assert_eq!(
                err.to_string(),
                format!("node id {hex} is a weak (small-order) ed25519 key")
            );
            let e = hex.parse::<NodeId>().unwrap_err();
            assert_eq!(e, ParseNodeIdError::Key(err));
        }
        let distinct: std::collections::BTreeSet<_> = SMALL_ORDER_POINTS.into_iter().collect();
        assert_eq!(distinct.len(), 8);
    }

    /// The rule as ed25519-dalek states it: decodes, re-encodes to the same
    /// bytes, not weak.
    fn reference(bytes: &[u8; 32]) -> bool {
        VerifyingKey::from_bytes(bytes)
            .is_ok_and(|k| k.to_edwards().compress().as_bytes() == bytes && !k.is_weak())
    }

    #[test]
    fn the_byte_rule_equals_decoding_and_re_encoding() {
        let mut cases: Vec<[u8; 32]> = Vec::new();
        // Small y, y near p, and the small-order points, with either sign.
        for y in 0u8..=40 {
            let mut b = [0u8; 32];
            b[0] = y;
            cases.push(b);
        }
        let p = hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
        for k in 0u8..=18 {
            let mut above = p;
            above[0] += k;
            cases.push(above);
            let mut below = p;
            below[0] -= k + 1;
            cases.push(below);
        }
        cases.extend(SMALL_ORDER_POINTS);
        for b in cases.clone() {
            let mut signed = b;
            signed[31] ^= 0x80;
            cases.push(signed);
        }
        // Honest keys, and seeded noise.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..4000u32 {
            let mut b = [0u8; 32];
            for chunk in b.chunks_mut(8) {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
            }
            if i % 4 == 0 {
                b = crate::event::Keypair::from_secret(b).node_id().0;
            }
            cases.push(b);
        }
        let mut accepted = 0;
        for b in &cases {
            let ours = check_point(b);
            assert_eq!(ours.is_ok(), reference(b), "{}", NodeId(*b));
            accepted += usize::from(ours.is_ok());
        }
        assert!(accepted > 1000, "{accepted}");
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        for (hex, note) in [
            // y = p + 1: the identity.
            (
                "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
                "identity, y >= p",
            ),
            // y = p: a point of order 4.
            (
                "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
                "order 4, y >= p",
            ),
            // y = p + 3: a point of large order, which ed25519-dalek's
            // `verify_strict` alone would take as a key.
            (NON_CANONICAL_LARGE, "large order, y >= p"),
            // y = 1 with the sign bit: the identity with x = 0 "negative".
            (
                "0100000000000000000000000000000000000000000000000000000000000080",
                "identity, x = 0 signed",
            ),
        ] {
            let err = id(hex).check_key().unwrap_err();
            assert_eq!(err.fault, PointFault::NonCanonical, "{note}");
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("node id {hex} is not a canonical point encoding")));
        }
        // ed25519-dalek itself decodes y = p + 3 and finds it not weak.
        let lenient = VerifyingKey::from_bytes(&id(NON_CANONICAL_LARGE).0).unwrap();
        assert!(!lenient.is_weak());
    }

    const NON_CANONICAL_LARGE: &str =
        "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";

    #[test]
    fn non_points_are_refused() {
        // No point has y = 2.
        let hex = "0200000000000000000000000000000000000000000000000000000000000000";
        let err = id(hex).check_key().unwrap_err();
        assert_eq!(err.fault, PointFault::NotOnCurve);
        assert_eq!(
            err.to_string(),
            format!("node id {hex} is not an ed25519 public key (not a curve point)")
        );
        assert!(hex.parse::<NodeId>().is_err());
    }
}
