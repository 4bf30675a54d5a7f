//! Guards `weftlog run` as a cluster of real processes on loopback: nodes
//! that append concurrently converge (equal state hash and frontier, every
//! acknowledged event everywhere, one conflict for one concurrent edit,
//! counters summed); a node killed with SIGKILL in the middle of a catch-up
//! or of its own appends loses nothing it acknowledged and catches up after
//! a restart; a node off the member list is refused; SIGTERM shuts down
//! cleanly and keeps what was received, even when it comes right after the
//! ready line; the CLI, given the data directory of a running node, goes
//! through its HTTP API; and a command carried out by two partitioned nodes
//! counts once after the heal.
//!
//! Every process is owned by a [`Proc`] whose `Drop` kills and reaps it, so
//! a failing test leaves nothing running. Waits poll every 50 ms up to
//! [`DEADLINE`] and fail with what each node reported.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{agent, copy_dir, init, pair, post, tail, Opts, Proc, DEADLINE};
use serde_json::{json, Value};
use weftlog::node::Node;
use weftlog_proto::state::Draft;
use weftlog_proto::{Meta, Op};

/// Time between two polls of a condition.
const POLL: Duration = Duration::from_millis(50);

/// A node's status in a few words, for failure messages.
fn summary(name: &str, s: &Value) -> String {
    let short = |v: &Value| v.as_str().map_or("-".to_string(), |s| s[..8].to_string());
    let frontier: BTreeMap<String, u64> = s["frontier"]
        .as_object()
        .map(|f| {
            f.iter()
                .map(|(a, e)| (a[..8].to_string(), e["seq"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let peers: Vec<String> = s["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    format!(
                        "{} connected={} behind={} error={}",
                        short(&p["node"]),
                        p["connected"],
                        p["behind"],
                        p["last_error"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{name} ({}): events={} hash={} frontier={frontier:?}\n    peers: {peers:?}",
        short(&s["node"]),
        s["events"],
        short(&s["state_hash"]),
    )
}

/// Polls until every node holds the same events (equal state hash, frontier
/// and count), `expected` of them if given; their statuses.
fn converge(nodes: &[&Proc], expected: Option<u64>, what: &str) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let statuses: Vec<Value> = nodes.iter().map(|n| n.status()).collect();
        let first = &statuses[0];
        let same = statuses.iter().all(|s| {
            s["state_hash"] == first["state_hash"]
                && s["frontier"] == first["frontier"]
                && s["events"] == first["events"]
        });
        if same && expected.is_none_or(|n| first["events"] == n) {
            eprintln!("{what}: converged in {:?}", t0.elapsed());
            return statuses;
        }
        if t0.elapsed() > DEADLINE {
            let mut msg = format!(
                "{what}: no convergence within {DEADLINE:?} (expected events: {expected:?})\n"
            );
            for (n, s) in nodes.iter().zip(&statuses) {
                msg.push_str(&summary(&n.name, s));
                msg.push('\n');
            }
            for n in nodes {
                msg.push_str(&format!(
                    "--- {} stderr (tail):\n{}\n",
                    n.name,
                    tail(&n.log, 15)
                ));
            }
            panic!("{msg}");
        }
        thread::sleep(POLL);
    }
}

/// Polls until `ok` holds for `p`'s status; that status.
fn wait_status(p: &Proc, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = p.status();
        if ok(&s) {
            return s;
        }
        if t0.elapsed() > DEADLINE {
            panic!(
                "{}: {what}: not within {DEADLINE:?}\n{}\n--- stderr (tail):\n{}",
                p.name,
                summary(&p.name, &s),
                tail(&p.log, 20)
            );
        }
        thread::sleep(POLL);
    }
}

/// Whether every peer in `ids` shows as connected in `status`.
fn connected_to(status: &Value, ids: &[&str]) -> bool {
    let peers = status["peers"].as_array().unwrap();
    ids.iter().all(|id| {
        peers
            .iter()
            .any(|p| p["node"] == *id && p["connected"] == true)
    })
}

fn members_file(path: &Path, ids: &[&str]) {
    let mut text = String::from("# test cluster\n");
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

/// A status without its `peers` (which differ from one poll to the next).
/// A status without what changes from one moment to the next while peers
/// talk: the peer rows and the time of the last round.
fn without_peers(mut v: Value) -> Value {
    let m = v.as_object_mut().unwrap();
    m.remove("peers");
    m.remove("last_round_ms");
    m.remove("gossip");
    v
}

/// The acknowledged ids that `held` lacks.
fn missing<'a>(
    held: &BTreeSet<String>,
    acked: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    acked
        .into_iter()
        .filter(|id| !held.contains(*id))
        .cloned()
        .collect()
}

/// N processes, a full mesh, concurrent appends on all, one concurrent
/// edit of one field on two nodes.
fn cluster_converges(n: usize) {
    const PER_NODE: usize = 100;
    const STREAMS: usize = 3;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let ids: Vec<String> = dirs.iter().map(|d| init(d)).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let members = tmp.path().join("members.txt");
    members_file(&members, &id_refs);

    let mut nodes: Vec<Proc> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let peers = nodes.iter().map(|p| p.quic.clone()).collect();
        let p = Proc::start(
            &format!("n{i}"),
            dir,
            Opts {
                peers,
                members: Some(&members),
                listen: None,
                ..Default::default()
            },
        );
        assert_eq!(p.id, ids[i]);
        nodes.push(p);
    }
    // A full mesh: every node connected to every other, one row per peer.
    for (i, p) in nodes.iter().enumerate() {
        let others: Vec<&str> = (0..n).filter(|&j| j != i).map(|j| id_refs[j]).collect();
        let s = wait_status(p, "full mesh", |s| connected_to(s, &others));
        let rows = s["peers"].as_array().unwrap();
        assert_eq!(
            rows.len(),
            n - 1,
            "{}: one peer row per other node: {:#}",
            p.name,
            s["peers"]
        );
    }
    eprintln!("{n} nodes up and meshed after {:?}", t0.elapsed());

    // One field edited on two nodes that cannot see each other: n0 and n1
    // are cut off from everyone, edit, and heal.
    for (i, p) in nodes.iter().enumerate().take(2) {
        let others: Vec<&str> = (0..n).filter(|&j| j != i).map(|j| id_refs[j]).collect();
        p.partition(&others);
    }
    let mut acked: Vec<String> = Vec::new();
    for (i, p) in nodes.iter().enumerate().take(2) {
        let e = p.append(
            "shared/0",
            json!({"kind": "Retitled", "set": {"title": format!("from n{i}")}}),
        );
        acked.push(e["id"].as_str().unwrap().to_string());
    }
    for p in nodes.iter().take(2) {
        p.partition(&[]);
    }

    // Concurrent appends: a thread per node, distinct fields on shared
    // streams, shared and per-node counters.
    let barrier = Arc::new(Barrier::new(n));
    let workers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let url = p.url("");
            let barrier = barrier.clone();
            thread::spawn(move || {
                let agent = agent();
                barrier.wait();
                let mut acks = Vec::new();
                for j in 0..PER_NODE {
                    let stream = format!("shared/{}", j % STREAMS);
                    let body = json!({
                        "kind": "Ticked",
                        "set": { format!("n{i}_f{}", j % 4): format!("{i}-{j}") },
                        "add": { "hits": 1, format!("n{i}"): j },
                        "command_id": format!("n{i}-{j}"),
                    });
                    let (code, v) =
                        post(&agent, &format!("{url}/v1/streams/{stream}/events"), &body)
                            .unwrap_or_else(|e| panic!("n{i}: append {j}: {e}"));
                    assert_eq!(code, 201, "n{i}: append {j}: {v}");
                    acks.push(v["id"].as_str().unwrap().to_string());
                }
                acks
            })
        })
        .collect();
    for w in workers {
        acked.extend(w.join().expect("an appender failed"));
    }
    let total = (n * PER_NODE + 2) as u64;
    assert_eq!(acked.len() as u64, total);
    eprintln!("{n} nodes: appends done after {:?}", t0.elapsed());
    let refs: Vec<&Proc> = nodes.iter().collect();
    let statuses = converge(&refs, Some(total), &format!("{n} nodes"));
    eprintln!("{n} nodes converged after {:?}", t0.elapsed());

    // Every acknowledged event is on every node, and nothing else.
    let acked_set: BTreeSet<String> = acked.iter().cloned().collect();
    assert_eq!(acked_set.len(), acked.len(), "two appends got one id");
    for (p, s) in nodes.iter().zip(&statuses) {
        let log = p.log_ids();
        assert_eq!(log.len() as u64, total, "{}: log length", p.name);
        let held: BTreeSet<String> = log.into_iter().collect();
        assert_eq!(
            held, acked_set,
            "{}: the log is not the acknowledged events",
            p.name
        );
        // Every author's chain is complete.
        for (i, id) in ids.iter().enumerate() {
            let expect = PER_NODE as u64 + u64::from(i < 2);
            assert_eq!(
                s["frontier"][id]["seq"], expect,
                "{}: frontier of n{i}",
                p.name
            );
        }
    }

    // The one concurrent edit is the one conflict, on every node.
    for p in &nodes {
        let c = p.get_json("/v1/conflicts");
        let rows = c.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{}: conflicts: {c:#}", p.name);
        assert_eq!(rows[0]["stream"], "shared/0", "{}", p.name);
        assert_eq!(rows[0]["field"], "title", "{}", p.name);
        let values: BTreeSet<&str> = rows[0]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"].as_str().unwrap())
            .collect();
        assert_eq!(values, BTreeSet::from(["from n0", "from n1"]), "{}", p.name);
        assert_eq!(c, nodes[0].get_json("/v1/conflicts"), "{}", p.name);
    }

    // Streams: counters sum, each node's fields hold its last write.
    for s in 0..STREAMS {
        let js: Vec<usize> = (0..PER_NODE).filter(|j| j % STREAMS == s).collect();
        let first = nodes[0].get_json(&format!("/v1/streams/shared/{s}"));
        let version = (js.len() * n) as u64 + if s == 0 { 2 } else { 0 };
        assert_eq!(first["version"], version, "shared/{s}: {first:#}");
        assert_eq!(first["counters"]["hits"], js.len() * n, "shared/{s}");
        for i in 0..n {
            let sum: usize = js.iter().sum();
            assert_eq!(first["counters"][format!("n{i}")], sum, "shared/{s} n{i}");
            for f in 0..4 {
                let last = js.iter().rev().find(|j| *j % 4 == f);
                let field = &first["fields"][format!("n{i}_f{f}")];
                match last {
                    Some(j) => {
                        assert_eq!(field["value"], format!("{i}-{j}"), "shared/{s}");
                        assert!(field.get("conflict").is_none(), "shared/{s}: {field}");
                    }
                    None => assert!(field.is_null(), "shared/{s}: {field}"),
                }
            }
        }
        if s == 0 {
            assert_eq!(
                first["fields"]["title"]["conflict"]
                    .as_array()
                    .map(Vec::len),
                Some(2),
                "{first:#}"
            );
        }
        for p in &nodes[1..] {
            assert_eq!(
                p.get_json(&format!("/v1/streams/shared/{s}")),
                first,
                "{}: shared/{s} differs from n0",
                p.name
            );
        }
    }

    // Each node's view of its peers settles: all connected, none behind,
    // and every event it holds from others counted once as received.
    for (i, p) in nodes.iter().enumerate() {
        let s = wait_status(p, "peers settled (connected, behind 0)", |s| {
            s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["connected"] == true && r["behind"] == 0)
        });
        let received: u64 = s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["events_received"].as_u64().unwrap())
            .sum();
        let own = PER_NODE as u64 + u64::from(i < 2);
        assert_eq!(
            received,
            total - own,
            "{}: events received from peers: {:#}",
            p.name,
            s["peers"]
        );
        let g = &s["gossip"];
        assert_eq!(
            g["delivered"].as_u64(),
            Some(total - own),
            "{}: gossip counters: {g}",
            p.name
        );
        for k in [
            "duplicates",
            "announcements_sent",
            "tree_repairs",
            "prunes",
            "rounds",
        ] {
            assert!(g[k].is_u64(), "{}: gossip.{k} missing: {g}", p.name);
        }
        eprintln!("{}: gossip {g}", p.name);
    }

    // The CLI, given a running node's directory, answers what the API does.
    for p in &nodes {
        let r = common::weftlog(&p.dir, &["status"]);
        assert_eq!(r.code, Some(0), "{}: status: {}", p.name, r.stderr);
        assert_eq!(r.stdout.lines().count(), 1, "{}: {}", p.name, r.stdout);
        let cli: Value = serde_json::from_str(&r.stdout).unwrap();
        assert!(
            cli["peers"].is_array(),
            "{}: forwarded status has peers",
            p.name
        );
        assert_eq!(
            without_peers(cli),
            without_peers(p.status()),
            "{}: CLI status differs from GET /v1/status",
            p.name
        );
    }
    eprintln!("{n} nodes: done in {:?}", t0.elapsed());
}

#[test]
fn three_processes_converge() {
    cluster_converges(3);
}

#[test]
fn five_processes_converge() {
    cluster_converges(5);
}

/// An event with a payload of `pad` bytes, so a catch-up takes a while.
fn padded(i: usize, pad: usize) -> Draft {
    Draft {
        stream: format!("backlog/{}", i % 16),
        kind: "Loaded".into(),
        ops: vec![Op::Add {
            counter: "n".into(),
            delta: 1,
        }],
        payload: format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(pad)).into_bytes(),
        meta: Meta::default(),
        expected_version: None,
        texts: Vec::new(),
    }
}

/// Appends `count` events to the node in `dir` with the library, from
/// many threads (group commit); their ids.
fn backlog(dir: &Path, count: usize, pad: usize) -> Vec<String> {
    const THREADS: usize = 64;
    let (node, _) = Node::open(dir).unwrap();
    let node = &node;
    let ids = Mutex::new(Vec::with_capacity(count));
    thread::scope(|s| {
        for t in 0..THREADS {
            let ids = &ids;
            s.spawn(move || {
                let mut mine = Vec::new();
                for i in (t..count).step_by(THREADS) {
                    mine.push(node.append(padded(i, pad)).unwrap().id.to_string());
                }
                ids.lock().unwrap().extend(mine);
            });
        }
    });
    ids.into_inner().unwrap()
}

/// Appends through `url` from `threads` threads until `stop` is set or a
/// request fails (the node died); the ids of the 201 answers.
fn append_until(
    url: &str,
    threads: usize,
    tag: &str,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicUsize>,
) -> Vec<thread::JoinHandle<Vec<String>>> {
    (0..threads)
        .map(|t| {
            let (url, tag) = (url.to_string(), tag.to_string());
            let (stop, count) = (stop.clone(), count.clone());
            thread::spawn(move || {
                let agent = agent();
                let mut acks = Vec::new();
                let mut j = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({
                        "kind": "Live",
                        "set": { format!("{tag}{t}"): j },
                        "add": { tag.clone(): 1 },
                    });
                    let stream = format!("live/{tag}");
                    match post(&agent, &format!("{url}/v1/streams/{stream}/events"), &body) {
                        Ok((201, v)) => {
                            acks.push(v["id"].as_str().unwrap().to_string());
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((code, v)) => panic!("{tag}{t}: append answered {code}: {v}"),
                        // The node was killed: what was in flight is unknown.
                        Err(_) => break,
                    }
                    j += 1;
                }
                acks
            })
        })
        .collect()
}

#[test]
fn sigkill_during_sync() {
    const BACKLOG: usize = 20_000;
    const PAD: usize = 1_000;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ia, ib) = (init(&da), init(&db));
    let members = tmp.path().join("members.txt");
    members_file(&members, &[&ia, &ib]);
    let mut acked: Vec<String> = backlog(&da, BACKLOG, PAD);
    eprintln!("backlog of {BACKLOG} events built in {:?}", t0.elapsed());

    let a = Proc::start(
        "a",
        &da,
        Opts {
            peers: vec![],
            members: Some(&members),
            listen: None,
            ..Default::default()
        },
    );
    assert_eq!(a.status()["events"], BACKLOG as u64);
    // A keeps appending while it streams its backlog to B.
    let stop = Arc::new(AtomicBool::new(false));
    let a_count = Arc::new(AtomicUsize::new(0));
    let a_writers = append_until(&a.url(""), 2, "a", &stop, &a_count);

    let b_opts = || Opts {
        peers: vec![a.quic.clone()],
        members: Some(&members),
        listen: None,
        ..Default::default()
    };
    let mut b = Proc::start("b", &db, b_opts());
    let t_sync = Instant::now();
    // Kill B as soon as it holds part of the backlog.
    let mut seen = 0;
    let held_at_kill = loop {
        let s = b.status();
        let events = s["events"].as_u64().unwrap();
        seen = seen.max(events);
        if events >= (BACKLOG / 10) as u64 {
            assert!(
                events < BACKLOG as u64,
                "B caught up with {events} events before it could be killed \
                 ({:?} after its start): the backlog is too small to test this",
                t_sync.elapsed()
            );
            b.sigkill();
            break events;
        }
        assert!(
            t_sync.elapsed() < DEADLINE,
            "B received nothing within {DEADLINE:?}:\n{}\n{}",
            summary("b", &s),
            tail(&b.log, 20)
        );
        thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "B killed holding {held_at_kill} of {BACKLOG}+ events, {:?} after its start",
        t_sync.elapsed()
    );

    // Restarted on the same directory, B recovers and catches up.
    b.launch();
    if let Some(l) = fs::read_to_string(&b.log)
        .unwrap()
        .lines()
        .find(|l| l.contains("recovered"))
    {
        eprintln!("B at restart: {l}");
    }
    let after_restart = b.status()["events"].as_u64().unwrap();
    assert!(after_restart <= BACKLOG as u64 + a_count.load(Ordering::Relaxed) as u64);
    stop.store(true, Ordering::Relaxed);
    for w in a_writers {
        acked.extend(w.join().expect("an appender on A failed"));
    }
    let total = acked.len() as u64;
    converge(&[&a, &b], Some(total), "after B's restart");
    let acked_set: BTreeSet<String> = acked.iter().cloned().collect();
    for p in [&a, &b] {
        let held: BTreeSet<String> = p.log_ids().into_iter().collect();
        let lost = missing(&held, &acked);
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged events missing",
            p.name,
            lost.len()
        );
        assert_eq!(held, acked_set, "{}", p.name);
    }
    eprintln!("catch-up after SIGKILL: done after {:?}", t0.elapsed());

    // B killed while it appends: its acknowledged appends survive.
    let stop = Arc::new(AtomicBool::new(false));
    let b_count = Arc::new(AtomicUsize::new(0));
    let b_writers = append_until(&b.url(""), 4, "b", &stop, &b_count);
    let t_app = Instant::now();
    while b_count.load(Ordering::Relaxed) < 200 {
        assert!(
            t_app.elapsed() < DEADLINE,
            "B acknowledged only {} appends within {DEADLINE:?}",
            b_count.load(Ordering::Relaxed)
        );
        thread::sleep(Duration::from_millis(5));
    }
    b.sigkill();
    let mut b_acked = Vec::new();
    for w in b_writers {
        b_acked.extend(w.join().expect("an appender on B failed"));
    }
    stop.store(true, Ordering::Relaxed);
    eprintln!("B killed after acknowledging {} appends", b_acked.len());
    // Its own log, before any peer can refill it: B alone.
    {
        let (node, recovery) = Node::open(&db).unwrap();
        let mut held = BTreeSet::new();
        node.scan(|_, id| {
            held.insert(id.to_string());
        })
        .unwrap();
        let lost = missing(&held, &b_acked);
        assert!(
            lost.is_empty(),
            "B lost {} of {} acknowledged appends to SIGKILL (recovery: {recovery:?}): {lost:?}",
            lost.len(),
            b_acked.len()
        );
        let own = node.with_state(|s| s.max_seq(&node.id()));
        assert!(
            own >= b_acked.len() as u64,
            "B's chain is shorter than its acks"
        );
    }
    b.launch();
    acked.extend(b_acked);
    let acked_set: BTreeSet<String> = acked.iter().cloned().collect();
    let statuses = converge(&[&a, &b], None, "after B's second restart");
    let total = statuses[0]["events"].as_u64().unwrap();
    assert!(total >= acked_set.len() as u64);
    for p in [&a, &b] {
        let held: BTreeSet<String> = p.log_ids().into_iter().collect();
        let lost = missing(&held, &acked);
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged events missing: {:?}",
            p.name,
            lost.len(),
            &lost[..lost.len().min(5)]
        );
    }
    eprintln!("sigkill_during_sync: {:?}", t0.elapsed());
}

#[test]
fn non_member_is_refused() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (da, dc, dd) = (
        tmp.path().join("a"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    let (ia, ic, id) = (init(&da), init(&dc), init(&dd));
    // A admits only itself. C and D admit A and themselves.
    let (ma, mc, md) = (
        tmp.path().join("a.members"),
        tmp.path().join("c.members"),
        tmp.path().join("d.members"),
    );
    members_file(&ma, &[&ia]);
    members_file(&mc, &[&ia, &ic]);
    members_file(&md, &[&ia, &id]);
    // C listens; A dials C (A must refuse C's certificate).
    let c = Proc::start(
        "c",
        &dc,
        Opts {
            peers: vec![],
            members: Some(&mc),
            listen: None,
            ..Default::default()
        },
    );
    for i in 0..3 {
        c.append("secret/c", json!({"kind": "Noted", "set": {"i": i}}));
    }
    let a = Proc::start(
        "a",
        &da,
        Opts {
            peers: vec![c.quic.clone()],
            members: Some(&ma),
            listen: None,
            ..Default::default()
        },
    );
    a.append("mine", json!({"kind": "Noted", "add": {"n": 1}}));
    // D dials A (A must refuse D's certificate).
    let d = Proc::start(
        "d",
        &dd,
        Opts {
            peers: vec![a.quic.clone()],
            members: Some(&md),
            listen: None,
            ..Default::default()
        },
    );
    for i in 0..3 {
        d.append("secret/d", json!({"kind": "Noted", "set": {"i": i}}));
    }

    let a_ok = |s: &Value| {
        // A never has a live session, and holds only its own event.
        let peers = s["peers"].as_array().unwrap();
        assert!(
            peers.iter().all(|p| p["connected"] == false),
            "A lists a non-member as connected: {:#}",
            s["peers"]
        );
        assert_eq!(s["events"], 1, "A took a non-member's events: {s:#}");
        let authors: Vec<&String> = s["frontier"].as_object().unwrap().keys().collect();
        assert_eq!(authors, vec![&ia], "{s:#}");
    };
    // Until both refusals are visible: A's dial of C failed with a reason,
    // and D's dial of A did.
    let refused =
        |s: &Value, addr: &str| {
            s["peers"].as_array().unwrap().iter().any(|p| {
                p["addr"] == addr && p["connected"] == false && p["last_error"].is_string()
            })
        };
    let mut polls = 0;
    loop {
        let (sa, sc, sd) = (a.status(), c.status(), d.status());
        a_ok(&sa);
        for (name, s) in [("c", &sc), ("d", &sd)] {
            assert_eq!(
                s["events"], 3,
                "{name} took events it should not have: {s:#}"
            );
        }
        assert!(
            !sc["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node"] == ia.as_str()
                    && p["connected"] == true
                    && p["events_received"].as_u64() > Some(0)),
            "C received events from A: {sc:#}"
        );
        if refused(&sa, &c.quic) && refused(&sd, &a.quic) {
            if polls == 0 {
                eprintln!("both refusals seen after {:?}", t0.elapsed());
            }
            polls += 1;
            // A few more polls after both refusals, with redials between.
            if polls > 20 {
                eprintln!(
                    "refusals: A→C: {}; D→A: {}",
                    sa["peers"][0]["last_error"], sd["peers"][0]["last_error"]
                );
                break;
            }
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "the refusals did not show within {DEADLINE:?}:\n{}\n{}\n{}\n--- a:\n{}\n--- d:\n{}",
            summary("a", &sa),
            summary("c", &sc),
            summary("d", &sd),
            tail(&a.log, 20),
            tail(&d.log, 20)
        );
        thread::sleep(POLL);
    }
    // The reason names the refusal.
    let sa = a.status();
    let err = sa["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == c.quic.as_str())
        .unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("not a member"), "A's error dialling C: {err}");
    let a_log = fs::read_to_string(&a.log).unwrap();
    assert!(
        a_log.contains("incoming connection refused"),
        "A's stderr does not show it refused D:\n{}",
        tail(&a.log, 30)
    );
    // A's log holds A's event only.
    assert_eq!(a.log_ids().len(), 1);
    let d_log = fs::read_to_string(&d.log).unwrap();
    assert!(
        d_log.contains("is not a member"),
        "D's stderr does not show A refused it:\n{}",
        tail(&d.log, 30)
    );
    eprintln!("non_member_is_refused: {:?}", t0.elapsed());
}

/// What a client of `GET /v1/events` saw.
struct Feed {
    /// The ids of the events announced, in order.
    ids: Vec<String>,
    /// `lagged` announcements.
    lagged: usize,
    /// Whether the stream ended (rather than failed).
    ended: bool,
}

/// Reads `GET /v1/events` until the stream ends; signals `opened` once
/// the answer's head is in.
fn sse_reader(url: String, opened: mpsc::Sender<()>) -> thread::JoinHandle<Feed> {
    thread::spawn(move || {
        let resp = agent().get(url).call().expect("GET /v1/events");
        assert_eq!(resp.status().as_u16(), 200);
        let _ = opened.send(());
        let mut feed = Feed {
            ids: Vec::new(),
            lagged: 0,
            ended: false,
        };
        let mut kind = String::new();
        let reader = BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else {
                return feed;
            };
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_string();
                if kind == "lagged" {
                    feed.lagged += 1;
                }
            } else if let Some(data) = line.strip_prefix("data:") {
                if kind == "event" {
                    let v: Value = serde_json::from_str(data.trim()).unwrap();
                    feed.ids.push(v["id"].as_str().unwrap().to_string());
                }
            }
        }
        feed.ended = true;
        feed
    })
}

#[test]
fn sigterm_is_graceful() {
    const BACKLOG: usize = 20_000;
    const PAD: usize = 1_000;
    const LIVE: usize = 300;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let (ia, ib, ic) = (init(&da), init(&db), init(&dc));
    let members = tmp.path().join("members.txt");
    members_file(&members, &[&ia, &ib, &ic]);
    let mut a_acked = backlog(&da, BACKLOG, PAD);
    let a = Proc::start(
        "a",
        &da,
        Opts {
            peers: vec![],
            members: Some(&members),
            listen: None,
            ..Default::default()
        },
    );
    let to_a = || Opts {
        peers: vec![a.quic.clone()],
        members: Some(&members),
        listen: None,
        ..Default::default()
    };
    let mut b = Proc::start("b", &db, to_a());
    // A client follows B's event feed through the shutdown.
    let (opened_tx, opened) = mpsc::channel();
    let sse = sse_reader(b.url("/v1/events"), opened_tx);
    opened
        .recv_timeout(DEADLINE)
        .expect("the event feed opened");
    // B appends a few of its own; A appends more from several threads.
    let mut b_acked = Vec::new();
    for i in 0..5 {
        let e = b.append("b/own", json!({"kind": "Own", "set": {"i": i}}));
        b_acked.push(e["id"].as_str().unwrap().to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writers = append_until(&a.url(""), 4, "a", &stop, &count);
    while count.load(Ordering::Relaxed) < LIVE {
        assert!(t0.elapsed() < DEADLINE, "A is too slow");
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        a_acked.extend(w.join().unwrap());
    }
    let expected = (a_acked.len() + b_acked.len()) as u64;
    // SIGTERM B as soon as its state holds A's events (they may not all
    // be on B's disk yet).
    wait_status(&b, "received A's events", |s| s["events"] == expected);
    let (status, took) = b.sigterm();
    eprintln!("B exited with {status} {took:?} after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "B did not exit 0 after SIGTERM ({status}); stderr:\n{}",
        tail(&b.log, 30)
    );
    assert!(
        took < Duration::from_secs(5),
        "B took {took:?} to stop after SIGTERM; stderr:\n{}",
        tail(&b.log, 30)
    );
    assert!(
        !db.join("http.addr").exists(),
        "http.addr is still there after a graceful stop"
    );
    let log = fs::read_to_string(&b.log).unwrap();
    assert!(
        log.contains("SIGTERM: shutting down") && log.contains("stopped"),
        "{}",
        tail(&b.log, 20)
    );
    assert!(
        !log.contains("still connected"),
        "an event-feed client held up the shutdown: {}",
        tail(&b.log, 20)
    );
    // The event feed ended with the node, having announced each event once.
    let feed = sse.join().expect("the event-feed reader");
    assert!(feed.ended, "the event feed failed instead of ending");
    let feed_set: BTreeSet<&String> = feed.ids.iter().collect();
    assert_eq!(
        feed_set.len(),
        feed.ids.len(),
        "the feed announced an event twice"
    );
    if feed.lagged == 0 {
        // B's own appends were durable before they were acknowledged.
        let lost: Vec<&String> = b_acked.iter().filter(|id| !feed_set.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "the feed did not announce B's appends {lost:?}"
        );
    }
    eprintln!(
        "the feed announced {} of {expected} events ({} lagged notices)",
        feed.ids.len(),
        feed.lagged
    );

    // Offline, B's directory holds everything it had.
    let r = common::weftlog(&db, &["status"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let offline: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        offline["events"], expected,
        "B lost events at SIGTERM: {offline:#}"
    );
    assert!(
        offline.get("peers").is_none(),
        "a local status has no peers"
    );
    // Restarted without peers (nothing can refill it), B holds them all.
    let b2 = Proc::start(
        "b2",
        &db,
        Opts {
            peers: vec![],
            members: Some(&members),
            listen: None,
            ..Default::default()
        },
    );
    let s = b2.status();
    assert_eq!(s["events"], expected, "{s:#}");
    let held: BTreeSet<String> = b2.log_ids().into_iter().collect();
    let lost = missing(&held, a_acked.iter().chain(&b_acked));
    assert!(
        lost.is_empty(),
        "B lost {} events over SIGTERM and restart",
        lost.len()
    );
    assert!(
        feed.ids.iter().all(|id| held.contains(id)),
        "the feed announced an event B does not hold"
    );
    assert_eq!(s["state_hash"], a.status()["state_hash"]);
    drop(b2);

    // C is stopped with SIGTERM in the middle of its catch-up: what it had
    // received is on its disk after the graceful stop.
    let mut c = Proc::start("c", &dc, to_a());
    let t_sync = Instant::now();
    let seen = loop {
        let events = c.status()["events"].as_u64().unwrap();
        if events >= (BACKLOG / 10) as u64 {
            assert!(
                events < expected,
                "C caught up before it could be stopped: the backlog is too small"
            );
            break events;
        }
        assert!(t_sync.elapsed() < DEADLINE, "C received nothing");
        thread::sleep(Duration::from_millis(5));
    };
    let (status, took) = c.sigterm();
    eprintln!("C stopped mid-catch-up holding {seen}+ events: {status} after {took:?}");
    assert_eq!(status.code(), Some(0), "{}", tail(&c.log, 30));
    assert!(
        took < Duration::from_secs(5),
        "{took:?}: {}",
        tail(&c.log, 30)
    );
    let r = common::weftlog(&dc, &["status"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let offline: Value = serde_json::from_str(&r.stdout).unwrap();
    let kept = offline["events"].as_u64().unwrap();
    assert!(
        kept >= seen,
        "C showed {seen} events when stopped but kept {kept}"
    );
    eprintln!("sigterm_is_graceful: {:?}", t0.elapsed());
}

/// The ready line says the node serves until SIGTERM and then stops in
/// order; a supervisor may send SIGTERM as soon as it has read that line.
#[test]
fn sigterm_right_after_ready_is_graceful() {
    const TRIES: usize = 20;
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    init(&dir);
    let mut p = Proc::start("n", &dir, Opts::default());
    let mut outcomes = Vec::new();
    for i in 0..TRIES {
        if i > 0 {
            p.launch();
        }
        let (status, took) = p.sigterm();
        outcomes.push(format!("{status} after {took:?}"));
        assert_eq!(
            status.code(),
            Some(0),
            "try {i}: SIGTERM sent right after the ready line ended the process \
             without a graceful stop ({status}); http.addr left behind: {}; \
             outcomes so far: {outcomes:?}; stderr:\n{}",
            dir.join("http.addr").exists(),
            tail(&p.log, 8)
        );
        assert!(
            !dir.join("http.addr").exists(),
            "try {i}: http.addr is still there after a graceful stop"
        );
    }
    eprintln!(
        "sigterm_right_after_ready_is_graceful: {:?}: {outcomes:?}",
        t0.elapsed()
    );
}

/// Runs `weftlog --data DIR ARGS…`, which must succeed with no stderr.
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let r = common::weftlog(dir, args);
    assert_eq!(
        r.code,
        Some(0),
        "weftlog {args:?} failed:\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stderr, "", "weftlog {args:?} wrote to stderr");
    r.stdout
}

fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let out = cli_ok(dir, args);
    assert_eq!(out.lines().count(), 1, "weftlog {args:?}: {out}");
    serde_json::from_str(&out).unwrap()
}

/// Starts `weftlog --data DIR run ARGS…`, which must fail (exit 1, within
/// [`DEADLINE`]) ending its stderr with one `error: ` line. That line.
fn run_fails(dir: &Path, args: &[&str]) -> String {
    let err = dir.with_extension("run-error");
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(dir)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("run {args:?} is still running: {}", tail(&err, 10));
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(1), "run {args:?}: {}", tail(&err, 10));
    assert_eq!(out, "", "run {args:?} failed but printed a ready line");
    let last = tail(&err, 1);
    assert!(
        last.starts_with("error: "),
        "run {args:?}: {}",
        tail(&err, 10)
    );
    eprintln!("run {args:?} failed after {:?}: {last}", t0.elapsed());
    last
}

#[test]
fn cli_forwards_to_running_node() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let (_ia, ib) = (init(&da), init(&db));
    let a = Proc::start("a", &da, Opts::default());
    let stream = "customer/20 x%y";
    let enc = "customer/20%20x%25y";

    // append goes to the running node (its directory is locked).
    let e1 = cli_json(
        &da,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
            "--add",
            "visits=2",
            "--command-id",
            "reg-1",
        ],
    );
    assert_eq!(e1["stream"], stream);
    assert_eq!(e1["version"], 1);
    assert_eq!(e1["seq"], 1);
    assert!(e1.get("existing").is_none(), "{e1}");
    let via_api = a.get_json(&format!("/v1/streams/{enc}"));
    assert_eq!(via_api["fields"]["name"]["value"], "Ada", "{via_api:#}");
    assert_eq!(via_api["counters"]["visits"], 2);
    // The same command id again: nothing new, the same event.
    let again = cli_json(
        &da,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
            "--command-id",
            "reg-1",
        ],
    );
    assert_eq!(again["id"], e1["id"]);
    assert_eq!(again["existing"], true);
    let e2 = cli_json(
        &da,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "Visited",
            "--add",
            "visits=-1",
            "--expect-version",
            "1",
        ],
    );
    assert_eq!(e2["version"], 2);

    // get, log, status: what the API answers.
    let got = cli_json(&da, &["get", "--stream", stream]);
    assert_eq!(got, a.get_json(&format!("/v1/streams/{enc}")));
    assert_eq!(got["counters"]["visits"], 1);
    let got_then = cli_json(
        &da,
        &["get", "--stream", stream, "--as-of", &e1["hlc"].to_string()],
    );
    assert_eq!(got_then["version"], 1, "{got_then:#}");
    assert_eq!(got_then["counters"]["visits"], 2);
    let log = cli_ok(&da, &["log"]);
    assert_eq!(log, a.get("/v1/log").1);
    assert_eq!(log.lines().count(), 2);
    let log_s = cli_ok(&da, &["log", "--stream", stream]);
    assert_eq!(log_s, log);
    assert_eq!(cli_ok(&da, &["log", "--stream", "other"]), "");
    assert_eq!(cli_ok(&da, &["conflicts"]), "");

    // B, offline, writes the same field; its export is imported into the
    // running A through the CLI: a conflict.
    cli_json(
        &db,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "Renamed",
            "--set",
            "name=\"Bob\"",
        ],
    );
    let b_export = tmp.path().join("b.weft");
    let x = cli_json(&db, &["export", "--out", b_export.to_str().unwrap()]);
    assert_eq!(x["exported"], 1);
    let imp = cli_json(&da, &["import", b_export.to_str().unwrap()]);
    assert_eq!(imp, json!({"imported": 1, "duplicates": 0}));
    let imp = cli_json(&da, &["import", b_export.to_str().unwrap()]);
    assert_eq!(imp, json!({"imported": 0, "duplicates": 1}));
    let conflicts = cli_ok(&da, &["conflicts"]);
    assert_eq!(conflicts.lines().count(), 1, "{conflicts}");
    let c: Value = serde_json::from_str(conflicts.trim()).unwrap();
    assert_eq!(c, a.get_json("/v1/conflicts")[0]);
    assert_eq!(c["field"], "name");
    assert_eq!(c["stream"], stream);
    let st = cli_json(&da, &["status"]);
    assert_eq!(st["events"], 3);
    assert!(st["frontier"].get(&ib).is_some(), "{st:#}");

    // Export from the running A: all, and only what B lacks.
    let b_status = tmp.path().join("b.status");
    fs::write(&b_status, cli_ok(&db, &["status"])).unwrap();
    let since = tmp.path().join("to-b.weft");
    let x = cli_json(
        &da,
        &[
            "export",
            "--since",
            b_status.to_str().unwrap(),
            "--out",
            since.to_str().unwrap(),
        ],
    );
    assert_eq!(x["exported"], 2, "{x}");
    let all = tmp.path().join("all.weft");
    let x = cli_json(&da, &["export", "--out", all.to_str().unwrap()]);
    assert_eq!(x["exported"], 3, "{x}");
    assert_eq!(x["bytes"], fs::metadata(&all).unwrap().len());
    let imp = cli_json(&db, &["import", since.to_str().unwrap()]);
    assert_eq!(imp, json!({"imported": 2, "duplicates": 0}));
    let sb = cli_json(&db, &["status"]);
    assert_eq!(sb["state_hash"], a.status()["state_hash"]);

    // Errors through the running node: one sentence, non-zero, nothing done.
    let before = a.status();
    let bad = common::fails(
        &da,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "K",
            "--add",
            "visits=lots",
        ],
    );
    assert!(bad.contains("--add"), "{bad}");
    let bad = common::fails(
        &da,
        &[
            "append", "--stream", stream, "--kind", "K", "--set", "name=Ada",
        ],
    );
    assert!(bad.contains("JSON"), "{bad}");
    let stale = common::fails(
        &da,
        &[
            "append",
            "--stream",
            stream,
            "--kind",
            "K",
            "--add",
            "visits=1",
            "--expect-version",
            "1",
        ],
    );
    assert!(stale.contains("version"), "{stale}");
    let garbage = tmp.path().join("garbage.weft");
    fs::write(&garbage, b"not an export file").unwrap();
    let refused = common::fails(&da, &["import", garbage.to_str().unwrap()]);
    assert!(refused.contains("import"), "{refused}");
    let bad_since = tmp.path().join("bad.status");
    fs::write(&bad_since, "{}").unwrap();
    let e = common::fails(
        &da,
        &[
            "export",
            "--since",
            bad_since.to_str().unwrap(),
            "--out",
            tmp.path().join("x.weft").to_str().unwrap(),
        ],
    );
    assert!(e.contains("frontier"), "{e}");
    assert!(!tmp.path().join("x.weft").exists());
    assert_eq!(
        without_peers(a.status()),
        without_peers(before.clone()),
        "a refused command changed the node"
    );
    // The API's own answers to the same mistakes.
    let (code, v) = a.post(
        &format!("/v1/streams/{enc}/events"),
        &json!({"kind": "K", "add": {"visits": 1}, "expected_version": 1}),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = a.post(&format!("/v1/streams/{enc}/events"), &json!({"kind": 3}));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].is_string(), "{v}");

    // A second `run` on a running node's directory, or on a busy HTTP
    // port, is refused; the running node is untouched.
    let e = run_fails(&da, &["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    assert!(e.contains("in use by another weftlog process"), "{e}");
    let e = run_fails(&db, &["--listen", "127.0.0.1:0", "--http", &a.http]);
    assert!(e.contains(&a.http), "{e}");
    assert!(!db.join("http.addr").exists());
    assert_eq!(
        fs::read_to_string(da.join("http.addr")).unwrap().trim(),
        a.http
    );
    assert_eq!(without_peers(a.status()), without_peers(before));
    eprintln!("cli_forwards_to_running_node: {:?}", t0.elapsed());
}

/// Several peers leave at once; the survivor must keep answering and stop
/// cleanly. (Its dial loops once spun on connections that were closed but
/// not yet unregistered, took every runtime thread, and the node stopped
/// answering HTTP and SIGTERM. This test exercises that path, but did not
/// catch the spin reliably here: a shell loop doing the same caught it in 5
/// of 6 runs.)
#[test]
fn survivor_answers_when_peers_stop_together() {
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..4 {
        let dirs: Vec<PathBuf> = (0..4)
            .map(|i| tmp.path().join(format!("r{round}n{i}")))
            .collect();
        for d in &dirs {
            init(d);
        }
        // Fixed ports, so that every node dials every other (the hang needed
        // dial loops on the survivor towards the peers that left).
        let ports: Vec<String> = (0..4)
            .map(|_| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.local_addr().unwrap().to_string()
            })
            .collect();
        let mut nodes: Vec<Proc> = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let peers = (0..4)
                .filter(|j| *j != i)
                .map(|j| ports[j].clone())
                .collect();
            nodes.push(Proc::start(
                &format!("r{round}n{i}"),
                dir,
                Opts {
                    peers,
                    members: None,
                    listen: Some(ports[i].clone()),
                    ..Default::default()
                },
            ));
        }
        let ids: Vec<String> = nodes.iter().map(|p| p.id.clone()).collect();
        let others: Vec<&str> = ids[..3].iter().map(String::as_str).collect();
        let survivor = nodes.pop().unwrap();
        wait_status(&survivor, "the survivor connecting to all", |s| {
            connected_to(s, &others)
        });
        for p in &nodes {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(p.pid(), libc::SIGTERM) };
        }
        for p in &mut nodes {
            if let Some(mut c) = p.child.take() {
                let _ = c.wait();
            }
        }
        let mut survivor = survivor;
        let t = Instant::now();
        wait_status(&survivor, "the survivor seeing its peers gone", |s| {
            !s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["connected"] == true)
        });
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "round {round}: the survivor answered slowly"
        );
        let (code, took) = survivor.sigterm();
        assert!(code.success(), "round {round}: survivor exit {code:?}");
        assert!(
            took < Duration::from_secs(10),
            "round {round}: the survivor took {took:?} to stop"
        );
    }
}

/// An author that signs two events with one seq (here: two data
/// directories sharing one key) is caught by sync: the honest node that
/// meets both branches keeps both, reports the fork in `status` (the
/// session's report with both ids, and the replica's fork list), and keeps
/// the report across a restart; the forked author's other replica ends
/// with the same events and state hash.
#[test]
fn equivocation_is_detected_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (dx1, dx2, dc) = (
        tmp.path().join("x1"),
        tmp.path().join("x2"),
        tmp.path().join("c"),
    );
    let x = init(&dx1);
    fs::create_dir(&dx2).unwrap();
    fs::copy(
        dx1.join(weftlog::node::KEY_FILE),
        dx2.join(weftlog::node::KEY_FILE),
    )
    .unwrap();
    let rename = |dir: &Path, name: &str| -> String {
        let v = cli_json(
            dir,
            &[
                "append",
                "--stream",
                "customer/20",
                "--kind",
                "Renamed",
                "--set",
                &format!("name=\"{name}\""),
            ],
        );
        assert_eq!(v["seq"], 1);
        assert_eq!(v["author"], x.as_str());
        v["id"].as_str().unwrap().to_string()
    };
    let (id1, id2) = (rename(&dx1, "Ada"), rename(&dx2, "Eve"));
    assert_ne!(id1, id2);
    init(&dc);
    let mut c = Proc::start("c", &dc, Opts::default());
    let mut x1 = Proc::start(
        "x1",
        &dx1,
        Opts {
            peers: vec![c.quic.clone()],
            ..Opts::default()
        },
    );
    wait_status(&c, "c receiving x1's branch", |s| s["events"] == 1);
    let (code, _) = x1.sigterm();
    assert!(code.success());
    let x2 = Proc::start(
        "x2",
        &dx2,
        Opts {
            peers: vec![c.quic.clone()],
            ..Opts::default()
        },
    );
    let s = wait_status(&c, "c holding both branches and listing the fork", |s| {
        s["events"] == 2
            && s["forks"].as_array().is_some_and(|f| f.len() == 1)
            && s["equivocations"].as_array().is_some_and(|e| !e.is_empty())
            // The proof is attached once both branches are durable, just
            // after the batch that stored the second one.
            && s["equivocations"][0]["fork_proof"].is_object()
    });
    let forks = s["equivocations"].as_array().unwrap();
    assert_eq!(forks.len(), 1, "{s}");
    let f = &forks[0];
    assert_eq!(f["author"], x.as_str(), "{f}");
    assert_eq!(f["seq"], 1, "{f}");
    let mut both = [f["held"].as_str().unwrap(), f["other"].as_str().unwrap()];
    both.sort();
    let mut want = [id1.as_str(), id2.as_str()];
    want.sort();
    assert_eq!(both, want, "{f}");
    // Both branches are kept and listed, whatever order they came in.
    let listed = &s["forks"][0];
    assert_eq!(listed["author"], x.as_str(), "{s}");
    assert_eq!(listed["seq"], 1, "{s}");
    let mut events: Vec<&str> = listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    events.sort();
    assert_eq!(events, want, "{s}");
    assert_eq!(
        s["frontier"][x.as_str()]["branches"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{s}"
    );
    // The forked author's other replica holds both and lists the fork too.
    let s2 = wait_status(&x2, "x2 holding both branches", |s| {
        s["events"] == 2 && s["forks"].as_array().is_some_and(|f| f.len() == 1)
    });
    assert_eq!(s2["state_hash"], s["state_hash"], "{s2}");
    // The proof survives a restart and shows in the offline status too.
    let (code, _) = c.sigterm();
    assert!(code.success());
    let offline = cli_json(&dc, &["status"]);
    assert_eq!(offline["equivocations"], s["equivocations"], "{offline}");
    assert_eq!(offline["forks"], s["forks"], "{offline}");
}

/// A node restarted after SIGKILL is reconnected at once, whichever of the
/// two has the larger id: the peer that kept the dead connection replaces
/// it as soon as the new incarnation dials in (the idle timeout here is
/// 30 s, which is how long the dead connection would otherwise be kept, and
/// refused the new one, when the restarted node has the larger id).
#[test]
fn a_restarted_node_reconnects_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = pair(tmp.path(), &["--idle-timeout-ms", "30000"]);
    for i in 0..2 {
        let other = nodes[1 - i].id.clone();
        wait_status(&nodes[i], "connected", |s| connected_to(s, &[&other]));
    }
    // The larger id first (the case the dialler rule alone got wrong).
    let mut order = [0, 1];
    order.sort_by_key(|&i| std::cmp::Reverse(nodes[i].id.clone()));
    for (round, &victim) in order.iter().enumerate() {
        let survivor = 1 - victim;
        nodes[victim].sigkill();
        nodes[victim].launch();
        let t0 = Instant::now();
        let e = nodes[victim].append(
            "after/restart",
            json!({"kind": "Restarted", "set": {"round": round}}),
        );
        let id = e["id"].as_str().unwrap().to_string();
        loop {
            if nodes[survivor].log_ids().contains(&id) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: the survivor lacks the restarted node's event {:?} after its \
                 restart; survivor stderr:\n{}",
                t0.elapsed(),
                tail(&nodes[survivor].log, 30)
            );
            thread::sleep(Duration::from_millis(10));
        }
        let larger = if round == 0 { "larger" } else { "smaller" };
        eprintln!(
            "round {round}: the restarted node (the {larger} id) reached its peer {:?} after its ready line",
            t0.elapsed()
        );
    }
}

/// A client's command reaches two nodes that cannot see each other (it
/// timed out at one and was retried at the other): both carry it out. After
/// the heal it counts once on both: one event took effect (the first in
/// canonical order), the other is kept, listed as ignored and marked in the
/// log, and a further retry anywhere answers with the event in effect.
#[test]
fn a_command_taken_by_two_partitioned_nodes_counts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = pair(tmp.path(), &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    // Ten seats, five of them held by each node.
    a.append(
        "session/7",
        json!({"kind": "SessionOpened", "escrow_init": {"seats": 10},
               "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 5}]}),
    );
    converge(&[a, b], Some(1), "setup");

    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    let purchase = json!({
        "kind": "SeatsPurchased",
        "command_id": "order-42",
        "escrow_consume": {"seats": 2},
        "add": {"orders": 1},
        "set": {"last_buyer": "Ada"},
    });
    let (code_a, ea) = a.post("/v1/streams/session/7/events", &purchase);
    let (code_b, eb) = b.post("/v1/streams/session/7/events", &purchase);
    assert_eq!((code_a, code_b), (201, 201), "{ea} {eb}");
    // Each side alone counts it once.
    for (n, e) in [(a, &ea), (b, &eb)] {
        let s = n.get_json("/v1/streams/session/7");
        assert_eq!(s["escrow"]["seats"]["consumed"], 2, "{}: {s}", n.name);
        let (code, again) = n.post("/v1/streams/session/7/events", &purchase);
        assert_eq!((code, &again["id"]), (200, &e["id"]), "{}", n.name);
    }

    a.partition(&[]);
    b.partition(&[]);
    let statuses = converge(&[a, b], Some(3), "after the heal");
    assert_eq!(statuses[0]["state_hash"], statuses[1]["state_hash"]);

    let key = |e: &Value| {
        (
            e["hlc"].as_u64().unwrap(),
            e["author"].as_str().unwrap().to_string(),
        )
    };
    let (first, ignored) = if key(&ea) < key(&eb) {
        (&ea, &eb)
    } else {
        (&eb, &ea)
    };
    for n in [a, b] {
        let s = n.get_json("/v1/streams/session/7");
        assert_eq!(
            s["escrow"]["seats"]["consumed"], 2,
            "{}: counted once: {s}",
            n.name
        );
        assert_eq!(s["counters"]["orders"], 1, "{}: {s}", n.name);
        assert_eq!(s["fields"]["last_buyer"]["value"], "Ada", "{}: {s}", n.name);
        assert!(
            s["fields"]["last_buyer"]["conflict"].is_null(),
            "{}: {s}",
            n.name
        );
        assert_eq!(
            s["version"], 3,
            "{}: both events are in the stream: {s}",
            n.name
        );
        let d = &s["duplicates"]["order-42"];
        assert_eq!(d["took_effect"], first["id"], "{}: {s}", n.name);
        assert_eq!(d["ignored"], json!([ignored["id"]]), "{}: {s}", n.name);
        // A further retry, on either node, names the event in effect.
        let (code, again) = n.post("/v1/streams/session/7/events", &purchase);
        assert_eq!(code, 200, "{}: {again}", n.name);
        assert_eq!(again["id"], first["id"], "{}", n.name);
        assert_eq!(again["existing"], true, "{}", n.name);
        // The log keeps both and marks the one without effect.
        let (code, log) = n.get("/v1/log?stream=session/7");
        assert_eq!(code, 200);
        let marked: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["meta"]["command_id"] == "order-42")
            .map(|e| json!([e["id"], e["duplicate_of"]]))
            .collect();
        assert_eq!(
            marked.len(),
            2,
            "{}: both events are in the log: {log}",
            n.name
        );
        assert!(
            marked.contains(&json!([first["id"], null]))
                && marked.contains(&json!([ignored["id"], first["id"]])),
            "{}: {marked:?}",
            n.name
        );
    }
}

/// The restore story: desk A's data directory is copied while it runs; A
/// appends two more events, which reach B and C; A is stopped, restored
/// from the copy, started with no peer reachable, and takes one append,
/// which signs a second event at a seq it had used (a fork); then it is
/// restarted with its peers. With no manual step, all three end with equal
/// state hashes, the restored desk's append everywhere, the fork reported
/// everywhere, and A's later appends reach the others.
#[test]
fn a_desk_restored_from_a_copy_forks_and_the_cluster_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for d in [&da, &db, &dc] {
        init(d);
    }
    let c = Proc::start("c", &dc, Opts::default());
    let b = Proc::start(
        "b",
        &db,
        Opts {
            peers: vec![c.quic.clone()],
            ..Opts::default()
        },
    );
    let with_peers = || Opts {
        peers: vec![b.quic.clone(), c.quic.clone()],
        ..Opts::default()
    };
    let mut a = Proc::start("a", &da, with_peers());
    a.append(
        "attendee/1",
        json!({"kind": "Registered", "set": {"name": "Ada"}}),
    );
    converge(&[&a, &b, &c], Some(1), "first event");
    // The backup, taken while A runs.
    let backup = tmp.path().join("a-backup");
    copy_dir(&da, &backup);
    for i in 0..2 {
        a.append(
            "attendee/1",
            json!({"kind": "Edited", "set": {"email": format!("ada{i}@x")}}),
        );
    }
    converge(&[&a, &b, &c], Some(3), "A's two later events");
    a.sigkill();
    fs::remove_dir_all(&da).unwrap();
    copy_dir(&backup, &da);
    // Offline: no peer reachable (the others never dial A).
    let mut a = Proc::start("a", &da, Opts::default());
    let offline = a.append(
        "attendee/1",
        json!({"kind": "Edited", "set": {"phone": "555"}}),
    );
    assert_eq!(
        offline["seq"], 2,
        "the restored desk reuses seq 2: {offline}"
    );
    a.sigterm();
    let mut a = Proc::start("a", &da, with_peers());
    let statuses = converge(&[&a, &b, &c], Some(4), "after the restored desk reconnects");
    for (n, s) in [&a, &b, &c].iter().zip(&statuses) {
        let forks = s["forks"].as_array().unwrap();
        assert_eq!(forks.len(), 1, "{}: the fork is reported: {s}", n.name);
        assert_eq!(forks[0]["author"], a.id.as_str(), "{}", n.name);
        assert_eq!(forks[0]["seq"], 2, "{}", n.name);
        assert_eq!(forks[0]["heads"].as_array().unwrap().len(), 2, "{}", n.name);
        assert!(
            n.log_ids()
                .contains(&offline["id"].as_str().unwrap().to_string()),
            "{}: the restored desk's append is kept",
            n.name
        );
        let got = n.get_json("/v1/streams/attendee/1");
        assert_eq!(got["fields"]["phone"]["value"], "555", "{}: {got}", n.name);
        assert_eq!(
            got["fields"]["email"]["value"], "ada1@x",
            "{}: {got}",
            n.name
        );
    }
    // A keeps working on its own branch, and the others get it.
    let later = a.append(
        "attendee/1",
        json!({"kind": "Edited", "set": {"company": "AE"}}),
    );
    assert_eq!(later["seq"], 3, "{later}");
    converge(&[&a, &b, &c], Some(5), "A's append after the fork");
    // And a restart of A does not lose track of its branch.
    a.sigterm();
    let a = Proc::start("a", &da, with_peers());
    let again = a.append(
        "attendee/1",
        json!({"kind": "Edited", "set": {"notes": "vip"}}),
    );
    assert_eq!(again["seq"], 4, "{again}");
    converge(&[&a, &b, &c], Some(6), "A's append after a restart");
}

/// The venue's risk window across a partition: two desks, each holding 5
/// of 10 seats, are cut off and keep selling beyond their rights, up to the
/// policy's overdraft; past it they refuse. After the heal both mark the
/// same overdraft sales oversold, write the policy's compensation at once
/// (each sale compensated once, however many desks wrote it), and a staff
/// decision on one desk supersedes it everywhere.
#[test]
fn a_risk_window_oversell_across_a_partition_is_detected_and_compensated_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = pair(tmp.path(), &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.append(
        "session/7",
        json!({"kind": "SessionOpened", "escrow_init": {"seats": 10},
               "escrow_policy": {"seats": {"mode": "risk-window", "max_overdraft": 3}},
               "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 5}]}),
    );
    converge(&[a, b], Some(1), "setup");
    // A round after the setup: the seats left then (10 of 10) admit the
    // overdraft. Before it, the counter was unknown at the last round.
    for n in [a, b] {
        let s = wait_status(n, "a sync round after the setup", |s| {
            s["seats"][0]["may_sell"] == 8
        });
        let rule = &s["seats"][0];
        assert_eq!(rule["policy"]["mode"], "risk-window", "{rule}");
        assert_eq!(
            (&rule["held"], &rule["limited_by"]),
            (&json!(5), &Value::Null),
            "{rule}"
        );
    }

    a.partition(&[&b.id]);
    b.partition(&[&a.id]);
    let sell = |n: &Proc, seats: u64| {
        n.post(
            "/v1/streams/session/7/events",
            &json!({"kind": "SeatsSold", "escrow_consume": {"seats": seats}}),
        )
    };
    for (n, beyond) in [(a, 2), (b, 3)] {
        assert_eq!(sell(n, 5).0, 201, "{}: its own rights", n.name);
        let (code, e) = sell(n, beyond);
        assert_eq!(code, 201, "{}: an overdraft within the bound: {e}", n.name);
    }
    let (code, e) = sell(b, 1);
    assert_eq!(code, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("the policy allows 3"),
        "{e}"
    );
    // Alone, neither desk sees an oversell: 7 and 8 of 10.
    assert_eq!(a.get_json("/v1/oversold"), json!([]));
    // Staff watching A's notifications are told of each oversold sale.
    let notices = a.sse("/v1/notifications", None);

    a.partition(&[]);
    b.partition(&[]);
    let done = |n: &Proc| {
        let rows = n.get_json("/v1/oversold");
        let rows = rows.as_array().unwrap().clone();
        (rows.len() == 2 && rows.iter().all(|r| r["state"] == "compensated")).then_some(rows)
    };
    let t0 = Instant::now();
    let (ra, rb) = loop {
        let s = converge(&[a, b], None, "after the heal");
        if let (Some(ra), Some(rb)) = (done(a), done(b)) {
            if s[0]["state_hash"] == s[1]["state_hash"] {
                break (ra, rb);
            }
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "not compensated: {:?}",
            a.get_json("/v1/oversold")
        );
        thread::sleep(POLL);
    };
    assert_eq!(ra, rb, "the same marks and compensations on both");
    let units: Vec<&Value> = ra.iter().map(|r| &r["units"]).collect();
    assert_eq!(units.iter().map(|u| u.as_u64().unwrap()).sum::<u64>(), 5);
    for r in &ra {
        assert_eq!(r["compensation"]["action"], "waitlist", "{r}");
        assert_eq!(r["compensation"]["by"], "auto", "{r}");
    }
    let seats = &a.get_json("/v1/streams/session/7")["escrow"]["seats"];
    assert_eq!(seats["consumed"], 15, "{seats}");
    let mut told: Vec<Value> = Vec::new();
    while !ra.iter().all(|r| told.contains(r)) {
        let (kind, id, row) = notices
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("oversold notices so far: {told:?}"));
        if kind == "reconciled" {
            // The reconnect report of the partition (tests/reconnects.rs).
            continue;
        }
        assert_eq!(kind, "oversold", "{row}");
        assert!(id.is_some(), "a notice has an id to resume after");
        told.push(row);
    }

    // Staff honour the first sale on B; A shows it once synced.
    let sale = ra[0]["sale"].as_str().unwrap();
    let (code, e) = b.post(
        &format!("/v1/oversold/{sale}"),
        &json!({"action": "honour", "user": "front-desk"}),
    );
    assert_eq!(code, 201, "{e}");
    let (code, e) = b.post(&format!("/v1/oversold/{sale}"), &json!({"action": "sell"}));
    assert_eq!(code, 400, "{e}");
    let t0 = Instant::now();
    loop {
        let rows = a.get_json("/v1/oversold");
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["sale"] == sale)
            .cloned()
            .unwrap();
        if row["compensation"]["by"] == "staff" {
            assert_eq!(row["compensation"]["action"], "honour", "{row}");
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "staff decision not seen: {row}");
        thread::sleep(POLL);
    }
}

/// A desk that runs short of rights while connected does not refuse a sale
/// its peer's spare rights cover: the sale waits for the peer's
/// rebalancing transfer (the replica's rule, at most
/// `weftlog_proto::rebalance::RIGHTS_WAIT_MS`) and is made; a sale no
/// spare rights cover is refused as before.
#[test]
fn a_sale_beyond_a_desks_rights_waits_for_a_connected_peers_transfer() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes = pair(tmp.path(), &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.append(
        "session/9",
        json!({"kind": "SessionOpened", "escrow_init": {"seats": 10},
               "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 1}]}),
    );
    converge(&[a, b], Some(1), "setup");
    wait_status(b, "connected", |s| connected_to(s, &[&a.id]));
    // The daemon tells its replica who is connected at its next tick.
    thread::sleep(Duration::from_millis(300));
    let sell = |seats: u64| {
        b.post(
            "/v1/streams/session/9/events",
            &json!({"kind": "SeatsSold", "escrow_consume": {"seats": seats}}),
        )
    };
    // B holds 1; A holds 9, 4 beyond its reserve (half the unsold seats).
    let (code, e) = sell(3);
    assert_eq!(code, 201, "the sale should wait for A's transfer: {e}");
    let s = converge(&[a, b], None, "after the sale");
    assert_eq!(s[0]["state_hash"], s[1]["state_hash"]);
    let seats = &b.get_json("/v1/streams/session/9")["escrow"]["seats"];
    assert_eq!(seats["consumed"], 3, "{seats}");
    let (code, log) = a.get("/v1/log");
    assert_eq!(code, 200, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(r#""kind":"RightsRebalanced""#)),
        "no rebalancing transfer in {log}"
    );
    // Beyond every seat left: refused, without waiting for anything.
    let (code, e) = sell(20);
    assert_eq!(code, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("needs 20"), "{e}");
}
