//! A simulated node: the node's [`Replica`] over simulated storage.
//!
//! Every rule of a node is the replica's ([`weftlog_proto::replica`]), the
//! same code `src/node.rs` drives with threads and files: the fold, the
//! clock, pending records, group commit (the last own record signed, a
//! commit mark on the batch's last record, no batch ending inside a
//! received run), the durable and signed indexes, and the store sync
//! sessions use ([`SimNode::store`]). This shell adds only what a
//! simulation needs:
//!
//! - a disk: a [`Log`] over [`MemStorage`] shared with the simulator
//!   ([`Disk`]). A group commit ([`SimNode::start_commit`]) takes the
//!   replica's next batch; its sync takes virtual time (the simulator
//!   schedules its end, [`SimNode::finish_commit`]), and only then are the
//!   node's appends acknowledged and the batch's signed heads pushed to the
//!   sync sessions. Durable events are served by reading them back from the
//!   log, as the node does;
//! - a crash model: a crash loses the replica and whatever was not synced.
//!   If a batch was being written, its write is torn: [`MemStorage::crash`]
//!   keeps a seeded prefix of the unsynced bytes. A restart recovers with
//!   [`Replica::open`], as the node does (torn tail cut, the records after
//!   the last commit mark cut, the log folded again, each author's last
//!   signature verified, the clock re-seeded from the largest hlc within
//!   the horizon of the node's wall time at restart);
//! - the hold after a restart ([`SimNode::await_confirmation`]): the
//!   replica's rule (`weftlog_proto::replica`, "A restored node learns its
//!   own log before it appends") decides whether appends are held
//!   ([`SimNode::appends_held`]) and when a peer's sync round releases them
//!   ([`SimNode::handle_own_head`]); the simulator holds the commands that
//!   arrive meanwhile, as the node's HTTP API holds its requests;
//! - fault hooks for tests ([`Sabotage`]) that prove the oracles catch a
//!   broken node.
//!
//! A failed write is fatal, as in the node: the replica stops and the node
//! goes down until the simulator restarts it (it never does: a failed write
//! is a durability violation of the run).

use std::cell::RefCell;
use std::rc::Rc;

use weftlog_proto::event::{Event, Keypair};
use weftlog_proto::log::{Log, MemStorage, TornTail};
use weftlog_proto::rebalance::Ask;
use weftlog_proto::replica::{AppendError, Batch, Lent, OwnFrontier, Replica, ReplicaStore};
use weftlog_proto::state::{Draft, PrepareError, State};
use weftlog_proto::sync::Head;
use weftlog_proto::{EventId, Hlc, NodeId};

pub use weftlog_proto::replica::Committed;

/// Records one group commit takes at most (as `MAX_BATCH_RECORDS` in the node).
pub const MAX_BATCH_RECORDS: usize = 65_536;

/// The storage of a simulated node: a [`MemStorage`] shared between the
/// log and the simulator, which reaches in to make a sync fail and to crash.
pub type Disk = Rc<RefCell<MemStorage>>;

/// The node as a sync store ([`SimNode::store`]).
pub type SimStore<'a> = ReplicaStore<Lent<'a, Disk>>;

/// What a crash did to the disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct Crashed {
    /// Whether a batch was being written.
    pub in_write: bool,
    /// Bytes of that batch's frames.
    pub batch_bytes: u64,
    /// Bytes of the unsynced writes that reached the disk anyway.
    pub kept_bytes: u64,
    /// Own events that were never acknowledged and may be lost.
    pub unacked: u64,
}

/// What a restart found.
#[derive(Debug, Default, Clone)]
pub struct Restarted {
    /// Records in the recovered log.
    pub records: u64,
    /// The torn tail that recovery cut, if any.
    pub torn: Option<TornTail>,
}

/// What running a local command gave: the new event's id and seq, `None`
/// for a command id already in the log, or the refusal.
pub type AppendResult = Result<Option<(EventId, u64)>, Refusal>;

/// Why a command was refused: by the fold's rules, or by a seat policy's
/// admission rule ([`weftlog_proto::admission`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The fold refused it.
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// A seat policy's admission rule refused the sale.
    #[error(transparent)]
    Seats(#[from] weftlog_proto::admission::Refused),
    /// Not refused yet: the sale waits for rights from a connected peer
    /// until `until_ms` ([`SimNode::append_held`] gives it again).
    #[error("waiting until {until_ms} ms for escrow rights from a connected peer")]
    AwaitingRights {
        /// The node's wall time after which it is refused.
        until_ms: u64,
    },
}

impl Refusal {
    /// Whether it refused a sale for want of rights: the fold's check, or
    /// a seat policy's admission rule.
    pub fn is_rights(&self) -> bool {
        matches!(
            self,
            Refusal::Prepare(PrepareError::Invalid(
                weftlog_proto::state::Invalid::InsufficientRights { .. }
            )) | Refusal::Seats(_)
        )
    }
}

/// Test-only ways to break a node, to prove the oracles catch it. Never
/// set by scenarios.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The node is honest.
    #[default]
    None,
    /// Received events are applied to the state but never written to the log.
    ForgetReceived,
    /// A crash also loses the last synced batch (acknowledged events).
    LoseSynced,
    /// The node never holds appends after a restart (it skips
    /// [`SimNode::await_confirmation`]), so a restored node appends on its
    /// old copy while its peers hold its newer events.
    SkipConfirmation,
    /// Not a node fault: the run's network draws from a process-wide
    /// counter, so that two runs of one seed differ.
    Nondeterministic,
}

/// One simulated node. See the module docs.
#[derive(Debug)]
pub struct SimNode {
    key: Keypair,
    replica: Replica,
    disk: Disk,
    /// `None` while the node is down.
    log: Option<Log<Disk>>,
    /// Received events waiting for a dependency, shared by the node's sync
    /// sessions (`None` while a store holds it); lost in a crash.
    pool: Option<weftlog_proto::sync::Pool>,
    /// The batch being written.
    inflight: Option<Batch>,
    /// Test-only breakage; [`Sabotage::None`] in every real run.
    sabotage: Sabotage,
    /// The replica's queue as of the last [`SimNode::take_received`].
    seen: weftlog_proto::replica::Mark,
    /// The hlc of the last event a local command made.
    last_hlc: Option<Hlc>,
}

impl SimNode {
    /// A node with a fresh, empty log.
    pub fn new(key: Keypair, sabotage: Sabotage) -> Result<SimNode, String> {
        let disk = Disk::default();
        // An empty log: no hlc to bound, any wall time will do.
        let (replica, log, _) = open(&key, &disk, 0)?;
        Ok(SimNode {
            key,
            seen: replica.mark(),
            replica,
            disk,
            log: Some(log),
            pool: Some(weftlog_proto::sync::Pool::new()),
            inflight: None,
            sabotage,
            last_hlc: None,
        })
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.replica.id()
    }

    /// Whether the node is running.
    pub fn is_up(&self) -> bool {
        self.log.is_some()
    }

    /// The folded state (everything applied, durable or not).
    pub fn state(&self) -> &State {
        self.replica.state()
    }

    /// The node as a store for sync sessions (the replica's one store):
    /// make one per session call and drop it after.
    pub fn store(&mut self) -> SimStore<'_> {
        ReplicaStore::new(Lent::new(&mut self.replica, self.log.as_mut()).with_pool(&mut self.pool))
    }

    /// What the node advertises: its durable, signed heads.
    pub fn frontier(&self) -> Vec<Head> {
        self.replica.frontier()
    }

    /// Whether records wait for a commit or a commit is running.
    pub fn is_busy(&self) -> bool {
        self.replica.has_pending() || self.inflight.is_some()
    }

    /// Whether records wait for a commit.
    pub fn has_pending(&self) -> bool {
        self.replica.has_pending()
    }

    /// Whether a batch is being written.
    pub fn is_writing(&self) -> bool {
        self.inflight.is_some()
    }

    /// Whether records were queued since the last call (received events,
    /// mostly: the simulator then schedules a commit).
    pub fn take_received(&mut self) -> bool {
        let mark = self.replica.mark();
        std::mem::replace(&mut self.seen, mark) != mark
    }

    /// Events durable in the log.
    pub fn durable_len(&self) -> u64 {
        self.replica.durable_len()
    }

    /// Per author, the highest durable signed seq.
    pub fn signed_heads(&self) -> std::collections::BTreeMap<NodeId, u64> {
        self.replica.signed_heads()
    }

    /// Runs a local command at wall time `now_ms`: the event is applied at
    /// once and waits for the next commit. `Ok(None)` when the command id
    /// is already in the log.
    ///
    /// # Panics
    /// If the node is down.
    pub fn append(&mut self, now_ms: u64, draft: Draft) -> AppendResult {
        self.append_held(now_ms, draft, None)
    }

    /// [`SimNode::append`], or with `held_until` a sale given again after
    /// [`Refusal::AwaitingRights`] ([`Replica::handle_held_sale`]).
    pub fn append_held(
        &mut self,
        now_ms: u64,
        draft: Draft,
        held_until: Option<u64>,
    ) -> AppendResult {
        assert!(self.is_up(), "append on a node that is down");
        let made = match held_until {
            None => self.replica.handle_append(draft, now_ms),
            Some(until) => self.replica.handle_held_sale(draft, now_ms, until),
        };
        match made {
            Ok(a) => {
                if !a.existing {
                    self.last_hlc = Some(a.hlc);
                }
                Ok((!a.existing).then_some((a.id, a.seq)))
            }
            Err(AppendError::Refused(e)) => Err(e.into()),
            Err(AppendError::Seats(e)) => Err(e.into()),
            Err(AppendError::AwaitingRights { until_ms }) => {
                Err(Refusal::AwaitingRights { until_ms })
            }
            // Invariant: the simulator holds commands while
            // `appends_held` says so, and hands them over only after.
            Err(e @ AppendError::Unconfirmed { .. }) => unreachable!("append while held: {e}"),
            // Invariant: a failed write takes the node down.
            Err(e) => unreachable!("append on a failed node: {e}"),
        }
    }

    /// The asks for escrow rights due at wall time `now_ms`, to peers in
    /// `connected` ([`Replica::poll_asks`]); nothing while the node is down.
    pub fn poll_asks(&mut self, now_ms: u64, connected: &[NodeId]) -> Vec<(NodeId, Ask)> {
        if !self.is_up() {
            return Vec::new();
        }
        self.replica.poll_asks(now_ms, connected)
    }

    /// Answers `peer`'s ask at wall time `now_ms` ([`Replica::handle_ask`])
    /// and the open asks it can answer now ([`Replica::poll_answers`];
    /// `ask` `None`): each new transfer event's id, seq and rights moved.
    /// Nothing while the node is down or holds its appends.
    pub fn answer(&mut self, ask: Option<(NodeId, &Ask)>, now_ms: u64) -> Vec<(EventId, u64, u64)> {
        if !self.is_up() || self.replica.appends_held(now_ms).is_some() {
            return Vec::new();
        }
        let drafts = match ask {
            Some((peer, ask)) => self
                .replica
                .handle_ask(peer, ask, now_ms)
                .into_iter()
                .collect(),
            None => self.replica.poll_answers(now_ms),
        };
        let mut out = Vec::new();
        for d in drafts {
            let moved = d
                .ops
                .iter()
                .map(|op| match op {
                    weftlog_proto::Op::EscrowTransfer { amount, .. } => *amount,
                    _ => 0,
                })
                .sum();
            if let Ok(a) = self.replica.handle_append(d, now_ms) {
                if !a.existing {
                    self.last_hlc = Some(a.hlc);
                    out.push((a.id, a.seq, moved));
                }
            }
        }
        out
    }

    /// Holds appends until a peer confirms the node's own log or its wall
    /// time reaches `until_ms` ([`Replica::await_confirmation`]), as the
    /// node does at start when it has peers.
    pub fn await_confirmation(&mut self, until_ms: u64) {
        if self.sabotage != Sabotage::SkipConfirmation {
            self.replica.await_confirmation(until_ms);
        }
    }

    /// A sync round with `peer` ended at wall time `now_ms`, the peer
    /// holding the node's own events up to `seq`
    /// ([`Replica::handle_own_head`]). Returns whether the peer confirmed
    /// the node's own log.
    pub fn handle_own_head(&mut self, peer: NodeId, seq: u64, now_ms: u64) -> bool {
        self.replica.handle_own_head(peer, seq, now_ms)
    }

    /// A sync round ended in sync at wall time `now_ms`
    /// ([`Replica::handle_synced`]): the seat policies' admission rules
    /// measure connectivity from it, as the node's do.
    pub fn handle_synced(&mut self, now_ms: u64) {
        self.replica.handle_synced(now_ms);
    }

    /// Until which wall time (ms) appends are held, if they are at wall
    /// time `now_ms` ([`Replica::appends_held`]; once the wait has passed,
    /// they are not held again).
    pub fn appends_held(&mut self, now_ms: u64) -> Option<u64> {
        self.replica.appends_held(now_ms)
    }

    /// The node's own frontier as peers confirmed it (status's
    /// `own_frontier`).
    pub fn own_frontier(&self) -> OwnFrontier {
        self.replica.own_frontier()
    }

    /// The hlc of the last event a local command made (since the node was
    /// made; restarts keep it).
    pub fn last_hlc(&self) -> Option<Hlc> {
        self.last_hlc
    }

    /// Tells the replica the node's wall time, as the node does before it
    /// stores received events ([`Replica::handle_time`]): its clock
    /// observes them only within the horizon of that time. Nothing while
    /// the node is down.
    pub fn handle_time(&mut self, now_ms: u64) {
        if self.is_up() {
            self.replica.handle_time(now_ms);
        }
    }

    /// A copy of the node's storage as a backup of its data directory
    /// takes it: what is synced (a write under way is not in it).
    pub fn backup(&self) -> MemStorage {
        let mut copy = self.disk.borrow().clone();
        copy.crash(0);
        copy
    }

    /// Puts `backup` in place of the node's storage, as an operator
    /// restoring a data directory from a copy does. The node must be down;
    /// its next [`SimNode::restart`] recovers from the copy.
    ///
    /// # Panics
    /// If the node is up.
    pub fn restore(&mut self, backup: MemStorage) {
        assert!(!self.is_up(), "restore on a node that is up");
        *self.disk.borrow_mut() = backup;
    }

    /// Starts a group commit of what waits, if nothing is being written:
    /// takes the replica's next batch. Returns whether a batch started (the
    /// simulator then schedules its end).
    pub fn start_commit(&mut self) -> bool {
        if self.inflight.is_some() || !self.is_up() {
            return false;
        }
        let Some(mut batch) = self.replica.poll_batch(MAX_BATCH_RECORDS) else {
            return false;
        };
        if self.sabotage == Sabotage::ForgetReceived {
            batch.retain_own(self.id());
        }
        self.inflight = Some(batch);
        true
    }

    /// Finishes the running group commit: appends and syncs its frames. A
    /// failure is fatal for the node (the simulator reports it).
    pub fn finish_commit(&mut self) -> Result<Committed, String> {
        let batch = self
            .inflight
            .take()
            .ok_or_else(|| "finish_commit without a running commit".to_string())?;
        let log = self.log.as_mut().ok_or("the node is down")?;
        let first = log.records();
        if !batch.is_empty() {
            if let Err(e) = log.append(batch.frames(), batch.len() as u64) {
                let e = e.to_string();
                self.replica.handle_write_failed(e.clone());
                self.log = None;
                return Err(e);
            }
        }
        Ok(self.replica.handle_durable(batch, first))
    }

    /// Crashes the node. If a batch is being written, its write is torn:
    /// `keep` (a fraction in `[0, 1]`, or more to keep it all) of its bytes
    /// reach the disk.
    pub fn crash(&mut self, keep: f64) -> Crashed {
        let mut out = Crashed {
            unacked: self.replica.unacked(),
            ..Crashed::default()
        };
        let log = self.log.take();
        self.pool = Some(weftlog_proto::sync::Pool::new());
        if self.sabotage == Sabotage::LoseSynced {
            // A disk that lies about fdatasync: the last synced record is
            // damaged (and whatever was being written is lost).
            let end = log.as_ref().map_or(0, |l| l.bytes()) as usize;
            self.inflight = None;
            let mut disk = self.disk.borrow_mut();
            disk.crash(0);
            if let Some(bytes) = disk.bytes_mut(0) {
                if end > 16 + 40 {
                    bytes.truncate(end - 40);
                }
            }
        } else if let (Some(mut log), Some(batch)) = (log, self.inflight.take()) {
            // The write was issued, the sync never returned.
            self.disk.borrow_mut().fail_sync = true;
            let failed = log.append(batch.frames(), batch.len() as u64);
            debug_assert!(failed.is_err(), "a failing sync fails the append");
            let frames = batch.frames().len();
            let kept = if keep >= 1.0 {
                usize::MAX
            } else {
                (frames as f64 * keep.max(0.0)) as usize
            };
            out.in_write = true;
            out.batch_bytes = frames as u64;
            out.kept_bytes = (kept as u64).min(out.batch_bytes);
            let mut disk = self.disk.borrow_mut();
            disk.fail_sync = false;
            disk.crash(kept);
        } else {
            self.disk.borrow_mut().crash(0);
        }
        self.replica = Replica::new(copy(&self.key));
        self.seen = self.replica.mark();
        out
    }

    /// Restarts a crashed node at its wall time `now_ms`: recovery as the
    /// module docs say.
    pub fn restart(&mut self, now_ms: u64) -> Result<Restarted, String> {
        debug_assert!(!self.is_up());
        let (replica, log, torn) = open(&self.key, &self.disk, now_ms)?;
        let records = log.records();
        self.seen = replica.mark();
        self.replica = replica;
        self.log = Some(log);
        Ok(Restarted { records, torn })
    }

    /// Reopens the node's log from a copy of its disk, as a restart would
    /// (without a crash: nothing unsynced is lost), and returns the folded
    /// state and every record in log order. For the oracles.
    pub fn reload(&self) -> Result<(State, Vec<(Event, EventId)>), String> {
        let copy_of_disk = Rc::new(RefCell::new(self.disk.borrow().clone()));
        // Only the state is used: the clock's seed does not matter.
        let (replica, mut log, _) = open(&self.key, &copy_of_disk, 0)?;
        let mut events = Vec::new();
        log.scan(|frame| {
            let e = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            events.push((e, frame.id));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok((replica.into_state(), events))
    }
}

fn copy(key: &Keypair) -> Keypair {
    Keypair::from_secret(key.secret())
}

/// Recovers the log on `disk` into a replica ([`Replica::open`]) at wall
/// time `now_ms`.
fn open(
    key: &Keypair,
    disk: &Disk,
    now_ms: u64,
) -> Result<(Replica, Log<Disk>, Option<TornTail>), String> {
    let (replica, log, recovery) = Replica::open(copy(key), now_ms, || Ok(disk.clone()))
        .map_err(|e| format!("recovery: {e}"))?;
    Ok((replica, log, recovery.torn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weftlog_proto::sync::Store;
    use weftlog_proto::Op;

    fn draft(v: &str) -> Draft {
        Draft {
            stream: "s/1".into(),
            kind: "Set".into(),
            ops: vec![Op::Set {
                field: "f".into(),
                value: v.as_bytes().to_vec(),
                supersedes: vec![],
            }],
            ..Draft::default()
        }
    }

    #[test]
    fn acknowledged_batches_survive_a_crash_and_torn_ones_are_cut() {
        let mut n = SimNode::new(Keypair::from_secret([3; 32]), Sabotage::None).unwrap();
        n.append(1_000, draft("1")).unwrap();
        n.append(1_001, draft("2")).unwrap();
        assert!(n.start_commit());
        let c = n.finish_commit().unwrap();
        assert_eq!(c.acked.len(), 2);
        assert_eq!(
            c.heads
                .iter()
                .map(|h| (h.author, h.seq))
                .collect::<Vec<_>>(),
            vec![(n.id(), 2)]
        );
        n.append(1_002, draft("3")).unwrap();
        n.append(1_003, draft("4")).unwrap();
        assert!(n.start_commit());
        // Half of the second batch reaches the disk: it is cut whole.
        let crashed = n.crash(0.5);
        assert!(crashed.in_write && crashed.unacked == 2);
        let r = n.restart(1_004).unwrap();
        assert_eq!(r.records, 2);
        assert!(r.torn.is_some());
        assert_eq!(n.state().len(), 2);
        assert_eq!(n.frontier().len(), 1);
        // The clock is above the recovered events; new events follow them.
        let (_, seq) = n.append(500, draft("5")).unwrap().unwrap();
        assert_eq!(seq, 3);
    }

    #[test]
    fn a_restarted_node_holds_appends_until_a_peer_confirms_its_log() {
        let mut n = SimNode::new(Keypair::from_secret([6; 32]), Sabotage::None).unwrap();
        n.append(1_000, draft("1")).unwrap();
        assert!(n.start_commit());
        n.finish_commit().unwrap();
        n.crash(0.0);
        n.restart(2_000).unwrap();
        n.await_confirmation(5_000);
        assert_eq!(n.appends_held(2_001), Some(5_000));
        let peer = Keypair::from_secret([7; 32]).node_id();
        // A peer holding more of the node's log than it does confirms
        // nothing: the round did not bring it back.
        assert!(!n.handle_own_head(peer, 2, 2_100));
        assert_eq!(n.appends_held(2_100), Some(5_000));
        // Nor does a peer holding less than another reported.
        let other = Keypair::from_secret([8; 32]).node_id();
        assert!(!n.handle_own_head(other, 1, 2_150));
        assert_eq!(n.appends_held(2_150), Some(5_000));
        // A restart forgets what peers reported; a peer holding what the
        // node holds confirms.
        n.crash(0.0);
        n.restart(2_160).unwrap();
        n.await_confirmation(5_000);
        assert!(n.handle_own_head(peer, 1, 2_200));
        assert_eq!(n.appends_held(2_200), None);
        let f = n.own_frontier();
        assert!(f.confirmed && f.by == vec![peer] && f.at_ms == Some(2_200));
        assert_eq!(n.append(2_300, draft("2")).unwrap().unwrap().1, 2);
        // Unconfirmed, the hold ends with the wait.
        n.crash(0.0);
        n.restart(6_000).unwrap();
        n.await_confirmation(9_000);
        assert_eq!(n.appends_held(8_999), Some(9_000));
        assert_eq!(n.appends_held(9_000), None);
        assert_eq!(n.appends_held(8_000), None, "a clock stepped back");
    }

    #[test]
    fn a_torn_batch_kept_whole_survives() {
        let mut n = SimNode::new(Keypair::from_secret([4; 32]), Sabotage::None).unwrap();
        n.append(1_000, draft("1")).unwrap();
        assert!(n.start_commit());
        n.crash(2.0);
        n.restart(1_001).unwrap();
        assert_eq!(n.state().len(), 1);
        let (state, events) = n.reload().unwrap();
        assert_eq!(state.state_hash(), n.state().state_hash());
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn durable_events_are_served_from_the_log() {
        let mut n = SimNode::new(Keypair::from_secret([5; 32]), Sabotage::None).unwrap();
        let (id, _) = n.append(1_000, draft("1")).unwrap().unwrap();
        let id2 = n.append(1_001, draft("2")).unwrap().unwrap().0;
        let me = n.id();
        assert!(n.store().fetch(&me, 1).is_none(), "not durable yet");
        assert!(n.start_commit());
        n.finish_commit().unwrap();
        let store = n.store();
        let (one, two) = (store.fetch(&me, 1).unwrap(), store.fetch(&me, 2).unwrap());
        assert_eq!((one.id, one.sig), (id, None));
        assert_eq!(two.id, id2);
        assert!(two.sig.is_some());
    }
}
