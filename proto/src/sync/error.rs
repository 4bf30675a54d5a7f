//! Why a session fails. One enum for the whole protocol, since a session
//! is one operation to its shell: every problem with the peer's bytes, its
//! events or the local store ends it with one of these, sent to the peer
//! as the reason of an Error message and reported to the shell.

use super::limits::{MAX_FRONTIER_ENTRIES, MAX_MESSAGE_BYTES};
use crate::event::{EventError, SignatureError};
use crate::id::{EventId, EventRef, NodeId};
use crate::log::FrameError;
use crate::state::Invalid;

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
    /// The bytes handed to
    /// [`Session::handle_message`](super::Session::handle_message) are not
    /// exactly one message.
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
        /// The limit ([`MAX_IHAVE_HEADS`](super::MAX_IHAVE_HEADS),
        /// [`MAX_GRAFT_HEADS`](super::MAX_GRAFT_HEADS)).
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
        /// [`SessionConfig::max_pending_events`](super::SessionConfig::max_pending_events).
        max_events: usize,
        /// [`SessionConfig::max_pending_bytes`](super::SessionConfig::max_pending_bytes).
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
        /// Its reason (at most [`MAX_REASON_BYTES`](super::MAX_REASON_BYTES)).
        reason: String,
    },
    /// The local store lacks an event it advertised (a [`Store`](super::Store)
    /// bug).
    #[error("the local store lacks seq {seq} of author {author}, which it advertised")]
    LocalMissing {
        /// The author.
        author: NodeId,
        /// The seq.
        seq: u64,
    },
    /// The local store advertised a head without a signature (a
    /// [`Store`](super::Store) bug, or `handle_stored` called before the batch
    /// was signed).
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
    /// [`Session::handle_message`](super::Session::handle_message) was called
    /// after the session closed.
    #[error("the session is closed")]
    Closed,
}
