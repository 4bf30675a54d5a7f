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
//!
//! # Layout
//!
//! The protocol's parts, each in its own file, in the order they build on
//! each other (none imports a later one):
//!
//! - `limits`: every size and limit, in one place;
//! - `error`: [`SyncError`], why a session failed;
//! - `codec`: the wire format: [`Message`], [`Hello`], [`Head`], wire
//!   frames, [`frontier_digest`], the protocol versions;
//! - `pool`: the [`Pool`] of received events waiting for a dependency;
//! - `store`: the [`Store`] a session reads and writes, and [`MemStore`];
//! - `session`: the [`Session`] state machine, its settings and reports;
//!   its `send` part keeps what the peer is known to hold and the merge of
//!   cursors that streams what it lacks, its `receive` part handles each
//!   message: the checks, unsigned runs, and storing from the pool.
//!
//! [`Event::decode`]: crate::Event::decode
//! [`State::insert`]: crate::State::insert

mod codec;
mod error;
mod limits;
mod pool;
mod session;
mod store;

pub use crate::id::EventRef;
pub use codec::{
    decode_message, decode_wire_frame, encode_message, encode_wire_frame, frontier_digest,
    message_len, wire_frame_len, Head, Hello, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use error::SyncError;
pub use limits::{
    EVENTS_TARGET_BYTES, LENGTH_PREFIX_BYTES, MAX_FRAME_BYTES, MAX_FRONTIER_ENTRIES,
    MAX_GRAFT_HEADS, MAX_IHAVE_HEADS, MAX_MESSAGE_BYTES, MAX_MISSING_DEPS, MAX_PENDING_BYTES,
    MAX_PENDING_EVENTS, MAX_POOL_BYTES, MAX_POOL_EVENTS, MAX_POOL_MAIL, MAX_QUEUED_ASKS,
    MAX_REASON_BYTES, PRUNE_AFTER_DUPLICATE_PUSHES, WIRE_FRAME_OVERHEAD,
};
pub use pool::Pool;
pub use session::{Equivocation, Session, SessionConfig, SessionEvent, SessionStats};
pub use store::{MemStore, Store, Stored};
