//! The wire format of sync: the messages two sessions exchange, how a
//! message is framed on a stream (a u32 LE length, then postcard), the wire
//! frames that carry events inside an Events message, and the digest a
//! Hello carries (`PROTOCOL.md` §9). Pure functions over bytes: the session
//! decides what to send, this decides how it looks.

use serde::{Deserialize, Serialize};

use super::error::SyncError;
use super::limits::{LENGTH_PREFIX_BYTES, MAX_MESSAGE_BYTES, WIRE_FRAME_OVERHEAD};
use crate::event::{Signature, MAX_EVENT_BYTES};
use crate::id::{EventId, NodeId};
use crate::log::{FrameError, SIG_BYTES};
use crate::rebalance::Ask;

/// The sync protocol version this build prefers (the highest it speaks).
/// Version 2 added live push along an epidemic broadcast tree (IHave,
/// Graft, Prune); version 3, forks: a frontier, IHave or Graft may name
/// several heads of one author (one per branch), and both branches of a
/// fork are exchanged; version 4, events of format 2 (seat policies,
/// overdraft sales, text changes).
pub const PROTOCOL_VERSION: u16 = 4;
/// The lowest sync protocol version this build speaks. Older peers are
/// refused at Hello: a version 2 peer refuses a frontier with two heads of
/// one author in the middle of a round, and drops a forked author's events;
/// a version 3 peer refuses events of format 2 as malformed.
pub const MIN_PROTOCOL_VERSION: u16 = 4;

/// A branch head: an author's highest seq on one of its chains (it has one
/// unless it forked) and that event's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Head {
    /// The author.
    pub author: NodeId,
    /// Its highest seq.
    pub seq: u64,
    /// The id of that event.
    pub id: EventId,
}

/// The first message of every round. Its layout is frozen for all versions,
/// so that peers of any version can agree on one (`PROTOCOL.md` §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The lowest protocol version the sender speaks.
    pub min_version: u16,
    /// The highest protocol version the sender speaks.
    pub max_version: u16,
    /// The cluster the sender belongs to.
    pub cluster: [u8; 32],
    /// The sender's node id.
    pub node: NodeId,
    /// [`frontier_digest`] of the sender's frontier.
    pub digest: [u8; 32],
}

/// A sync message. Postcard-encoded; the variant index is the first byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// 0: opens a round.
    Hello(Hello),
    /// 1: the sender's frontier, ascending by author, when digests differ.
    Frontier {
        /// At most [`MAX_FRONTIER_ENTRIES`](super::MAX_FRONTIER_ENTRIES) heads,
        /// strictly ascending by `(author, seq, id)`.
        heads: Vec<Head>,
    },
    /// 2: wire frames (`PROTOCOL.md` §9), concatenated.
    Events {
        /// The frames, each author's in seq order.
        #[serde(with = "serde_bytes")]
        frames: Vec<u8>,
    },
    /// 3: the sender has sent everything the receiver lacked as of the
    /// frontier exchange.
    Done,
    /// 4: the sender closes the session.
    Error {
        /// Why, for people; at most
        /// [`MAX_REASON_BYTES`](super::MAX_REASON_BYTES).
        reason: String,
    },
    /// 5: a lazy link's announcement: heads of events the sender stored
    /// since its last one, instead of the events.
    IHave {
        /// At most [`MAX_IHAVE_HEADS`](super::MAX_IHAVE_HEADS) heads, strictly
        /// ascending by `(author, seq, id)`.
        heads: Vec<Head>,
    },
    /// 6: makes the link eager at both ends; the receiver pushes what the
    /// sender lacks.
    Graft {
        /// The sender's heads for the authors it was told about, at most
        /// [`MAX_GRAFT_HEADS`](super::MAX_GRAFT_HEADS), strictly ascending by
        /// `(author, seq, id)`.
        heads: Vec<Head>,
    },
    /// 7: makes the link lazy at both ends: the sender received only
    /// events it already held.
    Prune,
    /// 8: the sender asks for escrow rights ([`crate::rebalance`]); the
    /// receiver may answer with a transfer event, which travels like any
    /// other. Checked by [`Ask::check`].
    Ask(Ask),
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Frontier { .. } => "Frontier",
            Message::Events { .. } => "Events",
            Message::Done => "Done",
            Message::Error { .. } => "Error",
            Message::IHave { .. } => "IHave",
            Message::Graft { .. } => "Graft",
            Message::Prune => "Prune",
            Message::Ask(_) => "Ask",
        }
    }
}

/// Appends `msg` to `out` as it goes on a stream: a u32 LE length, then the
/// postcard encoding.
///
/// # Panics
/// If the encoding exceeds [`MAX_MESSAGE_BYTES`]; the session never builds
/// such a message.
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
    // Writing to a Vec cannot fail and every field type is encodable.
    *out = postcard::to_extend(msg, std::mem::take(out)).expect("encode to Vec");
    let len = out.len() - start - LENGTH_PREFIX_BYTES;
    assert!(
        len <= MAX_MESSAGE_BYTES,
        "{} message of {len} bytes exceeds the limit",
        msg.name()
    );
    out[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
}

/// The body length a length prefix announces, checked against
/// [`MAX_MESSAGE_BYTES`]: call this before allocating for the body.
pub fn message_len(prefix: [u8; LENGTH_PREFIX_BYTES]) -> Result<usize, SyncError> {
    let len = u32::from_le_bytes(prefix);
    if len as usize > MAX_MESSAGE_BYTES {
        return Err(SyncError::TooLarge { len: len as u64 });
    }
    if len == 0 {
        return Err(SyncError::Malformed("empty message body".into()));
    }
    Ok(len as usize)
}

/// Decodes the message at the start of `buf`. `Ok(None)` when `buf` does
/// not yet hold all of it; otherwise the message and the bytes it used. The
/// length is checked before anything else is read.
pub fn decode_message(buf: &[u8]) -> Result<Option<(Message, usize)>, SyncError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = message_len(*prefix)?;
    let Some(body) = buf.get(LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + len) else {
        return Ok(None);
    };
    let (msg, rest): (Message, _) =
        postcard::take_from_bytes(body).map_err(|e| SyncError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SyncError::Malformed(format!(
            "{} bytes after the {} message",
            rest.len(),
            msg.name()
        )));
    }
    Ok(Some((msg, LENGTH_PREFIX_BYTES + len)))
}

/// The length of a wire frame around an `n`-byte event.
pub fn wire_frame_len(n: usize, signed: bool) -> usize {
    WIRE_FRAME_OVERHEAD + if signed { SIG_BYTES } else { 0 } + n
}

/// Appends a wire frame: `u32 LE n | u8 flags (1: signed) | [64 sig] |
/// [n] event`. Unlike a log frame it carries no id and no header check: the
/// receiver recomputes the id from the event, and the transport checks the
/// bytes.
pub fn encode_wire_frame(out: &mut Vec<u8>, event: &[u8], sig: Option<&Signature>) {
    out.extend_from_slice(&(event.len() as u32).to_le_bytes());
    out.push(sig.is_some() as u8);
    if let Some(sig) = sig {
        out.extend_from_slice(&sig.0);
    }
    out.extend_from_slice(event);
}

/// Decodes the wire frame at the start of `buf`: the event bytes, the
/// signature, and the frame's length. The length is checked against the
/// limit before anything else.
pub fn decode_wire_frame(buf: &[u8]) -> Result<(&[u8], Option<Signature>, usize), FrameError> {
    if buf.len() < WIRE_FRAME_OVERHEAD {
        return Err(FrameError::ShortHeader {
            have: buf.len(),
            need: WIRE_FRAME_OVERHEAD,
        });
    }
    let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if n == 0 || n as usize > MAX_EVENT_BYTES {
        return Err(FrameError::BadLength(n));
    }
    let flags = buf[4];
    if flags > 1 {
        return Err(FrameError::BadFlags(flags));
    }
    let len = wire_frame_len(n as usize, flags == 1);
    if buf.len() < len {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            need: len,
        });
    }
    let sig = (flags == 1).then(|| {
        let mut s = [0u8; SIG_BYTES];
        s.copy_from_slice(&buf[WIRE_FRAME_OVERHEAD..WIRE_FRAME_OVERHEAD + SIG_BYTES]);
        Signature(s)
    });
    Ok((&buf[len - n as usize..len], sig, len))
}

/// blake3 of the postcard encoding of `heads` (a `Vec<Head>`: count, then
/// each head). A frontier is digested strictly ascending by author; the
/// same bytes are the body of a Frontier message after its variant byte.
pub fn frontier_digest(heads: &[Head]) -> [u8; 32] {
    // Encoding plain data into a Vec cannot fail.
    let bytes = postcard::to_stdvec(heads).expect("encode frontier");
    *blake3::hash(&bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_limits() {
        let msgs = [
            Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                cluster: [3; 32],
                node: NodeId([4; 32]),
                digest: [5; 32],
            }),
            Message::Frontier {
                heads: vec![Head {
                    author: NodeId([1; 32]),
                    seq: 300,
                    id: EventId([2; 32]),
                }],
            },
            Message::Events {
                frames: vec![1, 2, 3],
            },
            Message::Done,
            Message::Error {
                reason: "bye".into(),
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            encode_message(m, &mut buf);
        }
        let mut off = 0;
        for m in &msgs {
            let (back, used) = decode_message(&buf[off..]).unwrap().unwrap();
            assert_eq!(&back, m);
            off += used;
        }
        assert_eq!(off, buf.len());
        // Incomplete: no error, no message.
        assert_eq!(decode_message(&buf[..3]), Ok(None));
        assert_eq!(decode_message(&buf[..6]), Ok(None));
        let big = (MAX_MESSAGE_BYTES as u32 + 1).to_le_bytes();
        assert!(matches!(message_len(big), Err(SyncError::TooLarge { .. })));
        assert!(matches!(
            decode_message(&[1, 0, 0, 0, 99]),
            Err(SyncError::Malformed(_))
        ));
    }
}
