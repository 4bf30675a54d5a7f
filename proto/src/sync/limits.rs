//! The sync protocol's sizes and limits. Every queue, buffer and message
//! has one; they live apart from
//! the code that enforces them so that the codec, the errors that name
//! them, the pool and the session can all read them without reading each
//! other.

use crate::event::MAX_EVENT_BYTES;
use crate::log::SIG_BYTES;

/// Bytes of the length prefix in front of every message on a stream.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Fixed bytes of a wire frame besides the event and the signature.
pub const WIRE_FRAME_OVERHEAD: usize = 5;
/// Largest wire frame: a signed frame around the largest event.
pub const MAX_FRAME_BYTES: usize = WIRE_FRAME_OVERHEAD + SIG_BYTES + MAX_EVENT_BYTES;
/// Largest message body (after the length prefix). One Events message holds
/// at least one frame of any size, so this is 1 MiB plus room for the
/// largest frame's overhead and the message header.
pub const MAX_MESSAGE_BYTES: usize = MAX_EVENT_BYTES + 1024;
/// Default for
/// [`SessionConfig::events_bytes_target`](super::SessionConfig::events_bytes_target):
/// an Events message is closed once its frames would exceed this many bytes.
pub const EVENTS_TARGET_BYTES: usize = 64 * 1024;
/// Most entries in a Frontier message (authors a cluster has ever had).
pub const MAX_FRONTIER_ENTRIES: usize = 8192;
/// Default for
/// [`SessionConfig::max_pending_events`](super::SessionConfig::max_pending_events).
pub const MAX_PENDING_EVENTS: usize = 16_384;
/// Default for
/// [`SessionConfig::max_pending_bytes`](super::SessionConfig::max_pending_bytes).
pub const MAX_PENDING_BYTES: usize = 32 * 1024 * 1024;
/// Longest reason in an Error message, in bytes; longer ones are cut.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most heads in an IHave message; a lazy link announces more in several.
pub const MAX_IHAVE_HEADS: usize = 1024;
/// Most heads in a Graft message (the grafting end's heads for the authors
/// it was told about; more are left out).
pub const MAX_GRAFT_HEADS: usize = 1024;
/// Default for [`Pool::new`](super::Pool::new): most events waiting for a
/// dependency in a store's pool, over all its sessions.
pub const MAX_POOL_EVENTS: usize = 65_536;
/// Default for [`Pool::new`](super::Pool::new): most bytes of such events.
pub const MAX_POOL_BYTES: usize = 64 * 1024 * 1024;
/// Default for
/// [`SessionConfig::prune_after`](super::SessionConfig::prune_after): two live
/// pushes in a row that carry only duplicates prune a link. One is too few
/// under load: two sources' events crossing a cycle of eager links at once cut
/// it twice, and the repair (grafts from every node cut off) makes new cycles.
pub const PRUNE_AFTER_DUPLICATE_PUSHES: u32 = 2;
/// Most ids in one [`SessionEvent::Missing`](super::SessionEvent::Missing).
pub const MAX_MISSING_DEPS: usize = 256;
/// Most reports a pool keeps for sessions that have not collected them
/// (the oldest are dropped).
pub const MAX_POOL_MAIL: usize = 1024;
/// Most asks for escrow rights a session holds unsent
/// ([`Session::ask`](super::Session::ask)).
pub const MAX_QUEUED_ASKS: usize = 64;

// An Events message (variant byte, length varint of at most 3 bytes, frames)
// with the largest frame fits, and so does the largest frontier.
const _: () = assert!(1 + 3 + MAX_FRAME_BYTES <= MAX_MESSAGE_BYTES);
const _: () = assert!(1 + 3 + MAX_FRONTIER_ENTRIES * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES <= u32::MAX as usize);
const _: () = assert!(1 + 3 + MAX_IHAVE_HEADS * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
const _: () = assert!(1 + 3 + MAX_GRAFT_HEADS * (32 + 10 + 32) <= MAX_MESSAGE_BYTES);
