//! weftlog's sans-IO core.
//!
//! Everything here is deterministic: no IO, no clock, no randomness of its
//! own. The node (`weftlog`) and the simulator (`weftlog-sim`) drive it.
//!
//! - [`conference`]: the conference domain's commands (sessions,
//!   attendees, seats, the waitlist), each turned into one draft;
//! - [`admission`]: a selling node's own rules under a seat policy (its
//!   clock and connectivity), applied before a sale becomes an event;
//! - [`event`]: the event model, canonical encoding, limits, signatures;
//! - [`hlc`]: the hybrid logical clock;
//! - [`state`]: the CRDT fold, read models, validity against the causal past;
//! - [`seats`]: the venue's seat rules in the fold: policies, overdraft
//!   sales, oversell marks and their compensation;
//! - [`log`]: record framing, segments and recovery over a storage trait;
//! - [`exchange`]: export files and the checks an import makes;
//! - [`fork_proof`]: proofs of a fork that anyone can check from the record
//!   alone;
//! - [`replica`]: one node's state, group commit and durable indexes, and
//!   the store sync sessions use, without IO;
//! - [`since`]: what another replica lacks, judged from its branch heads
//!   (the rule an export file follows);
//! - [`text`]: text fields merged with automerge (one document per
//!   stream and field, positions in UTF-16 units);
//! - [`sync`]: the sync protocol between two replicas, as a state machine;
//! - [`rebalance`]: moving escrow rights to where the sales are, while
//!   connected (who asks, how much, who answers);
//! - [`reconcile`]: what others did concurrently with this node's work of
//!   a disconnected period, grouped by stream and field;
//! - [`peers`]: a node's peer policy (connections, dialling, live push along
//!   a broadcast tree, anti-entropy), as a state machine that owns its sync
//!   sessions;
//! - [`projection`]: ordered projections, user read models folded in the
//!   canonical order, rewound and replayed for late events.
#![warn(missing_docs)]

pub mod admission;
pub mod conference;
pub mod event;
pub mod exchange;
pub mod fork_proof;
pub mod hlc;
pub mod id;
pub mod log;
pub mod peers;
pub mod projection;
pub mod rebalance;
pub mod reconcile;
pub mod replica;
pub mod seats;
pub mod since;
pub mod state;
pub mod sync;
#[cfg(test)]
mod testkit;
pub mod text;

pub use event::{Event, Keypair, Meta, Op, Signature};
pub use hlc::{Hlc, HlcClock};
pub use id::{Dot, EventId, KeyError, NodeId};
pub use state::{Draft, State};
