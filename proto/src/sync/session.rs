//! Sync: the sans-IO protocol two replicas speak to give each other what the
//! other lacks, and the live push that carries new events along an epidemic
//! broadcast tree (`DESIGN.md` §5, `PROTOCOL.md` §9).
//!
//! A [`Session`] is one end of one peer connection. It does no IO and reads
//! no clock: the shell hands it the bytes of each message that arrives
//! ([`Session::handle_message`]), tells it about events stored by anyone
//! else ([`Session::handle_stored`]), when to run anti-entropy
//! ([`Session::start_round`]) and when an announced event is late
//! ([`Session::graft`]), and carries out what it returns: messages to send
//! ([`Session::poll_transmit`]) and events to act on
//! ([`Session::poll_event`]). The replica is behind the [`Store`] trait;
//! [`MemStore`] is the in-memory one for tests and the simulator.
//!
//! # A round
//!
//! Both ends start the same way, so neither has to be the initiator:
//!
//! 1. **Hello.** Each end sends its protocol versions, cluster id, node id
//!    and the digest of its frontier ([`frontier_digest`]). If the digests
//!    are equal the replicas hold the same events: both report
//!    [`SessionEvent::InSync`] after one round trip of two ~100-byte messages.
//! 2. **Frontier.** Otherwise each end sends the frontier its digest was
//!    taken from (author → head seq and id, ascending by author).
//! 3. **Events.** Each end then streams what the other lacks: for every
//!    author, the seqs above the peer's head up to its own, merged across
//!    authors in canonical order, ascending `(hlc, author, seq)`. The merge
//!    keeps one cursor per author in a heap keyed by the hlc of the cursor's
//!    next event, so memory is O(authors), and the events are fetched from
//!    the store only as [`Session::poll_transmit`] packs them into messages:
//!    the shell's flow control bounds what is in memory. Cost is linear in
//!    the difference: nothing is read or sent for events both ends hold.
//! 4. **Done** closes each end's stream. When both ends have sent and
//!    received it the round is over ([`SessionEvent::RoundDone`]).
//!
//! Rounds are anti-entropy: the shell's timer calls [`Session::start_round`]
//! with a random peer every few seconds, and a round repairs whatever live
//! push missed.
//!
//! # Live push: an epidemic broadcast tree
//!
//! After the first round the session is **live**: every event stored later
//! (made locally or received from another peer, [`Session::handle_stored`])
//! that the peer is not known to hold goes to the peer at once. What the
//! peer is known to hold is its last frontier, plus everything either end
//! sent or announced to the other since. Pushing every event over every
//! link would cost each node one copy per neighbour; instead the links
//! follow Plumtree ("Epidemic Broadcast Trees", Leitão, Pereira, Rodrigues,
//! SRDS 2007):
//!
//! - A link is **eager** or **lazy**, the same at both ends in the steady
//!   state ([`SessionConfig::eager`], [`Session::is_eager`]). An eager end
//!   pushes events; a lazy end queues the heads of what it stored and sends
//!   them as one IHave (per author the highest seq, ascending by author) the
//!   next time it is polled.
//! - **Prune.** A live push that brings only events this replica already
//!   holds means another link brings that peer's events first. After
//!   [`SessionConfig::prune_after`] such pushes in a row, the session turns
//!   lazy and sends Prune; the peer turns lazy too. Both ends report
//!   [`SessionEvent::Pruned`]. The events of a round's stream never prune.
//!   Every cycle of eager links makes such duplicates somewhere, so the
//!   eager links thin out to a spanning tree, over which each node receives
//!   each event once, whatever its source.
//! - **Graft.** An IHave for events the replica lacks (a head whose id it
//!   does not hold, a branch of a fork included) is reported as
//!   [`SessionEvent::Announced`]. The node's policy starts a timer; if the
//!   events have not come by another link when it fires, the tree is broken
//!   and the policy calls [`Session::graft`]: the session sends Graft (with
//!   its heads for the authors announced) and turns eager; the peer turns
//!   eager, pushes everything the session is not known to hold and reports
//!   [`SessionEvent::Grafted`]. Policies should stagger these timers, so
//!   that the nodes a broken link cut off do not all graft at once.
//! - **Duplicates are known by their id.** A received frame's id is blake3
//!   of its event bytes; if the store or the pool holds that id the frame is
//!   counted as a duplicate and skipped, neither decoded nor verified (only
//!   its author and seq are read, from the fixed start of the encoding). An
//!   event at an `(author, seq)` held with another id is not a duplicate: it
//!   is checked in full, proves a fork, and is stored (see "Forks").
//!
//! The session needs no timer of its own: the transport is reliable and
//! ordered, and the two timers that matter (anti-entropy rounds, grafts)
//! are the policy's, which calls [`Session::start_round`] and
//! [`Session::graft`].
//!
//! # What is checked before anything is stored
//!
//! Every received event passes, in order: the wire frame's length and flags
//! (the id is recomputed: blake3 of the bytes, and a held id ends the checks
//! there); [`Event::decode`] (canonical encoding, limits); the chain within
//! the stream (each event continues an open run of its author by `prev`, or
//! starts one: its `prev` is held, or no run of the author is open); the
//! author's signature. A signature covers the
//! whole run before it through `prev`, so unsigned events are held until a
//! signed later event of the same author verifies, and then the run is
//! released into the [`Pool`]. Pooled events are stored through
//! [`Store::insert`], which checks them against their causal past
//! ([`State::insert`]); they are stored in canonical order and only as whole
//! *segments* — each run of an author ending at a signed event — once every
//! event of the segment has its chain predecessor and deps. So after each
//! call, every author's head in the store carries a signature and can be
//! forwarded to other peers as it is. An event the store refuses fails the
//! session that received it, with an error naming it
//! ([`SyncError::InvalidEvent`]).
//!
//! # Events waiting for a dependency
//!
//! Over a tree, an event and its dependency may come over different links,
//! in either order. Authenticated events whose predecessor or deps are not
//! stored wait in a [`Pool`] that the store shares among its sessions
//! ([`Store::pool`]); whenever any session stores events it stores the
//! pooled ones whose past is then complete, whichever session received them
//! (a store without a shared pool gives each session a private one, which
//! the session retries on each message it handles, and which
//! [`Session::retry_waiting`] drains after other sessions stored events).
//! At the peer's Done an unsigned run still open is a failure, but events
//! still waiting for a dependency are not: the session reports what they
//! wait for ([`SessionEvent::Missing`]) and they stay pooled. What a session
//! holds unstored is bounded by [`SessionConfig::max_pending_events`] and
//! [`SessionConfig::max_pending_bytes`], the pool by its own limits
//! ([`MAX_POOL_EVENTS`], [`MAX_POOL_BYTES`]); passing either fails the
//! session whose event would pass it.
//!
//! # Forks
//!
//! Two events with the same `(author, seq)` are a fork (a data directory
//! restored from a copy, a cloned machine). Both branches are valid
//! history, and replicas exchange and keep both (the `state` module docs
//! say how the fold treats them), so that any two replicas holding the same
//! events show the same state, whatever order they learned the branches in.
//!
//! - A frontier, IHave or Graft may name several heads of one author, one
//!   per branch, strictly ascending by `(author, seq, id)` (version 3).
//! - The session learns that an author forked from the frontiers (two
//!   heads of one author, or a head at a seq the store holds with another
//!   id) or from a received signed run (an event at a seq held with
//!   another id). It reports [`SessionEvent::Equivocation`] once per
//!   author, and from then on sends that author's chains **by head**: for
//!   each branch head the store holds, the chain that ends there, from the
//!   first event the peer is not known to hold (the highest seq it shares
//!   with a head the peer holds, [`Store::common_seq`]). What the peer
//!   holds of a forked author is kept as heads ("tips"), not as a seq.
//! - When a branch is new to both ends, neither can tell where it diverges
//!   from the other's: the end that sees the peer's head at a seq it holds
//!   with another id sends its branch from the first seq, and the peer
//!   skips what it holds by id (a one-time cost, the length of the shared
//!   prefix, per pair that first meets the fork). The next round knows the
//!   heads and sends only the rest.
//! - Received events are stored by id: an event waits in the pool until
//!   its `prev` and deps are held, and is stored whichever branch it is on.
//!   A message may interleave two branches of one author; each unsigned run
//!   is matched to its branch by `prev`.
//!
//! # The store contract
//!
//! [`Store::frontier`] is what the session advertises and sends from. Its
//! heads must be causally closed and each must carry the author's signature
//! (a node advertises its durable, signed log, not a batch still being
//! written); [`Session::handle_stored`] must only be told about such heads.
//! Stores keep every signature they receive, so that runs stay short: an
//! author signs at least its last event of every batch, and the receiver's
//! buffer limits must exceed the longest unsigned run an author makes.
//!
//! # Decisions
//!
//! - Events travel in compact wire frames ([`encode_wire_frame`]): length,
//!   flags, the signature where the sender holds one, the event. No id (the
//!   receiver recomputes it) and no header check (the transport checks the
//!   bytes), so a frame adds 5 bytes to an event, plus 64 per signature.
//! - Peers are symmetric (both send Hello first), so there is no initiator
//!   and two ends starting a round at once simply answer each other.
//! - The digest is of the frontier alone, so equal digests mean equal event
//!   sets (replicas are causally closed); a peer cannot steer the exchange
//!   into many rounds: a round is always Hello, Frontier, stream, Done.
//! - No `now` and no timers: the transport is reliable and ordered, waits
//!   are bounded by counts and by the peer's Done, and anti-entropy and
//!   grafts are the policy's timers. Idle and handshake timeouts belong to
//!   the transport.
//! - Version 2 (IHave, Graft, Prune, and waiting across sessions) refuses
//!   version 1 peers at Hello ([`MIN_PROTOCOL_VERSION`]): a version 1 peer
//!   floods, and fails a round on an event whose dependency another link
//!   brings, so a mixed cluster would do both.
//! - One push of duplicates does not prune ([`PRUNE_AFTER_DUPLICATE_PUSHES`]):
//!   under load, events of two sources crossing a cycle at once would cut
//!   it twice, and the grafts that repair the split make new cycles.
//! - Announcements carry heads, not ids: per author the highest seq, which
//!   names every event below it. An IHave is as big as the authors that
//!   wrote since the last one, not as the events.
//! - Every queue has a limit: messages ([`MAX_MESSAGE_BYTES`]), frontiers
//!   ([`MAX_FRONTIER_ENTRIES`]), announcements ([`MAX_IHAVE_HEADS`],
//!   [`MAX_GRAFT_HEADS`]), events held unstored ([`MAX_PENDING_EVENTS`],
//!   [`MAX_PENDING_BYTES`] per session, [`MAX_POOL_EVENTS`],
//!   [`MAX_POOL_BYTES`] per store), the send side (one cursor per author;
//!   events fetched only as messages are packed), and what is tracked per
//!   peer (authors the store or the pool holds). Only the event queue for
//!   [`Session::poll_event`] relies on the shell draining it.
//!
//! # Order of calls
//!
//! After [`Session::new`], and after each [`Session::handle_message`],
//! [`Session::handle_stored`], [`Session::start_round`],
//! [`Session::graft`] or [`Session::retry_waiting`]: drain
//! [`Session::poll_event`], then call [`Session::poll_transmit`] until it
//! returns `None` (or until the transport pushes back; the session keeps
//! what it has not sent). Tell every session of the node, the reporting one
//! included, about the heads a [`SessionEvent::Received`] names. A failed
//! session has one last message to send (an Error to the peer), then
//! returns `None` for ever.
//!
//! # Example
//!
//! Two in-memory peers, each with an event the other lacks, shuttle messages
//! until neither has anything to send:
//!
//! ```
//! use weftlog_proto::state::Draft;
//! use weftlog_proto::sync::{MemStore, Session, SessionConfig, SessionEvent};
//! use weftlog_proto::{HlcClock, Keypair, Op};
//!
//! let rename = |name: &str| Draft {
//!     stream: "customer/20".into(),
//!     kind: "Renamed".into(),
//!     ops: vec![Op::Set {
//!         field: "name".into(),
//!         value: format!("{name:?}").into_bytes(),
//!         supersedes: vec![], // `prepare` fills it in
//!     }],
//!     ..Draft::default()
//! };
//! let (ka, kb) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
//! let (mut a, mut b) = (MemStore::new(), MemStore::new());
//! a.commit(&ka, &mut HlcClock::default(), 1_000, [rename("Ada")]).unwrap();
//! b.commit(&kb, &mut HlcClock::default(), 2_000, [rename("Ada King")]).unwrap();
//!
//! let cluster = [7; 32];
//! let mut sa = Session::new(SessionConfig::new(cluster, ka.node_id()), &a);
//! let mut sb = Session::new(SessionConfig::new(cluster, kb.node_id()), &b);
//! let mut quiet = false;
//! while !quiet {
//!     quiet = true;
//!     while let Some(msg) = sa.poll_transmit(&a) {
//!         sb.handle_message(&msg, &mut b).unwrap();
//!         quiet = false;
//!     }
//!     while let Some(msg) = sb.poll_transmit(&b) {
//!         sa.handle_message(&msg, &mut a).unwrap();
//!         quiet = false;
//!     }
//! }
//! assert!(std::iter::from_fn(|| sa.poll_event()).any(|e| e == SessionEvent::RoundDone));
//! assert_eq!(a.frontier_digest(), b.frontier_digest());
//! assert_eq!(a.state().state_hash(), b.state().state_hash());
//! // The two offline renames are kept side by side, as a conflict.
//! assert_eq!(a.state().conflicts().count(), 1);
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{
    verify, Event, EventError, Keypair, Signature, SignatureError, MAX_EVENT_BYTES,
};
use crate::exchange::{describe, describe_bytes};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{EventId, NodeId};
use crate::log::{FrameError, SIG_BYTES};
use crate::rebalance::Ask;
use crate::state::{Draft, Inserted, Invalid, PrepareError, Prepared, State};

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
/// Bytes of the length prefix in front of every message on a stream.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Fixed bytes of a wire frame besides the event and the signature.
pub const WIRE_FRAME_OVERHEAD: usize = 5;
/// Largest wire frame: a signed frame around the largest event.
pub const MAX_FRAME_BYTES: usize = WIRE_FRAME_OVERHEAD + SIG_BYTES + MAX_EVENT_BYTES;

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
/// Largest message body (after the length prefix). One Events message holds
/// at least one frame of any size, so this is 1 MiB plus room for the
/// largest frame's overhead and the message header.
pub const MAX_MESSAGE_BYTES: usize = MAX_EVENT_BYTES + 1024;
/// Default for [`SessionConfig::events_bytes_target`]: an Events message is
/// closed once its frames would exceed this many bytes.
pub const EVENTS_TARGET_BYTES: usize = 64 * 1024;
/// Most entries in a Frontier message (authors a cluster has ever had).
pub const MAX_FRONTIER_ENTRIES: usize = 8192;
/// Default for [`SessionConfig::max_pending_events`].
pub const MAX_PENDING_EVENTS: usize = 16_384;
/// Default for [`SessionConfig::max_pending_bytes`].
pub const MAX_PENDING_BYTES: usize = 32 * 1024 * 1024;
/// Longest reason in an Error message, in bytes; longer ones are cut.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most heads in an IHave message; a lazy link announces more in several.
pub const MAX_IHAVE_HEADS: usize = 1024;
/// Most heads in a Graft message (the grafting end's heads for the authors
/// it was told about; more are left out).
pub const MAX_GRAFT_HEADS: usize = 1024;
/// Default for [`Pool::new`]: most events waiting for a dependency in a
/// store's pool, over all its sessions.
pub const MAX_POOL_EVENTS: usize = 65_536;
/// Default for [`Pool::new`]: most bytes of such events.
pub const MAX_POOL_BYTES: usize = 64 * 1024 * 1024;
/// Default for [`SessionConfig::prune_after`]: two live pushes in a row
/// that carry only duplicates prune a link. One is too few under load: two
/// sources' events crossing a cycle of eager links at once cut it twice,
/// and the repair (grafts from every node cut off) makes new cycles.
pub const PRUNE_AFTER_DUPLICATE_PUSHES: u32 = 2;
/// Most ids in one [`SessionEvent::Missing`].
pub const MAX_MISSING_DEPS: usize = 256;
/// Most reports a pool keeps for sessions that have not collected them
/// (the oldest are dropped).
pub const MAX_POOL_MAIL: usize = 1024;
/// Most asks for escrow rights a session holds unsent ([`Session::ask`]).
pub const MAX_QUEUED_ASKS: usize = 64;

// An Events message (variant byte, length varint of at most 3 bytes, frames)
// with the largest frame fits, and so does the largest frontier.
const _: () = assert!(1 + 3 + MAX_FRAME_BYTES <= MAX_MESSAGE_BYTES);
const _: () = assert!(1 + 3 + MAX_FRONTIER_ENTRIES * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES <= u32::MAX as usize);
const _: () = assert!(1 + 3 + MAX_IHAVE_HEADS * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
const _: () = assert!(1 + 3 + MAX_GRAFT_HEADS * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);

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
        /// At most [`MAX_FRONTIER_ENTRIES`] heads, strictly ascending by
        /// `(author, seq, id)`.
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
        /// Why, for people; at most [`MAX_REASON_BYTES`].
        reason: String,
    },
    /// 5: a lazy link's announcement: heads of events the sender stored
    /// since its last one, instead of the events.
    IHave {
        /// At most [`MAX_IHAVE_HEADS`] heads, strictly ascending by
        /// `(author, seq, id)`.
        heads: Vec<Head>,
    },
    /// 6: makes the link eager at both ends; the receiver pushes what the
    /// sender lacks.
    Graft {
        /// The sender's heads for the authors it was told about, at most
        /// [`MAX_GRAFT_HEADS`], strictly ascending by `(author, seq, id)`.
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

/// blake3 of the postcard encoding of `heads` (a `Vec<Head>`: count, then
/// each head). A frontier is digested strictly ascending by author; the
/// same bytes are the body of a Frontier message after its variant byte.
pub fn frontier_digest(heads: &[Head]) -> [u8; 32] {
    // Encoding plain data into a Vec cannot fail.
    let bytes = postcard::to_stdvec(heads).expect("encode frontier");
    *blake3::hash(&bytes).as_bytes()
}

/// An event as a store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The canonical encoding.
    pub bytes: Vec<u8>,
    /// The id.
    pub id: EventId,
    /// The hlc.
    pub hlc: Hlc,
    /// The author's signature, if the store holds one for this event.
    pub sig: Option<Signature>,
}

/// What a session needs from a replica. See the module docs for the
/// contract on heads and signatures.
///
/// An author that forked has several chains. `event_id`, `hlc` and `fetch`
/// by `(author, seq)` follow one of them (the replica's choice, the same on
/// every call: [`State::event_id`]); `chain_id`, `common_seq` and
/// `fetch_id` reach the others.
pub trait Store {
    /// Every branch head, strictly ascending by `(author, seq, id)`: one per
    /// author, or one per branch of an author that forked. The events up to
    /// the heads are causally closed and each head carries a signature.
    fn frontier(&self) -> Vec<Head>;
    /// The id of an author's event by seq.
    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId>;
    /// The id of the event at `seq` in the chain that ends at `head`.
    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId>;
    /// The highest seq at which the chains ending at `a` and `b` hold the
    /// same event (0 if none, or if either is not held).
    fn common_seq(&self, a: &EventId, b: &EventId) -> u64;
    /// Whether the event is stored.
    fn contains(&self, id: &EventId) -> bool;
    /// The hlc of an author's event by seq (the merge's sort key; cheaper
    /// than [`Store::fetch`]).
    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc>;
    /// An author's event by seq.
    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored>;
    /// An event by id.
    fn fetch_id(&self, id: &EventId) -> Option<Stored>;
    /// Checks an authenticated event against the replica and stores it with
    /// its signature, as [`State::insert`] does: on error nothing changes.
    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid>;
    /// The pool of events waiting for a dependency that all sessions on
    /// this store share, so that an event can wait for one that arrives
    /// over another connection. `None` (the default): each session keeps a
    /// private pool, and an event whose dependency another session stored
    /// waits until [`Session::retry_waiting`] or the session's next message.
    /// A store returns the same pool on every call.
    fn pool(&mut self) -> Option<&mut Pool> {
        None
    }
}

/// Key of a pooled event: canonical order, then the id (two branches of a
/// fork may share everything else).
type PoolKey = (Hlc, NodeId, u64, EventId);

/// Authenticated events waiting for their chain predecessor or a
/// dependency, shared by the sessions of one store ([`Store::pool`]).
///
/// Over a tree of eager links an event and its dependency may arrive over
/// different connections, in either order. The one that arrives first
/// waits here, whichever session received it, and any session that stores
/// events stores the waiting ones whose past is then complete. Every event
/// here has passed the checks up to its author's signature, and remembers
/// the session that received it (its *origin*), so that limits, forks and
/// refusals are charged to that session.
///
/// A pool outlives its sessions: events a closed session left keep waiting
/// until their past arrives and count against the pool's limits;
/// [`Pool::clear`] drops them.
#[derive(Clone, Debug)]
pub struct Pool {
    max_events: usize,
    max_bytes: usize,
    entries: BTreeMap<PoolKey, Box<Pending>>,
    ids: BTreeMap<EventId, PoolKey>,
    bytes: usize,
    /// Per origin: the events and bytes it holds here.
    held: BTreeMap<u64, (usize, usize)>,
    next_origin: u64,
    /// What one session's drain found about another's events (a fork, a
    /// refusal), until that session collects it.
    mail: VecDeque<(u64, Mail)>,
}

/// A report for the origin of a pooled event.
#[derive(Clone, Debug)]
enum Mail {
    /// The store refused a pooled event.
    Refused(SyncError),
}

impl Pool {
    /// An empty pool with the default limits ([`MAX_POOL_EVENTS`],
    /// [`MAX_POOL_BYTES`]).
    pub fn new() -> Pool {
        Pool::with_limits(MAX_POOL_EVENTS, MAX_POOL_BYTES)
    }

    /// An empty pool that holds at most `max_events` events and
    /// `max_bytes` bytes of them; the session whose event would pass a
    /// limit fails ([`SyncError::PoolFull`]).
    pub fn with_limits(max_events: usize, max_bytes: usize) -> Pool {
        Pool {
            max_events,
            max_bytes,
            entries: BTreeMap::new(),
            ids: BTreeMap::new(),
            bytes: 0,
            held: BTreeMap::new(),
            next_origin: 0,
            mail: VecDeque::new(),
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the events waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the event waits here.
    pub fn contains(&self, id: &EventId) -> bool {
        self.ids.contains_key(id)
    }

    /// Drops every waiting event and every undelivered report.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.ids.clear();
        self.bytes = 0;
        self.held.clear();
        self.mail.clear();
    }

    /// A new origin tag for a session.
    fn join(&mut self) -> u64 {
        let o = self.next_origin;
        self.next_origin += 1;
        o
    }

    /// Events and bytes `origin` holds here.
    fn held(&self, origin: u64) -> (usize, usize) {
        self.held.get(&origin).copied().unwrap_or((0, 0))
    }

    /// Adds an authenticated run of one author, whose signed event is at
    /// seq `seg`, received by `origin`. Events already here are skipped
    /// (returned: the number skipped); the segments they belong to are
    /// merged with the run's into one, stored whole, labelled by the
    /// highest signed seq among them. Nothing is added if the run would
    /// pass a limit.
    fn add_run(
        &mut self,
        run: Vec<Pending>,
        seg: (u64, EventId),
        origin: u64,
    ) -> Result<u64, SyncError> {
        let Some(author) = run.first().map(|p| p.event.author) else {
            return Ok(0);
        };
        let bytes: usize = run.iter().map(|p| p.bytes.len()).sum();
        if self.entries.len() + run.len() > self.max_events || self.bytes + bytes > self.max_bytes {
            return Err(SyncError::PoolFull {
                max_events: self.max_events,
                max_bytes: self.max_bytes,
            });
        }
        let merged: BTreeSet<(u64, EventId)> = run
            .iter()
            .filter_map(|p| self.ids.get(&p.id))
            .filter_map(|k| self.entries.get(k).map(|e| e.seg))
            .collect();
        let label = merged.last().map_or(seg, |&m| m.max(seg));
        if !merged.is_empty() {
            for (k, e) in self.entries.iter_mut() {
                if k.1 == author && merged.contains(&e.seg) {
                    e.seg = label;
                }
            }
        }
        let mut skipped = 0;
        for mut p in run {
            if self.ids.contains_key(&p.id) {
                skipped += 1;
                continue;
            }
            p.seg = label;
            p.origin = origin;
            let key = (p.event.hlc, author, p.event.seq, p.id);
            self.bytes += p.bytes.len();
            let h = self.held.entry(origin).or_insert((0, 0));
            h.0 += 1;
            h.1 += p.bytes.len();
            self.ids.insert(p.id, key);
            self.entries.insert(key, Box::new(p));
        }
        Ok(skipped)
    }

    /// Takes an event out.
    fn take(&mut self, key: &PoolKey) -> Option<Box<Pending>> {
        let p = self.entries.remove(key)?;
        self.ids.remove(&p.id);
        self.bytes -= p.bytes.len();
        if let Some(h) = self.held.get_mut(&p.origin) {
            h.0 -= 1;
            h.1 -= p.bytes.len();
            if h.0 == 0 {
                self.held.remove(&p.origin);
            }
        }
        Some(p)
    }

    /// Drops `author`'s events that `origin` received.
    fn drop_author(&mut self, author: NodeId, origin: u64) {
        let keys: Vec<PoolKey> = self
            .entries
            .iter()
            .filter(|(k, p)| k.1 == author && p.origin == origin)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.take(&k);
        }
    }

    fn post(&mut self, origin: u64, mail: Mail) {
        if self.mail.len() >= MAX_POOL_MAIL {
            self.mail.pop_front();
        }
        self.mail.push_back((origin, mail));
    }

    /// Takes the reports for `origin`.
    fn collect_mail(&mut self, origin: u64) -> Vec<Mail> {
        if self.mail.iter().all(|(o, _)| *o != origin) {
            return Vec::new();
        }
        let (mine, rest) = std::mem::take(&mut self.mail)
            .into_iter()
            .partition(|(o, _)| *o == origin);
        self.mail = rest;
        mine.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
    }

    /// What `origin`'s waiting events wait for: the predecessors and deps
    /// that neither the store nor the pool holds, followed through the
    /// pooled events they wait on; ascending, at most [`MAX_MISSING_DEPS`].
    fn missing<S: Store + ?Sized>(&self, origin: u64, store: &S) -> Vec<EventId> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<&Pending> = self
            .entries
            .values()
            .filter(|p| p.origin == origin)
            .map(|p| &**p)
            .collect();
        let mut seen: BTreeSet<EventId> = stack.iter().map(|p| p.id).collect();
        while let Some(p) = stack.pop() {
            for d in p.event.prev.iter().chain(&p.event.deps) {
                if store.contains(d) {
                    continue;
                }
                match self.ids.get(d).and_then(|k| self.entries.get(k)) {
                    Some(q) => {
                        if seen.insert(*d) {
                            stack.push(q);
                        }
                    }
                    None => {
                        out.insert(*d);
                        if out.len() >= MAX_MISSING_DEPS {
                            return out.into_iter().collect();
                        }
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

/// An in-memory replica: a [`State`], every event's bytes and signature,
/// and a [`Pool`] its sessions share.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    state: State,
    events: BTreeMap<EventId, Stored>,
    pool: Pool,
}

impl MemStore {
    /// An empty replica.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// The folded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Events stored.
    pub fn len(&self) -> u64 {
        self.state.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// [`frontier_digest`] of the frontier.
    pub fn frontier_digest(&self) -> [u8; 32] {
        frontier_digest(&self.frontier())
    }

    /// An author's event by seq (on the chain [`State::event_id`] follows).
    pub fn get(&self, author: &NodeId, seq: u64) -> Option<&Stored> {
        self.events.get(&self.state.event_id(author, seq)?)
    }

    /// The events its sessions received that wait for a dependency.
    pub fn waiting(&self) -> &Pool {
        &self.pool
    }

    /// Makes an event of `key`'s author from `draft`, as a node does
    /// ([`State::prepare`], [`Event::seal`]), and stores it unsigned, as part
    /// of a batch that [`MemStore::sign`] ends. `None` when the draft's
    /// command id is already in the log.
    pub fn append(
        &mut self,
        key: &Keypair,
        clock: &mut HlcClock,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Option<EventId>, PrepareError> {
        let event = match self.state.prepare(key.node_id(), clock, now_ms, draft)? {
            Prepared::New(event) => event,
            Prepared::Existing(_) => return Ok(None),
        };
        let (bytes, id) = event.seal();
        self.insert(&event, id, &bytes, None)?;
        Ok(Some(id))
    }

    /// Ends a batch: signs `key`'s author's head (the one its local events
    /// extend). Returns its id, or `None` when the author has no event.
    pub fn sign(&mut self, key: &Keypair) -> Option<EventId> {
        let author = key.node_id();
        let id = self
            .state
            .event_id(&author, self.state.local_seq(&author))?;
        let stored = self.events.get_mut(&id)?;
        stored.sig = Some(key.sign(&stored.id));
        Some(stored.id)
    }

    /// Appends each draft and signs the last event made, as a node's group
    /// commit does. At the first draft refused, the events made before it
    /// stay (signed) and the error is returned.
    pub fn commit(
        &mut self,
        key: &Keypair,
        clock: &mut HlcClock,
        now_ms: u64,
        drafts: impl IntoIterator<Item = Draft>,
    ) -> Result<Vec<EventId>, PrepareError> {
        let mut made = Vec::new();
        let mut result = Ok(());
        for draft in drafts {
            match self.append(key, clock, now_ms, draft) {
                Ok(Some(id)) => made.push(id),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !made.is_empty() {
            self.sign(key);
        }
        result.map(|()| made)
    }
}

impl Store for MemStore {
    fn frontier(&self) -> Vec<Head> {
        self.state
            .frontier()
            .into_iter()
            .map(|(author, seq, id)| Head { author, seq, id })
            .collect()
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.state.event_id(author, seq)
    }

    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId> {
        self.state.chain_id(head, seq)
    }

    fn common_seq(&self, a: &EventId, b: &EventId) -> u64 {
        self.state.common_seq(a, b)
    }

    fn contains(&self, id: &EventId) -> bool {
        self.state.contains(id)
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.state.hlc_of(&self.state.event_id(author, seq)?)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored> {
        self.fetch_id(&self.state.event_id(author, seq)?)
    }

    fn fetch_id(&self, id: &EventId) -> Option<Stored> {
        self.events.get(id).cloned()
    }

    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid> {
        let r = self.state.insert(event, id)?;
        if r == Inserted::New {
            self.events.insert(
                id,
                Stored {
                    bytes: bytes.to_vec(),
                    id,
                    hlc: event.hlc,
                    sig,
                },
            );
        }
        Ok(r)
    }

    fn pool(&mut self) -> Option<&mut Pool> {
        Some(&mut self.pool)
    }
}

/// A session's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// The cluster id; a peer with another one is refused.
    pub cluster: [u8; 32],
    /// This node's id.
    pub node: NodeId,
    /// The peer's id if the transport authenticated it; a Hello naming
    /// another node is refused.
    pub peer: Option<NodeId>,
    /// An Events message is closed once its frames would exceed this many
    /// bytes (a single larger frame goes alone). Clamped to
    /// `1..=MAX_FRAME_BYTES`.
    pub events_bytes_target: usize,
    /// Most received events held at once while they wait for a signature or
    /// a dependency (in the session's runs and in the pool); more fails the
    /// session.
    pub max_pending_events: usize,
    /// Most bytes of such events.
    pub max_pending_bytes: usize,
    /// Whether the link starts eager (events are pushed) or lazy (only
    /// announced). Both ends should start alike; Prune and Graft change
    /// both.
    pub eager: bool,
    /// Live pushes in a row from the peer that carry only events this
    /// replica holds before the link is pruned (at least 1).
    pub prune_after: u32,
    /// Whether the session opens its first round at once (its Hello is the
    /// first message). When `false` it waits quietly until the peer's Hello
    /// or [`Session::start_round`]; until a round has exchanged frontiers it
    /// neither pushes nor announces. A node connecting to many peers at
    /// once uses this to catch up from one peer at a time, rather than
    /// receive the same missing events from every one of them.
    pub round_at_start: bool,
}

impl SessionConfig {
    /// Defaults for a node in `cluster` with id `node`.
    pub fn new(cluster: [u8; 32], node: NodeId) -> SessionConfig {
        SessionConfig {
            cluster,
            node,
            peer: None,
            events_bytes_target: EVENTS_TARGET_BYTES,
            max_pending_events: MAX_PENDING_EVENTS,
            max_pending_bytes: MAX_PENDING_BYTES,
            eager: true,
            prune_after: PRUNE_AFTER_DUPLICATE_PUSHES,
            round_at_start: true,
        }
    }
}

/// What a session reports to the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The Hello digests are equal: the round is over, nothing to exchange.
    InSync,
    /// Events were stored: from the peer, or from the pool, whichever
    /// session received them. `heads` holds, per author and branch, the
    /// highest event stored (always a signed event): tell every session,
    /// this one included ([`Session::handle_stored`]).
    Received {
        /// Events stored.
        count: u64,
        /// Ascending.
        heads: Vec<Head>,
    },
    /// The peer's Done arrived: everything it sent is stored.
    PeerDone,
    /// Both ends have sent and received Done: the round is over.
    RoundDone,
    /// A fork: two events with one `(author, seq)`. Both branches are
    /// exchanged and stored like any other events (the fold keeps both,
    /// `state` module docs); this only tells the shell, once per author and
    /// session.
    Equivocation(Equivocation),
    /// The peer (its end lazy) announced heads this replica lacks, or holds
    /// with another id at that seq (a fork: its branch must be fetched to
    /// prove it). Ascending by author. If the events have not arrived by
    /// another link when the policy's timer fires, call
    /// [`Session::graft`].
    Announced {
        /// The heads announced and not held.
        heads: Vec<Head>,
    },
    /// The peer grafted the link: it is eager at both ends, and what the
    /// peer is not known to hold is being pushed.
    Grafted,
    /// The link became lazy at both ends: this end received only events it
    /// already held by live push and sent Prune, or the peer sent one.
    Pruned,
    /// At the peer's Done, events this session received still wait for
    /// these (predecessors or deps that neither the store nor the pool
    /// holds; at most [`MAX_MISSING_DEPS`], ascending). The waiting events
    /// stay pooled: ask for these (a graft, a round with another peer).
    Missing {
        /// The ids waited for.
        deps: Vec<EventId>,
    },
    /// The peer asks for escrow rights (checked: [`Ask::check`]). Hand it
    /// to [`crate::replica::Replica::handle_ask`].
    Asked(Ask),
    /// The session failed; the last event it reports.
    Failed(SyncError),
}

/// Two ids for one `(author, seq)`: the proof of a fork.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Equivocation {
    /// The author that forked.
    pub author: NodeId,
    /// The seq held twice.
    pub seq: u64,
    /// The id this replica holds (or accepted first) at that seq.
    pub held: EventId,
    /// The other id, from the peer.
    pub other: EventId,
    /// `true` when `other` arrived in a run whose author signature verified
    /// (it covers `other` through `prev`); `false` when it is only named in
    /// the peer's frontier.
    pub proven: bool,
}

/// Traffic counters of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Messages handed out by `poll_transmit`.
    pub messages_sent: u64,
    /// Their bytes, length prefixes included.
    pub bytes_sent: u64,
    /// Messages handed in.
    pub messages_received: u64,
    /// Their bytes, length prefixes included.
    pub bytes_received: u64,
    /// Events sent.
    pub events_sent: u64,
    /// Events received (frames, duplicates included).
    pub events_received: u64,
    /// Events stored by this session's calls (received by it, or waiting
    /// in the pool).
    pub events_stored: u64,
    /// Received events the store (or the pool) already held.
    pub duplicates: u64,
    /// Heads announced to the peer (IHave).
    pub announcements_sent: u64,
    /// Heads the peer announced.
    pub announcements_received: u64,
    /// Graft messages sent.
    pub grafts_sent: u64,
    /// Graft messages received.
    pub grafts_received: u64,
    /// Prune messages sent.
    pub prunes_sent: u64,
    /// Prune messages received.
    pub prunes_received: u64,
    /// Asks for escrow rights sent.
    pub asks_sent: u64,
    /// Asks for escrow rights received.
    pub asks_received: u64,
}

/// How errors name an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRef {
    /// Its id.
    pub id: EventId,
    /// Its author.
    pub author: NodeId,
    /// Its seq.
    pub seq: u64,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.id, &self.author, self.seq))
    }
}

fn short_hex(b: &[u8; 32]) -> String {
    b[..4].iter().map(|x| format!("{x:02x}")).collect()
}

/// Why a session failed. Nothing the peer sends makes a session panic: every
/// problem with its bytes is one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A length prefix announces more than [`MAX_MESSAGE_BYTES`]; nothing
    /// was allocated for it.
    #[error("message of {len} bytes announced, the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge {
        /// The announced length.
        len: u64,
    },
    /// The bytes handed to [`Session::handle_message`] are not exactly one
    /// message.
    #[error("message framing: the length prefix announces {announced} bytes, but {got} follow it")]
    LengthMismatch {
        /// Body bytes the prefix announces.
        announced: usize,
        /// Body bytes present.
        got: usize,
    },
    /// The message body does not decode, or bytes are left after it.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The two ends share no protocol version.
    #[error("no common sync protocol version: this node speaks {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}")]
    VersionMismatch {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// The peer's lowest version.
        theirs_min: u16,
        /// The peer's highest version.
        theirs_max: u16,
    },
    /// A later Hello of the peer's does not agree on the version its first
    /// Hello agreed on (a peer's versions cannot change within a
    /// connection).
    #[error("the peer's Hello speaks {theirs_min}..={theirs_max}, which does not give the version {first} its first Hello agreed on for this connection")]
    VersionChanged {
        /// The version agreed at the first Hello.
        first: u16,
        /// The later Hello's lowest version.
        theirs_min: u16,
        /// The later Hello's highest version.
        theirs_max: u16,
    },
    /// The peer belongs to another cluster.
    #[error("the peer is in cluster {}…, this node in cluster {}…", short_hex(.theirs), short_hex(.ours))]
    WrongCluster {
        /// Our cluster id.
        ours: [u8; 32],
        /// The peer's.
        theirs: [u8; 32],
    },
    /// The Hello names another node than the transport authenticated (or
    /// than the session's first Hello).
    #[error("the peer says it is node {got}, but it is {expected}")]
    WrongPeer {
        /// The node the peer is.
        expected: NodeId,
        /// The node its Hello names.
        got: NodeId,
    },
    /// The Hello names this node itself.
    #[error("the peer claims this node's own id {0}")]
    OwnNodeId(NodeId),
    /// A message that the protocol does not allow at this point.
    #[error("unexpected {message} message while {phase}")]
    Unexpected {
        /// The message.
        message: &'static str,
        /// What the session was doing.
        phase: &'static str,
    },
    /// The peer's frontier has more than [`MAX_FRONTIER_ENTRIES`] entries.
    #[error("the peer's frontier has {entries} entries, the limit is {MAX_FRONTIER_ENTRIES}")]
    FrontierTooLarge {
        /// Its entries.
        entries: usize,
    },
    /// The peer's frontier breaks a rule.
    #[error("the peer's frontier is invalid: {0}")]
    FrontierInvalid(&'static str),
    /// The peer's frontier does not hash to the digest in its Hello.
    #[error("the peer's frontier does not match the digest in its Hello")]
    FrontierDigestMismatch,
    /// An Events message with no frames.
    #[error("an Events message carries no frames")]
    EmptyEvents,
    /// A frame's framing or checks failed.
    #[error("frame {index} at byte {offset} of an Events message: {source}")]
    Frame {
        /// The frame's index in the message.
        index: usize,
        /// Its byte offset in the frames.
        offset: usize,
        /// What is wrong.
        source: FrameError,
    },
    /// A frame's event is malformed (encoding, canonical form, limits).
    #[error("frame {index} of an Events message, {event}: {source}")]
    Event {
        /// The frame's index in the message.
        index: usize,
        /// The id the frame carries (checked against the bytes).
        id: EventId,
        /// The event as messages name it: the id, with the author and seq
        /// when the start of its bytes reads as them.
        event: String,
        /// What is wrong (boxed: errors stay small).
        source: Box<EventError>,
    },
    /// An event does not continue its author's run in the stream: a seq
    /// out of order, or a `prev` that is not the event before it.
    #[error("{event} does not continue its author's run, which ended at seq {after_seq}: {why}")]
    BrokenRun {
        /// The event.
        event: EventRef,
        /// The seq of the author's event before it in the stream.
        after_seq: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A signature does not verify.
    #[error("{event}: signature refused: {source}")]
    BadSignature {
        /// The event.
        event: EventRef,
        /// Why.
        source: SignatureError,
    },
    /// The peer's stream ended with a run that no signature covers.
    #[error(
        "the peer finished its stream, but no signature covers {first} through seq {last_seq}"
    )]
    Unsigned {
        /// The run's first event.
        first: EventRef,
        /// The seq of its last.
        last_seq: u64,
    },
    /// An IHave or Graft message carries more heads than its limit.
    #[error("the peer's {message} message has {entries} heads, the limit is {max}")]
    TooManyHeads {
        /// The message.
        message: &'static str,
        /// Its heads.
        entries: usize,
        /// The limit ([`MAX_IHAVE_HEADS`], [`MAX_GRAFT_HEADS`]).
        max: usize,
    },
    /// An IHave or Graft message's heads break a rule.
    #[error("the peer's {message} message is invalid: {why}")]
    InvalidHeads {
        /// The message.
        message: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The store refused an authenticated event; it and nothing after it in
    /// its message was stored.
    #[error("{event} is invalid: {source}")]
    InvalidEvent {
        /// The event.
        event: EventRef,
        /// Why the store refused it (boxed: errors stay small).
        source: Box<Invalid>,
    },
    /// More received events wait for a signature or a dependency than the
    /// limits allow.
    #[error("more than {max_events} events or {max_bytes} bytes from the peer wait for a signature or a dependency")]
    PendingLimit {
        /// [`SessionConfig::max_pending_events`].
        max_events: usize,
        /// [`SessionConfig::max_pending_bytes`].
        max_bytes: usize,
    },
    /// The store's pool of events waiting for a dependency, shared by all
    /// its sessions, is full; the session whose events would pass the
    /// limit fails.
    #[error("the pool of events waiting for a dependency is full ({max_events} events or {max_bytes} bytes)")]
    PoolFull {
        /// The pool's limit on events.
        max_events: usize,
        /// Its limit on bytes.
        max_bytes: usize,
    },
    /// The peer closed the session with an Error message.
    #[error("the peer closed the session: {reason}")]
    Peer {
        /// Its reason (at most [`MAX_REASON_BYTES`]).
        reason: String,
    },
    /// The local store lacks an event it advertised (a [`Store`] bug).
    #[error("the local store lacks seq {seq} of author {author}, which it advertised")]
    LocalMissing {
        /// The author.
        author: NodeId,
        /// The seq.
        seq: u64,
    },
    /// The local store advertised a head without a signature (a [`Store`]
    /// bug, or `handle_stored` called before the batch was signed).
    #[error("the local store's head seq {seq} of author {author} carries no signature")]
    LocalUnsigned {
        /// The author.
        author: NodeId,
        /// The seq.
        seq: u64,
    },
    /// The local frontier has more than [`MAX_FRONTIER_ENTRIES`] authors.
    #[error("this node's frontier has {entries} authors, more than a Frontier message carries ({MAX_FRONTIER_ENTRIES})")]
    LocalFrontierTooLarge {
        /// Its entries.
        entries: usize,
    },
    /// [`Session::handle_message`] was called after the session closed.
    #[error("the session is closed")]
    Closed,
}

/// Where a session is in its round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Our Hello is queued or sent; waiting for the peer's.
    AwaitHello,
    /// Digests differ; our Frontier is queued or sent; waiting for the peer's.
    AwaitFrontier,
    /// Streaming what the peer lacks; waiting for the peer's Done.
    Streaming,
    /// Between rounds: pushing new events.
    Live,
    /// Failed; nothing more.
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for the peer's Hello",
            Phase::AwaitFrontier => "waiting for the peer's Frontier",
            Phase::Streaming => "streaming",
            Phase::Live => "between rounds",
            Phase::Closed => "closed",
        }
    }
}

/// One chain's events to send: seqs `next..=end`. At least one heap entry
/// per cursor, keyed by the hlc of `next`; entries whose seq is not the
/// cursor's `next` are stale and skipped.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    next: u64,
    end: u64,
    /// `None`: the author's chain as [`Store::event_id`] follows it, skipped
    /// as far as the peer is known to hold it. `Some`: the chain that ends
    /// at this event, a branch of an author that forked, sent in full.
    head: Option<EventId>,
}

/// A cursor's key: the author, and for a branch the head it was made for.
type CursorKey = (NodeId, Option<EventId>);

/// A received event not yet stored.
#[derive(Clone, Debug)]
struct Pending {
    event: Event,
    id: EventId,
    bytes: Vec<u8>,
    sig: Option<Signature>,
    /// The seq and id of the signed event that ends its segment (set on
    /// release).
    seg: (u64, EventId),
    /// The pool tag of the session that received it (set on release).
    origin: u64,
}

impl Pending {
    fn eref(&self) -> EventRef {
        EventRef {
            id: self.id,
            author: self.event.author,
            seq: self.event.seq,
        }
    }
}

/// What the drain decided about one released event.
enum Verdict {
    Store,
    Duplicate,
    Wait,
}

/// Heap key: `(hlc of next, author, next, branch)`, smallest first.
type HeapEntry = Reverse<(Hlc, NodeId, u64, Option<EventId>)>;

/// One end of a sync connection. See the module docs for the protocol and
/// the order of calls.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    /// The peer's node id and the negotiated version, from its first Hello.
    peer: Option<(NodeId, u16)>,
    /// The frontier our current Hello's digest was taken from.
    snapshot: Vec<Head>,
    snapshot_digest: [u8; 32],
    /// The digest in the peer's Hello of this round.
    peer_digest: [u8; 32],
    /// Hello, Frontier, Graft, Prune: sent before any IHave or Events.
    control: VecDeque<Message>,
    /// What to send after a failure: the Error message, preceded by our
    /// unsent Hello when the peer's versions were refused (so that it can
    /// name both ranges itself, `PROTOCOL.md` §9.2).
    goodbye: VecDeque<Vec<u8>>,
    /// Set once the peer's frontier is known (equal digests or Frontier):
    /// from then on both ends push and accept Events, IHave, Graft, Prune.
    known: bool,
    /// Per author, the highest seq the peer is known to hold, on the chain
    /// [`Store::event_id`] follows.
    peer_has: BTreeMap<NodeId, u64>,
    /// Per author that forked: heads held here that the peer is known to
    /// hold (with everything before them on their chains), none on
    /// another's chain.
    tips: BTreeMap<NodeId, Vec<Head>>,
    cursors: BTreeMap<CursorKey, Cursor>,
    heap: BinaryHeap<HeapEntry>,
    sent_done: bool,
    got_done: bool,
    /// Per author, received events no signature covers yet: chains (more
    /// than one only while a forked author's branches cross).
    runs: BTreeMap<NodeId, Vec<Vec<Pending>>>,
    /// The ids of every event in `runs`: "is it in an open run?" without
    /// a scan (a hostile peer may hold up to the pending limit open).
    run_ids: BTreeSet<EventId>,
    /// Events and bytes in `runs`.
    run_events: usize,
    run_bytes: usize,
    /// Events and bytes this session put in the pool that still wait, as
    /// of the last call that was handed the store.
    pooled: (usize, usize),
    /// This session's tag in the pool it uses; set on the first call that
    /// is handed the store.
    origin: Option<u64>,
    /// The pool, when the store keeps none to share.
    own_pool: Pool,
    /// Whether this end of the link pushes events (eager) or announces
    /// their heads (lazy).
    eager: bool,
    /// Lazy: per author, the highest seq stored and not yet announced.
    announce: BTreeMap<NodeId, u64>,
    /// Lazy: heads of forked authors' branches stored and not yet announced.
    announce_branches: BTreeSet<Head>,
    /// Per author, the highest seq [`Session::handle_stored`] offered. A
    /// live push carries only what was stored since: what the peer is not
    /// known to hold from before was offered already (pushed, or announced
    /// while the link was lazy), and re-sending it on the strength of a
    /// stale view of the peer is what made duplicates; a gap is the graft's
    /// and the round's to fill, which ask with the peer's own heads.
    offered: BTreeMap<NodeId, u64>,
    /// Per author, the highest seq announced to the peer.
    announced: BTreeMap<NodeId, u64>,
    /// Authors the peer announced that this replica lacked, for the heads
    /// of the next Graft; at most [`MAX_GRAFT_HEADS`].
    wanted: BTreeSet<NodeId>,
    /// A Prune went out and no Graft since: a lazy end does not answer
    /// each late push with another Prune.
    prune_sent: bool,
    /// Live pushes in a row from the peer that carried only duplicates.
    dup_streak: u32,
    /// Authors seen to fork in this session (reported once each): their
    /// branches are sent by head ([`Session::tips`]).
    forked: BTreeSet<NodeId>,
    /// Authors whose fork this session reported.
    reported: BTreeSet<NodeId>,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
}

impl Session {
    /// A session on a new connection. Its first round starts at once: the
    /// Hello is the first message [`Session::poll_transmit`] returns.
    pub fn new<S: Store + ?Sized>(config: SessionConfig, store: &S) -> Session {
        let eager = config.eager;
        let mut s = Session {
            config,
            phase: Phase::Live,
            peer: None,
            snapshot: Vec::new(),
            snapshot_digest: [0; 32],
            peer_digest: [0; 32],
            control: VecDeque::new(),
            goodbye: VecDeque::new(),
            known: false,
            peer_has: BTreeMap::new(),
            tips: BTreeMap::new(),
            cursors: BTreeMap::new(),
            heap: BinaryHeap::new(),
            sent_done: false,
            got_done: false,
            runs: BTreeMap::new(),
            run_ids: BTreeSet::new(),
            run_events: 0,
            run_bytes: 0,
            pooled: (0, 0),
            origin: None,
            own_pool: Pool::new(),
            eager,
            announce: BTreeMap::new(),
            announce_branches: BTreeSet::new(),
            offered: BTreeMap::new(),
            announced: BTreeMap::new(),
            wanted: BTreeSet::new(),
            prune_sent: false,
            dup_streak: 0,
            forked: BTreeSet::new(),
            reported: BTreeSet::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        if s.config.round_at_start {
            s.open_round(store);
        }
        s
    }

    /// The peer's node id, once its Hello arrived.
    pub fn peer(&self) -> Option<NodeId> {
        self.peer.map(|(n, _)| n)
    }

    /// The negotiated protocol version, once the peer's Hello arrived.
    pub fn version(&self) -> Option<u16> {
        self.peer.map(|(_, v)| v)
    }

    /// Whether the session failed (it has at most its Error left to send).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether a round is in progress (a new one cannot start).
    pub fn in_round(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitHello | Phase::AwaitFrontier | Phase::Streaming
        )
    }

    /// Received events held while they wait for a signature or a
    /// dependency: this session's unsigned runs, and the events it put in
    /// the pool that still wait (as of the last call handed the store).
    pub fn pending_events(&self) -> usize {
        self.run_events + self.pooled.0
    }

    /// Per author, the highest seq the peer is known to hold: its last
    /// frontier plus everything either end sent or announced to the other
    /// since. Empty until the first round has exchanged frontiers.
    pub fn peer_heads(&self) -> &BTreeMap<NodeId, u64> {
        &self.peer_has
    }

    /// Traffic counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Whether this end of the link is eager: events stored later are
    /// pushed to the peer at once. A lazy end announces their heads
    /// instead (IHave).
    pub fn is_eager(&self) -> bool {
        self.eager
    }

    /// Sets this end's mode without telling the peer: the policy's choice
    /// for a link (a Graft or a Prune changes both ends). Announcements
    /// already queued are still sent.
    pub fn set_eager(&mut self, eager: bool) {
        self.eager = eager;
        self.prune_sent = false;
        self.dup_streak = 0;
    }

    /// Asks the peer for what it announced, when it has not arrived by
    /// another link (the policy's timer after [`SessionEvent::Announced`]):
    /// queues a Graft with this replica's heads for the authors announced
    /// and makes this end eager; the peer's end turns eager too and pushes
    /// what this replica lacks. Returns `false` (and does nothing) before
    /// the peer's frontier is known or after a failure.
    pub fn graft<S: Store + ?Sized>(&mut self, store: &S) -> bool {
        if self.phase == Phase::Closed || !self.known {
            return false;
        }
        let wanted = std::mem::take(&mut self.wanted);
        let heads: Vec<Head> = if wanted.is_empty() {
            Vec::new()
        } else {
            store
                .frontier()
                .into_iter()
                .filter(|h| wanted.contains(&h.author))
                .take(MAX_GRAFT_HEADS)
                .collect()
        };
        self.control.push_back(Message::Graft { heads });
        self.eager = true;
        self.prune_sent = false;
        self.dup_streak = 0;
        self.stats.grafts_sent += 1;
        true
    }

    /// Queues an ask for escrow rights to the peer ([`crate::rebalance`]).
    /// Returns `false`, queuing nothing, until the peer's frontier is
    /// known (the peer would refuse it), on a closed session, when
    /// [`MAX_QUEUED_ASKS`] asks already wait to be sent, or for an ask
    /// that [`Ask::check`] refuses.
    pub fn ask(&mut self, ask: Ask) -> bool {
        if self.phase == Phase::Closed || !self.known || ask.check().is_err() {
            return false;
        }
        let queued = self
            .control
            .iter()
            .filter(|m| matches!(m, Message::Ask(_)))
            .count();
        if queued >= MAX_QUEUED_ASKS {
            return false;
        }
        self.stats.asks_sent += 1;
        self.control.push_back(Message::Ask(ask));
        true
    }

    /// Starts an anti-entropy round: queues a Hello with the store's current
    /// frontier. Returns `false` (and does nothing) while a round is in
    /// progress or after a failure.
    pub fn start_round<S: Store + ?Sized>(&mut self, store: &S) -> bool {
        if self.phase != Phase::Live {
            return false;
        }
        self.open_round(store);
        true
    }

    /// Tells the session that the event `head` was stored, made locally or
    /// received from any peer; it must be signed (the end of a batch). If
    /// the peer is not known to hold it, an eager end queues it and the
    /// author's events before it that the peer lacks to send; a lazy end
    /// queues it for the next IHave.
    pub fn handle_stored<S: Store + ?Sized>(&mut self, head: Head, store: &S) {
        if self.phase == Phase::Closed || !self.known {
            return;
        }
        let Head { author, seq, .. } = head;
        if self.on_branch(store, &head) {
            if self.peer_holds(store, &head) {
                return;
            }
            if !self.eager {
                self.announce_branches.insert(head);
                return;
            }
            if let Err(e) = self.add_branch(store, head) {
                self.fail(e);
            }
            return;
        }
        let has = self.peer_has.get(&author).copied().unwrap_or(0);
        let offered = self.offered.get(&author).copied().unwrap_or(0);
        raise(&mut self.offered, author, seq);
        if seq <= has {
            return;
        }
        if !self.eager {
            raise(&mut self.announce, author, seq);
            return;
        }
        // A cursor that already runs for the author is extended.
        if let Err(e) = self.add_cursor(store, author, has.max(offered) + 1, seq) {
            self.fail(e);
        }
    }

    /// Whether `head` is sent by head (a branch of an author that forked):
    /// its author is known to fork in this session, or `head` is not on
    /// the chain `event_id` follows (the author forked in the store).
    fn on_branch<S: Store + ?Sized>(&mut self, store: &S, head: &Head) -> bool {
        if self.forked.contains(&head.author) {
            return true;
        }
        if store.event_id(&head.author, head.seq) != Some(head.id) {
            self.peer_has.remove(&head.author);
            self.forked.insert(head.author);
            return true;
        }
        false
    }

    /// The highest seq of the chain ending at `head` that the peer is
    /// known to hold: its tips of the author, and the chain `event_id`
    /// follows as far as `peer_has` says.
    fn held_on<S: Store + ?Sized>(&self, store: &S, head: &Head) -> u64 {
        let mut have = 0;
        for t in self.tips.get(&head.author).into_iter().flatten() {
            have = have.max(store.common_seq(&head.id, &t.id));
        }
        let along = self
            .peer_has
            .get(&head.author)
            .copied()
            .unwrap_or(0)
            .min(head.seq);
        if along > have && store.chain_id(&head.id, along) == store.event_id(&head.author, along) {
            have = along;
        }
        have
    }

    /// Whether the peer is known to hold `head`.
    fn peer_holds<S: Store + ?Sized>(&self, store: &S, head: &Head) -> bool {
        self.held_on(store, head) >= head.seq
    }

    /// Records that the peer holds `head` (and its chain), which this
    /// replica holds too.
    fn note_held<S: Store + ?Sized>(&mut self, store: &S, head: Head) {
        if !self.forked.contains(&head.author)
            && store.event_id(&head.author, head.seq) == Some(head.id)
        {
            raise(&mut self.peer_has, head.author, head.seq);
            return;
        }
        if self.peer_holds(store, &head) {
            return;
        }
        let tips = self.tips.entry(head.author).or_default();
        // Tips the new one implies go; there are as many as branches.
        tips.retain(|t| store.common_seq(&t.id, &head.id) < t.seq);
        tips.push(head);
    }

    /// Queues the chain ending at `head` from the first event the peer is
    /// not known to hold, or extends a branch cursor this chain continues.
    fn add_branch<S: Store + ?Sized>(&mut self, store: &S, head: Head) -> Result<(), SyncError> {
        let from = self.held_on(store, &head) + 1;
        if from > head.seq {
            return Ok(());
        }
        for (key, c) in self.cursors.iter_mut() {
            if key.0 != head.author {
                continue;
            }
            let Some(h) = c.head else { continue };
            if c.end <= head.seq && store.chain_id(&head.id, c.end) == Some(h) {
                c.head = Some(head.id);
                c.end = head.seq;
                return Ok(());
            }
            if c.end >= head.seq && store.chain_id(&h, head.seq) == Some(head.id) {
                return Ok(()); // already on its way
            }
        }
        let hlc = branch_hlc(store, &head.id, from).ok_or(SyncError::LocalMissing {
            author: head.author,
            seq: from,
        })?;
        self.cursors.insert(
            (head.author, Some(head.id)),
            Cursor {
                next: from,
                end: head.seq,
                head: Some(head.id),
            },
        );
        self.heap
            .push(Reverse((hlc, head.author, from, Some(head.id))));
        Ok(())
    }

    /// Stores the events waiting in the pool whose past is now complete.
    /// With a pool the store shares ([`Store::pool`]) every session that
    /// stores events does this for all; with none, call it after another
    /// session stored events, or the waiting ones wait for this session's
    /// next message. What is stored is reported as
    /// [`SessionEvent::Received`].
    pub fn retry_waiting<S: Store + ?Sized>(&mut self, store: &mut S) {
        if self.phase == Phase::Closed {
            return;
        }
        let r = self.with_pool(store, |s, store, pool, _| {
            s.drain(store, pool)?;
            s.read_mail(pool)
        });
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Handles one message from the peer: exactly the bytes its
    /// `poll_transmit` returned (length prefix included). On error the
    /// session is closed, an Error for the peer is queued, and the error is
    /// both returned and reported as [`SessionEvent::Failed`].
    pub fn handle_message<S: Store + ?Sized>(
        &mut self,
        bytes: &[u8],
        store: &mut S,
    ) -> Result<(), SyncError> {
        if self.phase == Phase::Closed {
            return Err(SyncError::Closed);
        }
        self.stats.messages_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let r = self.with_pool(store, |s, store, pool, shared| {
            if !shared && !pool.is_empty() {
                // Other sessions may have stored what these wait for (a
                // shared pool is drained by whoever stores).
                s.drain(store, pool)?;
            }
            s.handle_inner(bytes, store, pool)?;
            s.read_mail(pool)
        });
        if let Err(e) = &r {
            self.fail(e.clone());
        }
        r
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The next message to send (length prefix included), or `None` when
    /// there is nothing to send until the next input. Events are fetched
    /// from the store only here, one message at a time.
    pub fn poll_transmit<S: Store + ?Sized>(&mut self, store: &S) -> Option<Vec<u8>> {
        if self.phase == Phase::Closed {
            return self.goodbye.pop_front();
        }
        if let Some(msg) = self.control.pop_front() {
            return Some(self.encode(&msg));
        }
        if let Some(heads) = self.next_ihave(store) {
            self.stats.announcements_sent += heads.len() as u64;
            return Some(self.encode(&Message::IHave { heads }));
        }
        match self.next_events(store) {
            Err(e) => {
                self.fail(e);
                return self.goodbye.pop_front();
            }
            Ok(Some(frames)) => return Some(self.encode(&Message::Events { frames })),
            Ok(None) => {}
        }
        if self.phase == Phase::Streaming && !self.sent_done {
            self.sent_done = true;
            let msg = self.encode(&Message::Done);
            self.maybe_round_done();
            return Some(msg);
        }
        None
    }

    fn encode(&mut self, msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(msg, &mut out);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += out.len() as u64;
        out
    }

    /// Runs `f` with the pool: the store's shared one, taken out of the
    /// store for the call (so that `f` can hold the store too) and put
    /// back, or the session's own. `f` is told which.
    fn with_pool<S: Store + ?Sized, R>(
        &mut self,
        store: &mut S,
        f: impl FnOnce(&mut Session, &mut S, &mut Pool, bool) -> R,
    ) -> R {
        let shared = store.pool().map(std::mem::take);
        let is_shared = shared.is_some();
        let mut pool = shared.unwrap_or_else(|| std::mem::take(&mut self.own_pool));
        let origin = *self.origin.get_or_insert_with(|| pool.join());
        let r = f(self, store, &mut pool, is_shared);
        self.pooled = pool.held(origin);
        match store.pool() {
            Some(slot) if is_shared => *slot = pool,
            _ => self.own_pool = pool,
        }
        r
    }

    /// This session's pool tag (set by `with_pool` before any use).
    fn me(&self) -> u64 {
        debug_assert!(self.origin.is_some(), "pool tag used outside with_pool");
        self.origin.unwrap_or(u64::MAX)
    }

    /// Acts on what other sessions' drains found about this session's
    /// pooled events.
    fn read_mail(&mut self, pool: &mut Pool) -> Result<(), SyncError> {
        // The first refusal ends the session.
        match pool.collect_mail(self.me()).into_iter().next() {
            Some(Mail::Refused(err)) => Err(err),
            None => Ok(()),
        }
    }

    /// The heads of the next IHave, if a lazy end has any to announce:
    /// queued heads the peer is not known to hold, ascending.
    fn next_ihave<S: Store + ?Sized>(&mut self, store: &S) -> Option<Vec<Head>> {
        let mut heads = Vec::new();
        while heads.len() < MAX_IHAVE_HEADS {
            let Some((author, seq)) = self.announce.pop_first() else {
                break;
            };
            let has = self.peer_has.get(&author).copied().unwrap_or(0);
            let told = self.announced.get(&author).copied().unwrap_or(0);
            if seq <= has.max(told) {
                continue;
            }
            if let Some(id) = store.event_id(&author, seq) {
                heads.push(Head { author, seq, id });
                raise(&mut self.announced, author, seq);
            }
        }
        while heads.len() < MAX_IHAVE_HEADS {
            let Some(h) = self.announce_branches.pop_first() else {
                break;
            };
            if !self.peer_holds(store, &h) {
                heads.push(h);
            }
        }
        heads.sort_unstable();
        heads.dedup();
        (!heads.is_empty()).then_some(heads)
    }

    /// Takes a snapshot of the frontier and queues a Hello for it.
    fn open_round<S: Store + ?Sized>(&mut self, store: &S) {
        self.snapshot = store.frontier();
        self.snapshot_digest = frontier_digest(&self.snapshot);
        self.control.push_back(Message::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            cluster: self.config.cluster,
            node: self.config.node,
            digest: self.snapshot_digest,
        }));
        self.phase = Phase::AwaitHello;
    }

    fn fail(&mut self, err: SyncError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        if matches!(err, SyncError::VersionMismatch { .. }) {
            // A quiet end answers a Hello with its own: the peer refused
            // for its versions still gets it, and refuses in turn, naming
            // both ranges from its side.
            if let Some(hello) = self.control.iter().find(|m| matches!(m, Message::Hello(_))) {
                let hello = hello.clone();
                let out = self.encode(&hello);
                self.goodbye.push_back(out);
            }
        }
        if !matches!(err, SyncError::Peer { .. }) {
            let reason = truncate(err.to_string(), MAX_REASON_BYTES);
            let out = self.encode(&Message::Error { reason });
            self.goodbye.push_back(out);
        }
        self.control.clear();
        self.cursors.clear();
        self.heap.clear();
        self.runs.clear();
        self.run_ids.clear();
        self.run_events = 0;
        self.run_bytes = 0;
        self.announce.clear();
        self.announce_branches.clear();
        self.wanted.clear();
        self.events.push_back(SessionEvent::Failed(err));
    }

    fn unexpected(&self, message: &'static str) -> SyncError {
        SyncError::Unexpected {
            message,
            phase: self.phase.name(),
        }
    }

    fn handle_inner<S: Store + ?Sized>(
        &mut self,
        bytes: &[u8],
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        let msg = match decode_message(bytes)? {
            Some((msg, used)) if used == bytes.len() => msg,
            _ => {
                // The bytes end inside the message, or more follow it.
                let announced = bytes
                    .first_chunk::<LENGTH_PREFIX_BYTES>()
                    .map_or(0, |p| u32::from_le_bytes(*p) as usize);
                return Err(SyncError::LengthMismatch {
                    announced,
                    got: bytes.len().saturating_sub(LENGTH_PREFIX_BYTES),
                });
            }
        };
        // Events, IHave, Graft and Prune need the peer's frontier: a peer
        // sends them only once it has ours, and ours is always sent first.
        if !self.known
            && matches!(
                msg,
                Message::Events { .. }
                    | Message::IHave { .. }
                    | Message::Graft { .. }
                    | Message::Prune
                    | Message::Ask(_)
            )
        {
            return Err(self.unexpected(msg.name()));
        }
        match msg {
            Message::Hello(hello) => self.on_hello(hello, store),
            Message::Frontier { heads } => {
                if self.phase != Phase::AwaitFrontier {
                    return Err(self.unexpected("Frontier"));
                }
                self.on_frontier(heads, store)
            }
            Message::Events { frames } => self.on_events(&frames, store, pool),
            Message::Done => {
                if self.phase != Phase::Streaming || self.got_done {
                    return Err(self.unexpected("Done"));
                }
                self.on_done(store, pool)
            }
            Message::Error { reason } => Err(SyncError::Peer {
                reason: truncate(reason, MAX_REASON_BYTES),
            }),
            Message::IHave { heads } => self.on_ihave(heads, store, pool),
            Message::Graft { heads } => self.on_graft(heads, store),
            Message::Prune => {
                self.stats.prunes_received += 1;
                self.eager = false;
                self.events.push_back(SessionEvent::Pruned);
                Ok(())
            }
            Message::Ask(ask) => {
                ask.check()
                    .map_err(|e| SyncError::Malformed(format!("Ask: {e}")))?;
                self.stats.asks_received += 1;
                self.events.push_back(SessionEvent::Asked(ask));
                Ok(())
            }
        }
    }

    fn on_hello<S: Store + ?Sized>(&mut self, hello: Hello, store: &S) -> Result<(), SyncError> {
        match self.phase {
            Phase::AwaitHello => {}
            // The peer opened a round: answer with our own Hello.
            Phase::Live => self.open_round(store),
            _ => return Err(self.unexpected("Hello")),
        }
        let version = PROTOCOL_VERSION.min(hello.max_version);
        let common = hello.min_version <= hello.max_version
            && version >= MIN_PROTOCOL_VERSION.max(hello.min_version);
        if let Some((_, first)) = self.peer {
            // The connection's version was agreed at its first Hello, and
            // a peer's build does not change within a connection: a later
            // Hello that would agree on another is a broken peer, not a
            // version to refuse in the middle of a sync.
            if !common || version != first {
                return Err(SyncError::VersionChanged {
                    first,
                    theirs_min: hello.min_version,
                    theirs_max: hello.max_version,
                });
            }
        } else if !common {
            return Err(SyncError::VersionMismatch {
                ours_min: MIN_PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            });
        }
        if hello.cluster != self.config.cluster {
            return Err(SyncError::WrongCluster {
                ours: self.config.cluster,
                theirs: hello.cluster,
            });
        }
        if hello.node == self.config.node {
            return Err(SyncError::OwnNodeId(hello.node));
        }
        let expected = self.peer.map(|(n, _)| n).or(self.config.peer);
        if let Some(expected) = expected.filter(|e| *e != hello.node) {
            return Err(SyncError::WrongPeer {
                expected,
                got: hello.node,
            });
        }
        self.peer = Some((hello.node, version));
        if hello.digest == self.snapshot_digest {
            // Same frontier as our snapshot: the peer holds exactly that.
            self.peer_has.clear();
            self.tips.clear();
            for h in std::mem::take(&mut self.snapshot) {
                if store.contains(&h.id) {
                    self.note_held(store, h);
                }
            }
            self.known = true;
            self.phase = Phase::Live;
            self.events.push_back(SessionEvent::InSync);
            if self.eager {
                // Push what was stored since the snapshot.
                return self.rebuild_cursors(store);
            }
            // Announce it.
            for h in store.frontier() {
                if self.on_branch(store, &h) {
                    if !self.peer_holds(store, &h) {
                        self.announce_branches.insert(h);
                    }
                    continue;
                }
                let has = self.peer_has.get(&h.author).copied().unwrap_or(0);
                if h.seq > has {
                    raise(&mut self.announce, h.author, h.seq);
                }
            }
            Ok(())
        } else {
            if self.snapshot.len() > MAX_FRONTIER_ENTRIES {
                return Err(SyncError::LocalFrontierTooLarge {
                    entries: self.snapshot.len(),
                });
            }
            self.peer_digest = hello.digest;
            let heads = std::mem::take(&mut self.snapshot);
            self.control.push_back(Message::Frontier { heads });
            self.phase = Phase::AwaitFrontier;
            Ok(())
        }
    }

    fn on_frontier<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
    ) -> Result<(), SyncError> {
        if heads.len() > MAX_FRONTIER_ENTRIES {
            return Err(SyncError::FrontierTooLarge {
                entries: heads.len(),
            });
        }
        if heads.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SyncError::FrontierInvalid(
                "heads are not strictly ascending by (author, seq, id)",
            ));
        }
        if heads.iter().any(|h| h.seq == 0) {
            return Err(SyncError::FrontierInvalid("a head has seq 0"));
        }
        if frontier_digest(&heads) != self.peer_digest {
            return Err(SyncError::FrontierDigestMismatch);
        }
        self.known = true;
        // The peer's frontier is the truth about what it holds: what this
        // end believed beyond it (events sent that the peer could not store
        // yet, or dropped with a session) is forgotten, so the round sends
        // it again rather than never.
        self.peer_has.clear();
        self.tips.clear();
        let ours = store.frontier();
        for w in ours.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for w in heads.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for h in &heads {
            if store.contains(&h.id) {
                self.note_held(store, *h);
                continue;
            }
            match store.event_id(&h.author, h.seq) {
                Some(held) => {
                    // Another event at that seq here: the peer holds a
                    // branch this replica lacks, and lacks ours from
                    // where they diverge (unknown here: from the start).
                    self.claim_fork(Equivocation {
                        author: h.author,
                        seq: h.seq,
                        held,
                        other: h.id,
                        proven: false,
                    });
                }
                // Only authors this replica holds: nothing else is ever sent
                // to the peer, and the map stays bounded by the store. The
                // peer is ahead on this chain, or on a branch that forked
                // above it: then its events tell, and the next round sends
                // ours by head.
                None if store.event_id(&h.author, 1).is_some() => {
                    raise(&mut self.peer_has, h.author, h.seq)
                }
                None => {}
            }
        }
        self.phase = Phase::Streaming;
        self.sent_done = false;
        self.got_done = false;
        self.rebuild_cursors(store)
    }

    /// Reports a fork of `e.author` (once per session) and from now on
    /// sends its chains by head.
    /// Whether the author was not known to fork in this session before.
    /// What the peer holds of its chains is known by heads from now on:
    /// a seq says nothing about which branch.
    fn claim_fork(&mut self, e: Equivocation) -> bool {
        if self.reported.insert(e.author) {
            self.events.push_back(SessionEvent::Equivocation(e));
        }
        self.peer_has.remove(&e.author);
        self.forked.insert(e.author)
    }

    /// Replaces the send queue by the store's events the peer is not known
    /// to hold: per author, the chain `event_id` follows above what the
    /// peer holds of it, and for an author that forked each branch from
    /// where the peer's known heads leave it.
    fn rebuild_cursors<S: Store + ?Sized>(&mut self, store: &S) -> Result<(), SyncError> {
        self.cursors.clear();
        self.heap.clear();
        let frontier = store.frontier();
        for w in frontier.windows(2) {
            if w[0].author == w[1].author {
                self.forked.insert(w[0].author);
            }
        }
        for h in frontier {
            if self.on_branch(store, &h) {
                self.add_branch(store, h)?;
                // What will have been sent counts for the next branches.
                self.tips.entry(h.author).or_default().push(h);
                continue;
            }
            let has = self.peer_has.get(&h.author).copied().unwrap_or(0);
            if h.seq > has {
                self.add_cursor(store, h.author, has + 1, h.seq)?;
            }
        }
        Ok(())
    }

    /// Queues `author`'s seqs `from..=to` on the chain `event_id` follows,
    /// or extends its cursor to `to`.
    fn add_cursor<S: Store + ?Sized>(
        &mut self,
        store: &S,
        author: NodeId,
        from: u64,
        to: u64,
    ) -> Result<(), SyncError> {
        if from > to {
            return Ok(());
        }
        if let Some(c) = self.cursors.get_mut(&(author, None)) {
            c.end = c.end.max(to);
            return Ok(());
        }
        let hlc = store
            .hlc(&author, from)
            .ok_or(SyncError::LocalMissing { author, seq: from })?;
        self.cursors.insert(
            (author, None),
            Cursor {
                next: from,
                end: to,
                head: None,
            },
        );
        self.heap.push(Reverse((hlc, author, from, None)));
        Ok(())
    }

    /// The frames of the next Events message, if there is anything to send:
    /// events popped from the merge in canonical order until the next would
    /// overflow the target. A cursor advances only when its event is packed,
    /// so an event that does not fit is fetched again for the next message.
    fn next_events<S: Store + ?Sized>(&mut self, store: &S) -> Result<Option<Vec<u8>>, SyncError> {
        let target = self.config.events_bytes_target.clamp(1, MAX_FRAME_BYTES);
        let mut frames = Vec::new();
        let mut count = 0u64;
        while let Some(&Reverse((_, author, queued, branch))) = self.heap.peek() {
            let key = (author, branch);
            let Some(c) = self.cursors.get_mut(&key) else {
                self.heap.pop(); // its cursor is done
                continue;
            };
            if c.next != queued {
                self.heap.pop(); // stale
                continue;
            }
            let seq = match c.head {
                Some(_) => queued,
                None => {
                    let has = self.peer_has.get(&author).copied().unwrap_or(0);
                    queued.max(has.saturating_add(1))
                }
            };
            if seq > c.end {
                // The peer got the rest meanwhile (from us or by its own pushes).
                self.heap.pop();
                self.cursors.remove(&key);
                continue;
            }
            if seq != queued {
                self.heap.pop();
                c.next = seq;
                let hlc = store
                    .hlc(&author, seq)
                    .ok_or(SyncError::LocalMissing { author, seq })?;
                self.heap.push(Reverse((hlc, author, seq, branch)));
                continue;
            }
            let end = c.end;
            let head = c.head;
            let stored = match head {
                None => store.fetch(&author, seq),
                Some(h) => store.chain_id(&h, seq).and_then(|id| store.fetch_id(&id)),
            }
            .ok_or(SyncError::LocalMissing { author, seq })?;
            if seq == end && stored.sig.is_none() {
                return Err(SyncError::LocalUnsigned { author, seq });
            }
            let len = wire_frame_len(stored.bytes.len(), stored.sig.is_some());
            if count > 0 && frames.len() + len > target {
                break;
            }
            self.heap.pop();
            if seq == end {
                self.cursors.remove(&key);
            } else {
                let hlc = match head {
                    None => store.hlc(&author, seq + 1),
                    Some(h) => branch_hlc(store, &h, seq + 1),
                }
                .ok_or(SyncError::LocalMissing {
                    author,
                    seq: seq + 1,
                })?;
                if let Some(c) = self.cursors.get_mut(&key) {
                    c.next = seq + 1;
                }
                self.heap.push(Reverse((hlc, author, seq + 1, branch)));
            }
            encode_wire_frame(&mut frames, &stored.bytes, stored.sig.as_ref());
            count += 1;
            if head.is_none() {
                raise(&mut self.peer_has, author, seq);
            }
        }
        self.stats.events_sent += count;
        Ok((count > 0).then_some(frames))
    }

    fn on_ihave<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
        pool: &Pool,
    ) -> Result<(), SyncError> {
        check_heads("IHave", &heads, MAX_IHAVE_HEADS)?;
        if heads.is_empty() {
            return Err(SyncError::InvalidHeads {
                message: "IHave",
                why: "it announces nothing",
            });
        }
        self.stats.announcements_received += heads.len() as u64;
        let mut lacking = Vec::new();
        for h in heads {
            if store.contains(&h.id) {
                self.note_held(store, h);
                continue;
            }
            match store.event_id(&h.author, h.seq) {
                // Another event at that seq: a branch, to be fetched.
                Some(_) => self.forked.extend([h.author]),
                // Only authors this replica holds are tracked.
                None if store.event_id(&h.author, 1).is_some() => {
                    raise(&mut self.peer_has, h.author, h.seq)
                }
                None => {}
            }
            if !pool.contains(&h.id) {
                lacking.push(h);
            }
        }
        if !lacking.is_empty() {
            for h in &lacking {
                if self.wanted.len() < MAX_GRAFT_HEADS {
                    self.wanted.insert(h.author);
                }
            }
            self.events
                .push_back(SessionEvent::Announced { heads: lacking });
        }
        Ok(())
    }

    fn on_graft<S: Store + ?Sized>(
        &mut self,
        heads: Vec<Head>,
        store: &S,
    ) -> Result<(), SyncError> {
        check_heads("Graft", &heads, MAX_GRAFT_HEADS)?;
        self.stats.grafts_received += 1;
        for h in heads {
            if store.contains(&h.id) {
                self.note_held(store, h);
            }
        }
        self.eager = true;
        self.prune_sent = false;
        self.dup_streak = 0;
        // Everything the peer lacks is pushed now: nothing to announce.
        self.announce.clear();
        self.announce_branches.clear();
        self.events.push_back(SessionEvent::Grafted);
        self.rebuild_cursors(store)
    }

    fn on_events<S: Store + ?Sized>(
        &mut self,
        frames: &[u8],
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        if frames.is_empty() {
            return Err(SyncError::EmptyEvents);
        }
        // Everything outside the peer's stream of a round (from its
        // Frontier to its Done) is a live push.
        let live = self.phase != Phase::Streaming || self.got_done;
        let me = self.me();
        let mut offset = 0;
        let mut index = 0;
        let mut released = false;
        let (mut fresh, mut dups) = (0u64, 0u64);
        // Signed heads of forked authors received, and authors found to
        // fork in this message.
        let mut got: Vec<Head> = Vec::new();
        let mut new_forks: Vec<NodeId> = Vec::new();
        while offset < frames.len() {
            let (bytes, sig, used) =
                decode_wire_frame(&frames[offset..]).map_err(|source| SyncError::Frame {
                    index,
                    offset,
                    source,
                })?;
            let id = EventId(*blake3::hash(bytes).as_bytes());
            let at = index;
            offset += used;
            index += 1;
            self.stats.events_received += 1;
            if self.run_ids.contains(&id) {
                // Sent again while its run is still open here.
                self.stats.duplicates += 1;
                dups += 1;
                continue;
            }
            // A pooled event may be the signed end of a run open here (its
            // signature covers the run): checked as the run's next event.
            let ends_run = !store.contains(&id)
                && peek_dot(bytes)
                    .is_some_and(|(a, _)| self.runs.get(&a).is_some_and(|r| !r.is_empty()));
            if (store.contains(&id) || pool.contains(&id)) && !ends_run {
                // A duplicate, known by its id: neither decoded nor
                // verified. Only its author and seq are read (the bytes are
                // those of an event held here). An open run cannot need a
                // stored one: what is stored has its whole chain stored, so
                // the run's next event names a held prev.
                if let Some((author, seq)) = peek_dot(bytes) {
                    if store.contains(&id) {
                        self.note_held(&*store, Head { author, seq, id });
                        self.drop_held_runs(author, &*store);
                    }
                    self.stats.duplicates += 1;
                    dups += 1;
                    continue;
                }
            }
            let (event, _) = Event::decode(bytes).map_err(|source| SyncError::Event {
                index: at,
                id,
                event: describe_bytes(&id, bytes),
                source: Box::new(source),
            })?;
            let author = event.author;
            let eref = EventRef {
                id,
                author,
                seq: event.seq,
            };
            // The run this event continues: the one that ends at its prev.
            // Else it starts one: its prev is held (or it is seq 1), or no
            // run of its author is open (it waits for its prev).
            let runs = self.runs.entry(author).or_default();
            let run_ix = match runs
                .iter()
                .position(|r| r.last().is_some_and(|l| Some(l.id) == event.prev))
            {
                Some(i) => i,
                None => {
                    // Its prev may sit inside another open run (a branch
                    // leaving it): it then waits in the pool for that run.
                    let held = event.prev.is_none_or(|p| {
                        store.contains(&p) || pool.contains(&p) || self.run_ids.contains(&p)
                    });
                    if !held {
                        if let Some(last) = runs.iter().filter_map(|r| r.last()).next() {
                            let why = if event.seq != last.event.seq.saturating_add(1) {
                                "its seq does not follow"
                            } else {
                                "its prev is not that event"
                            };
                            return Err(SyncError::BrokenRun {
                                event: eref,
                                after_seq: last.event.seq,
                                why,
                            });
                        }
                    }
                    runs.push(Vec::new());
                    runs.len() - 1
                }
            };
            if let Some(sig) = &sig {
                verify(&author, &id, sig).map_err(|source| SyncError::BadSignature {
                    event: eref,
                    source,
                })?;
            }
            let (in_pool, in_pool_bytes) = pool.held(me);
            if self.run_events + in_pool + 1 > self.config.max_pending_events
                || self.run_bytes + in_pool_bytes + bytes.len() > self.config.max_pending_bytes
            {
                return Err(SyncError::PendingLimit {
                    max_events: self.config.max_pending_events,
                    max_bytes: self.config.max_pending_bytes,
                });
            }
            self.run_events += 1;
            self.run_bytes += bytes.len();
            fresh += 1;
            let signed = sig.is_some();
            let runs = self.runs.entry(author).or_default();
            self.run_ids.insert(id);
            runs[run_ix].push(Pending {
                event,
                id,
                bytes: bytes.to_vec(),
                sig,
                seg: (0, id),
                origin: me,
            });
            if signed {
                // The signature covers the whole run through `prev`: it is
                // authenticated, and the peer holds it.
                let run = runs.swap_remove(run_ix);
                if runs.is_empty() {
                    self.runs.remove(&author);
                }
                for p in &run {
                    self.run_ids.remove(&p.id);
                }
                self.run_events -= run.len();
                self.run_bytes -= run.iter().map(|p| p.bytes.len()).sum::<usize>();
                // An event at a seq held here with another id proves a
                // fork: both branches are kept.
                let fork = run.iter().find_map(|p| {
                    let held = store.event_id(&author, p.event.seq)?;
                    (held != p.id).then_some(Equivocation {
                        author,
                        seq: p.event.seq,
                        held,
                        other: p.id,
                        proven: true,
                    })
                });
                if let Some(e) = fork {
                    if self.claim_fork(e) {
                        new_forks.push(author);
                    }
                }
                if self.forked.contains(&author) {
                    got.push(Head {
                        author,
                        seq: eref.seq,
                        id,
                    });
                } else {
                    raise(&mut self.peer_has, author, eref.seq);
                }
                self.stats.duplicates += pool.add_run(run, (eref.seq, id), me)?;
                released = true;
            }
        }
        debug_assert_eq!(self.run_ids.len(), self.run_events, "run_ids indexes runs");
        if released {
            self.drain(store, pool)?;
        }
        for h in got {
            if store.contains(&h.id) {
                self.note_held(&*store, h);
            }
        }
        for author in new_forks {
            // The peer holds another branch: send it ours, from where its
            // branch leaves ours.
            for h in store.frontier().into_iter().filter(|h| h.author == author) {
                self.add_branch(&*store, h)?;
                // What will have been sent counts for the next branches.
                self.tips.entry(h.author).or_default().push(h);
            }
        }
        if live && fresh > 0 {
            self.dup_streak = 0;
        } else if live && dups > 0 {
            self.dup_streak = self.dup_streak.saturating_add(1);
        }
        if self.dup_streak >= self.config.prune_after.max(1) && (self.eager || !self.prune_sent) {
            // The peer's pushes bring only what this replica holds: another
            // link brings them first. Both ends turn lazy.
            self.dup_streak = 0;
            self.eager = false;
            self.prune_sent = true;
            self.control.push_back(Message::Prune);
            self.stats.prunes_sent += 1;
            self.events.push_back(SessionEvent::Pruned);
        }
        Ok(())
    }

    /// Drops `author`'s open runs whose last event the store now holds
    /// (another link brought them, signed): their whole chain is held.
    fn drop_held_runs<S: Store + ?Sized>(&mut self, author: NodeId, store: &S) {
        let Some(runs) = self.runs.get_mut(&author) else {
            return;
        };
        let mut dropped = (0, 0);
        let ids = &mut self.run_ids;
        runs.retain(|r| {
            let held = r.last().is_some_and(|l| store.contains(&l.id));
            if held {
                for p in r {
                    ids.remove(&p.id);
                }
                dropped.0 += r.len();
                dropped.1 += r.iter().map(|p| p.bytes.len()).sum::<usize>();
            }
            !held
        });
        if runs.is_empty() {
            self.runs.remove(&author);
        }
        self.run_events -= dropped.0;
        self.run_bytes -= dropped.1;
        self.stats.duplicates += dropped.0 as u64;
    }

    fn on_done<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        self.drain(store, pool)?;
        let authors: Vec<NodeId> = self.runs.keys().copied().collect();
        for a in authors {
            self.drop_held_runs(a, &*store);
        }
        if let Some(run) = self.runs.values().flatten().find(|r| !r.is_empty()) {
            return Err(SyncError::Unsigned {
                first: run[0].eref(),
                last_seq: run[run.len() - 1].event.seq,
            });
        }
        // Events waiting for a dependency stay pooled: it may come over
        // another link. The policy learns what to ask for.
        let deps = pool.missing(self.me(), &*store);
        if !deps.is_empty() {
            self.events.push_back(SessionEvent::Missing { deps });
        }
        self.got_done = true;
        self.events.push_back(SessionEvent::PeerDone);
        self.maybe_round_done();
        Ok(())
    }

    fn maybe_round_done(&mut self) {
        if self.phase == Phase::Streaming && self.sent_done && self.got_done {
            self.phase = Phase::Live;
            self.events.push_back(SessionEvent::RoundDone);
        }
    }

    /// What to do with a pooled event, given the store and the events
    /// this drain pass accepted before it (`tent`): by id alone, so that
    /// both branches of a fork are stored.
    fn verdict<S: Store + ?Sized>(p: &Pending, store: &S, tent: &BTreeSet<EventId>) -> Verdict {
        let held = |id: &EventId| tent.contains(id) || store.contains(id);
        if held(&p.id) {
            return Verdict::Duplicate;
        }
        if p.event.prev.iter().chain(&p.event.deps).all(held) {
            Verdict::Store
        } else {
            Verdict::Wait
        }
    }

    /// Stores every segment in the pool that can be stored whole, in
    /// canonical order, whichever session received it. A pass walks the
    /// pool in canonical order, accepting each event whose predecessor and
    /// deps are stored or accepted before it; a segment with an event that
    /// must wait is excluded whole, and if part of it was already accepted
    /// the pass is run again without it.
    ///
    /// Cost: a pass is linear in the events pooled. In honest traffic over
    /// a stable tree nothing waits, so the pool is empty after every drain
    /// and the work is linear in what arrives. Events that keep waiting
    /// (which a hostile author can sign) are walked again on each release:
    /// bounded by the pool's limits; shells rate-limit peers.
    fn drain<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<(), SyncError> {
        let mut excluded: BTreeSet<(NodeId, (u64, EventId))> = BTreeSet::new();
        loop {
            let mut tent: BTreeSet<EventId> = BTreeSet::new();
            let mut seg_accepted: BTreeSet<(NodeId, (u64, EventId))> = BTreeSet::new();
            let mut accepted: Vec<(PoolKey, bool)> = Vec::new();
            let mut again = false;
            for (key, p) in &pool.entries {
                let seg = (p.event.author, p.seg);
                if excluded.contains(&seg) {
                    continue;
                }
                let store_it = match Self::verdict(p, &*store, &tent) {
                    Verdict::Store => true,
                    Verdict::Duplicate => false,
                    Verdict::Wait => {
                        again |= seg_accepted.contains(&seg);
                        excluded.insert(seg);
                        continue;
                    }
                };
                accepted.push((*key, store_it));
                tent.insert(p.id);
                seg_accepted.insert(seg);
            }
            if again {
                continue;
            }
            if self.commit(accepted, store, pool)? {
                continue;
            }
            return Ok(());
        }
    }

    /// Stores the accepted events in order. Returns `true` when the store
    /// refused an event that another session received: that session is
    /// told, its events of the author are dropped, and the caller passes
    /// again (what was accepted after it may have depended on it).
    fn commit<S: Store + ?Sized>(
        &mut self,
        accepted: Vec<(PoolKey, bool)>,
        store: &mut S,
        pool: &mut Pool,
    ) -> Result<bool, SyncError> {
        let me = self.me();
        let mut count = 0u64;
        let mut heads: BTreeSet<Head> = BTreeSet::new();
        let mut result = Ok(false);
        for (key, store_it) in accepted {
            let Some(p) = pool.take(&key) else {
                debug_assert!(false, "accepted keys come from the pool and are distinct");
                continue;
            };
            if !store_it {
                self.stats.duplicates += 1;
                continue;
            }
            match store.insert(&p.event, p.id, &p.bytes, p.sig) {
                Ok(Inserted::New) => {
                    count += 1;
                    if p.sig.is_some() {
                        // A signed head; what it extends is no longer one.
                        if let Some(prev) = p.event.prev {
                            heads.remove(&Head {
                                author: p.event.author,
                                seq: p.event.seq - 1,
                                id: prev,
                            });
                        }
                        heads.retain(|h| {
                            h.author != p.event.author || store.chain_id(&p.id, h.seq) != Some(h.id)
                        });
                        heads.insert(Head {
                            author: p.event.author,
                            seq: p.event.seq,
                            id: p.id,
                        });
                    }
                }
                Ok(Inserted::Duplicate) => self.stats.duplicates += 1,
                Err(source) => {
                    let err = SyncError::InvalidEvent {
                        event: p.eref(),
                        source: Box::new(source),
                    };
                    if p.origin == me {
                        result = Err(err);
                    } else {
                        pool.drop_author(p.event.author, p.origin);
                        pool.post(p.origin, Mail::Refused(err));
                        result = Ok(true);
                    }
                    break;
                }
            }
        }
        self.stats.events_stored += count;
        if count > 0 {
            // Reported even when a later event failed: these are stored.
            self.events.push_back(SessionEvent::Received {
                count,
                heads: heads.into_iter().collect(),
            });
        }
        result
    }
}

/// Checks the heads of an IHave or Graft: the limit, strictly ascending
/// authors, seqs from 1.
fn check_heads(message: &'static str, heads: &[Head], max: usize) -> Result<(), SyncError> {
    if heads.len() > max {
        return Err(SyncError::TooManyHeads {
            message,
            entries: heads.len(),
            max,
        });
    }
    if heads.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SyncError::InvalidHeads {
            message,
            why: "heads are not strictly ascending by (author, seq, id)",
        });
    }
    if heads.iter().any(|h| h.seq == 0) {
        return Err(SyncError::InvalidHeads {
            message,
            why: "a head has seq 0",
        });
    }
    Ok(())
}

/// The author and seq at the start of an event's encoding (`PROTOCOL.md`
/// §2: the version byte, the author, the seq), the rest left unread: for
/// bytes whose id this replica already holds.
fn peek_dot(bytes: &[u8]) -> Option<(NodeId, u64)> {
    let (author, rest): (NodeId, _) = postcard::take_from_bytes(bytes.get(1..)?).ok()?;
    let (seq, _): (u64, _) = postcard::take_from_bytes(rest).ok()?;
    Some((author, seq))
}

/// The hlc of the event at `seq` on the chain that ends at `head`.
fn branch_hlc<S: Store + ?Sized>(store: &S, head: &EventId, seq: u64) -> Option<Hlc> {
    Some(store.fetch_id(&store.chain_id(head, seq)?)?.hlc)
}

/// `map[k] = max(map[k], v)`.
fn raise(map: &mut BTreeMap<NodeId, u64>, k: NodeId, v: u64) {
    let slot = map.entry(k).or_insert(0);
    *slot = (*slot).max(v);
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
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

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
