//! The node's ordered projections ([`weftlog_proto::projection`]): the
//! shipped ones (`kind_counts`, `seat_order`) and any that embedding code
//! registers, fed from the node's durable feed on a thread of their own
//! (never the committer's).
//!
//! The thread follows a catch-up subscription from position 0
//! ([`Node::subscribe_from`]): it replays the durable log, then continues
//! live, with no gap and no duplicate, and never shows a projection an
//! event before it is durable. A projection registered later
//! ([`Projections::register`]) is handed to the same thread, which reads
//! the log up to where the others are into it before it feeds it with
//! them. When the log's epoch changes (the node found its log restored
//! from a copy, so positions name another history), every projection is
//! rebuilt from position 0.
//!
//! A late event (one that sorts before a projection's position) is
//! replayed from the log: the projector keeps only its ordered index of
//! keys and log positions, and reads events back by position
//! ([`Node::read_from`]). Checkpoints are rebuilt on start, never
//! persisted (the module docs of [`weftlog_proto::projection`] say why),
//! so a projection whose version changed is rebuilt by the start itself.
//!
//! The HTTP API serves them (`GET /v1/projections`,
//! `GET /v1/projections/{name}`): name, version, position (events
//! applied), lag (durable events not yet applied: those the thread has
//! not yet been given, plus those a projection holds back) and state hash
//! (hex). The lag also goes to the metrics
//! (`weftlog_projection_lag_events`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};
use weftlog_proto::projection::{
    EventSource, KindCounts, Projection, Projector, ReplayError, SeatOrder,
};
use weftlog_proto::{Event, EventId};

use crate::node::Node;
use crate::subscribe::{ReadError, READ_CHUNK};

/// How long the thread waits before it reads the log again after a read
/// failed.
pub const RETRY: Duration = Duration::from_secs(1);

/// A projector whose projection's type is erased, as the registry keeps it.
trait Runner: Send {
    fn name(&self) -> &str;
    fn insert(&mut self, event: &Event, id: EventId, pos: u64);
    fn catch_up(&mut self, source: &mut dyn EventSource) -> Result<u64, ReplayError>;
    fn lag(&self) -> u64;
    fn reset(&mut self);
    fn summary(&self, behind: u64) -> Summary;
    fn view(&self) -> Result<Value, serde_json::Error>;
}

impl<P> Runner for Projector<P>
where
    P: Projection + Send,
    P::State: Send,
{
    fn name(&self) -> &str {
        Projector::name(self)
    }

    fn insert(&mut self, event: &Event, id: EventId, pos: u64) {
        Projector::insert(self, event, id, pos);
    }

    fn catch_up(&mut self, source: &mut dyn EventSource) -> Result<u64, ReplayError> {
        Projector::catch_up(self, source)
    }

    fn lag(&self) -> u64 {
        Projector::lag(self)
    }

    fn reset(&mut self) {
        Projector::reset(self)
    }

    fn summary(&self, behind: u64) -> Summary {
        Summary {
            name: self.name().to_string(),
            version: self.version(),
            position: self.position(),
            lag: self.lag() + behind,
            hash: hex(&self.state_hash()),
        }
    }

    fn view(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(Projector::view(self))
    }
}

/// One projection's figures, as `GET /v1/projections` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// Events applied.
    pub position: u64,
    /// Durable events not yet applied (0 once caught up).
    pub lag: u64,
    /// Its state hash, 64 lowercase hex.
    pub hash: String,
}

type Registry = Mutex<BTreeMap<String, Box<dyn Runner>>>;

/// Registrations waiting for the projections thread, at most.
pub const REGISTER_QUEUE_CAP: usize = 64;

/// Why [`Projections::register`] did not take a projection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// [`REGISTER_QUEUE_CAP`] registrations already wait.
    #[error("{REGISTER_QUEUE_CAP} projections already wait to be registered; try again")]
    Busy,
    /// The projections thread has stopped (the node closed).
    #[error("the projections thread has stopped")]
    Stopped,
}

/// The node's projections; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Projections {
    node: Weak<Node>,
    registry: Arc<Registry>,
    /// The position of the last event given to the projections.
    fed: Arc<AtomicU64>,
    register: mpsc::Sender<Box<dyn Runner>>,
}

impl Projections {
    /// Starts the shipped projections over `node`: a thread replays the
    /// log into them and then follows the durable feed. The thread holds
    /// no handle that keeps the node open; it ends when the node closes.
    pub fn start(node: &Arc<Node>) -> Projections {
        let mut map: BTreeMap<String, Box<dyn Runner>> = BTreeMap::new();
        for r in [
            Box::new(Projector::new(KindCounts)) as Box<dyn Runner>,
            Box::new(Projector::new(SeatOrder)),
        ] {
            map.insert(r.name().to_string(), r);
        }
        let (tx, rx) = mpsc::channel(REGISTER_QUEUE_CAP);
        let p = Projections {
            node: Arc::downgrade(node),
            registry: Arc::new(Mutex::new(map)),
            fed: Arc::new(AtomicU64::new(0)),
            register: tx,
        };
        let worker = p.clone();
        let spawned = std::thread::Builder::new()
            .name("weftlog-projections".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run(rx)),
                    Err(e) => warn!("cannot start the projections thread: {e}"),
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the projections thread: {e}; projections stay empty");
        }
        p
    }

    /// Registers `projection`, replacing one of the same name (which
    /// rebuilds it: a new version, say). The projections thread replays
    /// the log into it, then lists it and feeds it like the others.
    ///
    /// # Panics
    /// If its name is not valid ([`Projection::name`]).
    pub fn register<P>(&self, projection: P) -> Result<(), RegisterError>
    where
        P: Projection + Send + 'static,
        P::State: Send,
    {
        self.register
            .try_send(Box::new(Projector::new(projection)))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => RegisterError::Busy,
                mpsc::error::TrySendError::Closed(_) => RegisterError::Stopped,
            })
    }

    /// Every projection's figures, by name.
    pub fn list(&self) -> Vec<Summary> {
        let behind = self.behind();
        self.lock().values().map(|r| r.summary(behind)).collect()
    }

    /// Durable events not yet given to the projections.
    fn behind(&self) -> u64 {
        let durable = self.node.upgrade().map_or(0, |n| n.durable_pos());
        durable.saturating_sub(self.fed.load(Ordering::Acquire))
    }

    /// One projection's figures and JSON view, `None` if no projection has
    /// that name.
    pub fn get(&self, name: &str) -> Option<(Summary, Value)> {
        let behind = self.behind();
        let g = self.lock();
        let r = g.get(name)?;
        let view = r
            .view()
            .unwrap_or_else(|e| json!({ "error": format!("the view is not JSON: {e}") }));
        Some((r.summary(behind), view))
    }

    /// `GET /v1/projections`: `{"projections": [summary…]}`.
    pub fn list_json(&self) -> Value {
        json!({ "projections": self.list() })
    }

    /// `GET /v1/projections/{name}`: the summary's fields plus `view`.
    pub fn get_json(&self, name: &str) -> Option<Value> {
        let (summary, view) = self.get(name)?;
        let mut v = serde_json::to_value(summary).ok()?;
        if let Value::Object(m) = &mut v {
            m.insert("view".into(), view);
        }
        Some(v)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Box<dyn Runner>>> {
        // A projector holds no invariant across a panic that a later
        // catch-up would not restore.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The thread: follow the log from position 0 and take registrations,
    /// until the node closes. Only this thread changes projectors.
    async fn run(self, mut register: mpsc::Receiver<Box<dyn Runner>>) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let mut sub = node.subscribe_from(0);
        drop(node);
        loop {
            tokio::select! {
                batch = sub.next_batch() => match batch {
                    None => return,
                    Some(Ok(batch)) => {
                        let mut g = self.lock();
                        for e in &batch {
                            let event = match Event::decode_trusted(&e.bytes) {
                                Ok(event) => event,
                                Err(err) => {
                                    warn!(event = %e.id, pos = e.pos, "projections: a durable event does not decode: {err}");
                                    continue;
                                }
                            };
                            for r in g.values_mut() {
                                r.insert(&event, e.id, e.pos);
                            }
                        }
                        drop(g);
                        if let Some(last) = batch.last() {
                            self.fed.store(last.pos, Ordering::Release);
                        }
                        if !self.catch_up() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        let Some(node) = self.node.upgrade() else {
                            return;
                        };
                        let from = match e {
                            ReadError::EpochChanged { .. } => {
                                warn!("projections: {e}; rebuilding every projection");
                                for r in self.lock().values_mut() {
                                    r.reset();
                                }
                                0
                            }
                            _ => {
                                warn!("projections: {e}; reading on in a second");
                                tokio::time::sleep(RETRY).await;
                                self.fed.load(Ordering::Acquire)
                            }
                        };
                        self.fed.store(from, Ordering::Release);
                        sub = node.subscribe_from(from);
                    }
                },
                Some(runner) = register.recv() => self.add(runner),
            }
        }
    }

    /// Reads the log up to where the others are into `runner`, then lists
    /// it: the batches after that reach it with the others'.
    fn add(&self, mut runner: Box<dyn Runner>) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let name = runner.name().to_string();
        let fed = self.fed.load(Ordering::Acquire);
        let mut from = 0;
        while from < fed {
            let max = READ_CHUNK.min((fed - from) as usize);
            let read = match node.read_from(from, max) {
                Ok(read) if !read.is_empty() => read,
                Ok(_) => break,
                Err(e) => {
                    warn!(projection = %name, "reading the log for a new projection: {e}");
                    break;
                }
            };
            for e in &read {
                from = e.pos;
                if let Ok(event) = Event::decode_trusted(&e.bytes) {
                    runner.insert(&event, e.id, e.pos);
                }
            }
        }
        if let Err(e) = runner.catch_up(&mut source(&node)) {
            warn!(projection = %name, "projection replay stopped: {e}");
        }
        node.metrics().set_projection_lag(&name, runner.lag());
        self.lock().insert(name.clone(), runner);
        info!(projection = %name, "projection registered");
    }

    /// Replays what waits, reading events back from the node's log, and
    /// reports the lags; false if the node is gone.
    fn catch_up(&self) -> bool {
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        let behind = node
            .durable_pos()
            .saturating_sub(self.fed.load(Ordering::Acquire));
        let mut source = source(&node);
        let mut g = self.lock();
        for (name, r) in g.iter_mut() {
            if let Err(e) = r.catch_up(&mut source) {
                // It stays behind (its lag says by how much) and goes on
                // at the next batch.
                warn!(projection = %name, "projection replay stopped: {e}");
            }
            node.metrics().set_projection_lag(name, r.lag() + behind);
        }
        true
    }
}

/// The node's log as an [`EventSource`]: the event at a position, checked
/// against the id the projector indexed there.
fn source(node: &Node) -> impl FnMut(u64, &EventId) -> Result<Event, ReplayError> + '_ {
    move |pos, id| {
        let unreadable = |reason: String| ReplayError::Unreadable {
            pos,
            id: *id,
            reason,
        };
        let read = node
            .read_from(pos.saturating_sub(1), 1)
            .map_err(|e| unreadable(e.to_string()))?;
        let e = read
            .into_iter()
            .next()
            .ok_or_else(|| unreadable("past the durable end of the log".into()))?;
        if e.id != *id {
            return Err(ReplayError::Mismatch { pos, id: *id });
        }
        Event::decode_trusted(&e.bytes).map_err(|err| unreadable(err.to_string()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use weftlog_proto::state::Draft;
    use weftlog_proto::Op;

    fn draft(stream: &str, kind: &str, ops: Vec<Op>) -> Draft {
        Draft {
            stream: stream.into(),
            kind: kind.into(),
            ops,
            ..Draft::default()
        }
    }

    /// Waits until every projection has applied `n` events.
    fn settle(p: &Projections, n: u64) -> Vec<Summary> {
        let start = Instant::now();
        loop {
            let list = p.list();
            if list.iter().all(|s| s.position == n && s.lag == 0) {
                return list;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{list:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn projections_replay_the_log_then_follow_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        crate::node::init(dir.path()).unwrap();
        let (node, _) = Node::open(dir.path()).unwrap();
        let node = Arc::new(node);
        let init = Op::EscrowInit {
            counter: "seats".into(),
            capacity: 2,
        };
        node.append(draft("session/1", "Opened", vec![init]))
            .unwrap();
        let p = Projections::start(&node);
        settle(&p, 1);
        for _ in 0..3 {
            let sale = Op::EscrowConsume {
                counter: "seats".into(),
                amount: 1,
            };
            // The third is refused (no rights left): two sales.
            let _ = node.append(draft("session/1", "Sold", vec![sale]));
        }
        node.append(draft("badge/9", "Printed", vec![])).unwrap();
        let list = settle(&p, 4);
        assert_eq!(
            list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["kind_counts", "seat_order"]
        );
        let kinds = p.get_json("kind_counts").unwrap();
        assert_eq!(kinds["view"]["session"]["Sold"], 2);
        assert_eq!(kinds["view"]["badge"]["Printed"], 1);
        assert_eq!(kinds["hash"].as_str().unwrap().len(), 64);
        let seats = p.get_json("seat_order").unwrap();
        assert_eq!(seats["view"]["counters"][0]["sales"][1]["label"], "seat 2");
        assert!(p.get_json("nope").is_none());

        // A projection registered later is replayed from the log.
        struct Streams;
        impl Projection for Streams {
            type State = BTreeMap<String, u64>;
            type View = BTreeMap<String, u64>;
            fn name(&self) -> &str {
                "streams"
            }
            fn version(&self) -> u32 {
                1
            }
            fn apply(&self, s: &mut Self::State, e: &Event, _: &EventId) {
                *s.entry(e.stream.clone()).or_default() += 1;
            }
            fn view(&self, s: &Self::State) -> Self::View {
                s.clone()
            }
        }
        p.register(Streams).unwrap();
        let start = Instant::now();
        while p.list().len() < 3 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        settle(&p, 4);
        assert_eq!(p.get_json("streams").unwrap()["view"]["session/1"], 3);

        // Reopened, the projections are rebuilt to the same hashes.
        let before = p.list();
        drop(p);
        drop(node);
        // The thread may hold the node a moment longer (a catch-up).
        let start = Instant::now();
        let node = loop {
            match Node::open(dir.path()) {
                Ok((node, _)) => break Arc::new(node),
                Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let p = Projections::start(&node);
        let after = settle(&p, 4);
        assert_eq!(after, before[..2]);
    }
}
