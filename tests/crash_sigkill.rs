//! Guards durability under abrupt process death: a node appending at full
//! speed from several threads is killed with SIGKILL (50 times, or
//! `WEFTLOG_CRASH_ITERATIONS`), and after every kill the reopened log holds
//! every acknowledged event, unchanged, and serves nothing corrupt. At the
//! end it prints what it did: kills, acknowledged appends, reopens, torn
//! tails cut, and the most appends acknowledged between two kills.
//!
//! The appender is this test binary re-executed (the `crash_child_appender`
//! test, which does nothing unless the environment names a data directory);
//! it prints `ACK <seq> <id>` after each `Node::append` returns.

mod common;

use common::{env_count, Rng};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use weftlog::node::{self, Node};
use weftlog_proto::state::Draft;
use weftlog_proto::{EventId, Meta, Op};

/// The environment variable that turns the child test on: its data directory.
const CHILD_DIR_ENV: &str = "WEFTLOG_CRASH_CHILD_DIR";
/// Seed of the kill schedule; a failure message prints it.
const SEED: u64 = 0x5eed_c4a5_0001;
/// How many kills: this variable, or [`ITERATIONS_DEFAULT`] (what CI runs).
const ITERATIONS_ENV: &str = "WEFTLOG_CRASH_ITERATIONS";
const ITERATIONS_DEFAULT: usize = 50;
const APPENDER_THREADS: usize = 4;
/// The child stops on its own after this many appends, should it outlive us.
const CHILD_MAX_APPENDS: u64 = 200_000;

/// An event of varying shape and size, so records straddle write boundaries
/// at varying offsets.
fn draft(thread: usize, i: u64) -> Draft {
    let mut rng = Rng((thread as u64) << 32 | i);
    let stream = format!("stream/{}", rng.below(8));
    let mut ops = vec![Op::Add {
        counter: "appends".into(),
        delta: 1,
    }];
    if rng.below(2) == 0 {
        ops.push(Op::Set {
            field: format!("f{}", rng.below(4)),
            value: format!("\"t{thread}-{i}\"").into_bytes(),
            supersedes: vec![],
        });
    }
    let pad = "x".repeat(rng.below(3000) as usize);
    Draft {
        stream,
        kind: "Appended".into(),
        ops,
        payload: format!("{{\"thread\":{thread},\"i\":{i},\"pad\":\"{pad}\"}}").into_bytes(),
        meta: Meta {
            command_id: None,
            user: Some(format!("appender-{thread}")),
        },
        expected_version: None,
        texts: Vec::new(),
    }
}

/// The child: appends from several threads until killed, acknowledging each
/// append on stdout once it returns.
#[test]
#[ignore = "the child process of sigkill_during_appends_loses_no_acknowledged_event"]
fn crash_child_appender() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let (node, _) = Node::open(Path::new(&dir)).expect("child: open the node");
    std::thread::scope(|s| {
        for t in 0..APPENDER_THREADS {
            let node = &node;
            s.spawn(move || {
                for i in 0..CHILD_MAX_APPENDS {
                    let a = node.append(draft(t, i)).expect("child: append");
                    let mut out = std::io::stdout().lock();
                    let line = format!("ACK {} {}\n", a.seq, a.id);
                    // The parent is gone if stdout is: stop.
                    if out.write_all(line.as_bytes()).is_err() || out.flush().is_err() {
                        std::process::exit(0);
                    }
                }
            });
        }
    });
}

/// `(seq, id)` of an `ACK` line, wherever libtest's own output puts it.
fn parse_ack(line: &str) -> Option<(u64, EventId)> {
    let rest = &line[line.find("ACK ")? + 4..];
    let mut parts = rest.split_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    Some((seq, id))
}

#[test]
fn sigkill_during_appends_loses_no_acknowledged_event() {
    let iterations = env_count(ITERATIONS_ENV, ITERATIONS_DEFAULT);
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let author = node::init(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(SEED);
    // Every acknowledged append over all runs: seq -> id.
    let mut acked: BTreeMap<u64, EventId> = BTreeMap::new();
    let mut torn_tails = 0;
    let mut reopens = 0;
    let mut most_acks = 0;
    for iteration in 0..iterations {
        let ctx = format!("seed {SEED:#x}, iteration {iteration}");
        let kill_after = match iteration % 5 {
            0 => 0,
            1 => rng.below(3),
            2 => rng.below(30),
            _ => rng.below(400),
        };
        let stderr_path = tmp.path().join(format!("child-{iteration}.stderr"));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_appender",
                "--nocapture",
                "--include-ignored",
                "--test-threads",
                "1",
            ])
            .env(CHILD_DIR_ENV, &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let kill = || {
            // SAFETY: `pid` is our child, not yet reaped (we wait below).
            let r = unsafe { libc::kill(pid, libc::SIGKILL) };
            assert_eq!(r, 0, "{ctx}: kill failed");
        };
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acks = Vec::new();
        let mut killed = false;
        if kill_after == 0 {
            kill();
            killed = true;
        }
        // Lines after the kill were printed before the child died: they
        // acknowledge appends too.
        for line in lines.by_ref() {
            let line = line.unwrap_or_else(|e| panic!("{ctx}: read child stdout: {e}"));
            if let Some(ack) = parse_ack(&line) {
                acks.push(ack);
            }
            if !killed && acks.len() as u64 >= kill_after {
                kill();
                killed = true;
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{ctx}: the child ended otherwise ({status}); its stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        most_acks = most_acks.max(acks.len());
        for (seq, id) in acks {
            if let Some(old) = acked.insert(seq, id) {
                assert_eq!(
                    old, id,
                    "{ctx}: seq {seq} was acknowledged as two different events: \
                     an acknowledged event was lost and its seq reused"
                );
            }
        }

        let (node, recovery) =
            Node::open(&dir).unwrap_or_else(|e| panic!("{ctx}: reopen after SIGKILL: {e}"));
        reopens += 1;
        if let Some(t) = &recovery.torn {
            torn_tails += 1;
            assert!(!t.reason.is_empty(), "{ctx}: torn tail without a reason");
        }
        let events = node.with_state(|s| {
            for (&seq, id) in &acked {
                assert_eq!(
                    s.event_id(&author, seq).as_ref(),
                    Some(id),
                    "{ctx}: acknowledged event seq {seq} is missing or different"
                );
            }
            let head = s.max_seq(&author);
            assert_eq!(head, s.len(), "{ctx}: the chain has gaps");
            s.len()
        });
        assert!(
            events >= acked.len() as u64,
            "{ctx}: {events} events, {} acknowledged",
            acked.len()
        );
        assert_eq!(recovery.records, events, "{ctx}");
        // Everything served reads back and is the event the state holds.
        let mut scanned = 0u64;
        node.scan(|e, id| {
            scanned += 1;
            assert_eq!(e.author, author);
            assert_eq!(node.with_state(|s| s.event_id(&author, e.seq)), Some(id));
        })
        .unwrap_or_else(|e| panic!("{ctx}: scan: {e}"));
        assert_eq!(scanned, events, "{ctx}");
        drop(node);
    }
    // Straight to stderr, past libtest's capture: the figures of a long
    // run are its result.
    let _ = writeln!(
        std::io::stderr(),
        "crash_sigkill (seed {SEED:#x}): {iterations} kills, {} acknowledged appends, \
         {reopens} reopens, {torn_tails} torn tails cut, at most {most_acks} acks \
         between two kills, {:.1?}",
        acked.len(),
        t0.elapsed()
    );

    let out = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(&dir)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weftlog status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["events"].as_u64().unwrap() >= acked.len() as u64);
    assert_eq!(status["node"], author.to_string());
}
