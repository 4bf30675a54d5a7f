//! A simulated node: the real proto core over simulated storage.
//!
//! It does what `src/node.rs` does, in the same order, minus threads:
//!
//! - a local command is turned into an event against the current
//!   [`State`] at once ([`State::append_local`], stamped by an
//!   [`HlcClock`] fed with the node's skewed virtual wall time), and waits
//!   for the next group commit;
//! - events received by sync are applied to the state at once
//!   ([`Store::insert`]) and written with the next batch, ahead of anything
//!   applied after them, so the log stays in causal order;
//! - a group commit signs the batch's last own event, frames every record
//!   ([`encode_frame_with`], the commit mark on the batch's last record),
//!   and appends the frames to a [`Log`] over [`MemStorage`] with one sync.
//!   The sync takes virtual time (the simulator schedules its end); only
//!   then are the node's appends acknowledged and the batch's signed heads
//!   pushed to the sync sessions;
//! - as a [`Store`] it advertises and serves only durable events, each
//!   author up to its last durable signed event, like `SyncStore`;
//! - a crash loses the state and whatever was not synced. If a batch was
//!   being written, its write is torn: [`MemStorage::crash`] keeps a seeded
//!   prefix of the unsynced bytes. A restart recovers exactly as `load()` in
//!   `src/node.rs` does: [`Log::open`] (torn tail cut), the records after
//!   the last commit mark cut, the log folded again, each author's last
//!   signature verified, the clock re-seeded from the largest hlc.
//!
//! The one liberty: durable events are served from an in-memory copy of
//! what the log holds (filled when a batch is synced and when the log is
//! recovered) rather than read back from the log, because `MemStorage`
//! copies a whole segment on every read. The oracles re-read every log at
//! the end of a run and check it against the state ([`SimNode::reload`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use weftlog_proto::event::{Event, Keypair, Signature};
use weftlog_proto::log::{self, encode_frame_with, Log, MemStorage, Storage, TornTail};
use weftlog_proto::state::{self, Draft, Inserted, Invalid, PrepareError, State};
use weftlog_proto::sync::{Head, Store, Stored};
use weftlog_proto::{EventId, Hlc, HlcClock, NodeId};

/// Records one group commit takes at most (as `MAX_BATCH_RECORDS` in the node).
pub const MAX_BATCH_RECORDS: usize = 65_536;

/// The storage of a simulated node: a [`MemStorage`] shared between the
/// log and the simulator, which reaches in to make a sync fail and to crash.
#[derive(Clone, Debug, Default)]
pub struct Disk(pub Rc<RefCell<MemStorage>>);

impl Storage for Disk {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.0.borrow_mut().list()
    }
    fn read(&mut self, segment: u64) -> io::Result<Vec<u8>> {
        self.0.borrow_mut().read(segment)
    }
    fn create(&mut self, segment: u64) -> io::Result<()> {
        self.0.borrow_mut().create(segment)
    }
    fn read_at(&mut self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.0.borrow_mut().read_at(segment, offset, len)
    }
    fn write_at(&mut self, segment: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.borrow_mut().write_at(segment, offset, data)
    }
    fn sync(&mut self, segment: u64) -> io::Result<()> {
        self.0.borrow_mut().sync(segment)
    }
    fn truncate(&mut self, segment: u64, len: u64) -> io::Result<()> {
        self.0.borrow_mut().truncate(segment, len)
    }
    fn remove(&mut self, segment: u64) -> io::Result<()> {
        self.0.borrow_mut().remove(segment)
    }
    fn alloc_step(&self) -> u64 {
        self.0.borrow().alloc_step()
    }
}

/// A record applied to the state and waiting for a group commit.
#[derive(Clone, Debug)]
struct Rec {
    bytes: Vec<u8>,
    id: EventId,
    author: NodeId,
    seq: u64,
    hlc: Hlc,
    sig: Option<Signature>,
}

/// A batch being written: its records and their frames.
#[derive(Debug)]
struct Batch {
    recs: Vec<Rec>,
    frames: Vec<u8>,
}

/// What a finished group commit did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Records written.
    pub records: u64,
    /// Bytes written (frames).
    pub bytes: u64,
    /// The node's own events in the batch, now acknowledged.
    pub acked: Vec<(EventId, u64)>,
    /// Per author, the highest seq in the batch that carries a signature:
    /// what the sync sessions may now push.
    pub heads: Vec<(NodeId, u64)>,
}

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
pub type AppendResult = Result<Option<(EventId, u64)>, PrepareError>;

/// The interleaving of the real node's threads that the simulator can
/// reproduce: the committer thread may take its batch, and apply a local
/// command waiting in its queue, between two inserts of one received run
/// (the sync session inserts event by event, each under the state lock).
#[derive(Debug)]
pub struct Race {
    /// Probability, per received event that is not the signed end of its
    /// run, that the committer runs right after it is inserted.
    pub p: f64,
    rng: crate::rng::Rng,
    /// Local commands waiting in the committer's queue: (token, wall ms, draft).
    parked: Vec<(u64, u64, Draft)>,
    /// What the committer did with them: (token, result).
    done: Vec<(u64, AppendResult)>,
    /// How many times the committer ran inside a run.
    pub hits: u64,
}

impl Race {
    /// A race with probability `p`, drawing from `rng`.
    pub fn new(p: f64, rng: crate::rng::Rng) -> Race {
        Race {
            p,
            rng,
            parked: Vec::new(),
            done: Vec::new(),
            hits: 0,
        }
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
    /// Not a node fault: the run's network draws from a process-wide
    /// counter, so that two runs of one seed differ.
    Nondeterministic,
}

/// One simulated node. See the module docs.
#[derive(Debug)]
pub struct SimNode {
    key: Keypair,
    id: NodeId,
    state: State,
    clock: HlcClock,
    disk: Disk,
    /// `None` while the node is down.
    log: Option<Log<Disk>>,
    /// Durable events by author, `[seq - 1]`: what the log holds.
    durable: BTreeMap<NodeId, Vec<Stored>>,
    /// Per author, the highest durable seq that carries a signature.
    signed: BTreeMap<NodeId, u64>,
    pending: Vec<Rec>,
    inflight: Option<Batch>,
    /// Test-only breakage; [`Sabotage::None`] in every real run.
    sabotage: Sabotage,
    /// Set by [`Store::insert`] when a received event was applied: the
    /// simulator schedules a commit.
    received: bool,
    /// Batch boundaries in `pending` (ascending): a group commit takes
    /// records only up to the first.
    cuts: Vec<usize>,
    /// The committer-thread interleaving, when simulated.
    race: Option<Race>,
}

type Loaded = (
    State,
    Log<Disk>,
    BTreeMap<NodeId, Vec<Stored>>,
    BTreeMap<NodeId, u64>,
    Option<TornTail>,
);

impl SimNode {
    /// A node with a fresh, empty log.
    pub fn new(key: Keypair, sabotage: Sabotage) -> Result<SimNode, String> {
        let disk = Disk::default();
        let (state, log, durable, signed, _) = load(&disk)?;
        Ok(SimNode {
            id: key.node_id(),
            key,
            clock: HlcClock::new(state.max_hlc()),
            state,
            disk,
            log: Some(log),
            durable,
            signed,
            pending: Vec::new(),
            inflight: None,
            sabotage,
            received: false,
            cuts: Vec::new(),
            race: None,
        })
    }

    /// Simulates the committer thread running between inserts of a run.
    pub fn set_race(&mut self, race: Race) {
        self.race = Some(race);
    }

    /// Puts a local command in the committer's queue: it runs at the next
    /// race point, or when [`SimNode::unpark`] is called.
    pub fn park(&mut self, token: u64, now_ms: u64, draft: Draft) {
        if let Some(r) = &mut self.race {
            r.parked.push((token, now_ms, draft));
        }
    }

    /// Runs a parked command now, if it is still parked.
    pub fn unpark(&mut self, token: u64) {
        let Some(r) = &mut self.race else {
            return;
        };
        let Some(i) = r.parked.iter().position(|p| p.0 == token) else {
            return;
        };
        let (token, now_ms, draft) = r.parked.remove(i);
        let res = self.append(now_ms, draft);
        if let Some(r) = &mut self.race {
            r.done.push((token, res));
        }
    }

    /// Results of parked commands that ran, and how often the race hit.
    pub fn take_raced(&mut self) -> Vec<(u64, AppendResult)> {
        self.race
            .as_mut()
            .map_or_else(Vec::new, |r| std::mem::take(&mut r.done))
    }

    /// Times the committer ran inside a received run.
    pub fn race_hits(&self) -> u64 {
        self.race.as_ref().map_or(0, |r| r.hits)
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Whether the node is running.
    pub fn is_up(&self) -> bool {
        self.log.is_some()
    }

    /// The folded state (everything applied, durable or not).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether records wait for a commit or a commit is running.
    pub fn is_busy(&self) -> bool {
        !self.pending.is_empty() || self.inflight.is_some()
    }

    /// Whether records wait for a commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether a batch is being written.
    pub fn is_writing(&self) -> bool {
        self.inflight.is_some()
    }

    /// Takes the flag [`Store::insert`] sets when a received event is applied.
    pub fn take_received(&mut self) -> bool {
        std::mem::take(&mut self.received)
    }

    /// Events durable in the log.
    pub fn durable_len(&self) -> u64 {
        self.durable.values().map(|v| v.len() as u64).sum()
    }

    /// Per author, the highest durable signed seq.
    pub fn signed_heads(&self) -> &BTreeMap<NodeId, u64> {
        &self.signed
    }

    /// Runs a local command at wall time `now_ms`: the event is applied at
    /// once and waits for the next commit. `Ok(None)` when the command id
    /// is already in the log.
    pub fn append(
        &mut self,
        now_ms: u64,
        draft: Draft,
    ) -> Result<Option<(EventId, u64)>, PrepareError> {
        debug_assert!(self.is_up());
        match self
            .state
            .append_local(self.id, &mut self.clock, now_ms, draft)?
        {
            state::Appended::Existing(_) => Ok(None),
            state::Appended::New { event, bytes, id } => {
                self.pending.push(Rec {
                    bytes,
                    id,
                    author: self.id,
                    seq: event.seq,
                    hlc: event.hlc,
                    sig: None,
                });
                Ok(Some((id, event.seq)))
            }
        }
    }

    /// Starts a group commit of what waits, if nothing is being written:
    /// signs the last own record and frames the batch. Returns whether a
    /// batch started (the simulator then schedules its end).
    pub fn start_commit(&mut self) -> bool {
        if self.inflight.is_some() || self.pending.is_empty() || !self.is_up() {
            return false;
        }
        let mut take = self.pending.len().min(MAX_BATCH_RECORDS);
        if let Some(&cut) = self.cuts.first() {
            take = take.min(cut);
        }
        let mut recs: Vec<Rec> = self.pending.drain(..take).collect();
        self.cuts.retain_mut(|c| {
            *c -= take;
            *c > 0
        });
        if let Some(r) = recs.iter_mut().rev().find(|r| r.author == self.id) {
            r.sig = Some(self.key.sign(&r.id));
        }
        let mut frames = Vec::new();
        let n = recs.len();
        for (i, r) in recs.iter().enumerate() {
            encode_frame_with(&mut frames, &r.bytes, &r.id, r.sig.as_ref(), i + 1 == n);
        }
        self.inflight = Some(Batch { recs, frames });
        true
    }

    /// Finishes the running group commit: appends and syncs its frames.
    /// A failure is fatal for the node (the simulator reports it).
    pub fn finish_commit(&mut self) -> Result<Committed, String> {
        let batch = self
            .inflight
            .take()
            .ok_or_else(|| "finish_commit without a running commit".to_string())?;
        let log = self.log.as_mut().ok_or("the node is down")?;
        let (records, bytes) = (batch.recs.len() as u64, batch.frames.len() as u64);
        if self.sabotage == Sabotage::ForgetReceived {
            // Only own records reach the log; received ones are dropped.
            let own: Vec<&Rec> = batch.recs.iter().filter(|r| r.author == self.id).collect();
            let mut frames = Vec::new();
            for (i, r) in own.iter().enumerate() {
                encode_frame_with(
                    &mut frames,
                    &r.bytes,
                    &r.id,
                    r.sig.as_ref(),
                    i + 1 == own.len(),
                );
            }
            if !own.is_empty() {
                log.append(&frames, own.len() as u64)
                    .map_err(|e| e.to_string())?;
            }
        } else {
            log.append(&batch.frames, records)
                .map_err(|e| e.to_string())?;
        }
        let mut heads: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut acked = Vec::new();
        for r in batch.recs {
            if self.sabotage == Sabotage::ForgetReceived && r.author != self.id {
                continue;
            }
            if r.author == self.id {
                acked.push((r.id, r.seq));
            }
            if r.sig.is_some() {
                heads.insert(r.author, r.seq);
                self.signed.insert(r.author, r.seq);
            }
            let seqs = self.durable.entry(r.author).or_default();
            debug_assert_eq!(seqs.len() as u64 + 1, r.seq, "log out of chain order");
            seqs.push(Stored {
                bytes: r.bytes,
                id: r.id,
                hlc: r.hlc,
                sig: r.sig,
            });
        }
        Ok(Committed {
            records,
            bytes,
            acked,
            heads: heads.into_iter().collect(),
        })
    }

    /// Crashes the node. If a batch is being written, its write is torn:
    /// `keep` (a fraction in `[0, 1]`, or more to keep it all) of its bytes
    /// reach the disk.
    pub fn crash(&mut self, keep: f64) -> Crashed {
        let mut out = Crashed {
            unacked: self
                .pending
                .iter()
                .chain(self.inflight.iter().flat_map(|b| b.recs.iter()))
                .filter(|r| r.author == self.id)
                .count() as u64,
            ..Crashed::default()
        };
        let log = self.log.take();
        if self.sabotage == Sabotage::LoseSynced {
            // A disk that lies about fdatasync: the last synced record is
            // damaged (and whatever was being written is lost).
            let end = log.as_ref().map_or(0, |l| l.bytes()) as usize;
            self.inflight = None;
            let mut disk = self.disk.0.borrow_mut();
            disk.crash(0);
            if let Some(bytes) = disk.bytes_mut(0) {
                if end > 16 + 40 {
                    bytes.truncate(end - 40);
                }
            }
        } else if let (Some(mut log), Some(batch)) = (log, self.inflight.take()) {
            // The write was issued, the sync never returned.
            self.disk.0.borrow_mut().fail_sync = true;
            let failed = log.append(&batch.frames, batch.recs.len() as u64);
            debug_assert!(failed.is_err(), "a failing sync fails the append");
            let kept = if keep >= 1.0 {
                usize::MAX
            } else {
                (batch.frames.len() as f64 * keep.max(0.0)) as usize
            };
            out.in_write = true;
            out.batch_bytes = batch.frames.len() as u64;
            out.kept_bytes = (kept as u64).min(out.batch_bytes);
            let mut disk = self.disk.0.borrow_mut();
            disk.fail_sync = false;
            disk.crash(kept);
        } else {
            self.disk.0.borrow_mut().crash(0);
        }
        self.state = State::new();
        self.clock = HlcClock::default();
        self.durable.clear();
        self.signed.clear();
        self.pending.clear();
        self.cuts.clear();
        if let Some(r) = &mut self.race {
            r.parked.clear();
        }
        self.received = false;
        out
    }

    /// Restarts a crashed node: recovery as the module docs say.
    pub fn restart(&mut self) -> Result<Restarted, String> {
        debug_assert!(!self.is_up());
        let (state, log, durable, signed, torn) = load(&self.disk)?;
        let records = log.records();
        self.clock = HlcClock::new(state.max_hlc());
        self.state = state;
        self.log = Some(log);
        self.durable = durable;
        self.signed = signed;
        Ok(Restarted { records, torn })
    }

    /// Reopens the node's log from a copy of its disk, as a restart would
    /// (without a crash: nothing unsynced is lost), and returns the folded
    /// state and every record in log order. For the oracles.
    pub fn reload(&self) -> Result<(State, Vec<(Event, EventId)>), String> {
        let copy = Disk(Rc::new(RefCell::new(self.disk.0.borrow().clone())));
        let (state, mut log, ..) = load(&copy)?;
        let mut events = Vec::new();
        log.scan(|frame| {
            let e = Event::decode_trusted(frame.bytes).map_err(|e| e.to_string())?;
            events.push((e, frame.id));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok((state, events))
    }

    /// A durable event by author and seq.
    pub fn durable_event(&self, author: &NodeId, seq: u64) -> Option<&Stored> {
        self.durable.get(author)?.get(seq.checked_sub(1)? as usize)
    }
}

impl SimNode {
    /// The committer runs now, in the middle of a received run: it applies
    /// the local commands in its queue and takes everything applied so far
    /// as its next batch.
    fn maybe_race(&mut self) {
        let Some(r) = &mut self.race else {
            return;
        };
        if !r.rng.chance(r.p) {
            return;
        }
        r.hits += 1;
        let parked = std::mem::take(&mut r.parked);
        for (token, now_ms, draft) in parked {
            let res = self.append(now_ms, draft);
            if let Some(r) = &mut self.race {
                r.done.push((token, res));
            }
        }
        let at = self.pending.len();
        if self.cuts.last() != Some(&at) {
            self.cuts.push(at);
        }
    }
}

/// Recovers and folds the log on `disk` with the node's recovery
/// ([`log::open_committed`]), and indexes the durable records for sync.
fn load(disk: &Disk) -> Result<Loaded, String> {
    type Acc = (State, BTreeMap<NodeId, Vec<Stored>>, BTreeMap<NodeId, u64>);
    let fresh = || -> Acc { (State::new(), BTreeMap::new(), BTreeMap::new()) };
    let (log, recovery, (state, durable, signed)) = log::open_committed(
        || Ok(disk.clone()),
        fresh,
        |(state, durable, signed), frame, event| {
            match state.insert(event, frame.id).map_err(|e| e.to_string())? {
                Inserted::New => {}
                Inserted::Duplicate => return Err("the event is in the log twice".into()),
            }
            durable.entry(event.author).or_default().push(Stored {
                bytes: frame.bytes.to_vec(),
                id: frame.id,
                hlc: event.hlc,
                sig: frame.sig,
            });
            if frame.sig.is_some() {
                signed.insert(event.author, event.seq);
            }
            Ok(())
        },
    )
    .map_err(|e| format!("recovery: {e}"))?;
    Ok((state, log, durable, signed, recovery.torn))
}

impl Store for SimNode {
    fn frontier(&self) -> Vec<Head> {
        self.signed
            .iter()
            .filter_map(|(author, &seq)| {
                let id = self.durable_event(author, seq)?.id;
                Some(Head {
                    author: *author,
                    seq,
                    id,
                })
            })
            .collect()
    }

    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.state.event_id(author, seq)
    }

    fn contains(&self, id: &EventId) -> bool {
        self.state.contains(id)
    }

    fn hlc(&self, author: &NodeId, seq: u64) -> Option<Hlc> {
        self.durable_event(author, seq).map(|s| s.hlc)
    }

    fn fetch(&self, author: &NodeId, seq: u64) -> Option<Stored> {
        self.durable_event(author, seq).cloned()
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
            self.clock.observe(event.hlc);
            self.pending.push(Rec {
                bytes: bytes.to_vec(),
                id,
                author: event.author,
                seq: event.seq,
                hlc: event.hlc,
                sig,
            });
            self.received = true;
            if sig.is_none() {
                self.maybe_race();
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(c.heads, vec![(n.id(), 2)]);
        n.append(1_002, draft("3")).unwrap();
        n.append(1_003, draft("4")).unwrap();
        assert!(n.start_commit());
        // Half of the second batch reaches the disk: it is cut whole.
        let crashed = n.crash(0.5);
        assert!(crashed.in_write && crashed.unacked == 2);
        let r = n.restart().unwrap();
        assert_eq!(r.records, 2);
        assert!(r.torn.is_some());
        assert_eq!(n.state().len(), 2);
        assert_eq!(n.frontier().len(), 1);
        // The clock is above the recovered events; new events follow them.
        let (_, seq) = n.append(500, draft("5")).unwrap().unwrap();
        assert_eq!(seq, 3);
    }

    #[test]
    fn a_torn_batch_kept_whole_survives() {
        let mut n = SimNode::new(Keypair::from_secret([4; 32]), Sabotage::None).unwrap();
        n.append(1_000, draft("1")).unwrap();
        assert!(n.start_commit());
        n.crash(2.0);
        n.restart().unwrap();
        assert_eq!(n.state().len(), 1);
        let (state, events) = n.reload().unwrap();
        assert_eq!(state.state_hash(), n.state().state_hash());
        assert_eq!(events.len(), 1);
    }
}
