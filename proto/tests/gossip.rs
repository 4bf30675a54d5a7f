//! Guards live push along an epidemic broadcast tree (`PROTOCOL.md` §9.7,
//! `DESIGN.md` §5): in a full mesh each event reaches each node about once
//! after the tree formed, and every replica converges without an
//! anti-entropy round; a split tree is repaired by IHave and Graft; an event
//! whose dependency arrives over another connection waits in the store's
//! pool and is stored as soon as the dependency is, with no session failing;
//! a fork announced or pushed is still an equivocation, never dropped as a
//! duplicate; and malformed IHave, Graft and Prune messages are refused with
//! an error.
//!
//! The meshes run on virtual time: each directed link has a latency and
//! delivers in order, events are made on random nodes (seeded), and the
//! graft timer a node's policy would run is driven here by hand.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use weftlog_proto::state::Draft;
use weftlog_proto::sync::{
    decode_message, encode_message, encode_wire_frame, frontier_digest, Head, Hello, MemStore,
    Message, Session, SessionConfig, SessionEvent, SessionStats, Store, SyncError, MAX_GRAFT_HEADS,
    MAX_IHAVE_HEADS, PROTOCOL_VERSION, PRUNE_AFTER_DUPLICATE_PUSHES,
};
use weftlog_proto::{EventId, HlcClock, Keypair, NodeId, Op, Signature};

const CLUSTER: [u8; 32] = [0x42; 32];
/// Virtual time starts here (ms).
const EPOCH_MS: u64 = 1_700_000_000_000;

fn key(i: usize) -> Keypair {
    Keypair::from_secret([i as u8 + 1; 32])
}

/// The `i`th draft: register writes and counter adds over a few streams.
fn draft(i: u64) -> Draft {
    let ops = if i.is_multiple_of(2) {
        vec![Op::Set {
            field: "name".into(),
            value: format!("\"n{i}\"").into_bytes(),
            supersedes: vec![], // `prepare` fills it in
        }]
    } else {
        vec![Op::Add {
            counter: "visits".into(),
            delta: 1,
        }]
    };
    Draft {
        stream: format!("customer/{}", i % 7),
        kind: "Edited".into(),
        ops,
        ..Draft::default()
    }
}

/// SplitMix64, seeded by the test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// A mesh of in-memory nodes on virtual time.

struct Node {
    clock: HlcClock,
    store: MemStore,
    /// One session per peer, by the peer's index.
    links: BTreeMap<usize, Session>,
}

enum Ev {
    Deliver {
        from: usize,
        to: usize,
        msg: Vec<u8>,
    },
    Make {
        node: usize,
    },
    /// The graft timer for an announcement `node` got from `peer`.
    Timer {
        node: usize,
        peer: usize,
        heads: Vec<Head>,
    },
}

/// Counters summed over the sessions of a mesh.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    messages: u64,
    bytes: u64,
    stored: u64,
    duplicates: u64,
    announced_heads: u64,
    grafts: u64,
    prunes: u64,
}

impl Totals {
    fn add(&mut self, s: SessionStats) {
        self.messages += s.messages_sent;
        self.bytes += s.bytes_sent;
        self.stored += s.events_stored;
        self.duplicates += s.duplicates;
        self.announced_heads += s.announcements_sent;
        self.grafts += s.grafts_sent;
        self.prunes += s.prunes_sent;
    }

    fn since(self, before: Totals) -> Totals {
        Totals {
            messages: self.messages - before.messages,
            bytes: self.bytes - before.bytes,
            stored: self.stored - before.stored,
            duplicates: self.duplicates - before.duplicates,
            announced_heads: self.announced_heads - before.announced_heads,
            grafts: self.grafts - before.grafts,
            prunes: self.prunes - before.prunes,
        }
    }

    fn duplicates_per_delivery(&self) -> f64 {
        self.duplicates as f64 / self.stored.max(1) as f64
    }
}

struct Mesh {
    nodes: Vec<Node>,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    now: u64,
    rng: Rng,
    /// Per directed link: latency and when its last message arrives (each
    /// link delivers in order, as a stream does).
    latency_ms: BTreeMap<(usize, usize), u64>,
    busy_until: BTreeMap<(usize, usize), u64>,
    /// Directed links whose messages are held back, in order.
    held: BTreeMap<(usize, usize), VecDeque<Vec<u8>>>,
    /// How long a node waits at least for an announced event before
    /// grafting (at most twice as long); `None`: timers never fire (tests
    /// graft by hand).
    graft_after_ms: Option<u64>,
    /// When each node last grafted for a head: a node grafts one announcer
    /// at a time, and waits as long again before it grafts the next.
    grafted_at: BTreeMap<(usize, EventId), u64>,
    make_every_ms: u64,
    made: u64,
    to_make: u64,
    /// What each session reported: `(node, peer, event)`.
    log: Vec<(usize, usize, SessionEvent)>,
}

impl Mesh {
    /// `n` nodes, each linked to every other, empty and in sync. Link
    /// latencies are drawn from `latency_ms` (inclusive).
    fn new(n: usize, seed: u64, latency_ms: (u64, u64)) -> Mesh {
        Mesh::with_prune_after(n, seed, latency_ms, PRUNE_AFTER_DUPLICATE_PUSHES)
    }

    /// [`Mesh::new`] with sessions that prune after `prune_after`
    /// duplicate pushes in a row (`u32::MAX`: never, a flood).
    fn with_prune_after(n: usize, seed: u64, latency_ms: (u64, u64), prune_after: u32) -> Mesh {
        let mut m = Mesh {
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            now: EPOCH_MS,
            rng: Rng(seed),
            latency_ms: BTreeMap::new(),
            busy_until: BTreeMap::new(),
            held: BTreeMap::new(),
            graft_after_ms: Some(3 * latency_ms.1 + 10),
            grafted_at: BTreeMap::new(),
            make_every_ms: 10,
            made: 0,
            to_make: 0,
            log: Vec::new(),
        };
        for i in 0..n {
            let store = MemStore::new();
            let mut links = BTreeMap::new();
            for j in (0..n).filter(|&j| j != i) {
                let mut c = SessionConfig::new(CLUSTER, key(i).node_id());
                c.peer = Some(key(j).node_id());
                c.prune_after = prune_after;
                links.insert(j, Session::new(c, &store));
            }
            m.nodes.push(Node {
                clock: HlcClock::default(),
                store,
                links,
            });
        }
        for i in 0..n {
            for j in i + 1..n {
                let l = latency_ms.0 + m.rng.below(latency_ms.1 - latency_ms.0 + 1);
                m.latency_ms.insert((i, j), l);
                m.latency_ms.insert((j, i), l);
            }
        }
        for i in 0..n {
            m.settle(i);
        }
        m.run();
        m
    }

    fn session(&mut self, node: usize, peer: usize) -> &mut Session {
        self.nodes[node].links.get_mut(&peer).expect("linked")
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    /// Sends what every session of `node` has to send.
    fn flush(&mut self, node: usize) {
        let mut out = Vec::new();
        let Node { store, links, .. } = &mut self.nodes[node];
        for (&peer, s) in links.iter_mut() {
            while let Some(msg) = s.poll_transmit(&*store) {
                out.push((peer, msg));
            }
        }
        for (peer, msg) in out {
            let link = (node, peer);
            if let Some(q) = self.held.get_mut(&link) {
                q.push_back(msg);
                continue;
            }
            let at = (self.now + self.latency_ms[&link])
                .max(self.busy_until.get(&link).copied().unwrap_or(0));
            self.busy_until.insert(link, at);
            self.schedule(
                at,
                Ev::Deliver {
                    from: node,
                    to: peer,
                    msg,
                },
            );
        }
    }

    /// Reacts to what the sessions of `node` report, as a node's shell
    /// does: stored heads go to every session, announcements start a graft
    /// timer; then sends what they have.
    fn settle(&mut self, node: usize) {
        loop {
            let mut heads = Vec::new();
            let mut timers = Vec::new();
            let mut any = false;
            let Node { store, links, .. } = &mut self.nodes[node];
            for (&peer, s) in links.iter_mut() {
                while let Some(e) = s.poll_event() {
                    any = true;
                    match &e {
                        SessionEvent::Received { heads: h, .. } => heads.extend(h.iter().copied()),
                        SessionEvent::Announced { heads: h } => timers.push((peer, h.clone())),
                        SessionEvent::Failed(err) => {
                            panic!("node {node}'s session with node {peer} failed: {err}")
                        }
                        _ => {}
                    }
                    self.log.push((node, peer, e));
                }
            }
            for h in heads {
                for s in links.values_mut() {
                    s.handle_stored(h, &*store);
                }
            }
            if let Some(after) = self.graft_after_ms {
                for (peer, heads) in timers {
                    // Staggered, so that the nodes a split cut off do not
                    // all graft at once: the first graft usually repairs
                    // the tree for the others.
                    let at = self.now + after + self.rng.below(after + 1);
                    self.schedule(at, Ev::Timer { node, peer, heads });
                }
            }
            self.flush(node);
            if !any {
                return;
            }
        }
    }

    /// Makes an event on `node` by its own key.
    fn make(&mut self, node: usize) {
        self.make_by(node, &key(node), draft(self.made));
        self.made += 1;
    }

    /// Makes an event on `node` by `author` (a fork when another node does
    /// the same with the same key), and tells its sessions.
    fn make_by(&mut self, node: usize, author: &Keypair, d: Draft) -> EventId {
        let now = self.now;
        let Node {
            clock,
            store,
            links,
            ..
        } = &mut self.nodes[node];
        let made = store
            .commit(author, clock, now, [d])
            .expect("a valid draft");
        let dot = store.state().dot_of(&made[0]).expect("just made");
        let head = Head {
            author: dot.author,
            seq: dot.seq,
            id: made[0],
        };
        for s in links.values_mut() {
            s.handle_stored(head, &*store);
        }
        self.settle(node);
        made[0]
    }

    /// Makes `count` events, one every `make_every_ms` on average, each on
    /// a random node.
    fn make_events(&mut self, count: u64) {
        self.to_make = self.made + count;
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        self.schedule(self.now + 1, Ev::Make { node });
    }

    /// Runs until nothing is scheduled.
    fn run(&mut self) {
        while let Some(((at, _), ev)) = self.queue.pop_first() {
            self.now = at;
            match ev {
                Ev::Deliver { from, to, msg } => {
                    let Node { store, links, .. } = &mut self.nodes[to];
                    let s = links.get_mut(&from).expect("linked");
                    if let Err(e) = s.handle_message(&msg, store) {
                        panic!("node {to}'s session with node {from} failed: {e}");
                    }
                    self.settle(to);
                }
                Ev::Make { node } => {
                    self.make(node);
                    if self.made < self.to_make {
                        let next = self.rng.below(self.nodes.len() as u64) as usize;
                        let gap = 1 + self.rng.below(2 * self.make_every_ms);
                        self.schedule(self.now + gap, Ev::Make { node: next });
                    }
                }
                Ev::Timer { node, peer, heads } => {
                    let store = &self.nodes[node].store;
                    let late: Vec<EventId> = heads
                        .iter()
                        .filter(|h| store.event_id(&h.author, h.seq) != Some(h.id))
                        .map(|h| h.id)
                        .collect();
                    if late.is_empty() {
                        continue;
                    }
                    let after = self.graft_after_ms.unwrap_or(0);
                    let recent = late
                        .iter()
                        .filter_map(|id| self.grafted_at.get(&(node, *id)))
                        .max()
                        .copied()
                        .filter(|t| t + after > self.now);
                    if let Some(t) = recent {
                        // A graft for it is under way: wait for that first.
                        self.schedule(t + after, Ev::Timer { node, peer, heads });
                        continue;
                    }
                    for id in late {
                        self.grafted_at.insert((node, id), self.now);
                    }
                    let Node { store, links, .. } = &mut self.nodes[node];
                    links.get_mut(&peer).expect("linked").graft(&*store);
                    self.settle(node);
                }
            }
        }
    }

    fn hold(&mut self, from: usize, to: usize) {
        self.held.entry((from, to)).or_default();
    }

    /// Delivers what was held on the link, in order, and stops holding.
    fn release(&mut self, from: usize, to: usize) {
        for msg in self.held.remove(&(from, to)).unwrap_or_default() {
            let link = (from, to);
            let at = (self.now + self.latency_ms[&link])
                .max(self.busy_until.get(&link).copied().unwrap_or(0));
            self.busy_until.insert(link, at);
            self.schedule(at, Ev::Deliver { from, to, msg });
        }
    }

    /// Sets both ends of a link eager or lazy, as a policy may.
    fn set_link(&mut self, a: usize, b: usize, eager: bool) {
        self.session(a, b).set_eager(eager);
        self.session(b, a).set_eager(eager);
    }

    fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for n in &self.nodes {
            for s in n.links.values() {
                t.add(s.stats());
            }
        }
        t
    }

    /// Eager links, each once: `(a, b)` with `a < b` where both ends are eager.
    fn eager_links(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (a, n) in self.nodes.iter().enumerate() {
            for (&b, s) in &n.links {
                if a < b && s.is_eager() && self.nodes[b].links[&a].is_eager() {
                    out.push((a, b));
                }
            }
        }
        out
    }

    /// Every replica holds every event made, with the same frontier and
    /// state; no pool holds anything.
    fn assert_converged(&self, events: u64) {
        let first = &self.nodes[0].store;
        for (i, n) in self.nodes.iter().enumerate() {
            assert_eq!(
                n.store.len(),
                events,
                "node {i} holds {} events",
                n.store.len()
            );
            assert_eq!(
                n.store.frontier_digest(),
                first.frontier_digest(),
                "node {i}"
            );
            assert_eq!(
                n.store.state().state_hash(),
                first.state().state_hash(),
                "node {i}"
            );
            assert!(n.store.waiting().is_empty(), "node {i}'s pool");
        }
    }

    /// An anti-entropy round on every link.
    fn anti_entropy(&mut self) {
        for i in 0..self.nodes.len() {
            let Node { store, links, .. } = &mut self.nodes[i];
            for s in links.values_mut() {
                s.start_round(&*store);
            }
            self.settle(i);
        }
        self.run();
    }

    fn reported(&self, node: usize, peer: usize, pred: impl Fn(&SessionEvent) -> bool) -> bool {
        self.log
            .iter()
            .any(|(n, p, e)| *n == node && *p == peer && pred(e))
    }
}

// ---------------------------------------------------------------------------
// Duplicates per delivered event in a full mesh.

/// `n` nodes in a full mesh: `warmup` events form the tree, then
/// `measured` more are made on random nodes. Returns the measured traffic,
/// and that of the same run with links that never prune (a flood).
fn full_mesh(n: usize, seed: u64, warmup: u64, measured: u64) -> (Totals, Totals) {
    let mut flooding = Mesh::with_prune_after(n, seed, (2, 20), u32::MAX);
    flooding.make_events(warmup + measured);
    flooding.run();
    flooding.assert_converged(warmup + measured);
    let flooded = flooding.totals();
    let mut m = Mesh::new(n, seed, (2, 20));
    m.make_events(warmup);
    m.run();
    let flood = m.totals();
    m.make_events(measured);
    m.run();
    let t = m.totals().since(flood);
    let deliveries = measured * (n as u64 - 1);
    let all = (warmup + measured) * (n as u64 - 1);
    println!(
        "{n}-node full mesh, seed {seed}, flooding: {:.3} duplicates per delivered event, \
         {:.2} messages and {:.0} bytes per delivery",
        flooded.duplicates_per_delivery(),
        flooded.messages as f64 / all as f64,
        flooded.bytes as f64 / all as f64,
    );
    println!(
        "{n}-node full mesh, seed {seed}: warm-up ({warmup} events) {:.3} duplicates per delivered event; \
         then {measured} events, {} deliveries, {} duplicates ({:.3} per delivered event), \
         {:.2} messages and {:.0} bytes per delivery ({} announced heads), {} grafts, {} prunes, \
         {} eager links of {}",
        flood.duplicates_per_delivery(),
        t.stored,
        t.duplicates,
        t.duplicates_per_delivery(),
        t.messages as f64 / deliveries as f64,
        t.bytes as f64 / deliveries as f64,
        t.announced_heads,
        t.grafts,
        t.prunes,
        m.eager_links().len(),
        n * (n - 1) / 2,
    );
    // Each node got each event by push or graft alone: no anti-entropy.
    assert_eq!(t.stored, deliveries, "every event reached every node once");
    m.assert_converged(warmup + measured);
    // The safety net finds nothing to do.
    m.anti_entropy();
    m.assert_converged(warmup + measured);
    assert!(
        m.log
            .iter()
            .all(|(_, _, e)| !matches!(e, SessionEvent::Missing { .. })),
        "nothing waits at a Done"
    );
    (t, flooded)
}

#[test]
fn a_five_node_mesh_delivers_each_event_about_once() {
    for seed in [1, 2, 3] {
        let (t, flood) = full_mesh(5, seed, 30, 200);
        assert!(flood.duplicates_per_delivery() > 2.0);
        assert!(
            t.duplicates_per_delivery() <= 0.5,
            "seed {seed}: {:.3} duplicates per delivered event",
            t.duplicates_per_delivery()
        );
    }
}

#[test]
fn a_twenty_node_mesh_delivers_each_event_about_once() {
    for seed in [7, 8, 9] {
        let (t, flood) = full_mesh(20, seed, 30, 150);
        assert!(flood.duplicates_per_delivery() > 10.0);
        assert!(t.bytes < flood.bytes / 2);
        assert!(
            t.duplicates_per_delivery() <= 0.5,
            "seed {seed}: {:.3} duplicates per delivered event",
            t.duplicates_per_delivery()
        );
    }
}

// ---------------------------------------------------------------------------
// Tree repair.

/// Three nodes at equal distance: the first events cross the link b–c a
/// second time, which prunes it, leaving a tree. With another link lazy the
/// tree is split; an event then reaches the cut-off node only as an
/// announcement, and the graft its timer makes delivers it.
#[test]
fn a_split_tree_is_repaired_by_announcement_and_graft() {
    let (a, b, c) = (0, 1, 2);
    let mut m = Mesh::new(3, 11, (10, 10));
    m.make(a);
    m.run();
    assert_eq!(
        m.eager_links().len(),
        3,
        "one push of duplicates is not enough"
    );
    m.make(a);
    m.run();
    assert_eq!(m.eager_links(), vec![(a, b), (a, c)], "b–c was pruned");
    assert!(m.reported(b, c, |e| *e == SessionEvent::Pruned));
    assert!(m.reported(c, b, |e| *e == SessionEvent::Pruned));
    assert_eq!(m.totals().duplicates, 4, "two duplicates each way on b–c");
    assert_eq!(m.totals().prunes, 2, "both ends sent Prune (they crossed)");

    // Split: c hangs on lazy links only.
    m.set_link(a, c, false);
    let before = m.totals();
    let log_at = m.log.len();
    m.make(b);
    m.run();
    let t = m.totals().since(before);
    let announced: Vec<usize> = m.log[log_at..]
        .iter()
        .filter(|(n, _, e)| *n == c && matches!(e, SessionEvent::Announced { .. }))
        .map(|(_, p, _)| *p)
        .collect();
    assert_eq!(announced, vec![b, a], "b announced it first, then a");
    assert_eq!(t.grafts, 1, "one graft, to the first announcer");
    assert!(m.reported(b, c, |e| *e == SessionEvent::Grafted));
    assert!(m.session(c, b).is_eager() && m.session(b, c).is_eager());
    assert_eq!(t.duplicates, 0);
    m.assert_converged(3);
    assert_eq!(m.session(c, b).stats().grafts_sent, 1);
    assert_eq!(m.session(b, c).stats().grafts_received, 1);
    assert_eq!(m.session(c, b).stats().announcements_received, 1);

    // The repaired tree carries the next event to everyone at once.
    let before = m.totals();
    m.make(c);
    m.run();
    let t = m.totals().since(before);
    assert_eq!((t.stored, t.duplicates, t.grafts), (2, 0, 0));
    m.assert_converged(4);
}

/// A lazy link announces instead of pushing; several events stored before
/// the link sends go out in one IHave (the highest head per author), and a
/// graft fetches them.
#[test]
fn a_lazy_link_announces_and_a_graft_fetches() {
    let (a, b) = (0, 1);
    let mut m = Mesh::new(2, 5, (5, 5));
    m.graft_after_ms = None;
    m.set_link(a, b, false);
    assert!(!m.session(a, b).is_eager());
    // Three batches stored before the session is polled.
    let Node {
        clock,
        store,
        links,
    } = &mut m.nodes[a];
    for i in 0..3 {
        let made = store
            .commit(&key(a), clock, EPOCH_MS + i, [draft(i)])
            .unwrap();
        let dot = store.state().dot_of(&made[0]).unwrap();
        let head = Head {
            author: dot.author,
            seq: dot.seq,
            id: made[0],
        };
        for s in links.values_mut() {
            s.handle_stored(head, &*store);
        }
    }
    m.settle(a);
    m.run();
    assert!(m.nodes[b].store.is_empty());
    let st = m.session(a, b).stats();
    assert_eq!(
        (st.messages_sent, st.announcements_sent),
        (2, 1),
        "Hello, one IHave"
    );
    let announced: Vec<&SessionEvent> = m
        .log
        .iter()
        .filter(|(n, _, e)| *n == b && matches!(e, SessionEvent::Announced { .. }))
        .map(|(_, _, e)| e)
        .collect();
    let head = m.nodes[a].store.frontier()[0];
    assert_eq!(head.seq, 3);
    assert_eq!(
        announced,
        vec![&SessionEvent::Announced { heads: vec![head] }]
    );
    // The policy's timer fired: graft.
    let Node { store, links, .. } = &mut m.nodes[b];
    assert!(links.get_mut(&a).unwrap().graft(&*store));
    m.settle(b);
    m.run();
    m.assert_converged(3);
    assert!(m.session(a, b).is_eager() && m.session(b, a).is_eager());
    assert_eq!(m.session(a, b).stats().events_sent, 3);
    // Eager now: the next event is pushed.
    m.make(a);
    m.run();
    m.assert_converged(4);
    assert_eq!(m.session(a, b).stats().announcements_sent, 1);
}

// ---------------------------------------------------------------------------
// Dependencies over another connection.

/// x makes e1; y gets it, makes e2 (which depends on it) and pushes e2 to
/// z over a link whose other end only announced e1; z's link from x is
/// slow. e2 waits in z's pool, no session fails, and it is stored in the
/// same call that stores e1, which arrives over the other session.
#[test]
fn a_dependency_arriving_over_another_session_releases_the_event() {
    let (x, y, z) = (0, 1, 2);
    let mut m = Mesh::new(3, 3, (5, 5));
    m.graft_after_ms = None;
    m.set_link(y, z, false);
    m.hold(x, z);
    let e1 = m.make_by(x, &key(x), draft(0));
    m.run();
    assert!(m.nodes[y].store.contains(&e1));
    // y pushes its own event to z (its end eager), but only announced e1.
    m.session(y, z).set_eager(true);
    let e2 = m.make_by(y, &key(y), draft(1));
    m.run();
    assert!(m.reported(
        z,
        y,
        |e| matches!(e, SessionEvent::Announced { heads } if heads[0].id == e1)
    ));
    let zs = &m.nodes[z];
    assert!(!zs.store.contains(&e2) && zs.store.waiting().contains(&e2));
    assert_eq!(zs.links[&y].pending_events(), 1);
    assert!(!m
        .log
        .iter()
        .any(|(_, _, e)| matches!(e, SessionEvent::Failed(_))));

    m.release(x, z);
    m.run();
    m.assert_converged(2);
    // Both stored by the session that brought e1.
    let got: Vec<&SessionEvent> = m
        .log
        .iter()
        .filter(|(n, p, e)| *n == z && *p == x && matches!(e, SessionEvent::Received { .. }))
        .map(|(_, _, e)| e)
        .collect();
    let SessionEvent::Received { count, heads } = got[0] else {
        unreachable!("filtered");
    };
    let mut want = vec![(key(x).node_id(), 1), (key(y).node_id(), 1)];
    want.sort();
    assert_eq!(*count, 2);
    assert_eq!(
        heads.iter().map(|h| (h.author, h.seq)).collect::<Vec<_>>(),
        want
    );
    assert_eq!(m.nodes[z].links[&y].stats().events_stored, 0);
}

/// A peer whose frontier is not causally closed sends an event without its
/// dependency and ends its stream: the receiver reports the dependency
/// missing at Done instead of failing, keeps the event pooled, and stores
/// it when the dependency comes over another session.
#[test]
fn a_dependency_that_never_comes_is_reported_missing_at_done() {
    let (kx, ky, kz) = (key(0), key(1), key(2));
    let mut xs = MemStore::new();
    let e1 = xs
        .commit(&kx, &mut HlcClock::default(), EPOCH_MS, [draft(0)])
        .unwrap()[0];
    let mut ys = xs.clone();
    let e2 = ys
        .commit(&ky, &mut HlcClock::default(), EPOCH_MS + 1, [draft(1)])
        .unwrap()[0];
    let y_head = ys
        .frontier()
        .into_iter()
        .find(|h| h.author == ky.node_id())
        .unwrap();
    assert_eq!(y_head.id, e2);
    let mut z = MemStore::new();
    // The broken peer claims only y's head and sends only e2.
    let mut zy = Session::new(SessionConfig::new(CLUSTER, kz.node_id()), &z);
    while zy.poll_transmit(&z).is_some() {}
    let stored = ys.get(&ky.node_id(), 1).unwrap();
    let mut frame = Vec::new();
    encode_wire_frame(&mut frame, &stored.bytes, stored.sig.as_ref());
    for msg in [
        hello(ky.node_id(), frontier_digest(&[y_head])),
        encode(&Message::Frontier {
            heads: vec![y_head],
        }),
        encode(&Message::Events { frames: frame }),
        encode(&Message::Done),
    ] {
        zy.handle_message(&msg, &mut z).expect("no failure");
    }
    let events: Vec<SessionEvent> = std::iter::from_fn(|| zy.poll_event()).collect();
    assert_eq!(
        &events[events.len() - 2..],
        [
            SessionEvent::Missing { deps: vec![e1] },
            SessionEvent::PeerDone
        ]
    );
    assert!(z.is_empty() && z.waiting().contains(&e2));

    // x brings e1 over another session: e2 follows from the pool.
    let mut sx = Session::new(SessionConfig::new(CLUSTER, kx.node_id()), &xs);
    let mut zx = Session::new(SessionConfig::new(CLUSTER, kz.node_id()), &z);
    loop {
        let mut quiet = true;
        while let Some(msg) = sx.poll_transmit(&xs) {
            zx.handle_message(&msg, &mut z).unwrap();
            quiet = false;
        }
        while let Some(msg) = zx.poll_transmit(&z) {
            sx.handle_message(&msg, &mut xs).unwrap();
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    assert!(z.contains(&e1) && z.contains(&e2) && z.waiting().is_empty());
    assert_eq!(zx.stats().events_stored, 2);
    assert_eq!(z.frontier(), ys.frontier());
}

// ---------------------------------------------------------------------------
// Forks.

/// Author f's key is used on two nodes (a restored backup): each makes its
/// own seq 1. Announced over a lazy link, the other branch is reported as
/// lacking (not a duplicate) and grafted; pushed over an eager one, it is
/// fetched at once. Either way both ends prove the fork.
#[test]
fn a_fork_announced_or_pushed_is_an_equivocation() {
    for eager in [false, true] {
        let (p, q) = (0, 1);
        let f = key(5);
        let mut m = Mesh::new(2, 9, (5, 5));
        m.set_link(p, q, eager);
        m.hold(p, q);
        m.hold(q, p);
        let x = m.make_by(p, &f, draft(0));
        let y = m.make_by(q, &f, draft(1));
        assert_ne!(x, y);
        m.release(p, q);
        m.release(q, p);
        m.run();
        if !eager {
            assert!(m.reported(
                q,
                p,
                |e| matches!(e, SessionEvent::Announced { heads } if heads[0].id == x)
            ));
            assert!(m.reported(
                p,
                q,
                |e| matches!(e, SessionEvent::Announced { heads } if heads[0].id == y)
            ));
        }
        for (node, peer, held, other) in [(p, q, x, y), (q, p, y, x)] {
            let proofs: Vec<&SessionEvent> = m
                .log
                .iter()
                .filter(|(n, pr, e)| {
                    *n == node
                        && *pr == peer
                        && matches!(e, SessionEvent::Equivocation(eq) if eq.proven)
                })
                .map(|(_, _, e)| e)
                .collect();
            assert_eq!(proofs.len(), 1, "eager {eager}, node {node}: {:?}", m.log);
            let SessionEvent::Equivocation(eq) = proofs[0] else {
                unreachable!()
            };
            assert_eq!(
                (eq.author, eq.seq, eq.held, eq.other),
                (f.node_id(), 1, held, other)
            );
            assert_eq!(m.nodes[node].store.event_id(&f.node_id(), 1), Some(held));
        }
    }
}

// ---------------------------------------------------------------------------
// Duplicates known by id.

/// A frame whose event the receiver holds is skipped by its id: its
/// signature is not even checked. The same bytes with a bad signature, for
/// an event the receiver lacks, are refused.
#[test]
fn a_duplicate_is_recognised_by_its_id_before_any_check() {
    let k = key(0);
    let mut w = MemStore::new();
    w.commit(&k, &mut HlcClock::default(), EPOCH_MS, [draft(0)])
        .unwrap();
    let held = w.get(&k.node_id(), 1).unwrap().clone();
    let mut bad = Vec::new();
    encode_wire_frame(&mut bad, &held.bytes, Some(&Signature([7; 64])));

    let mut v = Victim::new(w.clone());
    v.feed(&[
        hello(key(4).node_id(), w.frontier_digest()),
        encode(&Message::Events {
            frames: bad.clone(),
        }),
    ])
    .expect("a held event is skipped");
    let st = v.session.stats();
    assert_eq!((st.events_received, st.duplicates), (1, 1));
    assert!(v.session.is_eager(), "one push of duplicates is not enough");
    // A second live push of nothing new: the link turns lazy.
    v.feed(&[encode(&Message::Events {
        frames: bad.clone(),
    })])
    .unwrap();
    assert!(!v.session.is_eager());
    assert_eq!(v.events.last(), Some(&SessionEvent::Pruned));
    assert_eq!(
        decode_message(&v.session.poll_transmit(&v.store).unwrap())
            .unwrap()
            .unwrap()
            .0,
        Message::Prune
    );

    let mut v = Victim::new(MemStore::new());
    let err = v
        .feed(&[
            hello(key(4).node_id(), frontier_digest(&[])),
            encode(&Message::Events { frames: bad }),
        ])
        .unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    v.assert_refused(&err);
}

// ---------------------------------------------------------------------------
// What a peer may not send.

fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message(m, &mut out);
    out
}

fn hello(node: NodeId, digest: [u8; 32]) -> Vec<u8> {
    encode(&Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        cluster: CLUSTER,
        node,
        digest,
    }))
}

/// A session fed by hand, as a hostile peer would.
struct Victim {
    session: Session,
    store: MemStore,
    events: Vec<SessionEvent>,
    before: [u8; 32],
}

impl Victim {
    fn new(store: MemStore) -> Victim {
        let mut session = Session::new(SessionConfig::new(CLUSTER, key(3).node_id()), &store);
        while session.poll_transmit(&store).is_some() {}
        let before = store.state().state_hash();
        Victim {
            session,
            store,
            events: Vec::new(),
            before,
        }
    }

    fn feed(&mut self, msgs: &[Vec<u8>]) -> Result<(), SyncError> {
        for m in msgs {
            let r = self.session.handle_message(m, &mut self.store);
            self.events
                .extend(std::iter::from_fn(|| self.session.poll_event()));
            r?;
        }
        Ok(())
    }

    /// Failed with `err`: reported last, an Error for the peer naming it,
    /// closed, nothing stored.
    fn assert_refused(&mut self, err: &SyncError) {
        assert_eq!(self.events.last(), Some(&SessionEvent::Failed(err.clone())));
        assert!(self.session.is_closed());
        let last = std::iter::from_fn(|| self.session.poll_transmit(&self.store)).last();
        let (msg, _) = decode_message(&last.expect("an Error for the peer"))
            .unwrap()
            .unwrap();
        assert_eq!(
            msg,
            Message::Error {
                reason: err.to_string()
            }
        );
        assert_eq!(self.store.state().state_hash(), self.before);
    }
}

fn heads(n: usize) -> Vec<Head> {
    (0..n)
        .map(|i| {
            let mut author = [0u8; 32];
            author[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Head {
                author: NodeId(author),
                seq: 1,
                id: EventId([9; 32]),
            }
        })
        .collect()
}

#[test]
fn bad_ihave_graft_and_prune_are_refused() {
    // Before the peer's frontier is known (no Hello yet).
    for msg in [
        Message::Prune,
        Message::Graft { heads: vec![] },
        Message::IHave { heads: heads(1) },
    ] {
        let mut v = Victim::new(MemStore::new());
        let err = v.feed(&[encode(&msg)]).unwrap_err();
        assert_eq!(
            err,
            SyncError::Unexpected {
                message: msg.name(),
                phase: "waiting for the peer's Hello"
            }
        );
        assert!(err.to_string().contains(msg.name()), "{err}");
        v.assert_refused(&err);
    }

    let opening = || hello(key(4).node_id(), frontier_digest(&[]));
    let mut unsorted = heads(3);
    unsorted.swap(0, 2);
    let mut seq0 = heads(2);
    seq0[1].seq = 0;
    let cases: Vec<(Vec<u8>, SyncError)> = vec![
        (
            encode(&Message::IHave {
                heads: heads(MAX_IHAVE_HEADS + 1),
            }),
            SyncError::TooManyHeads {
                message: "IHave",
                entries: MAX_IHAVE_HEADS + 1,
                max: MAX_IHAVE_HEADS,
            },
        ),
        (
            encode(&Message::Graft {
                heads: heads(MAX_GRAFT_HEADS + 1),
            }),
            SyncError::TooManyHeads {
                message: "Graft",
                entries: MAX_GRAFT_HEADS + 1,
                max: MAX_GRAFT_HEADS,
            },
        ),
        (
            encode(&Message::IHave {
                heads: unsorted.clone(),
            }),
            SyncError::InvalidHeads {
                message: "IHave",
                why: "heads are not strictly ascending by (author, seq, id)",
            },
        ),
        (
            encode(&Message::Graft { heads: unsorted }),
            SyncError::InvalidHeads {
                message: "Graft",
                why: "heads are not strictly ascending by (author, seq, id)",
            },
        ),
        (
            encode(&Message::IHave { heads: seq0 }),
            SyncError::InvalidHeads {
                message: "IHave",
                why: "a head has seq 0",
            },
        ),
        (
            encode(&Message::IHave { heads: vec![] }),
            SyncError::InvalidHeads {
                message: "IHave",
                why: "it announces nothing",
            },
        ),
    ];
    for (msg, want) in cases {
        let mut v = Victim::new(MemStore::new());
        v.feed(&[opening()]).unwrap();
        let err = v.feed(&[msg]).unwrap_err();
        assert_eq!(err, want);
        v.assert_refused(&err);
    }

    // Bodies that do not decode: a Prune with a byte after it, an IHave cut
    // short, a Graft whose count promises more than follows, an unknown
    // variant.
    for (body, what) in [
        (vec![7, 0], "trailing"),
        (vec![5, 2, 1, 2, 3], "short IHave"),
        (vec![6, 0xff, 0xff, 0x03], "Graft count"),
        (vec![8], "variant 8"),
    ] {
        let mut msg = (body.len() as u32).to_le_bytes().to_vec();
        msg.extend_from_slice(&body);
        let mut v = Victim::new(MemStore::new());
        v.feed(&[opening()]).unwrap();
        let err = v.feed(&[msg]).unwrap_err();
        assert!(matches!(err, SyncError::Malformed(_)), "{what}: {err}");
        v.assert_refused(&err);
    }

    // Well-formed ones are fine between rounds.
    let mut v = Victim::new(MemStore::new());
    v.feed(&[
        opening(),
        encode(&Message::Prune),
        encode(&Message::Graft { heads: heads(2) }),
        encode(&Message::IHave { heads: heads(2) }),
    ])
    .unwrap();
    assert!(v.session.is_eager(), "the Graft came last");
    let kinds: BTreeSet<&str> = v
        .events
        .iter()
        .map(|e| match e {
            SessionEvent::InSync => "in sync",
            SessionEvent::Pruned => "pruned",
            SessionEvent::Grafted => "grafted",
            SessionEvent::Announced { .. } => "announced",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["announced", "grafted", "in sync", "pruned"]
            .into_iter()
            .collect()
    );
    let st = v.session.stats();
    assert_eq!(
        (
            st.prunes_received,
            st.grafts_received,
            st.announcements_received
        ),
        (1, 1, 2)
    );
}

/// A store that keeps no shared pool (as the node's store): each session
/// keeps its own.
struct NoPool(MemStore);

impl Store for NoPool {
    fn frontier(&self) -> Vec<Head> {
        self.0.frontier()
    }
    fn event_id(&self, author: &NodeId, seq: u64) -> Option<EventId> {
        self.0.event_id(author, seq)
    }
    fn chain_id(&self, head: &EventId, seq: u64) -> Option<EventId> {
        self.0.chain_id(head, seq)
    }
    fn common_seq(&self, a: &EventId, b: &EventId) -> u64 {
        self.0.common_seq(a, b)
    }
    fn fetch_id(&self, id: &EventId) -> Option<weftlog_proto::sync::Stored> {
        self.0.fetch_id(id)
    }
    fn contains(&self, id: &EventId) -> bool {
        self.0.contains(id)
    }
    fn hlc(&self, author: &NodeId, seq: u64) -> Option<weftlog_proto::Hlc> {
        self.0.hlc(author, seq)
    }
    fn fetch(&self, author: &NodeId, seq: u64) -> Option<weftlog_proto::sync::Stored> {
        self.0.fetch(author, seq)
    }
    fn insert(
        &mut self,
        event: &weftlog_proto::Event,
        id: EventId,
        bytes: &[u8],
        sig: Option<Signature>,
    ) -> Result<weftlog_proto::state::Inserted, weftlog_proto::state::Invalid> {
        self.0.insert(event, id, bytes, sig)
    }
}

/// Without a shared pool an event waits in the pool of the session that
/// received it; once another session stored its dependency,
/// `retry_waiting` (or the session's next message) stores it.
#[test]
fn a_private_pool_is_retried_after_another_session_stored() {
    let (kx, ky, kz) = (key(0), key(1), key(2));
    let mut xs = MemStore::new();
    let e1 = xs
        .commit(&kx, &mut HlcClock::default(), EPOCH_MS, [draft(0)])
        .unwrap()[0];
    let mut ys = xs.clone();
    let e2 = ys
        .commit(&ky, &mut HlcClock::default(), EPOCH_MS + 1, [draft(1)])
        .unwrap()[0];
    let y_head = ys
        .frontier()
        .into_iter()
        .find(|h| h.author == ky.node_id())
        .unwrap();
    let mut z = NoPool(MemStore::new());
    let mut zy = Session::new(SessionConfig::new(CLUSTER, kz.node_id()), &z);
    while zy.poll_transmit(&z).is_some() {}
    let stored = ys.get(&ky.node_id(), 1).unwrap();
    let mut frame = Vec::new();
    encode_wire_frame(&mut frame, &stored.bytes, stored.sig.as_ref());
    for msg in [
        hello(ky.node_id(), frontier_digest(&[y_head])),
        encode(&Message::Frontier {
            heads: vec![y_head],
        }),
        encode(&Message::Events { frames: frame }),
    ] {
        zy.handle_message(&msg, &mut z).unwrap();
    }
    assert_eq!(zy.pending_events(), 1);
    assert!(z.0.waiting().is_empty(), "the store's own pool is not used");

    let mut sx = Session::new(SessionConfig::new(CLUSTER, kx.node_id()), &xs);
    let mut zx = Session::new(SessionConfig::new(CLUSTER, kz.node_id()), &z);
    loop {
        let mut quiet = true;
        while let Some(msg) = sx.poll_transmit(&xs) {
            zx.handle_message(&msg, &mut z).unwrap();
            quiet = false;
        }
        while let Some(msg) = zx.poll_transmit(&z) {
            sx.handle_message(&msg, &mut xs).unwrap();
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    assert!(z.contains(&e1) && !z.contains(&e2));
    while zy.poll_event().is_some() {}
    zy.retry_waiting(&mut z);
    assert!(z.contains(&e2));
    assert_eq!(zy.pending_events(), 0);
    assert_eq!(
        zy.poll_event(),
        Some(SessionEvent::Received {
            count: 1,
            heads: vec![Head {
                author: ky.node_id(),
                seq: 1,
                id: e2
            }]
        })
    );
    // Its Done finds nothing missing.
    zy.handle_message(&encode(&Message::Done), &mut z).unwrap();
    assert_eq!(zy.poll_event(), Some(SessionEvent::PeerDone));
}
