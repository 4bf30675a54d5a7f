//! Guards the sync protocol (`PROTOCOL.md` §9, `DESIGN.md` §5): replicas in
//! sync settle in one round trip of two small Hellos at any log size;
//! divergent replicas converge to the same frontier and state hash, with
//! bytes on the wire that grow with the difference, not with the log; live
//! pushes and anti-entropy rounds carry later events; and nothing a peer
//! sends — forged, tampered, incomplete, oversized or garbage — is stored or
//! makes a session panic, while a fork is reported with both ids.
//!
//! Events are made as a node makes them: `State::prepare`, `Event::seal`,
//! and the author's signature on the last event of each batch.

use std::collections::VecDeque;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use weftlog_proto::event::MIN_FORMAT_VERSION;
use weftlog_proto::rebalance::Ask;
use weftlog_proto::state::{Draft, Invalid};
use weftlog_proto::sync::{
    decode_message, encode_message, encode_wire_frame, frontier_digest, message_len,
    wire_frame_len, Equivocation, Head, Hello, MemStore, Message, Session, SessionConfig,
    SessionEvent, Store, Stored, SyncError, MAX_MESSAGE_BYTES, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use weftlog_proto::{Event, EventId, Hlc, HlcClock, Keypair, Meta, NodeId, Op};

const CLUSTER: [u8; 32] = [0x42; 32];
/// Authors in the tests; the last one is the attacker's own key.
const KEYS: usize = 6;
const ATTACKER: usize = KEYS - 1;

fn keys() -> &'static [Keypair] {
    static KEYS_: OnceLock<Vec<Keypair>> = OnceLock::new();
    KEYS_.get_or_init(|| {
        (0..KEYS)
            .map(|i| Keypair::from_secret([i as u8 + 1; 32]))
            .collect()
    })
}

fn id(i: usize) -> NodeId {
    keys()[i].node_id()
}

fn config(cases_default: u32, file: &'static str) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases_default);
    ProptestConfig {
        cases,
        // Integration tests run with the package root as working directory.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Making events.

fn set(stream: &str, field: &str, value: &str) -> Draft {
    Draft {
        stream: stream.into(),
        kind: "FieldSet".into(),
        ops: vec![Op::Set {
            field: field.into(),
            value: format!("{value:?}").into_bytes(),
            supersedes: vec![],
        }],
        payload: br#"{"via":"desk"}"#.to_vec(),
        ..Draft::default()
    }
}

fn add(stream: &str, counter: &str, delta: i64) -> Draft {
    Draft {
        stream: stream.into(),
        kind: "Counted".into(),
        ops: vec![Op::Add {
            counter: counter.into(),
            delta,
        }],
        ..Draft::default()
    }
}

fn escrow(op: Op) -> Draft {
    Draft {
        stream: "event/keynote".into(),
        kind: "Seats".into(),
        ops: vec![op],
        ..Draft::default()
    }
}

/// Each author's clock and a shared wall clock, so tests are deterministic.
struct Clocks {
    clocks: Vec<HlcClock>,
    now_ms: u64,
}

impl Clocks {
    fn new() -> Clocks {
        Clocks {
            clocks: vec![HlcClock::default(); KEYS],
            now_ms: 1_700_000_000_000,
        }
    }

    /// Appends the drafts as one batch by `author` (refused drafts are
    /// skipped, as a node refuses a command) and signs its last event.
    /// Returns the seqs made.
    fn batch(&mut self, store: &mut MemStore, author: usize, drafts: Vec<Draft>) -> Vec<u64> {
        let mut made = Vec::new();
        for d in drafts {
            self.now_ms += 1;
            let clock = &mut self.clocks[author];
            if let Ok(Some(eid)) = store.append(&keys()[author], clock, self.now_ms, d) {
                let dot = store.state().dot_of(&eid).expect("appended");
                made.push(dot.seq);
            }
        }
        if !made.is_empty() {
            store.sign(&keys()[author]);
        }
        made
    }
}

/// A log of `n` events by `authors` authors, round-robin batches of
/// `batch` events (signed at their ends), touching 100 customers.
fn history(n: usize, authors: usize, batch: usize) -> MemStore {
    let mut store = MemStore::new();
    let mut clocks = Clocks::new();
    let mut i = 0;
    let mut author = 0;
    while i < n {
        let drafts = (i..(i + batch).min(n))
            .map(|j| {
                let stream = format!("customer/{}", j % 100);
                match j % 3 {
                    0 => set(&stream, "name", &format!("name {j}")),
                    1 => set(&stream, "email", &format!("c{j}@example.org")),
                    _ => add(&stream, "visits", 1),
                }
            })
            .collect::<Vec<_>>();
        i += drafts.len();
        clocks.batch(&mut store, author, drafts);
        author = (author + 1) % authors;
    }
    assert_eq!(store.len(), n as u64);
    store
}

/// 10,000 shared events by 4 authors, built once.
fn big_history() -> &'static MemStore {
    static H: OnceLock<MemStore> = OnceLock::new();
    H.get_or_init(|| history(10_000, 4, 20))
}

/// Frame bytes of `author`'s events above `from`, as `store` holds them.
fn frame_bytes(store: &MemStore, author: usize, from: u64) -> (u64, u64) {
    let mut frames = 0;
    let mut events = 0;
    let mut seq = from + 1;
    while let Some(s) = store.get(&id(author), seq) {
        frames += wire_frame_len(s.bytes.len(), s.sig.is_some()) as u64;
        events += s.bytes.len() as u64;
        seq += 1;
    }
    (frames, events)
}

// ---------------------------------------------------------------------------
// Peers and the network between them.

struct Peer {
    store: MemStore,
    session: Session,
    events: Vec<SessionEvent>,
}

impl Peer {
    fn new(store: MemStore, node: usize) -> Peer {
        Peer::with(store, SessionConfig::new(CLUSTER, id(node)))
    }

    fn with(store: MemStore, config: SessionConfig) -> Peer {
        let session = Session::new(config, &store);
        let mut p = Peer {
            store,
            session,
            events: Vec::new(),
        };
        p.collect();
        p
    }

    fn collect(&mut self) {
        while let Some(e) = self.session.poll_event() {
            self.events.push(e);
        }
    }

    fn handle(&mut self, msg: &[u8]) {
        if let Err(e) = self.session.handle_message(msg, &mut self.store) {
            panic!("session failed: {e}");
        }
        self.collect();
    }

    fn poll(&mut self) -> Option<Vec<u8>> {
        let m = self.session.poll_transmit(&self.store);
        self.collect();
        m
    }

    fn received(&self) -> u64 {
        self.events
            .iter()
            .map(|e| match e {
                SessionEvent::Received { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    fn failures(&self) -> Vec<&SyncError> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Failed(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn equivocations(&self) -> Vec<Equivocation> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Equivocation(e) => Some(*e),
                _ => None,
            })
            .collect()
    }
}

/// Messages and bytes each way: `[a → b, b → a]`.
#[derive(Debug, Default)]
struct Traffic {
    messages: [u64; 2],
    bytes: [u64; 2],
    hello_bytes: Vec<usize>,
}

impl Traffic {
    fn record(&mut self, dir: usize, msg: &[u8]) {
        self.messages[dir] += 1;
        self.bytes[dir] += msg.len() as u64;
        if let Ok(Some((Message::Hello(_), _))) = decode_message(msg) {
            self.hello_bytes.push(msg.len());
        }
    }

    fn total(&self) -> u64 {
        self.bytes[0] + self.bytes[1]
    }
}

/// Shuttles messages until neither peer has anything to send.
fn pump(a: &mut Peer, b: &mut Peer) -> Traffic {
    let mut t = Traffic::default();
    loop {
        let mut quiet = true;
        while let Some(m) = a.poll() {
            t.record(0, &m);
            b.handle(&m);
            quiet = false;
        }
        while let Some(m) = b.poll() {
            t.record(1, &m);
            a.handle(&m);
            quiet = false;
        }
        if quiet {
            return t;
        }
    }
}

fn assert_converged(a: &Peer, b: &Peer) {
    assert_eq!(a.store.frontier(), b.store.frontier(), "frontiers differ");
    assert_eq!(a.store.frontier_digest(), b.store.frontier_digest());
    assert_eq!(
        a.store.state().state_hash(),
        b.store.state().state_hash(),
        "same frontier, different state"
    );
    assert!(a.failures().is_empty() && b.failures().is_empty());
}

/// Tells a peer's session about events its store gained from elsewhere, as
/// the shell does after a local commit.
fn stored(p: &mut Peer, author: usize) {
    let head = p
        .store
        .frontier()
        .into_iter()
        .find(|h| h.author == id(author));
    if let Some(h) = head {
        p.session.handle_stored(h, &p.store);
        p.collect();
    }
}

/// The same events as `store`, re-inserted in canonical order, keeping the
/// signature of every author's head and of the other events `keep` picks:
/// a store whose unsigned runs span other authors' events (as one that lost
/// some signatures, or a hostile sender, would send them).
fn strip(store: &MemStore, mut keep: impl FnMut(NodeId, u64) -> bool) -> MemStore {
    let heads = store.frontier();
    let mut all = Vec::new();
    for h in &heads {
        for seq in 1..=h.seq {
            let s = store.get(&h.author, seq).unwrap().clone();
            all.push((s.hlc, h.author, seq, s));
        }
    }
    all.sort_by_key(|(hlc, a, seq, _)| (*hlc, *a, *seq));
    let mut out = MemStore::new();
    for (_, author, seq, s) in all {
        let head = heads.iter().any(|h| h.author == author && h.seq == seq);
        let sig = s.sig.filter(|_| head || keep(author, seq));
        let (event, eid) = Event::decode(&s.bytes).unwrap();
        out.insert(&event, eid, &s.bytes, sig).unwrap();
    }
    assert_eq!(out.state().state_hash(), store.state().state_hash());
    out
}

/// Every author's head carries a signature, so the store can forward it.
fn assert_heads_signed(store: &MemStore) {
    for h in store.frontier() {
        assert!(
            store.get(&h.author, h.seq).unwrap().sig.is_some(),
            "head {} of {:?} is unsigned",
            h.seq,
            h.author
        );
    }
}

// ---------------------------------------------------------------------------
// In sync, divergence, cost.

#[test]
fn in_sync_in_one_round_trip_with_small_hellos() {
    for n in [0usize, 1, 100, 10_000] {
        let store = if n == 10_000 {
            big_history().clone()
        } else {
            history(n, 3, 7)
        };
        let mut a = Peer::new(store.clone(), 0);
        let mut b = Peer::new(store, 1);
        let t = pump(&mut a, &mut b);
        assert_eq!(
            t.messages,
            [1, 1],
            "n = {n}: one Hello each way, nothing else"
        );
        assert!(t.hello_bytes.iter().all(|&h| h <= 200), "{t:?}");
        assert_eq!(a.events, vec![SessionEvent::InSync]);
        assert_eq!(b.events, vec![SessionEvent::InSync]);
        println!(
            "in-sync check at n = {n}: {} messages, {} bytes in all",
            t.messages[0] + t.messages[1],
            t.total()
        );
        // A later anti-entropy round costs the same.
        assert!(a.session.start_round(&a.store));
        let t = pump(&mut a, &mut b);
        assert_eq!(t.messages, [1, 1]);
        assert_eq!(t.total(), 2 * t.hello_bytes[0] as u64);
    }
}

/// A shared past with escrow, then both sides offline: the same field
/// edited on both (a conflict), different fields (merged), seats sold from
/// each side's rights, counters, and a third author whose events each side
/// got a different part of.
#[test]
fn divergent_peers_converge() {
    let mut clocks = Clocks::new();
    let mut world = MemStore::new();
    clocks.batch(
        &mut world,
        0,
        vec![
            escrow(Op::EscrowInit {
                counter: "seats".into(),
                capacity: 100,
            }),
            escrow(Op::EscrowTransfer {
                counter: "seats".into(),
                to: id(1),
                amount: 40,
            }),
            set("customer/20", "name", "Ada"),
        ],
    );
    clocks.batch(&mut world, 1, vec![add("customer/20", "visits", 1)]);
    clocks.batch(&mut world, 2, vec![set("customer/21", "name", "Grace")]);
    let mut p = world.clone();
    let mut q = world.clone();
    // A third author keeps writing; p sees two of its batches, q three.
    let mut third = world.clone();
    for (i, store) in [&mut p, &mut q].into_iter().enumerate() {
        for b in 0..2 + i {
            clocks.batch(
                &mut third,
                2,
                vec![
                    add("customer/21", "visits", 1),
                    add("customer/22", "x", b as i64),
                ],
            );
        }
        let mut tp = Peer::new(third.clone(), 2);
        let mut sp = Peer::new(store.clone(), 5);
        pump(&mut tp, &mut sp);
        *store = sp.store;
    }
    // Offline on both sides.
    clocks.batch(
        &mut p,
        0,
        vec![
            set("customer/20", "name", "Ada Lovelace"),
            set("customer/20", "email", "ada@example.org"),
            escrow(Op::EscrowConsume {
                counter: "seats".into(),
                amount: 50,
            }),
        ],
    );
    clocks.batch(&mut p, 0, vec![add("customer/20", "visits", 2)]);
    clocks.batch(
        &mut q,
        1,
        vec![
            set("customer/20", "name", "Ada King"),
            set("customer/20", "phone", "+44 20 7946 0000"),
            escrow(Op::EscrowConsume {
                counter: "seats".into(),
                amount: 40,
            }),
        ],
    );
    // Selling beyond one's rights is refused locally.
    assert!(q
        .state()
        .prepare(
            id(1),
            &mut HlcClock::default(),
            0,
            escrow(Op::EscrowConsume {
                counter: "seats".into(),
                amount: 1
            })
        )
        .is_err());
    let (p_len, q_len) = (p.len(), q.len());
    let mut a = Peer::new(p, 0);
    let mut b = Peer::new(q, 1);
    pump(&mut a, &mut b);
    assert_converged(&a, &b);
    for peer in [&a, &b] {
        assert!(peer.events.contains(&SessionEvent::PeerDone));
        assert_eq!(peer.events.last(), Some(&SessionEvent::RoundDone));
    }
    assert_eq!(a.received() + p_len, b.received() + q_len);
    let st = a.store.state();
    let c20 = st.stream("customer/20").unwrap();
    let names = &c20.fields["name"];
    assert_eq!(
        names.len(),
        2,
        "the same-field edits are kept as a conflict"
    );
    assert!(c20.fields["email"].len() == 1 && c20.fields["phone"].len() == 1);
    assert_eq!(c20.counters["visits"], 3);
    let seats = &st.stream("event/keynote").unwrap().escrow["seats"];
    assert_eq!((seats.capacity, seats.consumed), (100, 90));
    assert_eq!(st.conflicts().count(), 1);
}

#[test]
fn catch_up_bytes_grow_with_the_difference_not_the_log() {
    let authors = 4u64;
    for k in [1usize, 100, 1000] {
        let mut results = Vec::new();
        for base in [history(1_000, 4, 20), big_history().clone()] {
            let n = base.len();
            let mut p = base.clone();
            let mut clocks = Clocks::new();
            clocks.clocks[0] = HlcClock::new(base.state().max_hlc());
            let mut made = 0;
            while made < k {
                let m = (k - made).min(10);
                let drafts = (made..made + m)
                    .map(|j| {
                        set(
                            &format!("customer/{}", j % 100),
                            "name",
                            &format!("new {j}"),
                        )
                    })
                    .collect();
                clocks.batch(&mut p, 0, drafts);
                made += m;
            }
            let head0 = base
                .frontier()
                .iter()
                .find(|h| h.author == id(0))
                .unwrap()
                .seq;
            let (frames, event_bytes) = frame_bytes(&p, 0, head0);
            let mut a = Peer::new(p, 0);
            let mut b = Peer::new(base, 1);
            let t = pump(&mut a, &mut b);
            assert_converged(&a, &b);
            assert_eq!(b.received(), k as u64);
            let bound = frames as f64 * 1.1 + (authors * 2 * 80) as f64 + 512.0;
            println!(
                "catch-up n = {n}, k = {k}: {} bytes on the wire in {} messages; \
                 missing frames {frames} B, events {event_bytes} B; \
                 ratio to frames {:.3}, to event encodings {:.3}",
                t.total(),
                t.messages[0] + t.messages[1],
                t.total() as f64 / frames as f64,
                t.total() as f64 / event_bytes as f64,
            );
            assert!(
                (t.total() as f64) <= bound,
                "{} bytes for {k} missing events of {frames} frame bytes (bound {bound})",
                t.total()
            );
            results.push(t.total());
        }
        // The same difference costs the same over a 10x larger shared log
        // (give or take varint widths of seqs in the frontiers).
        let diff = results[0].abs_diff(results[1]);
        assert!(diff <= 2 * authors * 4, "{results:?}");
    }
}

/// Both sides make k new events: the figure the benchmarks compare with
/// automerge's sync.
#[test]
fn both_sides_new_events_cost() {
    for k in [1usize, 100, 1000] {
        let base = big_history();
        let (mut p, mut q) = (base.clone(), base.clone());
        let mut clocks = Clocks::new();
        for (store, author) in [(&mut p, 0), (&mut q, 1)] {
            clocks.clocks[author] = HlcClock::new(base.state().max_hlc());
            let mut made = 0;
            while made < k {
                let m = (k - made).min(10);
                let drafts = (made..made + m)
                    .map(|j| add(&format!("customer/{}", j % 100), "visits", 1))
                    .collect();
                clocks.batch(store, author, drafts);
                made += m;
            }
        }
        let heads: Vec<u64> = [0, 1]
            .iter()
            .map(|&x| {
                base.frontier()
                    .iter()
                    .find(|h| h.author == id(x))
                    .unwrap()
                    .seq
            })
            .collect();
        let frames = frame_bytes(&p, 0, heads[0]).0 + frame_bytes(&q, 1, heads[1]).0;
        let mut a = Peer::new(p, 0);
        let mut b = Peer::new(q, 1);
        let t = pump(&mut a, &mut b);
        assert_converged(&a, &b);
        println!(
            "both sides k = {k} new at n = 10000: {} bytes, {} messages, frames {frames} B ({:.3}x)",
            t.total(),
            t.messages[0] + t.messages[1],
            t.total() as f64 / frames as f64
        );
        assert!(t.total() as f64 <= frames as f64 * 1.1 + 4.0 * 2.0 * 80.0 + 512.0);
    }
}

// ---------------------------------------------------------------------------
// Live push, anti-entropy, relays.

#[test]
fn live_pushes_and_anti_entropy_rounds() {
    let mut clocks = Clocks::new();
    let base = history(50, 2, 5);
    let mut a = Peer::new(base.clone(), 0);
    let mut b = Peer::new(base, 1);
    pump(&mut a, &mut b);
    // Pushed at once, without a round.
    clocks.clocks[0] = HlcClock::new(a.store.state().max_hlc());
    clocks.batch(&mut a.store, 0, vec![set("customer/1", "name", "pushed")]);
    stored(&mut a, 0);
    let t = pump(&mut a, &mut b);
    assert_eq!(t.messages, [1, 0], "one Events message, no round");
    assert_converged(&a, &b);
    clocks.clocks[1] = HlcClock::new(b.store.state().max_hlc());
    clocks.batch(&mut b.store, 1, vec![add("customer/1", "visits", 5)]);
    stored(&mut b, 1);
    assert_eq!(pump(&mut a, &mut b).messages, [0, 1]);
    assert_converged(&a, &b);
    // Telling a session twice, or about what the peer sent, sends nothing.
    stored(&mut b, 1);
    stored(&mut b, 0);
    assert_eq!(pump(&mut a, &mut b).messages, [0, 0]);
    // An event the shell forgot to push is repaired by the next round.
    clocks.batch(&mut a.store, 0, vec![set("customer/2", "name", "missed")]);
    assert!(a.session.start_round(&a.store));
    assert!(!a.session.start_round(&a.store), "a round is in progress");
    pump(&mut a, &mut b);
    assert_converged(&a, &b);
    assert_eq!(b.events.last(), Some(&SessionEvent::RoundDone));
    // Both ends starting a round at once is one round.
    assert!(a.session.start_round(&a.store) && b.session.start_round(&b.store));
    let t = pump(&mut a, &mut b);
    assert_eq!(t.messages, [1, 1]);
    assert_eq!(a.events.last(), Some(&SessionEvent::InSync));
}

/// Events relayed a → b → c arrive with their signatures: b forwards what
/// its session with a reports as received.
#[test]
fn events_relay_through_a_middle_peer() {
    let mut clocks = Clocks::new();
    let base = history(30, 3, 4);
    let mut a = Peer::new(base.clone(), 0);
    let mut ba = Peer::new(base.clone(), 1);
    pump(&mut a, &mut ba);
    let mut bc = Peer::new(base.clone(), 1);
    let mut c = Peer::new(base, 2);
    pump(&mut bc, &mut c);
    clocks.clocks[0] = HlcClock::new(a.store.state().max_hlc());
    for i in 0..3i64 {
        clocks.batch(
            &mut a.store,
            0,
            (0..4)
                .map(|j| add("customer/9", "visits", i * 4 + j))
                .collect(),
        );
        stored(&mut a, 0);
        let before = ba.events.len();
        pump(&mut a, &mut ba);
        // b's store is shared by its two sessions; the shell forwards.
        bc.store = ba.store.clone();
        for e in ba.events[before..].iter().cloned() {
            if let SessionEvent::Received { heads, .. } = e {
                for h in heads {
                    bc.session.handle_stored(h, &bc.store);
                }
            }
        }
        pump(&mut bc, &mut c);
        ba.store = bc.store.clone();
    }
    assert_converged(&a, &c);
    assert_eq!(c.received(), 12);
}

/// Unsigned runs that span other authors' events: an event waits for a
/// dependency in a run no signature covers yet, and a segment is stored
/// whole or not at all, so the receiver's heads stay signed.
#[test]
fn events_waiting_for_a_later_signature_are_stored_whole() {
    // a1 a2 | b1(dep a2) | a3(dep b1), with a2's signature stripped: b1
    // arrives authenticated but waits for a2, which a3's signature covers.
    let mut w = MemStore::new();
    let mut clocks = Clocks::new();
    clocks.batch(
        &mut w,
        0,
        vec![set("c/1", "name", "a1"), set("c/1", "name", "a2")],
    );
    clocks.batch(&mut w, 1, vec![set("c/1", "name", "b1")]);
    clocks.batch(&mut w, 0, vec![set("c/1", "name", "a3")]);
    let w = strip(&w, |_, _| false);
    let a2 = w.get(&id(0), 2).unwrap();
    assert!(a2.sig.is_none());
    let b1 = w.get(&id(1), 1).unwrap();
    assert!(Event::decode(&b1.bytes).unwrap().0.deps.contains(&a2.id));
    // One frame per message, so each is handled on its own.
    let mut a = peer_with_target(w, 0, 1);
    let mut b = Peer::new(MemStore::new(), 1);
    let mut waited = 0;
    loop {
        let mut quiet = true;
        while let Some(m) = a.poll() {
            b.handle(&m);
            waited = waited.max(b.session.pending_events());
            assert_heads_signed(&b.store);
            quiet = false;
        }
        while let Some(m) = b.poll() {
            a.handle(&m);
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    assert_eq!(waited, 3, "a1, a2 unsigned, then b1 waiting");
    assert_converged(&a, &b);

    // a1 | c1(dep a1) | a2(dep c1) | c2(dep a2), a1 and c1 unsigned: when a2
    // releases [a1, a2], a2 must wait for c1 — and a1 must not be stored
    // alone, or the receiver's head of author 0 would be unsigned.
    let mut w = MemStore::new();
    let mut clocks = Clocks::new();
    for (author, v) in [(0, "a1"), (2, "c1"), (0, "a2"), (2, "c2")] {
        clocks.batch(&mut w, author, vec![set("c/1", "name", v)]);
    }
    let w = strip(&w, |_, _| false);
    let order = [(0, 1), (2, 1), (0, 2), (2, 2)];
    let mut v = Victim::new(MemStore::new());
    v.feed(&opening(w.frontier())).unwrap();
    for (i, &(author, seq)) in order.iter().enumerate() {
        let s = w.get(&id(author), seq).unwrap();
        assert_eq!(s.sig.is_some(), seq == 2);
        v.feed(&[events_msg(frame(s))]).unwrap();
        let stored = v.peer.store.len();
        assert_eq!(stored, if i < 3 { 0 } else { 4 }, "after {author}:{seq}");
        assert_heads_signed(&v.peer.store);
    }
    v.feed(&[encode(&Message::Done)]).unwrap();
    assert_eq!(v.peer.store.state().state_hash(), w.state().state_hash());
    assert_eq!(v.peer.store.frontier(), w.frontier());
}

/// Events the receiver already holds (from another peer, say) are skipped,
/// whether they arrive alone or inside a run that opened before it got them.
#[test]
fn events_the_store_already_holds_are_skipped() {
    let mut w = MemStore::new();
    let mut clocks = Clocks::new();
    clocks.batch(&mut w, 0, vec![add("c/1", "n", 1), add("c/1", "n", 2)]);
    clocks.batch(&mut w, 0, vec![add("c/1", "n", 3), add("c/1", "n", 4)]);
    let get = |seq| w.get(&id(0), seq).unwrap().clone();
    let mut have = MemStore::new();
    for seq in 1..=2 {
        let s = get(seq);
        let (e, eid) = Event::decode(&s.bytes).unwrap();
        have.insert(&e, eid, &s.bytes, s.sig).unwrap();
    }
    let mut v = Victim::new(have);
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(
        [1, 2, 3].iter().flat_map(|&s| frame(&get(s))).collect(),
    ));
    v.feed(&msgs).unwrap();
    assert_eq!(
        (v.peer.store.len(), v.peer.session.pending_events()),
        (2, 1)
    );
    // Seqs 3 and 4 reach the store by another path while 3 waits here.
    for seq in 3..=4 {
        let s = get(seq);
        let (e, eid) = Event::decode(&s.bytes).unwrap();
        v.peer.store.insert(&e, eid, &s.bytes, s.sig).unwrap();
    }
    v.feed(&[events_msg(frame(&get(4))), encode(&Message::Done)])
        .unwrap();
    let st = v.peer.session.stats();
    assert_eq!(
        (st.events_received, st.duplicates, st.events_stored),
        (4, 4, 0)
    );
    assert_eq!(v.peer.session.pending_events(), 0);
    assert_eq!(v.peer.store.frontier(), w.frontier());
    assert!(v.peer.events.contains(&SessionEvent::PeerDone));
}

// ---------------------------------------------------------------------------
// Random divergence.

/// A step of a random script over three nodes (authors 0, 1, 2).
#[derive(Clone, Debug)]
enum Step {
    /// A batch by one node of (stream, what) drafts.
    Batch(usize, Vec<(u8, u8)>),
    /// A full sync between two nodes.
    Sync(usize, usize, usize),
}

fn draft_of(author: usize, stream: u8, what: u8) -> Draft {
    let s = format!("customer/{}", stream % 3);
    match what % 6 {
        0 | 1 => set(&s, "name", &format!("{author}-{what}")),
        2 => set(&s, "email", &format!("{what}@{author}")),
        3 => add(&s, "visits", what as i64 - 100),
        4 => escrow(Op::EscrowConsume {
            counter: "seats".into(),
            amount: (what % 7) as u64 + 1,
        }),
        _ => escrow(Op::EscrowTransfer {
            counter: "seats".into(),
            to: id((author + 1 + what as usize % 2) % 3),
            amount: (what % 5) as u64 + 1,
        }),
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, prop::collection::vec((any::<u8>(), any::<u8>()), 1..5))
            .prop_map(|(a, d)| Step::Batch(a, d)),
        1 => (0..3usize, 1..3usize, 1..3000usize).prop_map(|(a, o, t)| Step::Sync(a, (a + o) % 3, t)),
    ]
}

/// SplitMix64 for delivery orders drawn from a seed proptest supplies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn peer_with_target(store: MemStore, node: usize, target: usize) -> Peer {
    let mut c = SessionConfig::new(CLUSTER, id(node));
    c.events_bytes_target = target;
    Peer::with(store, c)
}

/// Runs one session between `x` and `y` with messages delivered in a random
/// interleaving, local batches made during it (pushed with `handle_stored`)
/// and random anti-entropy rounds, until nothing moves. A pruned link
/// grafts when it goes quiet with announced events lacking, as the peers
/// policy does when its graft timer fires.
fn random_session(
    x: (MemStore, usize),
    y: (MemStore, usize),
    target: usize,
    rng: &mut Rng,
    clocks: &mut Clocks,
    mut appends: usize,
    mut rounds: usize,
) -> (Peer, Peer) {
    let mut peers = [
        peer_with_target(x.0, x.1, target),
        peer_with_target(y.0, y.1, target),
    ];
    let nodes = [x.1, y.1];
    let mut wires: [VecDeque<Vec<u8>>; 2] = [VecDeque::new(), VecDeque::new()];
    let mut idle = 0;
    let mut seen = [0usize; 2];
    while idle < 8 {
        let side = rng.below(2);
        let moved = match rng.below(6) {
            0 | 1 => match peers[side].poll() {
                Some(m) => {
                    wires[side].push_back(m);
                    true
                }
                None => false,
            },
            2 | 3 => match wires[side].pop_front() {
                Some(m) => {
                    peers[1 - side].handle(&m);
                    true
                }
                None => false,
            },
            4 if appends > 0 => {
                appends -= 1;
                let p = &mut peers[side];
                let what = rng.next() as u8;
                let author = nodes[side];
                clocks.batch(&mut p.store, author, vec![draft_of(author, what, what)]);
                stored(p, author);
                true
            }
            5 if rounds > 0 => {
                rounds -= 1;
                let p = &mut peers[side];
                p.session.start_round(&p.store);
                p.collect();
                true
            }
            _ => false,
        };
        // Quiet only when both wires are empty and neither has output.
        if moved || !wires[0].is_empty() || !wires[1].is_empty() {
            idle = 0;
            continue;
        }
        let mut any = false;
        for (s, p) in peers.iter_mut().enumerate() {
            // The policy's graft timer fires when nothing else arrives: a
            // pruned link is the only path here, so announced events that
            // are still lacking are asked for.
            let lacking = p.events[seen[s]..].iter().any(|e| match e {
                SessionEvent::Announced { heads } => heads.iter().any(|h| !p.store.contains(&h.id)),
                _ => false,
            });
            seen[s] = p.events.len();
            if lacking && p.session.graft(&p.store) {
                any = true;
            }
            if let Some(m) = p.poll() {
                wires[s].push_back(m);
                any = true;
            }
        }
        idle = if any { 0 } else { idle + 1 };
    }
    let [a, b] = peers;
    (a, b)
}

proptest! {
    #![proptest_config(config(256, "proptest-regressions/sync.txt"))]

    #[test]
    fn random_divergence_converges(
        steps in prop::collection::vec(step(), 0..24),
        seed in any::<u64>(),
        target in prop_oneof![1..400usize, 400..5000usize, Just(64 * 1024)],
        appends in 0..6usize,
        rounds in 0..3usize,
        strip_sigs in 0..3u8,
    ) {
        let mut clocks = Clocks::new();
        let mut stores = [MemStore::new(), MemStore::new(), MemStore::new()];
        // Node 0 opens the seats and hands rights to the others.
        clocks.batch(&mut stores[0], 0, vec![
            escrow(Op::EscrowInit { counter: "seats".into(), capacity: 60 }),
            escrow(Op::EscrowTransfer { counter: "seats".into(), to: id(1), amount: 20 }),
            escrow(Op::EscrowTransfer { counter: "seats".into(), to: id(2), amount: 20 }),
        ]);
        let mut rng = Rng(seed);
        for s in &steps {
            match s {
                Step::Batch(a, drafts) => {
                    let drafts = drafts.iter().map(|&(st, w)| draft_of(*a, st, w)).collect();
                    clocks.batch(&mut stores[*a], *a, drafts);
                }
                Step::Sync(x, y, t) => {
                    let sx = std::mem::take(&mut stores[*x]);
                    let sy = std::mem::take(&mut stores[*y]);
                    let (px, py) = random_session((sx, *x), (sy, *y), *t, &mut rng, &mut clocks, 0, 0);
                    assert_converged(&px, &py);
                    stores[*x] = px.store;
                    stores[*y] = py.store;
                }
            }
        }
        let mut s1 = std::mem::take(&mut stores[1]);
        let mut s0 = std::mem::take(&mut stores[0]);
        if strip_sigs > 0 {
            // Runs that span other authors' events: receivers must wait.
            let mut keep = |_, _| strip_sigs == 1 && rng.below(3) == 0;
            s0 = strip(&s0, &mut keep);
            s1 = strip(&s1, &mut keep);
        }
        let (a, b) = random_session((s0, 0), (s1, 1), target, &mut rng, &mut clocks, appends, rounds);
        assert_converged(&a, &b);
        assert_heads_signed(&a.store);
        assert_heads_signed(&b.store);
        let seats = &a.store.state().stream("event/keynote").unwrap().escrow["seats"];
        prop_assert!(seats.consumed <= seats.capacity);
    }
}

// ---------------------------------------------------------------------------
// What a peer may not do. A hand-driven attacker talks to a victim session.

fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message(m, &mut out);
    out
}

fn hello_from(node: NodeId, digest: [u8; 32]) -> Vec<u8> {
    encode(&Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        cluster: CLUSTER,
        node,
        digest,
    }))
}

/// The attacker's opening: a Hello and a Frontier claiming `heads`.
fn opening(heads: Vec<Head>) -> Vec<Vec<u8>> {
    vec![
        hello_from(id(ATTACKER), frontier_digest(&heads)),
        encode(&Message::Frontier { heads }),
    ]
}

fn events_msg(frames: Vec<u8>) -> Vec<u8> {
    encode(&Message::Events { frames })
}

fn frame(s: &Stored) -> Vec<u8> {
    let mut out = Vec::new();
    encode_wire_frame(&mut out, &s.bytes, s.sig.as_ref());
    out
}

fn frame_with(bytes: &[u8], id: &EventId, sig: Option<&weftlog_proto::Signature>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = id; // the wire frame carries no id: the receiver computes it
    encode_wire_frame(&mut out, bytes, sig);
    out
}

struct Victim {
    peer: Peer,
    before: (u64, [u8; 32]),
}

impl Victim {
    fn new(store: MemStore) -> Victim {
        Victim::with(SessionConfig::new(CLUSTER, id(4)), store)
    }

    fn with(config: SessionConfig, store: MemStore) -> Victim {
        let before = (store.len(), store.state().state_hash());
        Victim {
            peer: Peer::with(store, config),
            before,
        }
    }

    /// Feeds messages; returns the first error.
    fn feed(&mut self, msgs: &[Vec<u8>]) -> Result<(), SyncError> {
        for m in msgs {
            let r = self.peer.session.handle_message(m, &mut self.peer.store);
            self.peer.collect();
            r?;
        }
        Ok(())
    }

    /// Asserts the session failed with `err`: reported as the last event,
    /// an Error message for the peer, nothing more, and the store unchanged.
    fn assert_refused(&mut self, err: &SyncError) {
        assert_eq!(
            self.peer.events.last(),
            Some(&SessionEvent::Failed(err.clone()))
        );
        assert!(self.peer.session.is_closed());
        let mut last = None;
        while let Some(m) = self.peer.session.poll_transmit(&self.peer.store) {
            last = Some(m);
        }
        let (msg, _) = decode_message(&last.expect("an Error for the peer"))
            .unwrap()
            .unwrap();
        assert_eq!(
            msg,
            Message::Error {
                reason: err.to_string()
            }
        );
        assert_eq!(
            (self.peer.store.len(), self.peer.store.state().state_hash()),
            self.before,
            "nothing of a refused stream may be stored"
        );
        assert_eq!(
            self.peer
                .session
                .handle_message(&encode(&Message::Done), &mut self.peer.store),
            Err(SyncError::Closed)
        );
    }
}

/// A store with one signed event by author 0 and its frame parts.
fn one_event() -> (MemStore, Stored) {
    let mut w = MemStore::new();
    Clocks::new().batch(&mut w, 0, vec![set("customer/1", "name", "Ada")]);
    let s = w.get(&id(0), 1).unwrap().clone();
    (w, s)
}

#[test]
fn a_forged_event_is_refused() {
    // Author 0's event, signed by another key.
    let (w, s) = one_event();
    let forged = keys()[3].sign(&s.id);
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frame_with(&s.bytes, &s.id, Some(&forged))));
    let err = v.feed(&msgs).unwrap_err();
    assert!(
        matches!(&err, SyncError::BadSignature { event, .. } if event.id == s.id),
        "{err}"
    );
    assert!(err.to_string().contains("signature"), "{err}");
    v.assert_refused(&err);
}

#[test]
fn a_tampered_event_is_refused() {
    let (w, s) = one_event();
    // Bytes changed in flight: the wire frame has no id of its own, so the
    // changed event either no longer decodes or its signature fails.
    let mut f = frame(&s);
    let n = f.len();
    f[n - 40] ^= 1;
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(f));
    let err = v.feed(&msgs).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Event { index: 0, .. } | SyncError::BadSignature { .. }
        ),
        "{err}"
    );
    v.assert_refused(&err);

    // Changed and re-framed with a fresh id: the signature no longer covers it.
    let (mut e, _) = Event::decode(&s.bytes).unwrap();
    e.payload = br#"{"via":"mallory"}"#.to_vec();
    let (bytes, tid) = e.seal();
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frame_with(&bytes, &tid, s.sig.as_ref())));
    let err = v.feed(&msgs).unwrap_err();
    assert!(matches!(&err, SyncError::BadSignature { event, .. } if event.id == tid));
    v.assert_refused(&err);

    // An unsigned event changed before a genuine signed one: the chain breaks.
    let mut w = MemStore::new();
    Clocks::new().batch(
        &mut w,
        0,
        vec![
            set("customer/1", "name", "Ada"),
            set("customer/1", "name", "Ada B"),
        ],
    );
    let (s1, s2) = (w.get(&id(0), 1).unwrap(), w.get(&id(0), 2).unwrap());
    assert!(s1.sig.is_none() && s2.sig.is_some());
    let (mut e, _) = Event::decode(&s1.bytes).unwrap();
    e.kind = "Tampered".into();
    let (bytes, tid) = e.seal();
    let mut frames = frame_with(&bytes, &tid, None);
    frames.extend(frame(s2));
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frames));
    let err = v.feed(&msgs).unwrap_err();
    assert!(
        matches!(&err, SyncError::BrokenRun { event, .. } if event.id == s2.id),
        "{err}"
    );
    v.assert_refused(&err);
}

/// An event whose dependency never arrives is not a failure at the peer's
/// Done (the dependency may come over another link): it stays in the pool
/// and the session reports what it waits for.
#[test]
fn an_event_whose_dependency_never_arrives_is_reported_missing_at_done() {
    let mut w = MemStore::new();
    let mut clocks = Clocks::new();
    clocks.batch(&mut w, 0, vec![set("customer/1", "name", "Ada")]);
    clocks.batch(&mut w, 1, vec![set("customer/1", "name", "Ada K")]);
    let x = w.get(&id(0), 1).unwrap().id;
    let y = w.get(&id(1), 1).unwrap().clone();
    assert_eq!(Event::decode(&y.bytes).unwrap().0.deps, vec![x]);
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frame(&y)));
    v.feed(&msgs).expect("an event may wait for its dependency");
    assert_eq!(v.peer.session.pending_events(), 1);
    assert!(v.peer.store.is_empty());
    v.feed(&[encode(&Message::Done)])
        .expect("a missing dependency is no failure");
    assert!(v.peer.failures().is_empty());
    let at_done = &v.peer.events[v.peer.events.len() - 2..];
    assert_eq!(
        at_done,
        [
            SessionEvent::Missing { deps: vec![x] },
            SessionEvent::PeerDone
        ]
    );
    assert!(v.peer.store.is_empty());
    assert_eq!(v.peer.store.waiting().len(), 1, "y stays pooled");
    assert_eq!(v.peer.session.pending_events(), 1);

    // An unsigned run left open at Done is a failure: no signature covers it.
    let mut w = MemStore::new();
    Clocks::new().batch(
        &mut w,
        0,
        vec![
            set("customer/1", "name", "a"),
            set("customer/1", "name", "b"),
        ],
    );
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frame(w.get(&id(0), 1).unwrap())));
    msgs.push(encode(&Message::Done));
    let err = v.feed(&msgs).unwrap_err();
    assert!(
        matches!(err, SyncError::Unsigned { last_seq: 1, .. }),
        "{err}"
    );
    v.assert_refused(&err);
}

#[test]
fn waiting_events_are_bounded() {
    let mut w = MemStore::new();
    Clocks::new().batch(
        &mut w,
        0,
        (0..10).map(|i| add("customer/1", "visits", i)).collect(),
    );
    let mut c = SessionConfig::new(CLUSTER, id(4));
    c.max_pending_events = 3;
    let mut v = Victim::with(c, MemStore::new());
    let frames: Vec<u8> = (1..=4)
        .flat_map(|s| frame(w.get(&id(0), s).unwrap()))
        .collect();
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(frames));
    let err = v.feed(&msgs).unwrap_err();
    assert!(
        matches!(err, SyncError::PendingLimit { max_events: 3, .. }),
        "{err}"
    );
    v.assert_refused(&err);
}

#[test]
fn an_invalid_signed_event_is_refused_by_name() {
    // Author 0 signs a sale of seats it holds no rights to.
    let e = Event {
        version: MIN_FORMAT_VERSION,
        author: id(0),
        seq: 1,
        prev: None,
        deps: vec![],
        hlc: Hlc::from_ms(1_700_000_000_000),
        stream: "event/keynote".into(),
        kind: "SeatsSold".into(),
        ops: vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: 5,
        }],
        payload: vec![],
        meta: Meta::default(),
    };
    let (bytes, eid) = e.seal();
    let sig = keys()[0].sign(&eid);
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(vec![Head {
        author: id(0),
        seq: 1,
        id: eid,
    }]);
    msgs.push(events_msg(frame_with(&bytes, &eid, Some(&sig))));
    let err = v.feed(&msgs).unwrap_err();
    match &err {
        SyncError::InvalidEvent { event, source } => {
            assert_eq!(event.id, eid);
            assert!(matches!(**source, Invalid::InsufficientRights { .. }));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&eid.to_string()), "{err}");
    v.assert_refused(&err);
}

fn seats_ask() -> Ask {
    Ask {
        stream: "event/1".into(),
        counter: "seats".into(),
        target: 25,
        nonce: 1_000,
    }
}

#[test]
fn asks_go_once_frontiers_are_known_and_malformed_ones_are_refused() {
    let (w, _) = one_event();
    let mut a = Peer::new(w, 0);
    let mut b = Peer::new(MemStore::new(), 1);
    assert!(
        !a.session.ask(seats_ask()),
        "the peer's frontier is not known"
    );
    pump(&mut a, &mut b);
    assert!(a.session.ask(seats_ask()));
    pump(&mut a, &mut b);
    let asked: Vec<&SessionEvent> = b
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::Asked(_)))
        .collect();
    assert_eq!(asked, vec![&SessionEvent::Asked(seats_ask())]);
    assert_eq!(
        (a.session.stats().asks_sent, b.session.stats().asks_received),
        (1, 1)
    );
    // An ask the sender's own check refuses is not sent.
    let empty = Ask {
        target: 0,
        ..seats_ask()
    };
    assert!(!a.session.ask(empty));

    // Before the frontiers: refused as unexpected.
    let mut v = Victim::new(MemStore::new());
    let err = v.feed(&[encode(&Message::Ask(seats_ask()))]).unwrap_err();
    assert!(matches!(err, SyncError::Unexpected { .. }), "{err}");
    v.assert_refused(&err);
    // Names beyond an event's limits, or nothing asked: malformed.
    for bad in [
        Ask {
            counter: "c".repeat(129),
            ..seats_ask()
        },
        Ask {
            stream: String::new(),
            ..seats_ask()
        },
        Ask {
            target: 0,
            ..seats_ask()
        },
    ] {
        let mut v = Victim::new(MemStore::new());
        // An empty store, as the victim's: in sync at Hello.
        let mut msgs = vec![hello_from(id(ATTACKER), frontier_digest(&[]))];
        msgs.push(encode(&Message::Ask(bad)));
        let err = v.feed(&msgs).unwrap_err();
        assert!(matches!(err, SyncError::Malformed(_)), "{err}");
        v.assert_refused(&err);
    }
    // A body cut short.
    let mut v = Victim::new(MemStore::new());
    let mut msgs = vec![hello_from(id(ATTACKER), frontier_digest(&[]))];
    msgs.push(vec![3, 0, 0, 0, 8, 7, b'e']);
    let err = v.feed(&msgs).unwrap_err();
    assert!(matches!(err, SyncError::Malformed(_)), "{err}");
    v.assert_refused(&err);
}

#[test]
fn oversized_and_garbage_messages_are_refused() {
    let big = (MAX_MESSAGE_BYTES as u32 + 1).to_le_bytes();
    assert_eq!(
        message_len(big),
        Err(SyncError::TooLarge {
            len: MAX_MESSAGE_BYTES as u64 + 1
        })
    );
    let mut m = big.to_vec();
    m.extend_from_slice(&[2; 64]);
    let mut v = Victim::new(MemStore::new());
    let err = v.feed(&[m]).unwrap_err();
    assert!(matches!(err, SyncError::TooLarge { .. }), "{err}");
    v.assert_refused(&err);

    for (bytes, what) in [
        (vec![5, 0, 0, 0, 9, 9, 9, 9, 9], "unknown message variant"),
        (vec![1, 0, 0, 0], "short"),
        (vec![0, 0, 0, 0], "empty body"),
        (vec![1, 0, 0, 0, 3, 3], "trailing"),
        (vec![3, 0, 0, 0, 4, 1, 0xff], "bad utf-8 reason"),
    ] {
        let mut v = Victim::new(MemStore::new());
        let err = v.feed(&[bytes]).unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Malformed(_) | SyncError::LengthMismatch { .. }
            ),
            "{what}: {err}"
        );
        v.assert_refused(&err);
    }

    // Frames that are garbage inside a well-formed Events message.
    let (w, _) = one_event();
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(vec![0xff; 100]));
    let err = v.feed(&msgs).unwrap_err();
    assert!(matches!(err, SyncError::Frame { .. }), "{err}");
    v.assert_refused(&err);
    let mut v = Victim::new(MemStore::new());
    let mut msgs = opening(w.frontier());
    msgs.push(events_msg(vec![]));
    assert_eq!(v.feed(&msgs), Err(SyncError::EmptyEvents));
}

#[test]
fn wrong_cluster_version_or_peer_is_refused() {
    let mut v = Victim::new(MemStore::new());
    let err = v
        .feed(&[encode(&Message::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            cluster: [0x43; 32],
            node: id(ATTACKER),
            digest: [0; 32],
        }))])
        .unwrap_err();
    assert!(matches!(err, SyncError::WrongCluster { .. }));
    assert!(err.to_string().contains("cluster 43434343"), "{err}");
    v.assert_refused(&err);

    // A peer too new, a version 3 peer (which refuses events of format 2),
    // a version 2 peer (which drops a forked author's events and refuses a
    // frontier with two heads of one author) and a version 1 peer (which
    // floods): refused at Hello, both named.
    for (theirs_min, theirs_max) in [(5, 6), (3, 3), (2, 2), (1, 1)] {
        let mut v = Victim::new(MemStore::new());
        let err = v
            .feed(&[encode(&Message::Hello(Hello {
                min_version: theirs_min,
                max_version: theirs_max,
                cluster: CLUSTER,
                node: id(ATTACKER),
                digest: [0; 32],
            }))])
            .unwrap_err();
        assert_eq!(
            err,
            SyncError::VersionMismatch {
                ours_min: MIN_PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min,
                theirs_max
            }
        );
        assert!(err.to_string().contains("version"), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("{theirs_min}..={theirs_max}")),
            "{err}"
        );
        v.assert_refused(&err);
    }
    assert_eq!((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), (4, 4));

    // A newer peer that still speaks 4 is fine.
    let mut v = Victim::new(MemStore::new());
    v.feed(&[encode(&Message::Hello(Hello {
        min_version: 1,
        max_version: 9,
        cluster: CLUSTER,
        node: id(ATTACKER),
        digest: frontier_digest(&[]),
    }))])
    .unwrap();
    assert_eq!(v.peer.session.version(), Some(4));
    assert_eq!(v.peer.events, vec![SessionEvent::InSync]);

    let mut c = SessionConfig::new(CLUSTER, id(4));
    c.peer = Some(id(3));
    let mut v = Victim::with(c, MemStore::new());
    let err = v.feed(&[hello_from(id(ATTACKER), [0; 32])]).unwrap_err();
    assert_eq!(
        err,
        SyncError::WrongPeer {
            expected: id(3),
            got: id(ATTACKER)
        }
    );
    v.assert_refused(&err);

    let mut v = Victim::new(MemStore::new());
    let err = v.feed(&[hello_from(id(4), [0; 32])]).unwrap_err();
    assert_eq!(err, SyncError::OwnNodeId(id(4)));
}

/// A peer whose versions share none with ours is refused at its Hello, and
/// only there: the refusing end sends its own Hello (even a quiet end,
/// which had not sent one) before its Error, so the peer can refuse in
/// turn and both ends report the same two ranges, each from its side. A
/// later Hello cannot change the connection's version.
#[test]
fn a_peer_of_another_version_is_refused_at_hello_and_gets_our_hello() {
    let old_hello = |min_version, max_version| {
        encode(&Message::Hello(Hello {
            min_version,
            max_version,
            cluster: CLUSTER,
            node: id(ATTACKER),
            digest: frontier_digest(&[]),
        }))
    };
    for quiet in [false, true] {
        let mut c = SessionConfig::new(CLUSTER, id(4));
        c.round_at_start = !quiet;
        let mut v = Victim::with(c, MemStore::new());
        let err = v.feed(&[old_hello(1, 1)]).unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "no common sync protocol version: this node speaks \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer 1..=1"
            )
        );
        assert_eq!(
            v.peer.events.last(),
            Some(&SessionEvent::Failed(err.clone()))
        );
        let mut sent = Vec::new();
        while let Some(m) = v.peer.session.poll_transmit(&v.peer.store) {
            sent.push(decode_message(&m).unwrap().unwrap().0);
        }
        assert_eq!(
            sent,
            vec![
                Message::Hello(Hello {
                    min_version: MIN_PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                    cluster: CLUSTER,
                    node: id(4),
                    digest: frontier_digest(&[]),
                }),
                Message::Error { reason: text },
            ],
            "quiet: {quiet}"
        );
    }

    // Agreed at the first Hello; a later one (a new round) must agree on
    // the same version. This build speaks one version, so a later Hello
    // that would change it shares none with ours and is refused as such.
    let mut v = Victim::new(MemStore::new());
    v.feed(&[old_hello(PROTOCOL_VERSION, PROTOCOL_VERSION)])
        .unwrap();
    assert_eq!(v.peer.session.version(), Some(PROTOCOL_VERSION));
    v.feed(&[old_hello(PROTOCOL_VERSION, 9)]).unwrap();
    let err = v
        .feed(&[old_hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::VersionMismatch { .. } | SyncError::VersionChanged { .. }
        ),
        "{err}"
    );
    v.assert_refused(&err);
}

#[test]
fn messages_out_of_order_and_bad_frontiers_are_refused() {
    let (w, s) = one_event();
    for first in [
        encode(&Message::Done),
        events_msg(frame(&s)),
        encode(&Message::Frontier { heads: vec![] }),
    ] {
        let mut v = Victim::new(MemStore::new());
        let err = v.feed(&[first]).unwrap_err();
        assert!(matches!(err, SyncError::Unexpected { .. }), "{err}");
        v.assert_refused(&err);
    }
    // A frontier that is not the one the Hello's digest names.
    let mut v = Victim::new(MemStore::new());
    let err = v
        .feed(&[
            hello_from(id(ATTACKER), [9; 32]),
            encode(&Message::Frontier {
                heads: w.frontier(),
            }),
        ])
        .unwrap_err();
    assert_eq!(err, SyncError::FrontierDigestMismatch);
    v.assert_refused(&err);
    // Unsorted.
    let h = w.frontier()[0];
    let mut h2 = h;
    h2.author = NodeId([0; 32]);
    let mut v = Victim::new(MemStore::new());
    let err = v.feed(&opening(vec![h, h2])).unwrap_err();
    assert!(matches!(err, SyncError::FrontierInvalid(_)), "{err}");
    // The peer's Error is reported with its reason, and not answered.
    let mut v = Victim::new(MemStore::new());
    let err = v
        .feed(&[encode(&Message::Error {
            reason: "disk full".into(),
        })])
        .unwrap_err();
    assert_eq!(
        err,
        SyncError::Peer {
            reason: "disk full".into()
        }
    );
    assert_eq!(v.peer.session.poll_transmit(&v.peer.store), None);
}

proptest! {
    #![proptest_config(config(256, "proptest-regressions/sync.txt"))]

    /// Garbage, and valid conversations with bytes flipped, never panic and
    /// never store anything that is not a genuine event.
    #[test]
    fn peer_bytes_never_panic(
        garbage in prop::collection::vec(any::<u8>(), 0..300),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        which in any::<prop::sample::Index>(),
    ) {
        let mut v = Victim::new(MemStore::new());
        let _ = v.feed(&[garbage]);
        // A genuine stream of three batches, one message damaged.
        let mut w = MemStore::new();
        let mut clocks = Clocks::new();
        clocks.batch(&mut w, 0, vec![set("c/1", "name", "a"), add("c/1", "n", 1)]);
        clocks.batch(&mut w, 1, vec![set("c/1", "name", "b")]);
        clocks.batch(&mut w, 0, vec![add("c/1", "n", 2)]);
        let mut msgs = opening(w.frontier());
        let frames: Vec<u8> = [(0, 1), (1, 1), (0, 2), (0, 3)]
            .iter()
            .flat_map(|&(a, s)| frame(w.get(&id(a), s).unwrap()))
            .collect();
        msgs.push(events_msg(frames));
        msgs.push(encode(&Message::Done));
        let m = which.index(msgs.len());
        for (at, x) in &flips {
            let i = at.index(msgs[m].len());
            msgs[m][i] ^= x | 1;
        }
        let mut v = Victim::new(MemStore::new());
        let r = v.feed(&msgs);
        // Whatever got stored is genuine: present in the author's store.
        for h in v.peer.store.frontier() {
            for seq in 1..=h.seq {
                let got = v.peer.store.get(&h.author, seq).unwrap();
                prop_assert_eq!(Some(got.id), w.event_id(&h.author, seq));
            }
        }
        if r.is_ok() {
            prop_assert!(v.peer.store.len() <= 4);
        }
    }
}

// ---------------------------------------------------------------------------
// Equivocation.

/// Author 0 forks after a shared past: `p` gets one branch, `q` another
/// (`q_extra` more events on it).
fn forked(q_extra: usize) -> (MemStore, MemStore) {
    let mut clocks = Clocks::new();
    let mut world = MemStore::new();
    clocks.batch(
        &mut world,
        0,
        vec![set("c/1", "name", "a"), add("c/1", "n", 1)],
    );
    clocks.batch(&mut world, 1, vec![set("c/1", "email", "e")]);
    let (mut p, mut q) = (world.clone(), world);
    // An honest author's new event on p, which q should still get.
    clocks.batch(&mut p, 1, vec![add("c/2", "n", 1)]);
    // Author 0's key used twice (a restored backup, say) with the same past.
    let mut c2 = Clocks::new();
    c2.clocks = clocks.clocks.clone();
    c2.now_ms = clocks.now_ms + 500;
    clocks.batch(&mut p, 0, vec![set("c/9", "name", "branch x")]);
    c2.batch(&mut q, 0, vec![set("c/9", "name", "branch y")]);
    for i in 0..q_extra {
        c2.batch(&mut q, 0, vec![add("c/9", "n", i as i64)]);
    }
    (p, q)
}

/// Two replicas holding different branches of a forked author exchange
/// both: each reports the fork once (naming both ids), keeps its own branch
/// as the one `event_id` follows, and both end with the same events and
/// state hash; a later round finds them in sync.
#[test]
fn a_fork_is_reported_once_and_both_branches_converge() {
    for q_extra in [0, 2] {
        let (p, q) = forked(q_extra);
        let x = p.event_id(&id(0), 3).unwrap();
        let y = q.event_id(&id(0), 3).unwrap();
        assert_ne!(x, y);
        let mut a = Peer::new(p, 2);
        let mut b = Peer::new(q, 3);
        pump(&mut a, &mut b);
        assert!(a.failures().is_empty() && b.failures().is_empty());
        for (peer, held, other) in [(&a, x, y), (&b, y, x)] {
            let reports = peer.equivocations();
            assert_eq!(reports.len(), 1, "q_extra = {q_extra}: {:?}", peer.events);
            let e = reports[0];
            assert_eq!((e.author, e.seq), (id(0), 3), "q_extra = {q_extra}");
            let mut both = [e.held, e.other];
            both.sort();
            let mut want = [held, other];
            want.sort();
            assert_eq!(both, want, "q_extra = {q_extra}");
            // Each replica keeps its branch as its own, and holds the other.
            assert_eq!(peer.store.event_id(&id(0), 3), Some(held));
            assert!(peer.store.contains(&other));
            assert!(peer.store.state().is_forked(&id(0)));
        }
        assert_eq!(a.store.len(), b.store.len(), "q_extra = {q_extra}");
        assert_eq!(a.store.state().state_hash(), b.store.state().state_hash());
        assert_eq!(a.store.frontier(), b.store.frontier());
        assert_eq!(a.store.frontier_digest(), b.store.frontier_digest());
        // The honest author's event crossed over.
        assert_eq!(a.store.event_id(&id(1), 2), b.store.event_id(&id(1), 2));
        assert!(b.store.event_id(&id(1), 2).is_some());
        // A later round is in sync: nothing re-reported, re-sent or failed.
        let before = (a.events.len(), b.events.len());
        let sent = a.session.stats().events_sent + b.session.stats().events_sent;
        assert!(a.session.start_round(&a.store));
        pump(&mut a, &mut b);
        assert!(a.events[before.0..]
            .iter()
            .chain(&b.events[before.1..])
            .all(|e| !matches!(e, SessionEvent::Equivocation(_) | SessionEvent::Failed(_))));
        assert!(a.events[before.0..].contains(&SessionEvent::InSync));
        assert_eq!(
            a.session.stats().events_sent + b.session.stats().events_sent,
            sent
        );
    }
}

// ---------------------------------------------------------------------------
// PROTOCOL.md §9 vectors.

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn protocol_vectors() {
    let key1 = Keypair::from_secret([1; 32]).node_id();
    let hello = encode(&Message::Hello(Hello {
        min_version: 2,
        max_version: 2,
        cluster: [0x42; 32],
        node: key1,
        digest: frontier_digest(&[]),
    }));
    let v1: EventId = "389c67c58eb09ccad685b53f9a5361351e64e308c1cbb821c6f83860ae5e8f12"
        .parse()
        .unwrap();
    let heads = [Head {
        author: key1,
        seq: 1,
        id: v1,
    }];
    let frontier = encode(&Message::Frontier {
        heads: heads.to_vec(),
    });
    let done = encode(&Message::Done);
    let error = encode(&Message::Error {
        reason: "bye".into(),
    });
    let ihave = encode(&Message::IHave {
        heads: heads.to_vec(),
    });
    let graft = encode(&Message::Graft {
        heads: heads.to_vec(),
    });
    let graft_empty = encode(&Message::Graft { heads: vec![] });
    let prune = encode(&Message::Prune);
    let ask = encode(&Message::Ask(seats_ask()));
    // Vector 3's frame is 269 bytes (a signed frame of a 164-byte event).
    let events = encode(&Message::Events {
        frames: vec![0; wire_frame_len(164, true)],
    });
    let got = format!(
        "hello {}\nempty-digest {}\nfrontier {}\ndigest {}\ndone {}\nerror {}\nevents-header {}\n\
         ihave {}\ngraft {}\ngraft-empty {}\nprune {}\nask {}",
        hex(&hello),
        hex(&frontier_digest(&[])),
        hex(&frontier),
        hex(&frontier_digest(&heads)),
        hex(&done),
        hex(&error),
        hex(&events[..7]),
        hex(&ihave),
        hex(&graft),
        hex(&graft_empty),
        hex(&prune),
        hex(&ask),
    );
    println!("{got}");
    let doc = include_str!("../PROTOCOL.md");
    let section = &doc[doc.find("## 9. Sync protocol").expect("§9 in PROTOCOL.md")..];
    for line in got.lines() {
        assert!(section.contains(line), "PROTOCOL.md §9 lacks `{line}`");
    }
    assert!(hello.len() <= 200);
}
