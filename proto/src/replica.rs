//! The replica: one node's folded state, its group commit and the indexes
//! of its durable log, as a state machine that does no IO.
//!
//! A node (`src/node.rs`: threads and files) and a simulated node
//! (`weftlog-sim`: virtual time and a simulated disk) are shells around one
//! [`Replica`]. The replica owns every rule between a command or a received
//! event and the log; the shell owns the threads, the clock and the
//! storage. The replica never touches storage: it hands out the bytes to
//! write ([`Batch::frames`]) and is told when they are durable.
//!
//! # The model
//!
//! - **Pending records.** A local command becomes an event against the
//!   current [`State`] at once ([`Replica::handle_append`]: idempotency by
//!   command id and expected-version checks are [`State::append_local`]'s,
//!   stamped by the replica's [`HlcClock`] from the shell's `now_ms`).
//!   Events received by sync ([`Replica::handle_received`], through
//!   [`ReplicaStore`]) and imported files ([`Replica::handle_import`], all
//!   or nothing) are applied at once too. Each new event is queued as a
//!   pending record, in the order it was applied, so the log is written in
//!   causal order. Readers of [`Replica::state`] may see an event a moment
//!   before it is durable; a crash loses only what was never acknowledged.
//! - **Group commit.** [`Replica::poll_batch`] takes pending records, in
//!   order, signs the batch's last own record (the signature covers every
//!   own record before it through `prev`), and frames them
//!   ([`log::encode_frame_with`], the commit mark on the batch's last
//!   record). The shell appends the frames, syncs, and calls
//!   [`Replica::handle_durable`]; only then are appends acknowledged and
//!   the batch's signed heads pushed to sync sessions.
//! - **Durable indexes.** Per author, each durable seq's log record index
//!   and hlc (what [`sync::Store::fetch`] reads back from the log), and the
//!   highest durable seq whose record carries a signature: the signed
//!   heads, which are what sync advertises ([`Replica::frontier`]).
//! - **The clock's horizon.** The clock follows received and imported
//!   events only up to [`Hlc::horizon`] of the wall time (`hlc` module
//!   docs): it is seeded on [`Replica::open`] from the largest hlc within
//!   the horizon of the `now_ms` given there, observes an imported or
//!   received event only within the horizon of the last wall time the
//!   shell gave ([`Replica::open`], [`Replica::handle_append`],
//!   [`Replica::handle_import`], [`Replica::handle_time`]), and a new local
//!   event takes as deps only events within the horizon of its own `now_ms`
//!   ([`State::prepare`]). Received events are never held back or refused
//!   by the clock: they are stored as usual and listed by
//!   [`State::ahead`]. The last wall time given is at most the true one
//!   (unless the wall clock stepped back), so a shell that gives it rarely
//!   only makes the clock observe less; a new event's hlc is above its
//!   deps' in any case.
//! - **Failure is fatal.** A failed write or sync
//!   ([`Replica::handle_write_failed`]) stops the replica: no more batches,
//!   and appends and imports are refused with the reason until the node is
//!   reopened ([`Replica::open`]: recovery decides what is on disk).
//! - **A full disk pauses.** A write that ran out of space
//!   ([`log::AppendError::Full`]: the log undid it and ends at its last
//!   record) is handed back with [`Replica::handle_write_full`]. The
//!   replica keeps the batch, as it was (same records, same signature,
//!   same frames), and [`Replica::poll_batch`] gives it again, first, until
//!   it is durable; the shell tries it again every [`DISK_FULL_RETRY_MS`].
//!   Meanwhile appends and imports are refused with
//!   [`AppendError::DiskFull`] (nothing of them is applied), and
//!   [`Replica::disk_full`] says since when and why. What was applied
//!   before stays applied and queued: the kept batch, then the pending
//!   records behind it, are written in order once space is freed, so
//!   nothing is reordered and nothing applied is dropped. Replies waiting
//!   for them keep waiting (they are neither acknowledged nor refused),
//!   and nothing of them is advertised or pushed before it is durable,
//!   since the frontier and [`Committed::heads`] come from durable records
//!   only. Events received by sync meanwhile are still applied and queued
//!   behind the kept batch (they are not acknowledged either, so their
//!   senders keep them and would send them again after a restart): what
//!   the replica holds in memory while full grows only with what the
//!   cluster appends meanwhile. A command id retried while full is refused
//!   like any append; retried once the kept batch is durable, it gives the
//!   existing event.
//!
//! # A restored node learns its own log before it appends
//!
//! A node whose data directory was restored from a backup holds less of
//! its own log than its peers do; appending at once would sign a second
//! event at a seq the cluster already holds (a fork). So a shell with
//! peers calls [`Replica::await_confirmation`] after [`Replica::open`]:
//! until a peer confirms the replica's own frontier, or the wait passes,
//! [`Replica::handle_append`] makes nothing ([`AppendError::Unconfirmed`]),
//! and the shell holds its appends (it does not refuse them) until
//! [`Replica::appends_held`] says they may go. A peer confirms when a sync
//! round with it ends ([`crate::peers::PeerEvent::OwnHead`], handed to
//! [`Replica::handle_own_head`]) and the replica holds as much of its own
//! log as that peer, and as any peer reported before, holds: the round has
//! brought back whatever the backup lacked, so the next append takes the
//! seq after them (a peer that lacks newer own events another reported
//! cannot let appends go). Events by this node that come
//! back by sync are stored like any other. Without peers, or once the wait
//! passes (a desk offline must keep selling), appends go ahead unconfirmed;
//! what follows a fork then is the fork handling's. A replica that is never
//! asked to wait never holds an append. The simulator holds its nodes'
//! commands by the same calls after each restart (not at the first start
//! of a fresh cluster, which has nothing to learn), for
//! [`CONFIRM_WAIT_MS`] unless its scenario says otherwise.
//!
//! # Rebalancing
//!
//! The replica watches the escrow counters its node sells from
//! ([`Replica::handle_append`] notes each sale, and each sale refused for
//! want of rights), and says when to ask connected peers for rights
//! ([`Replica::poll_asks`]) and what to give a peer that asks
//! ([`Replica::handle_ask`], now, or [`Replica::poll_answers`], once its
//! spare rights grew): ordinary transfer commands, which the shell appends
//! like any other. The rule is [`crate::rebalance`]'s; the asks travel as
//! sync messages.
//!
//! # A batch never ends inside a received run
//!
//! Sync stores an author's events in runs that end at a signed event
//! (`sync` module docs). Until the run's signed end arrives, its events are
//! applied but their author's signed head is below them. A batch that
//! ended there, with an own event (or any signed event) that depends on the
//! run, would make that event a durable signed head whose dependency is not
//! advertised: a peer lacking the run would fail the round ("depends on
//! event …, which the peer never sent"). So a record closes a batch only
//! if no received run is open after it, and [`Replica::poll_batch`] ends
//! every batch at such a record. A run left open (the session failed in
//! its middle, having stored part of it) is closed by
//! [`Replica::handle_received_end`], which [`ReplicaStore`] calls when it
//! is dropped.
//!
//! # Order of calls
//!
//! 1. [`Replica::open`] over the log's storage: recovery
//!    ([`log::open_committed`]), the fold, the indexes, the clock.
//! 2. Any number of inputs, in any order: [`Replica::handle_append`],
//!    [`Replica::handle_import`], and received events through a
//!    [`ReplicaStore`] (one per `Session::handle_message` call, dropped
//!    after it). [`Replica::mark`] after an input is the point in the queue
//!    its reply waits for.
//! 3. [`Replica::poll_batch`]; append [`Batch::frames`] to the [`Log`] at
//!    record index `first` and sync; then [`Replica::handle_durable`] with
//!    the batch and `first` (batches become durable in the order they were
//!    polled: at most one is written at a time), or
//!    [`Replica::handle_write_failed`]. Replies whose mark is at most
//!    [`Committed::mark`] are now durable; push [`Committed::heads`] to
//!    the sync sessions.
//!
//! # Threads
//!
//! The replica is a plain value; a threaded shell keeps it behind a lock.
//! A [`ReplicaStore`] reaches the replica through an [`Access`], which may
//! take that lock at the store's first insert and hold it until the store
//! is dropped: signature checks (in the session, before any insert) run
//! outside the lock, and a received run is stored whole before anyone
//! else sees the replica.

use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::admission::{self, Connectivity, RuleNow};
use crate::event::{Event, Keypair, Op, Signature};
use crate::exchange::{self, Incoming};
use crate::hlc::{Hlc, HlcClock};
use crate::id::{EventId, NodeId};
use crate::log::{self, encode_frame_with, Log, OpenError, Recovery, Storage};
use crate::rebalance::{self, Ask, Rebalancer};
use crate::since::{self, SinceError};
use crate::state::{self, Draft, Inserted, Invalid, PrepareError, Slot, State};
use crate::sync::{self, Head, Pool, Stored};

/// How long a shell waits, after a write ran out of space, before it tries
/// the kept batch again ([`Replica::handle_write_full`]).
pub const DISK_FULL_RETRY_MS: u64 = 500;

/// How long a shell with peers holds appends at start, by default, for a
/// peer to confirm the own log ([`Replica::await_confirmation`]): many sync
/// rounds on a LAN, and short enough that a desk cut off from its peers
/// sells again soon. The node's `--confirm-wait-ms` and the simulator's
/// `confirm_wait_ms` default to it.
pub const CONFIRM_WAIT_MS: u64 = 3_000;

/// One node's replica. See the module docs for the model and the order of
/// calls.
#[derive(Debug)]
pub struct Replica {
    key: Keypair,
    id: NodeId,
    state: State,
    clock: HlcClock,
    /// Records applied and not yet taken by [`Replica::poll_batch`].
    pending: VecDeque<Pending>,
    /// Authors whose last queued record is an unsigned received one: a run
    /// whose signed end has not arrived.
    open: BTreeSet<NodeId>,
    /// Records queued since open: the position after the last one.
    queued: u64,
    /// The position after the last record that may end a batch.
    closed: u64,
    /// The position after the last record taken by `poll_batch`.
    taken: u64,
    /// The position after the last durable batch.
    durable_at: u64,
    /// Own records queued and not yet durable.
    unacked: u64,
    /// Events by this node that came back from outside (sync or import):
    /// the log had lost them, so it was restored from a copy.
    own_returned: u64,
    /// Per lane of the state ([`State::slot_of`]), each durable event's
    /// (log record index, hlc), by its index in the lane. An author that
    /// never forked has one lane, seq 1 up.
    durable: Vec<Vec<(u64, Hlc)>>,
    /// Per lane, the index of the highest durable event whose record
    /// carries a signature: the signed heads, one per branch.
    signed: BTreeMap<u32, usize>,
    /// Records in the durable log.
    records: u64,
    /// Why the log stopped, after a failed write or sync.
    failed: Option<String>,
    /// Set while a write ran out of space and its batch is not yet durable.
    full: Option<DiskFull>,
    /// The batch whose write ran out of space, given again by `poll_batch`.
    kept: Option<Batch>,
    /// The last wall time the shell gave: received events are observed
    /// against it (module docs, "The clock's horizon").
    wall_ms: u64,
    /// Whether peers confirmed the own log, and how long appends wait for
    /// it (module docs, "A restored node learns its own log").
    confirm: Confirm,
    /// The last sync round and what counters had left then, for the seat
    /// policies' admission rules ([`admission`]).
    conn: Connectivity,
    /// Escrow counters an event touched since the last look for oversold
    /// sales that need their automatic compensation
    /// ([`Replica::compensate`]).
    unchecked: BTreeSet<(String, String)>,
    /// The counters this node sold from, and when it last asked peers for
    /// rights (module docs, "Rebalancing").
    rebalance: Rebalancer,
}

/// Peers that confirmed this replica's own frontier, at most: enough to
/// show it was more than one, bounded however many peers a node has.
pub const MAX_CONFIRMED_BY: usize = 16;

/// The replica's own frontier as peers confirmed it ([`Replica::own_frontier`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnFrontier {
    /// A peer's sync round ended with this replica holding every own event
    /// the peer holds.
    pub confirmed: bool,
    /// The peers that confirmed it, ascending (at most [`MAX_CONFIRMED_BY`]).
    pub by: Vec<NodeId>,
    /// When it was first confirmed, by the shell's wall clock (ms).
    pub at_ms: Option<u64>,
    /// The highest own seq held when it was first confirmed.
    pub seq: u64,
    /// Appends wait for a confirmation until this wall time (ms); `None` if
    /// the replica was never asked to wait ([`Replica::await_confirmation`]).
    pub wait_until_ms: Option<u64>,
}

/// See [`OwnFrontier`].
#[derive(Debug, Default)]
struct Confirm {
    by: BTreeSet<NodeId>,
    at_ms: Option<u64>,
    seq: u64,
    until_ms: Option<u64>,
    /// The wait passed unconfirmed ([`Replica::appends_held`]).
    waited: bool,
    /// The highest own seq any peer reported holding: a peer confirms only
    /// once the replica holds that much, so a peer that lacks newer own
    /// events cannot confirm after another reported them.
    reported: u64,
}

/// A write ran out of space ([`Replica::handle_write_full`]): appends and
/// imports are refused until its batch is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFull {
    /// When the first write ran out of space, by the shell's clock
    /// (milliseconds since the Unix epoch).
    pub since_ms: u64,
    /// When the kept batch was last tried, by the shell's clock.
    pub last_try_ms: u64,
    /// Writes of the kept batch that ran out of space so far.
    pub tries: u64,
    /// The storage error of the last try.
    pub error: String,
}

/// A record applied to the state and waiting for a group commit.
#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    id: EventId,
    author: NodeId,
    seq: u64,
    hlc: Hlc,
    sig: Option<Signature>,
    /// No received run is open after this record: a batch may end here.
    closes: bool,
}

/// A point in the replica's queue of records: everything applied before it
/// was taken. Compare with [`Committed::mark`] to know whether it is
/// durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mark(u64);

/// What [`Replica::handle_append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Event id.
    pub id: EventId,
    /// Author.
    pub author: NodeId,
    /// Seq.
    pub seq: u64,
    /// Hlc.
    pub hlc: Hlc,
    /// Stream.
    pub stream: String,
    /// Stream version after the event.
    pub version: u64,
    /// Whether the command id was already in the log (nothing was appended;
    /// this is that command's event).
    pub existing: bool,
}

/// What [`Replica::handle_import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// New events stored.
    pub imported: u64,
    /// Events already present.
    pub duplicates: u64,
}

/// Why [`Replica::handle_append`] made nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The command was refused.
    #[error(transparent)]
    Refused(#[from] PrepareError),
    /// A seat policy's admission rule refused a sale ([`admission`]).
    #[error(transparent)]
    Seats(#[from] admission::Refused),
    /// A write or sync failed earlier; the node must be reopened.
    #[error("the log is unusable after a failed write or sync: {0}")]
    Failed(String),
    /// The disk is full ([`Replica::disk_full`]): nothing was applied.
    #[error(
        "disk full ({0}): refused, nothing stored; appends resume by themselves when space is freed"
    )]
    DiskFull(String),
    /// No peer has confirmed the replica's own frontier yet and the wait
    /// is not over ([`Replica::appends_held`]): nothing was applied. A
    /// shell holds the append and gives it again later.
    #[error("waiting until {until_ms} ms for a peer to confirm this node's own log")]
    Unconfirmed {
        /// The wall time (ms) after which appends go ahead unconfirmed.
        until_ms: u64,
    },
    /// A sale lacked rights that connected peers hold spare: it waits for
    /// their transfer until `until_ms` ([`Replica::handle_held_sale`]).
    /// Nothing was applied.
    #[error("waiting until {until_ms} ms for escrow rights from a connected peer")]
    AwaitingRights {
        /// The wall time (ms) after which the sale is refused if rights
        /// still lack.
        until_ms: u64,
    },
}

/// The counter and the rights lacking, when `e` refused a sale for want of
/// rights (the fold's check, or a risk window that admits no overdraft).
fn short_of_rights(e: &AppendError) -> Option<(String, u64)> {
    match e {
        AppendError::Refused(PrepareError::Invalid(state::Invalid::InsufficientRights {
            counter,
            held,
            wanted,
        })) => Some((
            counter.clone(),
            u64::try_from(wanted.saturating_sub(*held)).unwrap_or(u64::MAX),
        )),
        AppendError::Seats(admission::Refused::NoOverdraft {
            counter,
            held,
            wanted,
            ..
        }) => Some((
            counter.clone(),
            // Rights received repay a debt (`held` < 0) first.
            u64::try_from(i128::from(*wanted) - *held).unwrap_or(u64::MAX),
        )),
        _ => None,
    }
}

/// Why [`Replica::handle_import`] stored nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// An event was refused.
    #[error(transparent)]
    Refused(#[from] exchange::ImportError),
    /// A write or sync failed earlier; the node must be reopened.
    #[error("the log is unusable after a failed write or sync: {0}")]
    Failed(String),
    /// The disk is full ([`Replica::disk_full`]): nothing was stored.
    #[error(
        "disk full ({0}): refused, nothing stored; imports resume by themselves when space is freed"
    )]
    DiskFull(String),
}

/// Records taken by [`Replica::poll_batch`], to be written as one commit.
#[derive(Debug)]
pub struct Batch {
    records: Vec<Pending>,
    /// Queue positions of the batch: `[first, end)`.
    first: u64,
    end: u64,
    /// The frames, made on first use (outside any lock the shell holds).
    frames: OnceCell<Vec<u8>>,
}

/// What became durable with a batch ([`Replica::handle_durable`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Everything queued before this mark is durable.
    pub mark: Mark,
    /// Records written.
    pub records: u64,
    /// Bytes written (frames).
    pub bytes: u64,
    /// The node's own events in the batch, now acknowledged: `(id, seq)`.
    pub acked: Vec<(EventId, u64)>,
    /// Per author and branch, the highest event in the batch that carries
    /// a signature, ascending: what sync sessions may now push
    /// ([`sync::Session::handle_stored`]).
    pub heads: Vec<Head>,
    /// The batch's events in log order: `(id, encoded event)`.
    pub events: Vec<(EventId, Vec<u8>)>,
}

impl Replica {
    /// An empty replica of `key`'s node, as [`Replica::open`] makes over an
    /// empty log.
    pub fn new(key: Keypair) -> Replica {
        Replica {
            id: key.node_id(),
            key,
            state: State::new(),
            clock: HlcClock::default(),
            pending: VecDeque::new(),
            open: BTreeSet::new(),
            queued: 0,
            closed: 0,
            taken: 0,
            durable_at: 0,
            unacked: 0,
            own_returned: 0,
            durable: Vec::new(),
            signed: BTreeMap::new(),
            records: 0,
            failed: None,
            full: None,
            kept: None,
            wall_ms: 0,
            confirm: Confirm::default(),
            conn: Connectivity::new(),
            unchecked: BTreeSet::new(),
            rebalance: Rebalancer::new(),
        }
    }

    /// Opens the log over `storage` ([`log::open_committed`]: a torn tail
    /// and an interrupted batch are cut, each author's last signature is
    /// verified), folds it, indexes its records, and seeds the clock with
    /// the largest hlc within [`Hlc::horizon`] of the wall time `now_ms`.
    /// `storage` opens the storage afresh for each pass.
    pub fn open<S: Storage>(
        key: Keypair,
        now_ms: u64,
        storage: impl FnMut() -> Result<S, OpenError>,
    ) -> Result<(Replica, Log<S>, Recovery), OpenError> {
        let fresh = || Replica::new(Keypair::from_secret(key.secret()));
        let (log, recovery, mut replica) =
            log::open_committed(storage, fresh, |r, frame, event| {
                match r.state.insert(event, frame.id).map_err(|e| e.to_string())? {
                    Inserted::New => {}
                    Inserted::Duplicate => return Err("the event is in the log twice".into()),
                }
                r.index(r.records, &frame.id, event.hlc, frame.sig.is_some());
                r.records += 1;
                Ok(())
            })?;
        debug_assert_eq!(replica.records, log.records());
        replica.clock = HlcClock::new(replica.state.max_hlc_within(Hlc::horizon(now_ms)));
        replica.wall_ms = now_ms;
        Ok((replica, log, recovery))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The node's key.
    pub fn keypair(&self) -> &Keypair {
        &self.key
    }

    /// The folded state: every event applied, durable or not.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The folded state, by value.
    pub fn into_state(self) -> State {
        self.state
    }

    /// Why the log stopped, if a write or sync failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether a write ran out of space and its batch is not yet durable
    /// ([`Replica::handle_write_full`]).
    pub fn disk_full(&self) -> Option<&DiskFull> {
        self.full.as_ref()
    }

    /// Runs a local command at wall time `now_ms`: the event is applied at
    /// once and queued for the next batch. A command id already in the log
    /// gives that command's event (`existing`) and queues nothing.
    ///
    /// A sale refused for want of rights while connected peers hold spare
    /// rights covering it gives [`AppendError::AwaitingRights`] instead of
    /// the refusal ([`crate::rebalance`], "A refused sale waits"): nothing
    /// was applied, the ask goes out with the next
    /// [`Replica::poll_asks`], and the shell gives the sale again with
    /// [`Replica::handle_held_sale`] as rights arrive (after received
    /// events) and at the deadline. So a shell keeps a copy of a draft that
    /// sells ([`rebalance::sales`]) until it is answered.
    pub fn handle_append(&mut self, draft: Draft, now_ms: u64) -> Result<Appended, AppendError> {
        self.append(draft, now_ms, None)
    }

    /// Gives again a sale that [`AppendError::AwaitingRights`] held until
    /// `until_ms`: made if the rights now cover it; the refusal itself at
    /// or after `until_ms`, or once no connected peer is seen with spare
    /// rights covering it any more; else `AwaitingRights` again.
    pub fn handle_held_sale(
        &mut self,
        draft: Draft,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Appended, AppendError> {
        self.append(draft, now_ms, Some(until_ms))
    }

    fn append(
        &mut self,
        draft: Draft,
        now_ms: u64,
        held_until: Option<u64>,
    ) -> Result<Appended, AppendError> {
        let sells = draft.ops.iter().any(|op| {
            matches!(
                op,
                crate::Op::EscrowConsume { .. } | crate::Op::EscrowOverdraw { .. }
            )
        });
        if !sells {
            // Only a sale waits (a transfer short of rights is refused).
            return self.try_append(draft, now_ms);
        }
        let stream = draft.stream.clone();
        match self.try_append(draft, now_ms) {
            Err(e) => {
                let Some((counter, shortfall)) = short_of_rights(&e) else {
                    return Err(e);
                };
                let worth = self.rebalance.worth_waiting(
                    &self.state,
                    &self.id,
                    &stream,
                    &counter,
                    shortfall,
                );
                if !worth {
                    // No connected peer is seen with spare rights covering
                    // it (any more: they sold them, or went away).
                    return Err(e);
                }
                let until_ms =
                    held_until.unwrap_or_else(|| now_ms.saturating_add(rebalance::RIGHTS_WAIT_MS));
                if now_ms < until_ms {
                    Err(AppendError::AwaitingRights { until_ms })
                } else {
                    Err(e)
                }
            }
            ok => ok,
        }
    }

    fn try_append(&mut self, draft: Draft, now_ms: u64) -> Result<Appended, AppendError> {
        self.wall_ms = now_ms;
        if let Some(why) = &self.failed {
            return Err(AppendError::Failed(why.clone()));
        }
        if let Some(full) = &self.full {
            return Err(AppendError::DiskFull(full.error.clone()));
        }
        if let Some(until_ms) = self.appends_held(now_ms) {
            return Err(AppendError::Unconfirmed { until_ms });
        }
        let mut draft = draft;
        let sales = rebalance::sales(&draft);
        // A command id already in the log gives its event, whatever the
        // seat rules say now.
        let retried = draft
            .meta
            .command_id
            .as_deref()
            .is_some_and(|c| self.state.command(&draft.stream, c).is_some());
        if !retried {
            if let Err(e) = admission::admit(&self.state, &self.id, &self.conn, &mut draft, now_ms)
            {
                if let admission::Refused::NoOverdraft {
                    counter,
                    held,
                    wanted,
                    ..
                } = &e
                {
                    // Rights would let it through: ask for them (a debt is
                    // repaid first).
                    let short = i128::from(*wanted) - *held;
                    self.rebalance.note_refused(
                        &draft.stream,
                        counter,
                        u64::try_from(short).unwrap_or(u64::MAX),
                    );
                }
                return Err(e.into());
            }
        }
        self.touched(&draft.stream, &draft.ops);
        let made = self
            .state
            .append_local(self.id, &mut self.clock, now_ms, draft);
        self.rebalance.note(&sales, &made);
        match made? {
            state::Appended::Existing(rec) => Ok(Appended {
                id: rec.id,
                author: rec.author,
                seq: rec.seq,
                hlc: rec.hlc,
                stream: rec.stream,
                version: rec.version,
                existing: true,
            }),
            state::Appended::New { event, bytes, id } => {
                let version = self.state.version(&event.stream);
                self.queue(
                    Pending {
                        bytes,
                        id,
                        author: self.id,
                        seq: event.seq,
                        hlc: event.hlc,
                        sig: None,
                        closes: false,
                    },
                    false,
                );
                // A sale may complete an oversell this replica can see.
                self.compensate(now_ms);
                Ok(Appended {
                    id,
                    author: self.id,
                    seq: event.seq,
                    hlc: event.hlc,
                    stream: event.stream,
                    version,
                    existing: false,
                })
            }
        }
    }

    /// The asks for escrow rights due at wall time `now_ms`, to peers in
    /// `connected` (those with an established connection): `(peer, ask)`.
    /// Send each to its peer ([`crate::peers::Peers::ask`]). Call it after
    /// appends (a refused sale asks at once) and after received events; see
    /// [`crate::rebalance`] for the rule.
    pub fn poll_asks(&mut self, now_ms: u64, connected: &[NodeId]) -> Vec<(NodeId, Ask)> {
        self.rebalance
            .poll(&self.state, &self.id, now_ms, connected)
    }

    /// `peer`'s ask for escrow rights, at wall time `now_ms`: the transfer
    /// to make now ([`rebalance::answer`]), as a command the shell appends
    /// like any other ([`Replica::handle_append`]: the node through its
    /// committer); `None` when nothing is given now (the ask may stay open,
    /// [`Replica::poll_answers`]).
    pub fn handle_ask(&mut self, peer: NodeId, ask: &Ask, now_ms: u64) -> Option<Draft> {
        self.rebalance
            .handle_ask(&self.state, &self.id, &peer, ask, now_ms)
    }

    /// Transfers for open asks that this node can answer now, at wall time
    /// `now_ms` (its spare rights grew since they came): append each like
    /// any command. Call it with [`Replica::poll_asks`].
    pub fn poll_answers(&mut self, now_ms: u64) -> Vec<Draft> {
        self.rebalance.poll_answers(&self.state, &self.id, now_ms)
    }

    /// Imports authenticated events ([`exchange::authenticate`]) at wall
    /// time `now_ms`: every one is checked against its causal past first,
    /// and either all new ones are applied and queued, or none. The clock
    /// observes the largest hlc within [`Hlc::horizon`]`(now_ms)`.
    pub fn handle_import(
        &mut self,
        items: Vec<Incoming>,
        now_ms: u64,
    ) -> Result<Imported, ImportError> {
        self.wall_ms = now_ms;
        if let Some(why) = &self.failed {
            return Err(ImportError::Failed(why.clone()));
        }
        if let Some(full) = &self.full {
            return Err(ImportError::DiskFull(full.error.clone()));
        }
        let mut scratch = self.state.clone();
        let mut new = Vec::new();
        let mut duplicates = 0;
        for item in items {
            match scratch.insert(&item.event, item.id) {
                Ok(Inserted::New) => new.push(item),
                Ok(Inserted::Duplicate) => duplicates += 1,
                Err(e) => return Err(exchange::ImportError::event(&item, e).into()),
            }
        }
        self.clock
            .observe(scratch.max_hlc_within(Hlc::horizon(now_ms)));
        for item in &new {
            self.touched(&item.event.stream, &item.event.ops);
        }
        self.state = scratch;
        let imported = new.len() as u64;
        // `authenticate` ends every author's run signed; should a caller
        // skip it, the import must still not hold batches back for ever.
        let mut unsigned_ends: BTreeSet<NodeId> = BTreeSet::new();
        for item in &new {
            if item.sig.is_none() {
                unsigned_ends.insert(item.event.author);
            } else {
                unsigned_ends.remove(&item.event.author);
            }
        }
        for item in new {
            self.queue(
                Pending {
                    bytes: item.bytes,
                    id: item.id,
                    author: item.event.author,
                    seq: item.event.seq,
                    hlc: item.event.hlc,
                    sig: item.sig,
                    closes: false,
                },
                true,
            );
        }
        if !unsigned_ends.is_empty() {
            self.open.retain(|a| !unsigned_ends.contains(a));
            self.close_if_none_open();
        }
        self.compensate(now_ms);
        Ok(Imported {
            imported,
            duplicates,
        })
    }

    /// Stores an authenticated event received by sync, as
    /// [`sync::Store::insert`] does: checked against its causal past
    /// ([`State::insert`]: on error nothing changes), applied, observed by
    /// the clock if within [`Hlc::horizon`] of the last wall time given
    /// (module docs), and queued with its signature. Call
    /// [`Replica::handle_received_end`] after the last insert of a
    /// session's call; [`ReplicaStore`] does both.
    pub fn handle_received(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid> {
        self.touched(&event.stream, &event.ops);
        let r = self.state.insert(event, id)?;
        if r == Inserted::New {
            self.clock.observe_at(event.hlc, self.wall_ms);
            self.queue(
                Pending {
                    bytes: bytes.to_vec(),
                    id,
                    author: event.author,
                    seq: event.seq,
                    hlc: event.hlc,
                    sig,
                    closes: false,
                },
                true,
            );
        }
        Ok(r)
    }

    /// A sync round with a peer ended in sync at wall time `now_ms`
    /// ([`crate::peers::PeerEvent::Synced`]): the seat policies' admission
    /// rules measure connectivity from it ([`admission`]).
    pub fn handle_synced(&mut self, now_ms: u64) {
        self.conn.handle_synced(&self.state, now_ms);
        self.compensate(now_ms);
    }

    /// An event of `stream` with `ops` is about to be applied: the escrow
    /// counters it touches are noted for admission (before the state
    /// changes, [`Connectivity::touched`]) and for [`Replica::compensate`].
    fn touched(&mut self, stream: &str, ops: &[Op]) {
        self.conn.touched(&self.state, stream, ops);
        for op in ops.iter().filter(|op| op.is_escrow()) {
            self.unchecked
                .insert((stream.to_string(), op.target().to_string()));
        }
    }

    /// Writes, at wall time `now_ms`, the automatic compensation of every
    /// oversold sale, on the counters events touched since the last call,
    /// that has none ([`admission::compensations`]). The replica calls it
    /// itself after a local sale, an import, the end of a received run
    /// ([`Replica::handle_received_end`]) and a sync round
    /// ([`Replica::handle_synced`]); a compensation that cannot be written
    /// then (appends held, disk full) is tried again at the next call.
    /// Returns how many were written.
    pub fn compensate(&mut self, now_ms: u64) -> usize {
        let mut written = 0;
        for (stream, counter) in std::mem::take(&mut self.unchecked) {
            for draft in admission::compensations(&self.state, &stream, &counter) {
                match self.handle_append(draft, now_ms) {
                    Ok(a) if !a.existing => written += 1,
                    Ok(_) => {}
                    Err(_) => {
                        self.unchecked.insert((stream.clone(), counter.clone()));
                    }
                }
            }
        }
        written
    }

    /// When the last sync round ended, by this node's wall clock.
    pub fn last_round_ms(&self) -> Option<u64> {
        self.conn.last_round_ms()
    }

    /// The seat rule that applies now to a sale on `counter` of `stream`
    /// ([`admission::rule_now`]).
    pub fn rule_now(&self, stream: &str, counter: &str, now_ms: u64) -> RuleNow {
        admission::rule_now(&self.state, &self.id, &self.conn, stream, counter, now_ms)
    }

    /// The shell's wall time: received events are observed against the last
    /// one given (module docs, "The clock's horizon").
    pub fn handle_time(&mut self, now_ms: u64) {
        self.wall_ms = now_ms;
    }

    /// Holds appends until a peer confirms the own frontier or the wall
    /// time `until_ms` passes, whichever comes first (module docs, "A
    /// restored node learns its own log"). A shell with peers calls it
    /// after [`Replica::open`]; one without peers does not, and its appends
    /// are never held. Nothing if a peer has confirmed already.
    pub fn await_confirmation(&mut self, until_ms: u64) {
        if self.confirm.at_ms.is_none() {
            self.confirm.until_ms = Some(until_ms);
            self.confirm.waited = false;
        }
    }

    /// A sync round with `peer` ended at wall time `now_ms`, the peer
    /// holding this node's own events up to `seq` (0: none;
    /// [`crate::peers::PeerEvent::OwnHead`]). The peer confirms the own
    /// frontier if the replica holds that much of its own log (applied,
    /// durable or not), and as much as any peer reported holding before:
    /// from then on appends are not held. Returns whether it confirmed.
    pub fn handle_own_head(&mut self, peer: NodeId, seq: u64, now_ms: u64) -> bool {
        if peer == self.id {
            return false;
        }
        self.confirm.reported = self.confirm.reported.max(seq);
        let want = self.confirm.reported;
        if self.own_seq() < want {
            // A peer holds more of this node's log than it does: the round
            // did not bring it all (it waits for a dependency), or this
            // peer lacks what another reported. (Any branch counts: once
            // the author forked, appends go on the branch this replica's
            // log holds, which need not be the longest.)
            return false;
        }
        if self.confirm.at_ms.is_none() {
            self.confirm.at_ms = Some(now_ms);
            self.confirm.seq = self.own_seq();
        }
        if self.confirm.by.len() < MAX_CONFIRMED_BY {
            self.confirm.by.insert(peer);
        }
        true
    }

    /// Whether appends are held at wall time `now_ms`: the wall time until
    /// which they wait ([`Replica::await_confirmation`]) while no peer has
    /// confirmed the own frontier and it has not passed; `None` when they
    /// may go. Once a call finds the wait passed, the hold is over for
    /// good: a wall clock stepped back afterwards does not hold appends
    /// again (that would leave requests waiting on a clock, not on peers).
    pub fn appends_held(&mut self, now_ms: u64) -> Option<u64> {
        match self.confirm.until_ms {
            Some(until) if self.confirm.at_ms.is_none() && !self.confirm.waited => {
                if now_ms < until {
                    return Some(until);
                }
                self.confirm.waited = true;
                None
            }
            _ => None,
        }
    }

    /// The own frontier as peers confirmed it, for status.
    pub fn own_frontier(&self) -> OwnFrontier {
        OwnFrontier {
            confirmed: self.confirm.at_ms.is_some(),
            by: self.confirm.by.iter().copied().collect(),
            at_ms: self.confirm.at_ms,
            seq: self.confirm.seq,
            wait_until_ms: self.confirm.until_ms,
        }
    }

    /// The events queued and not yet taken by a batch, decoded: for tests.
    #[cfg(test)]
    pub(crate) fn pending_events(&self) -> impl Iterator<Item = Event> + '_ {
        self.pending
            .iter()
            .map(|p| Event::decode_trusted(&p.bytes).expect("a queued record is an event"))
    }

    /// The highest own seq applied (on any branch).
    fn own_seq(&self) -> u64 {
        self.state.max_seq(&self.id)
    }

    /// Ends a run of received events: runs still open (their signed end
    /// never came: the session failed in their middle) no longer hold
    /// batches back. Their events are written unsigned, and advertised once
    /// a later signed event of their author arrives.
    pub fn handle_received_end(&mut self) {
        if !self.open.is_empty() {
            self.open.clear();
            self.close_if_none_open();
        }
        self.compensate(self.wall_ms);
    }

    /// Takes the next batch: pending records in order, at most
    /// `max_records` (at least one), ending at a record that closes a batch
    /// (see the module docs; a received run longer than `max_records` is
    /// taken whole). Signs the batch's last own record. `None` when nothing
    /// can be taken, or after a failed write. A batch kept after a write ran
    /// out of space ([`Replica::handle_write_full`]) comes first, as it was.
    pub fn poll_batch(&mut self, max_records: usize) -> Option<Batch> {
        if self.failed.is_some() {
            return None;
        }
        if let Some(kept) = self.kept.take() {
            return Some(kept);
        }
        let avail = (self.closed - self.taken) as usize;
        if avail == 0 {
            return None;
        }
        let max = max_records.max(1);
        let n = if avail <= max {
            avail
        } else {
            let closes = |k: &usize| self.pending[*k - 1].closes;
            (1..=max)
                .rev()
                .find(closes)
                .or_else(|| (max + 1..=avail).find(closes))
                // Invariant: the record before `closed` closes a batch.
                .expect("a record closes a batch at `closed`")
        };
        let mut records: Vec<Pending> = self.pending.drain(..n).collect();
        let first = self.taken;
        self.taken += n as u64;
        if let Some(p) = records.iter_mut().rev().find(|p| p.author == self.id) {
            if p.sig.is_none() {
                p.sig = Some(self.key.sign(&p.id));
            }
        }
        Some(Batch {
            records,
            first,
            end: self.taken,
            frames: OnceCell::new(),
        })
    }

    /// The shell appended `batch`'s frames to the log at record index
    /// `first_record` and synced them: indexes them and says what became
    /// durable.
    ///
    /// # Panics
    /// If `batch` is not the oldest batch polled and not yet durable, or if
    /// `first_record` is not the number of records in the durable log.
    pub fn handle_durable(&mut self, batch: Batch, first_record: u64) -> Committed {
        assert_eq!(
            batch.first, self.durable_at,
            "batches become durable in the order they were polled"
        );
        assert_eq!(
            first_record, self.records,
            "the batch must follow the durable log"
        );
        let bytes = batch.frames().len() as u64;
        let mut heads: BTreeMap<u32, Head> = BTreeMap::new();
        let mut acked = Vec::new();
        let mut events = Vec::with_capacity(batch.records.len());
        for p in batch.records {
            let signed = p.sig.is_some();
            let lane = self.index(self.records, &p.id, p.hlc, signed);
            self.records += 1;
            if signed {
                let head = Head {
                    author: p.author,
                    seq: p.seq,
                    id: p.id,
                };
                heads.insert(lane, head);
            }
            if p.author == self.id {
                acked.push((p.id, p.seq));
            }
            events.push((p.id, p.bytes));
        }
        self.unacked -= acked.len() as u64;
        self.durable_at = batch.end;
        self.full = None;
        Committed {
            mark: Mark(batch.end),
            records: events.len() as u64,
            bytes,
            acked,
            heads: {
                let mut h: Vec<Head> = heads.into_values().collect();
                h.sort_unstable();
                h
            },
            events,
        }
    }

    /// A write or sync of a batch failed: the replica stops. No more
    /// batches; appends and imports are refused with `why` until the node
    /// is reopened. The first reason is kept.
    pub fn handle_write_failed(&mut self, why: String) {
        self.failed.get_or_insert(why);
    }

    /// The write of `batch` ran out of space at wall time `now_ms`, and the
    /// log undid it ([`log::AppendError::Full`]): the replica keeps the
    /// batch for [`Replica::poll_batch`] to give again, and refuses appends
    /// and imports until it is durable (module docs). Try it again after
    /// [`DISK_FULL_RETRY_MS`].
    ///
    /// # Panics
    /// If `batch` is not the oldest batch polled and not yet durable.
    pub fn handle_write_full(&mut self, batch: Batch, error: String, now_ms: u64) {
        assert_eq!(
            batch.first, self.durable_at,
            "only the batch being written can be kept"
        );
        debug_assert!(self.kept.is_none(), "one batch is written at a time");
        let full = self.full.get_or_insert(DiskFull {
            since_ms: now_ms,
            last_try_ms: now_ms,
            tries: 0,
            error: String::new(),
        });
        full.last_try_ms = now_ms;
        full.tries += 1;
        full.error = error;
        self.kept = Some(batch);
    }

    /// The point in the queue after everything applied so far.
    pub fn mark(&self) -> Mark {
        Mark(self.queued)
    }

    /// The point in the queue up to which everything is durable.
    pub fn durable_mark(&self) -> Mark {
        Mark(self.durable_at)
    }

    /// Whether records wait for a batch.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Records waiting for a batch.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// How many events by this node were received from outside since the
    /// replica opened. Each means the log had lost an own event (a restore
    /// from a copy, or a copied data directory): the shell's log positions
    /// no longer name the history its readers saw.
    pub fn own_returned(&self) -> u64 {
        self.own_returned
    }

    /// Own records applied and not yet durable (pending, or in a batch
    /// being written).
    pub fn unacked(&self) -> u64 {
        self.unacked
    }

    /// Records in the durable log.
    pub fn durable_len(&self) -> u64 {
        self.records
    }

    /// A durable event's log record index and hlc.
    /// On the chain [`State::event_id`] follows.
    pub fn durable_record(&self, author: &NodeId, seq: u64) -> Option<(u64, Hlc)> {
        self.durable_record_of(&self.state.event_id(author, seq)?)
    }

    /// A durable event's log record index and hlc, by id.
    pub fn durable_record_of(&self, id: &EventId) -> Option<(u64, Hlc)> {
        let slot = self.state.slot_of(id)?;
        self.durable
            .get(slot.lane as usize)?
            .get(slot.index)
            .copied()
    }

    /// Per author, the highest durable seq whose record carries a signature
    /// (on any branch).
    pub fn signed_heads(&self) -> BTreeMap<NodeId, u64> {
        let mut out = BTreeMap::new();
        for h in self.frontier() {
            out.insert(h.author, h.seq);
        }
        out
    }

    /// What sync advertises: the signed heads, one per author and branch,
    /// ascending. They are causally closed (no batch ends inside a
    /// received run).
    pub fn frontier(&self) -> Vec<Head> {
        let mut out: Vec<Head> = self
            .signed
            .iter()
            .filter_map(|(&lane, &index)| {
                let (author, seq, id) = self.state.at_slot(Slot { lane, index })?;
                Some(Head { author, seq, id })
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The durable log records an export file holds for a replica whose
    /// branch heads are `theirs` (all of them when empty): the events of
    /// [`since::lacking`] from this replica's signed durable heads
    /// ([`Replica::frontier`]), so that each chain ends at a signed event,
    /// as `(record index, id)` ascending by record (log order, which is
    /// causal order), each event once.
    pub fn export_records(&self, theirs: &[Head]) -> Result<Vec<(u64, EventId)>, SinceError> {
        let spans = since::lacking(&self.state, &self.frontier(), theirs)?;
        let mut out = BTreeMap::new();
        for span in spans {
            for id in span.ids(&self.state) {
                match self.durable_record_of(&id) {
                    Some((record, _)) => {
                        out.insert(record, id);
                    }
                    // The log is in causal order: a durable head's chain is
                    // durable.
                    None => debug_assert!(false, "a durable head's chain is durable"),
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Queues a new record. `received` for events from peers or files,
    /// whose unsigned runs stay open until their signed end.
    fn queue(&mut self, mut p: Pending, received: bool) {
        if p.sig.is_some() {
            self.open.remove(&p.author);
        } else if received {
            self.open.insert(p.author);
        }
        if p.author == self.id {
            self.unacked += 1;
            if received {
                self.own_returned += 1;
            }
        }
        p.closes = self.open.is_empty();
        self.queued += 1;
        if p.closes {
            self.closed = self.queued;
        }
        self.pending.push_back(p);
    }

    /// Lets a batch end after the last queued record if no run is open.
    fn close_if_none_open(&mut self) {
        if !self.open.is_empty() {
            return;
        }
        if let Some(last) = self.pending.back_mut() {
            last.closes = true;
            self.closed = self.queued;
        }
    }

    /// Indexes durable record `record`, the event `id` (applied to the
    /// state). Returns its lane.
    fn index(&mut self, record: u64, id: &EventId, hlc: Hlc, signed: bool) -> u32 {
        // Every record is applied before it is indexed.
        let slot = self.state.slot_of(id).expect("indexed events are applied");
        let lane = slot.lane as usize;
        if self.durable.len() <= lane {
            self.durable.resize_with(lane + 1, Vec::new);
        }
        let seqs = &mut self.durable[lane];
        debug_assert_eq!(seqs.len(), slot.index, "log out of chain order");
        seqs.push((record, hlc));
        if signed {
            self.signed.insert(slot.lane, slot.index);
        }
        slot.lane
    }
}

impl Batch {
    /// The batch's frames, one byte buffer: append it to the log as is.
    pub fn frames(&self) -> &[u8] {
        self.frames.get_or_init(|| {
            let mut out = Vec::new();
            let n = self.records.len();
            for (i, p) in self.records.iter().enumerate() {
                encode_frame_with(&mut out, &p.bytes, &p.id, p.sig.as_ref(), i + 1 == n);
            }
            out
        })
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the batch holds no record (only after [`Batch::retain_own`]).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The mark that becomes durable with the batch.
    pub fn mark(&self) -> Mark {
        Mark(self.end)
    }

    /// Test hook (the simulator's sabotage of a node that never writes
    /// received events): drops the batch's received records.
    #[doc(hidden)]
    pub fn retain_own(&mut self, id: NodeId) {
        self.records.retain(|p| p.author == id);
        self.frames = OnceCell::new();
    }
}

/// How a [`ReplicaStore`] reaches the replica and the log it describes.
///
/// A threaded shell keeps the replica behind a lock: `read` may take it
/// for the call, and `write` takes it at the first call and holds it until
/// the access is dropped, so that a received run is stored whole (module
/// docs). A single-threaded shell simply lends the replica.
pub trait Access {
    /// Runs `f` on the replica.
    fn read<T>(&self, f: impl FnOnce(&Replica) -> T) -> T;
    /// Runs `f` on the replica to store received events.
    fn write<T>(&mut self, f: impl FnOnce(&mut Replica) -> T) -> T;
    /// Reads durable log record `record` (checked as it is read): the
    /// event's encoding, its id and its signature. `None` if it cannot be
    /// read.
    fn read_record(&self, record: u64) -> Option<(Vec<u8>, EventId, Option<Signature>)>;
    /// Takes the pool of received events waiting for a dependency that all
    /// the node's sessions share ([`sync::Store::pool`]), if the shell keeps
    /// one and nobody else holds it now; the store gives it back with
    /// [`Access::put_pool`] when it is dropped.
    fn take_pool(&mut self) -> Option<Pool> {
        None
    }
    /// Gives back what [`Access::take_pool`] took.
    fn put_pool(&mut self, pool: Pool) {
        drop(pool);
    }
}

/// [`Access`] for a single-threaded shell: the replica and its log, lent
/// for as long as the store lives.
#[derive(Debug)]
pub struct Lent<'a, S> {
    replica: &'a mut Replica,
    log: RefCell<Option<&'a mut Log<S>>>,
    pool: Option<&'a mut Option<Pool>>,
}

impl<'a, S: Storage> Lent<'a, S> {
    /// Lends `replica` and the log it describes (`None` while the shell has
    /// no log open: nothing can be fetched).
    pub fn new(replica: &'a mut Replica, log: Option<&'a mut Log<S>>) -> Lent<'a, S> {
        Lent {
            replica,
            log: RefCell::new(log),
            pool: None,
        }
    }

    /// Lends the shell's shared pool too (a slot: `None` while a store
    /// holds it).
    pub fn with_pool(mut self, pool: &'a mut Option<Pool>) -> Lent<'a, S> {
        self.pool = Some(pool);
        self
    }
}

impl<S: Storage> Access for Lent<'_, S> {
    fn read<T>(&self, f: impl FnOnce(&Replica) -> T) -> T {
        f(self.replica)
    }

    fn write<T>(&mut self, f: impl FnOnce(&mut Replica) -> T) -> T {
        f(self.replica)
    }

    fn read_record(&self, record: u64) -> Option<(Vec<u8>, EventId, Option<Signature>)> {
        let mut log = self.log.borrow_mut();
        read_record(log.as_mut()?, record)
    }

    fn take_pool(&mut self) -> Option<Pool> {
        self.pool.as_mut()?.take()
    }

    fn put_pool(&mut self, pool: Pool) {
        if let Some(slot) = self.pool.as_mut() {
            **slot = Some(pool);
        }
    }
}

/// Reads record `record` of `log` for [`Access::read_record`].
pub fn read_record<S: Storage>(
    log: &mut Log<S>,
    record: u64,
) -> Option<(Vec<u8>, EventId, Option<Signature>)> {
    let (read, _) = log
        .read_with(record, |f| (f.bytes.to_vec(), f.id, f.sig))
        .ok()?;
    Some(read)
}

/// A replica as a [`sync::Store`] for sync sessions: it advertises and
/// serves only durable events, each author up to its last signed one, and
/// queues received events for the next batch.
///
/// Make one per `Session` call that may insert (`handle_message`) and drop
/// it after: dropping it ends the received input
/// ([`Replica::handle_received_end`]).
#[derive(Debug)]
pub struct ReplicaStore<A: Access> {
    access: A,
    /// The shared pool, taken from the shell at the first use.
    pool: Option<Pool>,
    /// Whether it was asked for (it is taken once per store).
    pool_asked: bool,
    /// An insert was made: end the received input on drop.
    inserted: bool,
}

impl<A: Access> ReplicaStore<A> {
    /// A store over `access`.
    pub fn new(access: A) -> ReplicaStore<A> {
        ReplicaStore {
            access,
            pool: None,
            pool_asked: false,
            inserted: false,
        }
    }
}

impl<A: Access> Drop for ReplicaStore<A> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            self.access.put_pool(pool);
        }
        if self.inserted {
            self.access.write(Replica::handle_received_end);
        }
    }
}

impl<A: Access> sync::Store for ReplicaStore<A> {
    fn frontier(&self) -> Vec<Head> {
        self.access.read(Replica::frontier)
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.access.read(|r| r.state.event_id(author, seq))
    }

    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId> {
        self.access.read(|r| r.state.chain_id(head, seq))
    }

    fn common_seq(&self, a: &EventId, b: &EventId) -> u64 {
        self.access.read(|r| r.state.common_seq(a, b))
    }

    fn contains(&self, id: &EventId) -> bool {
        self.access.read(|r| r.state.contains(id))
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.access
            .read(|r| r.durable_record(author, seq))
            .map(|(_, hlc)| hlc)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored> {
        self.fetch_id(&self.access.read(|r| r.state.event_id(author, seq))?)
    }

    fn fetch_id(&self, id: &EventId) -> Option<Stored> {
        let (record, hlc) = self.access.read(|r| r.durable_record_of(id))?;
        let (bytes, id, sig) = self.access.read_record(record)?;
        Some(Stored {
            bytes,
            id,
            hlc,
            sig,
        })
    }

    fn insert(
        &mut self,
        event: &Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<Inserted, Invalid> {
        self.inserted = true;
        self.access
            .write(|r| r.handle_received(event, id, bytes, sig))
    }

    fn pool(&mut self) -> Option<&mut Pool> {
        if !self.pool_asked {
            self.pool_asked = true;
            self.pool = self.access.take_pool();
        }
        self.pool.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::event::Op;
    use crate::hlc::MAX_CLOCK_AHEAD_MS;
    use crate::log::MemStorage;
    use crate::sync::{MemStore, Session, SessionConfig, SessionEvent, Store, SyncError};

    const CLUSTER: [u8; 32] = [9; 32];

    fn key(secret: u8) -> Keypair {
        Keypair::from_secret([secret; 32])
    }

    fn edit(v: &str) -> Draft {
        Draft {
            stream: "attendee/1".into(),
            kind: "Edited".into(),
            ops: vec![Op::Set {
                field: "email".into(),
                value: format!("{v:?}").into_bytes(),
                supersedes: vec![],
            }],
            ..Draft::default()
        }
    }

    /// A replica over fresh in-memory storage, with its log.
    /// `(author, seq)` of each head.
    fn dots(heads: &[Head]) -> Vec<(NodeId, u64)> {
        heads.iter().map(|h| (h.author, h.seq)).collect()
    }

    fn open(secret: u8) -> (Replica, Log<MemStorage>) {
        let (r, log, recovery) = Replica::open(key(secret), 0, || Ok(MemStorage::new())).unwrap();
        assert_eq!(recovery.torn, None);
        (r, log)
    }

    /// Writes the next batch as a shell does; `None` if there is none.
    fn commit(r: &mut Replica, log: &mut Log<MemStorage>) -> Option<Committed> {
        let batch = r.poll_batch(usize::MAX)?;
        let first = log.records();
        log.append(batch.frames(), batch.len() as u64).unwrap();
        Some(r.handle_durable(batch, first))
    }

    /// A run of `n` events by peer X, made in one commit (signed at its
    /// end), as sync hands them to a store; and X's id.
    fn peer_run(n: usize) -> (NodeId, Vec<Received>) {
        let kx = key(7);
        let mut x = MemStore::new();
        let drafts = (0..n).map(|i| edit(&format!("x{i}")));
        x.commit(&kx, &mut HlcClock::default(), 1_000, drafts)
            .unwrap();
        (kx.node_id(), received(&x, kx.node_id()))
    }

    /// An event as sync hands it to a store: `(event, id, bytes, sig)`.
    type Received = (Event, EventId, Vec<u8>, Option<Signature>);

    /// A peer's events as sync hands them to a store.
    fn received(peer: &MemStore, author: NodeId) -> Vec<Received> {
        (1..)
            .map_while(|seq| peer.get(&author, seq))
            .map(|s| {
                let (event, id) = Event::decode(&s.bytes).unwrap();
                (event, id, s.bytes.clone(), s.sig)
            })
            .collect()
    }

    /// Shuttles messages between a replica and a `MemStore` until both are
    /// quiet; returns what the `MemStore`'s session reported.
    fn sync_with(
        r: &mut Replica,
        log: &mut Log<MemStorage>,
        peer: &mut MemStore,
        peer_id: NodeId,
    ) -> Vec<SessionEvent> {
        let mut cr = SessionConfig::new(CLUSTER, r.id());
        cr.peer = Some(peer_id);
        let mut cp = SessionConfig::new(CLUSTER, peer_id);
        cp.peer = Some(r.id());
        fn store<'a>(
            r: &'a mut Replica,
            log: &'a mut Log<MemStorage>,
        ) -> ReplicaStore<Lent<'a, MemStorage>> {
            ReplicaStore::new(Lent::new(r, Some(log)))
        }
        let mut sr = Session::new(cr, &store(r, log));
        let mut sp = Session::new(cp, &*peer);
        loop {
            let mut quiet = true;
            while let Some(m) = sr.poll_transmit(&store(r, log)) {
                let _ = sp.handle_message(&m, peer);
                quiet = false;
            }
            while let Some(m) = sp.poll_transmit(&*peer) {
                let _ = sr.handle_message(&m, &mut store(r, log));
                quiet = false;
            }
            if quiet {
                break;
            }
        }
        std::iter::from_fn(|| sp.poll_event()).collect()
    }

    fn failures(events: &[SessionEvent]) -> Vec<&SyncError> {
        events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Failed(err) => Some(err),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_append_is_acknowledged_and_advertised_once_its_batch_is_durable() {
        let (mut r, mut log) = open(1);
        let a = r.handle_append(edit("a"), 1_000).unwrap();
        let b = r.handle_append(edit("b"), 1_001).unwrap();
        assert_eq!((a.seq, b.seq, b.version, b.existing), (1, 2, 2, false));
        let wait = r.mark();
        assert!(r.durable_mark() < wait && r.has_pending());
        assert_eq!(r.unacked(), 2);
        // Applied at once, advertised only once durable.
        assert_eq!(r.state().len(), 2);
        assert!(r.frontier().is_empty());
        let batch = r.poll_batch(16).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(r.poll_batch(16).is_none(), "one batch in flight takes all");
        let first = log.records();
        log.append(batch.frames(), batch.len() as u64).unwrap();
        let c = r.handle_durable(batch, first);
        assert!(c.mark >= wait);
        assert_eq!(c.acked, vec![(a.id, 1), (b.id, 2)]);
        assert_eq!(dots(&c.heads), vec![(r.id(), 2)]);
        assert_eq!(c.events.len(), 2);
        assert_eq!(r.unacked(), 0);
        assert_eq!(r.durable_len(), 2);
        assert_eq!(
            r.frontier(),
            vec![Head {
                author: r.id(),
                seq: 2,
                id: b.id
            }]
        );
        // Served from the log: the batch's last own event is signed.
        let store = ReplicaStore::new(Lent::new(&mut r, Some(&mut log)));
        let got = store.fetch(&a.author, 2).unwrap();
        assert_eq!((got.id, got.hlc), (b.id, b.hlc));
        crate::event::verify(&a.author, &b.id, &got.sig.unwrap()).unwrap();
        assert_eq!(store.fetch(&a.author, 1).unwrap().sig, None);
        assert_eq!(store.hlc(&a.author, 1), Some(a.hlc));
        assert!(store.fetch(&a.author, 3).is_none());
    }

    #[test]
    fn a_command_id_already_applied_is_the_existing_event() {
        let (mut r, mut log) = open(1);
        let mut d = edit("a");
        d.meta.command_id = Some("c-1".into());
        let a = r.handle_append(d.clone(), 1_000).unwrap();
        let mark = r.mark();
        let again = r.handle_append(d, 1_001).unwrap();
        assert!(again.existing && again.id == a.id);
        assert_eq!(r.mark(), mark, "nothing queued");
        commit(&mut r, &mut log).unwrap();
        let mut stale = edit("b");
        stale.expected_version = Some(0);
        assert!(matches!(
            r.handle_append(stale, 1_002),
            Err(AppendError::Refused(PrepareError::VersionMismatch { .. }))
        ));
    }

    /// The bug this guards against: a node whose committer ran between two
    /// inserts of one received run wrote a batch [X1, L] (X1 an unsigned
    /// received event, L an own event depending on it). It then advertised
    /// L, signed and durable, but not X1 (X's signed head was below it), so
    /// a peer lacking X1 failed the round on L's dependency.
    #[test]
    fn a_batch_never_ends_inside_a_received_run() {
        let (x, run) = peer_run(2);
        assert!(
            run[0].3.is_none() && run[1].3.is_some(),
            "one run, signed at its end"
        );
        let (mut n, mut log) = open(2);
        let l0 = n.handle_append(edit("n0"), 500).unwrap();
        // The committer's interleaving: X1 stored, a local command applied
        // (it depends on X1), a batch taken, and only then X2.
        let (e, id, bytes, sig) = &run[0];
        n.handle_received(e, *id, bytes, *sig).unwrap();
        let l1 = n.handle_append(edit("n1"), 2_000).unwrap();
        let c = commit(&mut n, &mut log).unwrap();
        // What N advertises is causally closed: a peer syncs cleanly.
        let kp = key(3);
        let mut p = MemStore::new();
        let at_p = sync_with(&mut n, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        // Because the batch ended before the open run.
        assert_eq!(c.acked, vec![(l0.id, 1)]);
        assert_eq!(p.len(), 1);
        assert!(n.poll_batch(usize::MAX).is_none(), "X1 and L wait for X2");
        // The run's end closes it: everything goes in one batch.
        let (e, id, bytes, sig) = &run[1];
        n.handle_received(e, *id, bytes, *sig).unwrap();
        let c = commit(&mut n, &mut log).unwrap();
        assert_eq!(c.records, 3);
        assert_eq!(c.acked, vec![(l1.id, 2)]);
        let mut heads = vec![(x, 2), (n.id(), 2)];
        heads.sort();
        assert_eq!(dots(&c.heads), heads);
        let at_p = sync_with(&mut n, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn a_run_left_open_is_released_when_the_received_input_ends() {
        let (x, run) = peer_run(2);
        let (mut n, mut log) = open(2);
        {
            // A session stored X1 and then failed: the store is dropped.
            let mut store = ReplicaStore::new(Lent::new(&mut n, Some(&mut log)));
            let (e, id, bytes, sig) = &run[0];
            assert_eq!(store.insert(e, *id, bytes, *sig), Ok(Inserted::New));
        }
        let c = commit(&mut n, &mut log).unwrap();
        assert_eq!(c.records, 1);
        assert!(c.heads.is_empty(), "written, but not advertised");
        assert!(n.frontier().is_empty());
        assert_eq!(n.durable_record(&x, 1).map(|(rec, _)| rec), Some(0));
    }

    #[test]
    fn batches_end_at_closing_records_within_the_limit() {
        let (x, run) = peer_run(5);
        let (mut n, mut log) = open(2);
        n.handle_append(edit("a"), 500).unwrap();
        n.handle_append(edit("b"), 501).unwrap();
        for (e, id, bytes, sig) in &run {
            n.handle_received(e, *id, bytes, *sig).unwrap();
        }
        n.handle_append(edit("c"), 3_000).unwrap();
        // Two own records close; the run of five closes at its signed end,
        // so a limit of three takes the own records, then the run whole.
        let sizes: Vec<u64> = std::iter::from_fn(|| {
            let batch = n.poll_batch(3)?;
            let first = log.records();
            log.append(batch.frames(), batch.len() as u64).unwrap();
            Some(n.handle_durable(batch, first).records)
        })
        .collect();
        assert_eq!(sizes, vec![2, 5, 1]);
        assert_eq!(n.durable_len(), 8);
        assert_eq!(n.signed_heads()[&x], 5);
        assert_eq!(n.signed_heads()[&n.id()], 3);
    }

    #[test]
    fn a_received_run_goes_through_a_session_whole() {
        let kx = key(7);
        let mut x = MemStore::new();
        for i in 0..3 {
            let drafts = (0..4).map(|j| edit(&format!("x{i}.{j}")));
            x.commit(&kx, &mut HlcClock::default(), 1_000 + i, drafts)
                .unwrap();
        }
        let (mut n, mut log) = open(2);
        let at_x = sync_with(&mut n, &mut log, &mut x, kx.node_id());
        assert!(failures(&at_x).is_empty(), "{at_x:?}");
        assert_eq!(n.state().len(), 12);
        let c = commit(&mut n, &mut log).unwrap();
        assert_eq!(c.records, 12);
        assert_eq!(dots(&c.heads), vec![(kx.node_id(), 12)]);
        assert!(c.acked.is_empty());
        assert_eq!(n.frontier(), x.frontier());
    }

    #[test]
    fn an_import_is_all_or_nothing() {
        let (_, run) = peer_run(2);
        let incoming = |seqs: &[u64]| -> Vec<Incoming> {
            run.iter()
                .filter(|(e, ..)| seqs.contains(&e.seq))
                .cloned()
                .map(|(event, id, bytes, sig)| Incoming {
                    event,
                    id,
                    bytes,
                    sig,
                })
                .collect()
        };
        let (mut n, mut log) = open(2);
        n.handle_append(edit("n"), 500).unwrap();
        let (len, mark, hash) = (n.state().len(), n.mark(), n.state().state_hash());
        // X2 without X1: its chain predecessor is missing.
        assert!(matches!(
            n.handle_import(incoming(&[2]), 500),
            Err(ImportError::Refused(exchange::ImportError::Event { .. }))
        ));
        assert_eq!(
            (n.state().len(), n.mark(), n.state().state_hash()),
            (len, mark, hash)
        );
        let done = n.handle_import(incoming(&[1, 2]), 500).unwrap();
        assert_eq!(
            done,
            Imported {
                imported: 2,
                duplicates: 0
            }
        );
        let again = n.handle_import(incoming(&[1, 2]), 500).unwrap();
        assert_eq!(
            again,
            Imported {
                imported: 0,
                duplicates: 2
            }
        );
        let c = commit(&mut n, &mut log).unwrap();
        assert_eq!(c.records, 3);
        assert_eq!(c.heads.len(), 2, "the import kept X2's signature");
    }

    #[test]
    fn a_reopen_after_a_torn_batch_keeps_what_was_durable() {
        let (mut r, mut log) = open(1);
        r.handle_append(edit("a"), 1_000).unwrap();
        r.handle_append(edit("b"), 1_001).unwrap();
        commit(&mut r, &mut log).unwrap();
        let hash = r.state().state_hash();
        r.handle_append(edit("c"), 1_002).unwrap();
        r.handle_append(edit("d"), 1_003).unwrap();
        let batch = r.poll_batch(usize::MAX).unwrap();
        // The write is issued, the sync never returns, half of it lands.
        let disk = Rc::new(RefCell::new(log.into_storage()));
        disk.borrow_mut().fail_sync = true;
        let (mut log, ..) = Log::open(disk.clone(), |_| Ok(())).unwrap();
        assert!(log.append(batch.frames(), 2).is_err());
        r.handle_write_failed("injected".into());
        disk.borrow_mut().fail_sync = false;
        disk.borrow_mut().crash(batch.frames().len() / 2);
        let (mut r, log, recovery) = Replica::open(key(1), 10, || Ok(disk.clone())).unwrap();
        assert!(recovery.torn.is_some());
        assert_eq!((log.records(), r.durable_len()), (2, 2));
        assert_eq!(r.state().state_hash(), hash);
        assert_eq!(r.signed_heads()[&r.id()], 2);
        assert_eq!(r.failed(), None);
        // The clock is above the recovered events; new events follow them.
        let e = r.handle_append(edit("e"), 10).unwrap();
        assert_eq!(e.seq, 3);
        assert!(e.hlc > Hlc::from_ms(1_001));
    }

    /// A replica restored from a backup that lacks its last own events
    /// holds appends until a peer confirms its own frontier; the round
    /// that confirms it brings those events back (stored like any
    /// received event), so the next append follows them instead of
    /// forking. Offline, appends go ahead once the wait passes; a replica
    /// never asked to wait never holds one.
    #[test]
    fn a_restored_replica_takes_its_own_events_back_before_it_appends() {
        let (mut r, mut log) = open(1);
        r.handle_append(edit("a"), 1_000).unwrap();
        r.handle_append(edit("b"), 1_001).unwrap();
        commit(&mut r, &mut log).unwrap();
        assert_eq!(r.appends_held(1_001), None, "never asked to wait");
        let backup = log.into_storage();
        // The original goes on: two more events, which a peer receives.
        let (mut r, mut log, _) = Replica::open(key(1), 1_002, || Ok(backup.clone())).unwrap();
        r.handle_append(edit("c"), 1_002).unwrap();
        r.handle_append(edit("d"), 1_003).unwrap();
        commit(&mut r, &mut log).unwrap();
        let kp = key(3);
        let mut p = MemStore::new();
        let at_p = sync_with(&mut r, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        assert_eq!(p.len(), 4);

        // The backup comes back, with peers: appends are held.
        let (mut n, mut log, _) = Replica::open(key(1), 2_000, || Ok(backup.clone())).unwrap();
        n.await_confirmation(5_000);
        assert_eq!(n.appends_held(2_000), Some(5_000));
        assert_eq!(
            n.handle_append(edit("e"), 2_000),
            Err(AppendError::Unconfirmed { until_ms: 5_000 })
        );
        assert_eq!(n.mark(), Mark(0), "nothing applied");
        // A peer that holds more of the own log than the replica does not
        // confirm it.
        assert!(!n.handle_own_head(kp.node_id(), 4, 2_100));
        assert!(!n.own_frontier().confirmed);
        // The round brings the own events back; then the peer confirms.
        let at_p = sync_with(&mut n, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        assert!(n.state().event_id(&n.id(), 4).is_some());
        assert!(n.handle_own_head(kp.node_id(), 4, 2_200));
        assert_eq!(
            n.own_frontier(),
            OwnFrontier {
                confirmed: true,
                by: vec![kp.node_id()],
                at_ms: Some(2_200),
                seq: 4,
                wait_until_ms: Some(5_000),
            }
        );
        assert_eq!(n.appends_held(2_200), None);
        let e = n.handle_append(edit("e"), 2_300).unwrap();
        assert_eq!(e.seq, 5, "after the events taken back: no fork");
        commit(&mut n, &mut log).unwrap();
        let at_p = sync_with(&mut n, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        assert!(
            !at_p
                .iter()
                .any(|e| matches!(e, SessionEvent::Equivocation(_))),
            "{at_p:?}"
        );
        assert_eq!(p.len(), 5);

        // Offline: the wait passes and appends go ahead.
        let (mut m, ..) = Replica::open(key(1), 2_000, || Ok(backup.clone())).unwrap();
        m.await_confirmation(3_000);
        assert!(m.handle_append(edit("f"), 2_999).is_err());
        assert_eq!(m.appends_held(3_000), None);
        assert_eq!(m.handle_append(edit("f"), 3_000).unwrap().seq, 3);
        assert!(!m.own_frontier().confirmed);
        // A clock stepped back after the wait passed holds nothing again.
        assert_eq!(m.appends_held(2_500), None);
        assert_eq!(m.handle_append(edit("g"), 2_500).unwrap().seq, 4);
    }

    /// A write that runs out of space pauses the replica: its batch is
    /// kept and given again as it was; appends and imports are refused with
    /// nothing applied; nothing of it is acknowledged or advertised;
    /// received events queue behind it. Once space is freed, the kept batch
    /// and then what queued behind it become durable, the pause ends, a
    /// retried command id gives the existing event, and a reopen finds
    /// every record and no torn tail.
    #[test]
    fn a_full_disk_pauses_appends_until_the_kept_batch_is_written() {
        let disk = Rc::new(RefCell::new(MemStorage::new()));
        let (mut r, mut log, _) = Replica::open(key(1), 1_000, || Ok(disk.clone())).unwrap();
        let write = |r: &mut Replica, log: &mut Log<Rc<RefCell<MemStorage>>>| {
            let batch = r.poll_batch(usize::MAX).unwrap();
            let first = log.records();
            match log.append(batch.frames(), batch.len() as u64) {
                Ok(()) => Some(r.handle_durable(batch, first)),
                Err(crate::log::AppendError::Full(e)) => {
                    r.handle_write_full(
                        batch,
                        e.to_string(),
                        2_000 + r.disk_full().map_or(0, |f| f.tries),
                    );
                    None
                }
                Err(e) => panic!("{e}"),
            }
        };
        let a = r.handle_append(edit("a"), 1_000).unwrap();
        write(&mut r, &mut log).unwrap();
        let mut d = edit("b");
        d.meta.command_id = Some("c-b".into());
        let b = r.handle_append(d.clone(), 1_001).unwrap();
        let wait = r.mark();
        disk.borrow_mut().space = Some(10);
        assert!(write(&mut r, &mut log).is_none());
        let full = r.disk_full().unwrap().clone();
        assert_eq!((full.since_ms, full.tries), (2_000, 1));
        assert!(full.error.contains("no space left"), "{}", full.error);
        // Refused, nothing applied: a new command, a retry of the kept one,
        // an import.
        let hash = r.state().state_hash();
        let refused = r.handle_append(edit("c"), 2_001).unwrap_err();
        assert!(matches!(refused, AppendError::DiskFull(_)));
        assert!(refused.to_string().starts_with("disk full"), "{refused}");
        assert!(matches!(
            r.handle_append(d.clone(), 2_001),
            Err(AppendError::DiskFull(_))
        ));
        assert!(matches!(
            r.handle_import(Vec::new(), 2_000),
            Err(ImportError::DiskFull(_))
        ));
        assert_eq!(r.state().state_hash(), hash);
        // Not acknowledged, not advertised.
        assert!(r.durable_mark() < wait);
        assert_eq!(r.unacked(), 1);
        let a_head = Head {
            author: r.id(),
            seq: 1,
            id: a.id,
        };
        assert_eq!(r.frontier(), vec![a_head]);
        // Received events still queue, behind the kept batch.
        let (x, run) = peer_run(2);
        for (e, id, bytes, sig) in &run {
            r.handle_received(e, *id, bytes, *sig).unwrap();
        }
        r.handle_received_end();
        // Still full: the same batch again, which fails again.
        disk.borrow_mut().space = Some(0);
        assert!(write(&mut r, &mut log).is_none());
        let full = r.disk_full().unwrap();
        assert_eq!(
            (full.since_ms, full.last_try_ms, full.tries),
            (2_000, 2_001, 2)
        );
        assert_eq!(r.frontier(), vec![a_head]);
        // Space is freed: the kept batch first, then the received run.
        disk.borrow_mut().space = None;
        let c = write(&mut r, &mut log).unwrap();
        assert_eq!((c.records, c.acked.clone()), (1, vec![(b.id, 2)]));
        assert!(c.mark >= wait);
        assert_eq!(r.disk_full(), None);
        let c = write(&mut r, &mut log).unwrap();
        assert_eq!(dots(&c.heads), vec![(x, 2)]);
        assert!(r.poll_batch(usize::MAX).is_none());
        // A retried command id gives the existing event.
        let again = r.handle_append(d, 3_000).unwrap();
        assert!(again.existing && again.id == b.id);
        let hash = r.state().state_hash();
        drop(log);
        let (reopened, log, recovery) = Replica::open(key(1), 3_000, || Ok(disk.clone())).unwrap();
        assert_eq!(recovery.torn, None);
        assert_eq!(log.records(), 4);
        assert_eq!(reopened.state().state_hash(), hash);
        // Appends work again.
        r.handle_append(edit("c"), 3_001).unwrap();
    }

    /// A wall time of the clock tests: 2023-11-14.
    const T: u64 = 1_700_000_000_000;
    /// How far ahead the fast clocks of the clock tests run.
    const TEN_MIN: u64 = 600_000;

    /// Stores `from`'s event `(author, seq)` in `to`, as sync would.
    fn give(to: &mut MemStore, from: &MemStore, author: NodeId, seq: u64) {
        let s = from.get(&author, seq).unwrap();
        let (e, id) = Event::decode(&s.bytes).unwrap();
        assert_eq!(to.insert(&e, id, &s.bytes, s.sig), Ok(Inserted::New));
    }

    /// Feeds a peer's events to `n` as sync does, the peer's order.
    fn receive_all(n: &mut Replica, peer: &MemStore, author: NodeId) {
        for (e, id, bytes, sig) in received(peer, author) {
            assert_eq!(n.handle_received(&e, id, &bytes, sig), Ok(Inserted::New));
        }
        n.handle_received_end();
    }

    /// Own event `seq` of `n`, decoded from the pending queue or the log.
    fn own_event(n: &Replica, log: &mut Log<MemStorage>, seq: u64) -> Event {
        let pending = n.pending.iter().find(|p| p.author == n.id && p.seq == seq);
        let bytes = match pending {
            Some(p) => p.bytes.clone(),
            None => {
                let (record, _) = n.durable_record(&n.id, seq).unwrap();
                read_record(log, record).unwrap().0
            }
        };
        Event::decode(&bytes).unwrap().0
    }

    /// X's clock runs ten minutes ahead from its second event on; Y, whose
    /// clock also ran ahead, builds on it. N, with a true clock, stores all
    /// of it, but neither follows nor depends on what is beyond its
    /// horizon until its wall time catches up.
    #[test]
    fn an_event_far_ahead_is_stored_but_not_followed_until_the_wall_time_catches_up() {
        let (kx, ky) = (key(7), key(8));
        let (x, y) = (kx.node_id(), ky.node_id());
        let (mut sx, mut sy) = (MemStore::new(), MemStore::new());
        let (mut cx, mut cy) = (HlcClock::default(), HlcClock::default());
        let x1 = sx.commit(&kx, &mut cx, T, [edit("x1")]).unwrap()[0];
        let x2 = sx.commit(&kx, &mut cx, T + TEN_MIN, [edit("x2")]).unwrap()[0];
        give(&mut sy, &sx, x, 1);
        let y1 = sy.commit(&ky, &mut cy, T, [edit("y1")]).unwrap()[0];
        give(&mut sy, &sx, x, 2);
        let y2 = sy
            .commit(&ky, &mut cy, T + TEN_MIN + 5, [edit("y2")])
            .unwrap()[0];
        let hlc = |s: &MemStore, a: NodeId, seq: u64| s.get(&a, seq).unwrap().hlc;
        let (y1_hlc, y2_hlc) = (hlc(&sy, y, 1), hlc(&sy, y, 2));
        assert!(y2_hlc > hlc(&sx, x, 2), "y2 follows x2");

        let (mut n, mut log) = open(2);
        n.handle_time(T + 1_000);
        receive_all(&mut n, &sx, x);
        receive_all(&mut n, &sy, y);
        // Stored, as every replica stores it; the clock followed x1 and y1.
        assert_eq!(n.state().len(), 4);
        assert!(n.state().contains(&x2) && n.state().contains(&y2));
        assert_eq!(n.clock.last(), y1_hlc);
        let ahead = n.state().ahead(T + 1_000);
        assert_eq!(ahead.events, 2);
        let far = ahead.furthest.unwrap();
        assert_eq!((far.author, far.seq, far.id, far.hlc), (y, 2, y2, y2_hlc));
        assert_eq!(far.ahead_ms, TEN_MIN + 5 - 1_000);

        // N's next event depends on y1 (which implies x1), not on x2 or
        // y2, and carries N's wall time; its write leaves y2's standing.
        let n1 = n.handle_append(edit("n1"), T + 1_000).unwrap();
        assert_eq!(n1.hlc, Hlc::from_ms(T + 1_000));
        let e1 = own_event(&n, &mut log, 1);
        assert_eq!(e1.deps, vec![y1]);
        let Op::Set { supersedes, .. } = &e1.ops[0] else {
            unreachable!()
        };
        assert!(supersedes.is_empty(), "y2 is the only standing write");
        let email = &n.state().stream("attendee/1").unwrap().fields["email"];
        assert_eq!(email.len(), 2, "n1 is concurrent with y2: a conflict");
        commit(&mut n, &mut log).unwrap();

        // Reopened, the clock is seeded below the horizon: from n1.
        let disk = log.into_storage();
        let (mut n, mut log, _) = Replica::open(key(2), T + 1_500, || Ok(disk.clone())).unwrap();
        assert_eq!(n.clock.last(), n1.hlc);
        assert_eq!(n.state().ahead(T + 1_500).events, 2);

        // When x2 is within the horizon but y2 is not, x2 is a dep (X's
        // latest event within the horizon; y1, Y's, is in n1's past).
        let at = T + TEN_MIN - MAX_CLOCK_AHEAD_MS + 2;
        n.handle_append(edit("n2"), at).unwrap();
        let e2 = own_event(&n, &mut log, 2);
        assert_eq!(e2.deps, vec![x2]);
        assert_eq!(e2.hlc, Hlc(hlc(&sx, x, 2).0 + 1), "just above x2");
        assert_eq!(n.state().ahead(at).events, 1);

        // Once the wall time has passed y2, it is an ordinary dep.
        let late = T + TEN_MIN + 10;
        n.handle_append(edit("n3"), late).unwrap();
        let e3 = own_event(&n, &mut log, 3);
        assert_eq!(e3.deps, vec![y2]);
        assert_eq!(e3.hlc, Hlc::from_ms(late));
        let email = &n.state().stream("attendee/1").unwrap().fields["email"];
        assert_eq!(email.len(), 1, "n3 supersedes y2 and n2");
        assert_eq!(n.state().ahead(late), Default::default());
        commit(&mut n, &mut log).unwrap();

        // Every event N made is valid elsewhere: a peer syncs cleanly and
        // folds to the same state.
        let kp = key(3);
        let mut p = MemStore::new();
        let at_p = sync_with(&mut n, &mut log, &mut p, kp.node_id());
        assert!(failures(&at_p).is_empty(), "{at_p:?}");
        assert_eq!(p.len(), 7);
        assert_eq!(p.state().state_hash(), n.state().state_hash());
        assert!(p.state().contains(&x1));
    }

    #[test]
    fn an_import_is_observed_only_within_the_horizon() {
        let kx = key(7);
        let mut sx = MemStore::new();
        let mut cx = HlcClock::default();
        sx.commit(&kx, &mut cx, T, [edit("x1")]).unwrap();
        sx.commit(&kx, &mut cx, T + TEN_MIN, [edit("x2")]).unwrap();
        let items = received(&sx, kx.node_id())
            .into_iter()
            .map(|(event, id, bytes, sig)| Incoming {
                event,
                id,
                bytes,
                sig,
            })
            .collect();
        let (mut n, _log) = open(2);
        let done = n.handle_import(items, T).unwrap();
        assert_eq!(done.imported, 2);
        assert_eq!(n.clock.last(), Hlc::from_ms(T));
        let a = n.handle_append(edit("n1"), T + 1).unwrap();
        assert_eq!(a.hlc, Hlc::from_ms(T + 1));
    }

    /// A node's own events are beyond its horizon only if its wall clock
    /// stepped back: the clock never goes back, so the chain goes on above
    /// them.
    #[test]
    fn after_a_step_back_the_clock_stays_above_its_own_events() {
        let (mut n, _log) = open(1);
        let a = n.handle_append(edit("a"), T + TEN_MIN).unwrap();
        let b = n.handle_append(edit("b"), T).unwrap();
        assert_eq!(b.hlc, Hlc(a.hlc.0 + 1));
        let ahead = n.state().ahead(T);
        assert_eq!(ahead.events, 2);
        assert_eq!(ahead.furthest.unwrap().id, b.id);
    }

    #[test]
    fn a_failed_write_is_fatal() {
        let (mut r, mut log) = open(1);
        r.handle_append(edit("a"), 1_000).unwrap();
        let batch = r.poll_batch(usize::MAX).unwrap();
        drop(batch);
        r.handle_write_failed("disk on fire".into());
        r.handle_write_failed("later".into());
        assert_eq!(r.failed(), Some("disk on fire"));
        assert!(r.poll_batch(usize::MAX).is_none());
        assert_eq!(
            r.handle_append(edit("b"), 1_001),
            Err(AppendError::Failed("disk on fire".into()))
        );
        assert!(matches!(
            r.handle_import(Vec::new(), 1_001),
            Err(ImportError::Failed(_))
        ));
        assert_eq!(r.unacked(), 1, "never acknowledged");
        assert!(commit(&mut r, &mut log).is_none());
    }

    /// Sells `n` seats of counter `seats` of `event/1`.
    fn sale(n: u64) -> Draft {
        Draft {
            stream: "event/1".into(),
            kind: "SeatsSold".into(),
            ops: vec![Op::EscrowConsume {
                counter: "seats".into(),
                amount: n,
            }],
            ..Draft::default()
        }
    }

    /// Hands `peer`'s events by `author` from seq `from` to `r`, as sync does.
    fn deliver(r: &mut Replica, peer: &MemStore, author: NodeId, from: u64) {
        for (event, id, bytes, sig) in received(peer, author).into_iter().skip(from as usize - 1) {
            r.handle_received(&event, id, &bytes, sig).unwrap();
        }
        r.handle_received_end();
    }

    /// Peer X opens 10 seats and gives 1 to replica B (key 2), which learns
    /// of it: X holds 9, 4 beyond its reserve (half the unsold seats).
    fn sold_out_desk() -> (Replica, MemStore, Keypair, HlcClock) {
        let kx = key(7);
        let mut x = MemStore::new();
        let mut clock = HlcClock::default();
        let opened = Draft {
            stream: "event/1".into(),
            kind: "Opened".into(),
            ops: vec![
                Op::EscrowInit {
                    counter: "seats".into(),
                    capacity: 10,
                },
                Op::EscrowTransfer {
                    counter: "seats".into(),
                    to: key(2).node_id(),
                    amount: 1,
                },
            ],
            ..Draft::default()
        };
        x.commit(&kx, &mut clock, 1_000, [opened]).unwrap();
        let (mut b, _log) = open(2);
        deliver(&mut b, &x, kx.node_id(), 1);
        (b, x, kx, clock)
    }

    #[test]
    fn a_sale_short_of_rights_waits_for_a_connected_peers_transfer() {
        let (mut b, mut x, kx, mut clock) = sold_out_desk();
        // Not connected: refused at once.
        assert!(matches!(
            b.handle_append(sale(2), 2_000),
            Err(AppendError::Refused(PrepareError::Invalid(
                Invalid::InsufficientRights { .. }
            )))
        ));
        // Once connected, the refused sale is asked for, enough for it.
        let asks = b.poll_asks(2_000, &[kx.node_id()]);
        assert_eq!(asks.len(), 1);
        assert!(asks[0].1.target >= 2, "{asks:?}");
        // X is seen with 4 spare: the sale given now waits, and its ask,
        // for as much, is on its way already.
        let until = match b.handle_append(sale(2), 2_010) {
            Err(AppendError::AwaitingRights { until_ms }) => until_ms,
            other => panic!("{other:?}"),
        };
        assert_eq!(until, 2_010 + rebalance::RIGHTS_WAIT_MS);
        assert!(b.poll_asks(2_010, &[kx.node_id()]).is_empty());
        // Given again before rights arrive: still waiting, and no second ask.
        assert!(matches!(
            b.handle_held_sale(sale(2), 2_050, until),
            Err(AppendError::AwaitingRights { until_ms }) if until_ms == until
        ));
        assert!(b.poll_asks(2_050, &[kx.node_id()]).is_empty());
        // X answers with a transfer; once B holds it, the sale is made.
        let answer = rebalance::answer(x.state(), &kx.node_id(), &b.id(), &asks[0].1).unwrap();
        x.commit(&kx, &mut clock, 2_060, [answer]).unwrap();
        deliver(&mut b, &x, kx.node_id(), 2);
        let made = b.handle_held_sale(sale(2), 2_070, until).unwrap();
        assert!(!made.existing);
    }

    #[test]
    fn a_waiting_sale_is_refused_at_its_deadline_or_once_no_peer_has_spare() {
        let (mut b, mut x, kx, mut clock) = sold_out_desk();
        b.poll_asks(2_000, &[kx.node_id()]);
        let Err(AppendError::AwaitingRights { until_ms: until }) = b.handle_append(sale(2), 2_000)
        else {
            panic!("the sale should wait");
        };
        // The deadline passes with no transfer: the refusal itself.
        assert!(matches!(
            b.handle_held_sale(sale(2), until, until),
            Err(AppendError::Refused(PrepareError::Invalid(
                Invalid::InsufficientRights { .. }
            )))
        ));
        // X sells every seat: B, seeing no spare rights left, refuses a
        // waiting sale before its deadline.
        let Err(AppendError::AwaitingRights { until_ms: until }) =
            b.handle_append(sale(2), until + 1)
        else {
            panic!("the sale should wait");
        };
        x.commit(&kx, &mut clock, 2_100, [sale(9)]).unwrap();
        deliver(&mut b, &x, kx.node_id(), 2);
        assert!(matches!(
            b.handle_held_sale(sale(2), until - 1, until),
            Err(AppendError::Refused(_))
        ));
        // A transfer short of rights never waits.
        b.poll_asks(until, &[kx.node_id()]);
        let give = Draft {
            stream: "event/1".into(),
            kind: "Given".into(),
            ops: vec![Op::EscrowTransfer {
                counter: "seats".into(),
                to: kx.node_id(),
                amount: 2,
            }],
            ..Draft::default()
        };
        assert!(matches!(
            b.handle_append(give, until),
            Err(AppendError::Refused(_))
        ));
    }
}
