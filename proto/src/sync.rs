//! Sync: the sans-IO protocol two replicas speak to give each other what the
//! other lacks (`DESIGN.md` §5, `PROTOCOL.md` §9).
//!
//! A [`Session`] is one end of one peer connection. It does no IO and reads
//! no clock: the shell hands it the bytes of each message that arrives
//! ([`Session::handle_message`]), tells it about events stored by anyone
//! else ([`Session::handle_stored`]) and when to run anti-entropy
//! ([`Session::start_round`]), and carries out what it returns: messages to
//! send ([`Session::poll_transmit`]) and events to act on
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
//! After the first round the session is **live**: every event stored later
//! (made locally or received from another peer) that the peer is not known
//! to hold goes out at once ([`Session::handle_stored`]). What the peer is
//! known to hold is its last frontier, plus everything either end sent the
//! other since. A new round (the same Hello exchange) repairs anything a push
//! missed; the shell's anti-entropy timer calls [`Session::start_round`],
//! which is why the session needs no timer of its own: the transport is
//! reliable and ordered, so nothing here waits for time to pass.
//!
//! # What is checked before anything is stored
//!
//! Every received event passes, in order: the wire frame's length and flags
//! (the id is recomputed: blake3 of the bytes); [`Event::decode`] (canonical encoding,
//! limits); the chain within the stream (each author's events arrive in seq
//! order, each linked to the one before by `prev`); the author's signature.
//! A signature covers the whole run before it through `prev`, so unsigned
//! events are held until a signed later event of the same author verifies,
//! and then the run is released. Released events are stored through
//! [`Store::insert`], which checks them against their causal past
//! ([`State::insert`]); they are stored in canonical order and only as whole
//! *segments* — each run of an author ending at a signed event — once every
//! event of the segment has its chain predecessor and deps. So after each
//! call, every author's head in the store carries a signature and can be
//! forwarded to other peers as it is. Events whose deps have not arrived
//! wait; the wait is bounded by [`SessionConfig::max_pending_events`] and
//! [`SessionConfig::max_pending_bytes`] and ends at the peer's Done, by
//! which time everything must have been stored. An event the store refuses
//! fails the session with an error naming it ([`SyncError::InvalidEvent`]).
//!
//! # Equivocation
//!
//! Two events with the same `(author, seq)` are a fork. The session reports
//! each forked author once as a claim, when the peer's frontier names an
//! `(author, seq)` that the store holds with another id, and once with
//! proof, when such an event arrives in a run whose signature verifies (or
//! a signed event's `prev` names another id than the store's). Either end
//! that detects a fork sends the peer its own branch from the forked seq, so
//! that both ends get a signed proof. The forked author's events from this
//! peer are then ignored for the rest of the session; events of others that
//! depend on them can never be stored, and the session fails at the peer's
//! Done naming one. A deterministic rule to choose between the branches
//! (`DESIGN.md` §2) is the store's business, not the session's.
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
//!   are bounded by counts and by the peer's Done, and anti-entropy is the
//!   shell's timer calling [`Session::start_round`]. Idle and handshake
//!   timeouts belong to the transport.
//! - Every queue has a limit: messages ([`MAX_MESSAGE_BYTES`]), frontiers
//!   ([`MAX_FRONTIER_ENTRIES`]), events held unstored
//!   ([`MAX_PENDING_EVENTS`], [`MAX_PENDING_BYTES`]), the send side (one
//!   cursor per author; events fetched only as messages are packed), and
//!   what is tracked per peer (authors the store holds). Only the event
//!   queue for [`Session::poll_event`] relies on the shell draining it.
//!
//! # Order of calls
//!
//! After [`Session::new`], and after each [`Session::handle_message`],
//! [`Session::handle_stored`] or [`Session::start_round`]: drain
//! [`Session::poll_event`], then call [`Session::poll_transmit`] until it
//! returns `None` (or until the transport pushes back; the session keeps
//! what it has not sent). A failed session has one last message to send (an
//! Error to the peer), then returns `None` for ever.
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
use crate::exchange::describe;
use crate::hlc::{Hlc, HlcClock};
use crate::id::{EventId, NodeId};
use crate::log::{FrameError, SIG_BYTES};
use crate::state::{Draft, Inserted, Invalid, PrepareError, Prepared, State};

/// The sync protocol version this build prefers (the highest it speaks).
pub const PROTOCOL_VERSION: u16 = 1;
/// The lowest sync protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
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

// An Events message (variant byte, length varint of at most 3 bytes, frames)
// with the largest frame fits, and so does the largest frontier.
const _: () = assert!(1 + 3 + MAX_FRAME_BYTES <= MAX_MESSAGE_BYTES);
const _: () = assert!(1 + 3 + MAX_FRONTIER_ENTRIES * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES <= u32::MAX as usize);

/// One author's head: its highest seq and that event's id.
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
        /// At most [`MAX_FRONTIER_ENTRIES`] heads, strictly ascending by author.
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
pub trait Store {
    /// Every author's head, strictly ascending by author. The events up to
    /// the heads are causally closed and each head carries a signature.
    fn frontier(&self) -> Vec<Head>;
    /// The id of an author's event by seq.
    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId>;
    /// Whether the event is stored.
    fn contains(&self, id: &EventId) -> bool;
    /// The hlc of an author's event by seq (the merge's sort key; cheaper
    /// than [`Store::fetch`]).
    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc>;
    /// An author's event by seq.
    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored>;
    /// Checks an authenticated event against the replica and stores it with
    /// its signature, as [`State::insert`] does: on error nothing changes.
    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid>;
}

/// An in-memory replica: a [`State`] and every event's bytes and signature.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    state: State,
    events: BTreeMap<(NodeId, u64), Stored>,
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

    /// An author's event by seq.
    pub fn get(&self, author: &NodeId, seq: u64) -> Option<&Stored> {
        self.events.get(&(*author, seq))
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

    /// Ends a batch: signs `key`'s author's head. Returns its id, or `None`
    /// when the author has no event.
    pub fn sign(&mut self, key: &Keypair) -> Option<EventId> {
        let author = key.node_id();
        let (&(_, _), stored) = self
            .events
            .range_mut((author, 0)..=(author, u64::MAX))
            .next_back()?;
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
            .map(|(author, (seq, id))| Head { author, seq, id })
            .collect()
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.state.event_id(author, seq)
    }

    fn contains(&self, id: &EventId) -> bool {
        self.state.contains(id)
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.events.get(&(*author, seq)).map(|s| s.hlc)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored> {
        self.events.get(&(*author, seq)).cloned()
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
                (event.author, event.seq),
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
    /// a dependency; more fails the session.
    pub max_pending_events: usize,
    /// Most bytes of such events.
    pub max_pending_bytes: usize,
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
        }
    }
}

/// What a session reports to the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The Hello digests are equal: the round is over, nothing to exchange.
    InSync,
    /// Events from the peer were stored. `heads` holds, per author, the
    /// highest seq stored (always a signed event): tell the other sessions
    /// ([`Session::handle_stored`]).
    Received {
        /// Events stored.
        count: u64,
        /// `(author, highest seq stored)`, ascending by author.
        heads: Vec<(NodeId, u64)>,
    },
    /// The peer's Done arrived: everything it sent is stored.
    PeerDone,
    /// Both ends have sent and received Done: the round is over.
    RoundDone,
    /// A fork: two events with one `(author, seq)`.
    Equivocation(Equivocation),
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
    /// Events received (frames decoded).
    pub events_received: u64,
    /// Received events stored.
    pub events_stored: u64,
    /// Received events the store already held.
    pub duplicates: u64,
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
    #[error("frame {index} of an Events message, event {id}: {source}")]
    Event {
        /// The frame's index in the message.
        index: usize,
        /// The id the frame carries (checked against the bytes).
        id: EventId,
        /// What is wrong.
        source: EventError,
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
    /// The peer's stream ended without a dependency of an event.
    #[error("{event} depends on event {dep}, which the peer never sent")]
    MissingDep {
        /// The event.
        event: EventRef,
        /// The missing dependency.
        dep: EventId,
    },
    /// The peer's stream ended without the predecessor of an event.
    #[error("{event} follows seq {} of its author, which the peer never sent", .event.seq.saturating_sub(1))]
    MissingPrev {
        /// The event.
        event: EventRef,
    },
    /// The peer's stream ended with an event that waits on events that wait
    /// on it (deps that are not in its past).
    #[error("{event} can never be stored: its dependencies wait on it")]
    Stalled {
        /// The event.
        event: EventRef,
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
    #[error("this node's frontier has {entries} authors, more than sync version 1 carries ({MAX_FRONTIER_ENTRIES})")]
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

/// One author's events to send: seqs `next..=end`. Exactly one heap entry
/// per cursor, keyed by the hlc of `next`.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    next: u64,
    end: u64,
    /// Sends a forked author's branch (so the peer gets the proof): not
    /// skipped by what the peer holds.
    branch: bool,
}

/// A received event not yet stored.
#[derive(Debug)]
struct Pending {
    event: Event,
    id: EventId,
    bytes: Vec<u8>,
    sig: Option<Signature>,
    /// The seq of the signed event that ends its segment (set on release).
    seg: u64,
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

#[derive(Clone, Copy, Debug, Default)]
struct Fork {
    proven: bool,
    branch_sent: bool,
}

/// What the drain decided about one released event.
enum Verdict {
    Store,
    Duplicate,
    Wait,
    Fork(Equivocation),
}

/// Heap key: `(hlc of next, author, next)`, smallest first.
type HeapEntry = Reverse<(Hlc, NodeId, u64)>;

/// Key of released events: canonical order.
type ReadyKey = (Hlc, NodeId, u64);

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
    /// Hello, Frontier: sent before any Events.
    control: VecDeque<Message>,
    /// The Error message to send after a failure.
    goodbye: Option<Vec<u8>>,
    /// Set once the peer's frontier is known (equal digests or Frontier):
    /// from then on both ends push and accept Events.
    known: bool,
    /// Per author, the highest seq the peer is known to hold.
    peer_has: BTreeMap<NodeId, u64>,
    cursors: BTreeMap<NodeId, Cursor>,
    heap: BinaryHeap<HeapEntry>,
    sent_done: bool,
    got_done: bool,
    /// Per author, received events no signature covers yet: a chain.
    runs: BTreeMap<NodeId, Vec<Pending>>,
    /// Authenticated events waiting to be stored, in canonical order.
    /// Boxed: a pending event is a few hundred bytes, and the map shifts
    /// its values on insert.
    ready: BTreeMap<ReadyKey, Box<Pending>>,
    pending_events: usize,
    pending_bytes: usize,
    forks: BTreeMap<NodeId, Fork>,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
}

impl Session {
    /// A session on a new connection. Its first round starts at once: the
    /// Hello is the first message [`Session::poll_transmit`] returns.
    pub fn new<S: Store + ?Sized>(config: SessionConfig, store: &S) -> Session {
        let mut s = Session {
            config,
            phase: Phase::Live,
            peer: None,
            snapshot: Vec::new(),
            snapshot_digest: [0; 32],
            peer_digest: [0; 32],
            control: VecDeque::new(),
            goodbye: None,
            known: false,
            peer_has: BTreeMap::new(),
            cursors: BTreeMap::new(),
            heap: BinaryHeap::new(),
            sent_done: false,
            got_done: false,
            runs: BTreeMap::new(),
            ready: BTreeMap::new(),
            pending_events: 0,
            pending_bytes: 0,
            forks: BTreeMap::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        s.open_round(store);
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

    /// Received events held while they wait for a signature or a dependency.
    pub fn pending_events(&self) -> usize {
        self.pending_events
    }

    /// Per author, the highest seq the peer is known to hold: its last
    /// frontier plus everything either end sent the other since. Empty until
    /// the first round has exchanged frontiers.
    pub fn peer_heads(&self) -> &BTreeMap<NodeId, u64> {
        &self.peer_has
    }

    /// Traffic counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
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

    /// Tells the session that the event `(author, seq)` was stored, made
    /// locally or received from any peer; it must be signed (the end of a
    /// batch). If the peer is not known to hold it, it and the author's
    /// events before it that the peer lacks are queued to send.
    pub fn handle_stored<S: Store + ?Sized>(&mut self, author: NodeId, seq: u64, store: &S) {
        if self.phase == Phase::Closed || !self.known || self.forks.contains_key(&author) {
            return;
        }
        let has = self.peer_has.get(&author).copied().unwrap_or(0);
        if seq <= has {
            return;
        }
        if let Err(e) = self.add_cursor(store, author, has + 1, seq, false) {
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
        let r = self.handle_inner(bytes, store);
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
            return self.goodbye.take();
        }
        if let Some(msg) = self.control.pop_front() {
            return Some(self.encode(&msg));
        }
        match self.next_events(store) {
            Err(e) => {
                self.fail(e);
                return self.goodbye.take();
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
        if !matches!(err, SyncError::Peer { .. }) {
            let reason = truncate(err.to_string(), MAX_REASON_BYTES);
            let mut out = Vec::new();
            encode_message(&Message::Error { reason }, &mut out);
            self.stats.messages_sent += 1;
            self.stats.bytes_sent += out.len() as u64;
            self.goodbye = Some(out);
        }
        self.control.clear();
        self.cursors.clear();
        self.heap.clear();
        self.runs.clear();
        self.ready.clear();
        self.pending_events = 0;
        self.pending_bytes = 0;
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
        match msg {
            Message::Hello(hello) => self.on_hello(hello, store),
            Message::Frontier { heads } => {
                if self.phase != Phase::AwaitFrontier {
                    return Err(self.unexpected("Frontier"));
                }
                self.on_frontier(heads, store)
            }
            Message::Events { frames } => {
                if !self.known {
                    return Err(self.unexpected("Events"));
                }
                self.on_events(&frames, store)
            }
            Message::Done => {
                if self.phase != Phase::Streaming || self.got_done {
                    return Err(self.unexpected("Done"));
                }
                self.on_done(store)
            }
            Message::Error { reason } => Err(SyncError::Peer {
                reason: truncate(reason, MAX_REASON_BYTES),
            }),
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
        if hello.min_version > hello.max_version
            || version < MIN_PROTOCOL_VERSION.max(hello.min_version)
        {
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
            // Same frontier as our snapshot: the peer holds all of it.
            for h in std::mem::take(&mut self.snapshot) {
                raise(&mut self.peer_has, h.author, h.seq);
            }
            self.known = true;
            self.phase = Phase::Live;
            self.events.push_back(SessionEvent::InSync);
            // Push what was stored since the snapshot.
            self.rebuild_cursors(store, &[])
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
        if heads.windows(2).any(|w| w[0].author >= w[1].author) {
            return Err(SyncError::FrontierInvalid(
                "authors are not strictly ascending",
            ));
        }
        if heads.iter().any(|h| h.seq == 0) {
            return Err(SyncError::FrontierInvalid("a head has seq 0"));
        }
        if frontier_digest(&heads) != self.peer_digest {
            return Err(SyncError::FrontierDigestMismatch);
        }
        self.known = true;
        let mut branches = Vec::new();
        for h in &heads {
            match store.event_id(&h.author, h.seq) {
                Some(held) if held != h.id => {
                    let known = self.forks.contains_key(&h.author);
                    let fork = self.forks.entry(h.author).or_default();
                    if !known {
                        self.events
                            .push_back(SessionEvent::Equivocation(Equivocation {
                                author: h.author,
                                seq: h.seq,
                                held,
                                other: h.id,
                                proven: false,
                            }));
                    }
                    if !fork.branch_sent {
                        fork.branch_sent = true;
                        branches.push((h.author, h.seq));
                    }
                }
                // Only authors this replica holds: nothing else is ever sent
                // to the peer, and the map stays bounded by the store.
                _ if store.event_id(&h.author, 1).is_some() => {
                    raise(&mut self.peer_has, h.author, h.seq)
                }
                _ => {}
            }
        }
        self.phase = Phase::Streaming;
        self.sent_done = false;
        self.got_done = false;
        self.rebuild_cursors(store, &branches)
    }

    /// Replaces the send queue by the store's events the peer is not known
    /// to hold, plus the branches of forked authors: those being sent, and
    /// new ones from the seqs given.
    fn rebuild_cursors<S: Store + ?Sized>(
        &mut self,
        store: &S,
        branches: &[(NodeId, u64)],
    ) -> Result<(), SyncError> {
        let running: Vec<(NodeId, Cursor)> = self
            .cursors
            .iter()
            .filter(|(_, c)| c.branch)
            .map(|(a, c)| (*a, *c))
            .collect();
        self.cursors.clear();
        self.heap.clear();
        for (author, c) in running {
            self.add_cursor(store, author, c.next, c.end, true)?;
        }
        let frontier = store.frontier();
        for h in &frontier {
            if self.forks.contains_key(&h.author) {
                continue;
            }
            let has = self.peer_has.get(&h.author).copied().unwrap_or(0);
            if h.seq > has {
                self.add_cursor(store, h.author, has + 1, h.seq, false)?;
            }
        }
        for &(author, from) in branches {
            if let Ok(i) = frontier.binary_search_by_key(&author, |h| h.author) {
                self.add_cursor(store, author, from, frontier[i].seq, true)?;
            }
        }
        Ok(())
    }

    /// Queues `author`'s seqs `from..=to`, or extends its cursor to `to`.
    fn add_cursor<S: Store + ?Sized>(
        &mut self,
        store: &S,
        author: NodeId,
        from: u64,
        to: u64,
        branch: bool,
    ) -> Result<(), SyncError> {
        if from > to {
            return Ok(());
        }
        if let Some(c) = self.cursors.get_mut(&author) {
            c.end = c.end.max(to);
            return Ok(());
        }
        let hlc = store
            .hlc(&author, from)
            .ok_or(SyncError::LocalMissing { author, seq: from })?;
        self.cursors.insert(
            author,
            Cursor {
                next: from,
                end: to,
                branch,
            },
        );
        self.heap.push(Reverse((hlc, author, from)));
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
        while let Some(&Reverse((_, author, queued))) = self.heap.peek() {
            // Invariant: one heap entry per cursor, removed together.
            let Some(c) = self.cursors.get_mut(&author) else {
                debug_assert!(false, "heap entry without a cursor");
                self.heap.pop();
                continue;
            };
            debug_assert_eq!(c.next, queued);
            let has = self.peer_has.get(&author).copied().unwrap_or(0);
            let seq = if c.branch {
                queued
            } else {
                queued.max(has.saturating_add(1))
            };
            if seq > c.end {
                // The peer got the rest meanwhile (from us or by its own pushes).
                self.heap.pop();
                self.cursors.remove(&author);
                continue;
            }
            if seq != queued {
                self.heap.pop();
                c.next = seq;
                let hlc = store
                    .hlc(&author, seq)
                    .ok_or(SyncError::LocalMissing { author, seq })?;
                self.heap.push(Reverse((hlc, author, seq)));
                continue;
            }
            let end = c.end;
            let stored = store
                .fetch(&author, seq)
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
                self.cursors.remove(&author);
            } else {
                c.next = seq + 1;
                let hlc = store.hlc(&author, seq + 1).ok_or(SyncError::LocalMissing {
                    author,
                    seq: seq + 1,
                })?;
                self.heap.push(Reverse((hlc, author, seq + 1)));
            }
            encode_wire_frame(&mut frames, &stored.bytes, stored.sig.as_ref());
            count += 1;
            if !self.forks.contains_key(&author) {
                raise(&mut self.peer_has, author, seq);
            }
        }
        self.stats.events_sent += count;
        Ok((count > 0).then_some(frames))
    }

    fn on_events<S: Store + ?Sized>(
        &mut self,
        frames: &[u8],
        store: &mut S,
    ) -> Result<(), SyncError> {
        if frames.is_empty() {
            return Err(SyncError::EmptyEvents);
        }
        let mut offset = 0;
        let mut index = 0;
        let mut released = false;
        while offset < frames.len() {
            let (bytes, sig, used) =
                decode_wire_frame(&frames[offset..]).map_err(|source| SyncError::Frame {
                    index,
                    offset,
                    source,
                })?;
            let (event, id) = Event::decode(bytes).map_err(|source| SyncError::Event {
                index,
                id: EventId(*blake3::hash(bytes).as_bytes()),
                source,
            })?;
            offset += used;
            index += 1;
            self.stats.events_received += 1;
            let author = event.author;
            let eref = EventRef {
                id,
                author,
                seq: event.seq,
            };
            if self.forks.get(&author).is_some_and(|f| f.proven) {
                continue; // the other branch of a proven fork
            }
            match self.runs.get(&author).and_then(|r| r.last()) {
                Some(last) => {
                    let why = if event.seq != last.event.seq.saturating_add(1) {
                        Some("its seq does not follow")
                    } else if event.prev != Some(last.id) {
                        Some("its prev is not that event")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(SyncError::BrokenRun {
                            event: eref,
                            after_seq: last.event.seq,
                            why,
                        });
                    }
                }
                None if store.event_id(&author, event.seq) == Some(id) => {
                    raise(&mut self.peer_has, author, event.seq);
                    self.stats.duplicates += 1;
                    continue;
                }
                None => {}
            }
            if let Some(sig) = &sig {
                verify(&author, &id, sig).map_err(|source| SyncError::BadSignature {
                    event: eref,
                    source,
                })?;
            }
            if self.pending_events + 1 > self.config.max_pending_events
                || self.pending_bytes + bytes.len() > self.config.max_pending_bytes
            {
                return Err(SyncError::PendingLimit {
                    max_events: self.config.max_pending_events,
                    max_bytes: self.config.max_pending_bytes,
                });
            }
            self.pending_events += 1;
            self.pending_bytes += bytes.len();
            let signed = sig.is_some();
            self.runs.entry(author).or_default().push(Pending {
                event,
                id,
                bytes: bytes.to_vec(),
                sig,
                seg: 0,
            });
            if signed {
                // The signature covers the whole run through `prev`.
                let seq = eref.seq;
                for mut p in self.runs.remove(&author).unwrap_or_default() {
                    p.seg = seq;
                    self.ready
                        .insert((p.event.hlc, author, p.event.seq), Box::new(p));
                }
                released = true;
            }
        }
        if released {
            self.drain(store)?;
        }
        Ok(())
    }

    fn on_done<S: Store + ?Sized>(&mut self, store: &mut S) -> Result<(), SyncError> {
        self.drain(store)?;
        if let Some(run) = self.runs.values().find(|r| !r.is_empty()) {
            // Invariant: the run is not empty.
            return Err(SyncError::Unsigned {
                first: run[0].eref(),
                last_seq: run[run.len() - 1].event.seq,
            });
        }
        if !self.ready.is_empty() {
            return Err(self.diagnose_stuck(store));
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

    /// Names the first released event that cannot be stored and why.
    fn diagnose_stuck<S: Store + ?Sized>(&self, store: &S) -> SyncError {
        let ids: BTreeSet<EventId> = self.ready.values().map(|p| p.id).collect();
        let dots: BTreeSet<(NodeId, u64)> = self
            .ready
            .values()
            .map(|p| (p.event.author, p.event.seq))
            .collect();
        for p in self.ready.values() {
            let (a, seq) = (p.event.author, p.event.seq);
            if seq > 1 && store.event_id(&a, seq - 1).is_none() && !dots.contains(&(a, seq - 1)) {
                return SyncError::MissingPrev { event: p.eref() };
            }
            if let Some(dep) = p
                .event
                .deps
                .iter()
                .find(|d| !store.contains(d) && !ids.contains(d))
            {
                return SyncError::MissingDep {
                    event: p.eref(),
                    dep: *dep,
                };
            }
        }
        // Invariant: only called with `ready` non-empty.
        let first = self.ready.values().next().expect("ready is not empty");
        SyncError::Stalled {
            event: first.eref(),
        }
    }

    /// What to do with a released event, given the store and the events
    /// this drain pass accepted before it (`tent`, `tent_ids`).
    fn verdict<S: Store + ?Sized>(
        p: &Pending,
        store: &S,
        tent: &BTreeMap<(NodeId, u64), EventId>,
        tent_ids: &BTreeSet<EventId>,
    ) -> Verdict {
        let (a, seq) = (p.event.author, p.event.seq);
        let held = |s: u64| tent.get(&(a, s)).copied().or_else(|| store.event_id(&a, s));
        match held(seq) {
            Some(x) if x == p.id => return Verdict::Duplicate,
            Some(x) => {
                return Verdict::Fork(Equivocation {
                    author: a,
                    seq,
                    held: x,
                    other: p.id,
                    proven: true,
                })
            }
            None => {}
        }
        if let Some(prev) = p.event.prev {
            // `Event::check` (in decode) made `prev` present exactly when seq > 1.
            match held(seq - 1) {
                None => return Verdict::Wait,
                Some(x) if x != prev => {
                    return Verdict::Fork(Equivocation {
                        author: a,
                        seq: seq - 1,
                        held: x,
                        other: prev,
                        proven: true,
                    })
                }
                Some(_) => {}
            }
        }
        if p.event
            .deps
            .iter()
            .any(|d| !tent_ids.contains(d) && !store.contains(d))
        {
            return Verdict::Wait;
        }
        Verdict::Store
    }

    /// Stores every released segment that can be stored whole, in canonical
    /// order. A pass walks the released events in canonical order, accepting
    /// each whose predecessor and deps are stored or accepted before it; a
    /// segment with an event that must wait is excluded whole, and if part
    /// of it was already accepted the pass is run again without it.
    ///
    /// Cost: a pass is linear in the events held. In honest traffic nothing
    /// waits, so `ready` is empty after every drain and the work is linear
    /// in what arrives. Only events that keep waiting (which a hostile
    /// author can sign) are walked again on each release: bounded by the
    /// pending limits, squared, before the session fails; shells rate-limit
    /// peers.
    fn drain<S: Store + ?Sized>(&mut self, store: &mut S) -> Result<(), SyncError> {
        let mut excluded: BTreeSet<(NodeId, u64)> = BTreeSet::new();
        loop {
            let mut tent: BTreeMap<(NodeId, u64), EventId> = BTreeMap::new();
            let mut tent_ids: BTreeSet<EventId> = BTreeSet::new();
            let mut seg_accepted: BTreeSet<(NodeId, u64)> = BTreeSet::new();
            let mut accepted: Vec<(ReadyKey, bool)> = Vec::new();
            let mut again = false;
            let mut fork = None;
            for (key, p) in &self.ready {
                let seg = (p.event.author, p.seg);
                if excluded.contains(&seg) {
                    continue;
                }
                let store_it = match Self::verdict(p, &*store, &tent, &tent_ids) {
                    Verdict::Store => true,
                    Verdict::Duplicate => false,
                    Verdict::Wait => {
                        again |= seg_accepted.contains(&seg);
                        excluded.insert(seg);
                        continue;
                    }
                    Verdict::Fork(e) => {
                        fork = Some(e);
                        break;
                    }
                };
                accepted.push((*key, store_it));
                tent.insert((p.event.author, p.event.seq), p.id);
                tent_ids.insert(p.id);
                seg_accepted.insert(seg);
            }
            if let Some(e) = fork {
                self.proven_fork(e, store)?;
                continue;
            }
            if again {
                continue;
            }
            return self.commit(accepted, store);
        }
    }

    fn commit<S: Store + ?Sized>(
        &mut self,
        accepted: Vec<(ReadyKey, bool)>,
        store: &mut S,
    ) -> Result<(), SyncError> {
        let mut count = 0u64;
        let mut heads: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut result = Ok(());
        for (key, store_it) in accepted {
            // Invariant: accepted keys come from `ready` and are distinct.
            let p = self.ready.remove(&key).expect("accepted event is ready");
            self.pending_events -= 1;
            self.pending_bytes -= p.bytes.len();
            // The peer holds what it sent; recorded once it is stored here,
            // so that only authors this replica holds are tracked.
            if !store_it {
                raise(&mut self.peer_has, p.event.author, p.event.seq);
                self.stats.duplicates += 1;
                continue;
            }
            match store.insert(&p.event, p.id, &p.bytes, p.sig) {
                Ok(Inserted::New) => {
                    count += 1;
                    raise(&mut heads, p.event.author, p.event.seq);
                    raise(&mut self.peer_has, p.event.author, p.event.seq);
                }
                Ok(Inserted::Duplicate) => {
                    raise(&mut self.peer_has, p.event.author, p.event.seq);
                    self.stats.duplicates += 1;
                }
                Err(source) => {
                    result = Err(SyncError::InvalidEvent {
                        event: p.eref(),
                        source: Box::new(source),
                    });
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

    /// A signed event proves that `e.author` forked: report it (once), drop
    /// the author's events from this peer, and send the peer our branch.
    fn proven_fork<S: Store + ?Sized>(
        &mut self,
        e: Equivocation,
        store: &S,
    ) -> Result<(), SyncError> {
        let author = e.author;
        let fork = self.forks.entry(author).or_default();
        let first_proof = !fork.proven;
        fork.proven = true;
        let send_branch = !fork.branch_sent && store.event_id(&author, e.seq).is_some();
        fork.branch_sent |= send_branch;
        if first_proof {
            self.events.push_back(SessionEvent::Equivocation(e));
        }
        for p in self.runs.remove(&author).unwrap_or_default() {
            self.pending_events -= 1;
            self.pending_bytes -= p.bytes.len();
        }
        let keys: Vec<ReadyKey> = self
            .ready
            .keys()
            .filter(|k| k.1 == author)
            .copied()
            .collect();
        for k in keys {
            // Invariant: the key was just read from `ready`.
            let p = self.ready.remove(&k).expect("ready key");
            self.pending_events -= 1;
            self.pending_bytes -= p.bytes.len();
        }
        if self.cursors.get(&author).is_some_and(|c| !c.branch) {
            self.cursors.remove(&author);
            self.heap.retain(|Reverse((_, a, _))| *a != author);
        }
        if send_branch {
            let head = store
                .frontier()
                .into_iter()
                .find(|h| h.author == author)
                .map_or(e.seq, |h| h.seq);
            if self.cursors.contains_key(&author) {
                // A branch cursor already runs; it covers the rest.
                return Ok(());
            }
            self.add_cursor(store, author, e.seq, head, true)?;
        }
        Ok(())
    }
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
