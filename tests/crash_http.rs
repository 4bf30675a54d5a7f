//! Guards durability and idempotency of the real server under abrupt
//! death: `weftlog run` taking appends from several HTTP clients at once is
//! killed with SIGKILL at seeded random points (20 times, or
//! `WEFTLOG_CRASH_HTTP_ITERATIONS`) and restarted on the same data
//! directory, and after every restart every append answered 2xx before the
//! kill is in the log, unchanged (seq, stream, stream version, body), the
//! stream versions, counters and fields agree with the log, and a command
//! id that was acknowledged gives back the same event when sent again.
//!
//! Each client puts a command id on some of its requests and, now and then,
//! sends an acknowledged command again (before and after restarts). A
//! request cut off by the kill has an unknown outcome: sent again after the
//! restart with its command id, it is either found (it was durable) or
//! appended anew. At the end the server is killed once more while idle and
//! the CLI, reading the data directory itself, serves what the server
//! served. Figures are printed at the end.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::server::{agent, init, post, Opts, Proc, DEADLINE};
use common::{env_count, Rng};
use serde_json::{json, Value};

/// Seed of the kill schedule and of every client's requests; a failure
/// message prints it.
const SEED: u64 = 0x5eed_c4a5_0002;
/// How many kills: this variable, or [`ITERATIONS_DEFAULT`] (what CI runs).
const ITERATIONS_ENV: &str = "WEFTLOG_CRASH_HTTP_ITERATIONS";
const ITERATIONS_DEFAULT: usize = 20;
/// HTTP clients appending at once.
const CLIENTS: usize = 4;
/// Streams the clients append to (`crash/0` …).
const STREAMS: u64 = 6;
/// One request in this many carries a command id.
const COMMAND_EVERY: u64 = 3;
/// One request in this many sends an acknowledged command again.
const RETRY_EVERY: u64 = 10;
/// Acknowledged commands sent again by the test after each restart.
const RETRIES_AFTER_RESTART: usize = 8;
/// Largest payload padding, so that records vary in size.
const PAD_MAX: u64 = 1500;
/// A client stops after this many requests in one iteration, should the
/// kill never come.
const CLIENT_MAX_REQUESTS: u64 = 100_000;
/// What the server prints on stderr when it cuts a torn tail at startup.
const TORN_TAIL: &str = "cut a torn tail";

/// An append the server acknowledged (2xx), and what was sent for it.
#[derive(Debug, Clone)]
struct Ack {
    stream: String,
    body: Value,
    id: String,
    seq: u64,
    version: u64,
}

impl Ack {
    fn command_id(&self) -> Option<&str> {
        self.body["command_id"].as_str()
    }
}

/// What one client did between a start and a kill.
#[derive(Default)]
struct ClientRun {
    /// New appends acknowledged (201).
    acks: Vec<Ack>,
    /// Acknowledged commands sent again and answered with their event.
    retried: usize,
    /// The request the kill cut off, if it carried a command id: its stream
    /// and body.
    cut_off: Option<(String, Value)>,
    /// Requests without a command id that the kill cut off.
    unknown: usize,
}

/// Sends an acknowledged command again: the answer must be 200 with the
/// event it was acknowledged as. `Err` if the server did not answer.
fn retry(agent: &ureq::Agent, base: &str, ack: &Ack, ctx: &str) -> Result<(), ureq::Error> {
    let url = format!("{base}/v1/streams/{}/events", ack.stream);
    let (code, v) = post(agent, &url, &ack.body)?;
    assert_eq!(
        code,
        200,
        "{ctx}: command {:?}, acknowledged as event {} (seq {}), sent again: \
         answered {code} {v}: an acknowledged command was forgotten",
        ack.command_id(),
        ack.id,
        ack.seq
    );
    let got = (
        &v["id"],
        &v["seq"],
        &v["stream"],
        &v["version"],
        &v["existing"],
    );
    assert_eq!(
        got,
        (
            &json!(ack.id),
            &json!(ack.seq),
            &json!(ack.stream),
            &json!(ack.version),
            &json!(true)
        ),
        "{ctx}: command {:?} sent again: another answer than its acknowledged event: {v}",
        ack.command_id()
    );
    Ok(())
}

/// Client `t`'s new request number `j` in `iteration`: its stream and body.
fn request(rng: &mut Rng, iteration: usize, t: usize, j: u64) -> (String, Value) {
    let stream = format!("crash/{}", rng.below(STREAMS));
    let mut body = json!({
        "kind": "Appended",
        "add": { "n": 1, format!("c{t}"): 1 + rng.below(5) },
        "payload": { "t": t, "i": iteration, "j": j, "pad": "x".repeat(rng.below(PAD_MAX) as usize) },
        "user": format!("client-{t}"),
    });
    if rng.below(2) == 0 {
        body["set"] = json!({ format!("f{}", rng.below(3)): format!("{iteration}-{t}-{j}") });
    }
    if rng.below(COMMAND_EVERY) == 0 {
        body["command_id"] = json!(format!("cmd-{iteration}-{t}-{j}"));
    }
    (stream, body)
}

/// Client `t`: appends (and now and then sends an acknowledged command
/// again) until a request finds no server or `stop` is set.
fn client(
    base: String,
    iteration: usize,
    t: usize,
    commands: Arc<Vec<Ack>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> ClientRun {
    let ctx = format!("seed {SEED:#x}, iteration {iteration}, client {t}");
    let mut rng = Rng(SEED ^ (((iteration as u64) << 20) | t as u64));
    let agent = agent();
    let mut run = ClientRun::default();
    for j in 0..CLIENT_MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if !commands.is_empty() && rng.below(RETRY_EVERY) == 0 {
            let ack = &commands[rng.below(commands.len() as u64) as usize];
            match retry(&agent, &base, ack, &ctx) {
                Ok(()) => run.retried += 1,
                // Killed: sending a known command again changes nothing.
                Err(_) => break,
            }
            continue;
        }
        let (stream, body) = request(&mut rng, iteration, t, j);
        let url = format!("{base}/v1/streams/{stream}/events");
        match post(&agent, &url, &body) {
            Ok((201, v)) => {
                assert_eq!(v["stream"], json!(stream), "{ctx}: {v}");
                assert_eq!(v.get("existing"), None, "{ctx}: {v}");
                let field = |k: &str| {
                    v[k].as_u64()
                        .unwrap_or_else(|| panic!("{ctx}: append answered without {k}: {v}"))
                };
                run.acks.push(Ack {
                    stream,
                    id: v["id"].as_str().expect("an id").to_string(),
                    seq: field("seq"),
                    version: field("version"),
                    body,
                });
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok((code, v)) => panic!("{ctx}: a new append answered {code}: {v}"),
            // Killed: the outcome of this request is unknown.
            Err(_) => {
                if body["command_id"].is_string() {
                    run.cut_off = Some((stream, body));
                } else {
                    run.unknown += 1;
                }
                break;
            }
        }
    }
    run
}

/// An event's ops as `(set|add, name) -> value`, from a logged event or
/// from an append body; `supersedes` (the node's business) left out.
fn ops_of_event(e: &Value) -> BTreeMap<(String, String), Value> {
    let mut ops = BTreeMap::new();
    for op in e["ops"].as_array().expect("ops") {
        if let Some(s) = op.get("set") {
            let f = s["field"].as_str().expect("a field").to_string();
            ops.insert(("set".into(), f), s["value"].clone());
        } else if let Some(a) = op.get("add") {
            let c = a["counter"].as_str().expect("a counter").to_string();
            ops.insert(("add".into(), c), a["delta"].clone());
        } else {
            panic!("an op this test never sends: {op}");
        }
    }
    ops
}

fn ops_of_body(body: &Value) -> BTreeMap<(String, String), Value> {
    let mut ops = BTreeMap::new();
    for (kind, map) in [("set", &body["set"]), ("add", &body["add"])] {
        for (k, v) in map.as_object().into_iter().flatten() {
            ops.insert((kind.to_string(), k.clone()), v.clone());
        }
    }
    ops
}

/// The log as `GET /v1/log` or `weftlog log` prints it: parsed, by seq.
fn parse_log(text: &str, ctx: &str) -> Vec<Value> {
    let mut events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{ctx}: log line {l}: {e}")))
        .collect();
    events.sort_by_key(|e| e["seq"].as_u64());
    events
}

/// Checks a log and the streams it folds to against every acknowledged
/// append: each is there with its seq, stream, version and body; the chain
/// has no gap; each stream's version counts its events, its counters sum
/// their adds and each field shows its last write.
fn check(
    author: &str,
    log: &[Value],
    streams: &BTreeMap<String, Value>,
    acked: &BTreeMap<String, Ack>,
    ctx: &str,
) {
    let mut by_id = BTreeMap::new();
    let mut in_stream: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    // The position of each event in its stream: its version.
    let mut version = BTreeMap::new();
    for (i, e) in log.iter().enumerate() {
        assert_eq!(
            e["seq"],
            json!(i as u64 + 1),
            "{ctx}: the chain has a gap or a repeat at {i}"
        );
        assert_eq!(e["author"], json!(author), "{ctx}: {e}");
        let id = e["id"].as_str().expect("an id");
        let stream = e["stream"].as_str().expect("a stream");
        let events = in_stream.entry(stream).or_default();
        events.push(e);
        version.insert(id, events.len() as u64);
        by_id.insert(id, e);
    }
    for a in acked.values() {
        let Some(e) = by_id.get(a.id.as_str()) else {
            panic!(
                "{ctx}: acknowledged event {} (seq {}, stream {}, command {:?}) is missing; \
                 the log holds {} events",
                a.id,
                a.seq,
                a.stream,
                a.command_id(),
                log.len()
            );
        };
        let what = format!("{ctx}: acknowledged event {} (seq {})", a.id, a.seq);
        assert_eq!(e["seq"], json!(a.seq), "{what}: another seq: {e}");
        assert_eq!(e["stream"], json!(a.stream), "{what}: another stream");
        assert_eq!(version[a.id.as_str()], a.version, "{what}: another version");
        assert_eq!(e["kind"], a.body["kind"], "{what}: another kind");
        assert_eq!(e["payload"], a.body["payload"], "{what}: another payload");
        assert_eq!(e["meta"]["command_id"], a.body["command_id"], "{what}");
        assert_eq!(e["meta"]["user"], a.body["user"], "{what}");
        assert_eq!(ops_of_event(e), ops_of_body(&a.body), "{what}: other ops");
    }
    let held: usize = in_stream.values().map(Vec::len).sum();
    assert_eq!(held, log.len());
    for (name, s) in streams {
        let events = in_stream.get(name.as_str()).map_or(&[][..], |v| &v[..]);
        let n = events.len() as u64;
        let what = format!("{ctx}: stream {name}");
        assert_eq!(s["version"], json!(n), "{what}: version vs its {n} events");
        let mut sums: BTreeMap<String, Value> = BTreeMap::new();
        let mut last: BTreeMap<&str, &Value> = BTreeMap::new();
        for e in events {
            for ((kind, name), v) in ops_of_event(e) {
                if kind == "add" {
                    let sum = sums.get(&name).and_then(Value::as_i64).unwrap_or(0);
                    sums.insert(name, json!(sum + v.as_i64().expect("a delta")));
                }
            }
            for op in e["ops"].as_array().expect("ops") {
                if let Some(set) = op.get("set") {
                    last.insert(set["field"].as_str().expect("a field"), &set["value"]);
                }
            }
        }
        // Every append adds 1 to `n`.
        assert_eq!(sums.get("n").cloned(), (n > 0).then(|| json!(n)), "{what}");
        let counters: BTreeMap<String, Value> = s["counters"]
            .as_object()
            .expect("counters")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(counters, sums, "{what}: counters vs the adds of its events");
        let fields = s["fields"].as_object().expect("fields");
        assert_eq!(fields.len(), last.len(), "{what}: fields {fields:?}");
        for (f, v) in last {
            assert_eq!(&fields[f]["value"], v, "{what}: field {f}");
            assert!(fields[f].get("conflict").is_none(), "{what}: field {f}");
        }
    }
    let acked_in = |name: &str| acked.values().filter(|a| a.stream == name).count();
    for name in in_stream.keys() {
        assert!(
            streams.contains_key(*name),
            "{ctx}: an event in a stream no client appended to: {name}"
        );
        assert!(in_stream[name].len() >= acked_in(name), "{ctx}: {name}");
    }
}

fn stream_names() -> Vec<String> {
    (0..STREAMS).map(|s| format!("crash/{s}")).collect()
}

/// The log and the streams, through the running server's HTTP API.
fn served(p: &Proc, ctx: &str) -> (Vec<Value>, BTreeMap<String, Value>) {
    let (code, text) = p.get("/v1/log");
    assert_eq!(code, 200, "{ctx}: GET /v1/log: {text}");
    let log = parse_log(&text, ctx);
    let streams = stream_names()
        .into_iter()
        .map(|s| {
            let v = p.get_json(&format!("/v1/streams/{s}"));
            (s, v)
        })
        .collect();
    let status = p.status();
    assert_eq!(status["events"], json!(log.len()), "{ctx}: status {status}");
    (log, streams)
}

/// The log and the streams as the CLI prints them from the data directory
/// itself (no server runs).
fn read_with_cli(dir: &Path) -> (Vec<Value>, BTreeMap<String, Value>, String) {
    let r = common::weftlog(dir, &["log"]);
    assert_eq!(
        r.code,
        Some(0),
        "weftlog log after the last kill: {}",
        r.stderr
    );
    let log = parse_log(&r.stdout, "weftlog log");
    let mut stderr = r.stderr;
    let streams = stream_names()
        .into_iter()
        .map(|s| {
            let r = common::weftlog(dir, &["get", "--stream", &s]);
            assert_eq!(r.code, Some(0), "weftlog get --stream {s}: {}", r.stderr);
            stderr.push_str(&r.stderr);
            let v = serde_json::from_str(&r.stdout).expect("get prints JSON");
            (s, v)
        })
        .collect();
    (log, streams, stderr)
}

fn torn_tails_in(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(TORN_TAIL)
        .count()
}

#[test]
fn sigkill_during_http_appends_loses_no_acknowledged_event() {
    let iterations = env_count(ITERATIONS_ENV, ITERATIONS_DEFAULT);
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let author = init(&dir);
    let mut p = Proc::start("node", &dir, Opts::default());
    let mut rng = Rng(SEED);
    // Every acknowledged append over all runs, by event id.
    let mut acked: BTreeMap<String, Ack> = BTreeMap::new();
    let mut by_seq: BTreeMap<u64, String> = BTreeMap::new();
    let (mut most_acks, mut retried, mut unknown) = (0, 0, 0);
    let (mut cut_off_found, mut cut_off_redone) = (0, 0);
    let mut torn_tails = 0;
    for iteration in 0..iterations {
        let ctx = format!("seed {SEED:#x}, iteration {iteration}");
        let kill_after = match iteration % 5 {
            0 => 0,
            1 => rng.below(5),
            2 => rng.below(50),
            3 => rng.below(300),
            _ => rng.below(1000),
        } as usize;
        let delay = Duration::from_micros(rng.below(3000));
        let commands: Arc<Vec<Ack>> = Arc::new(
            acked
                .values()
                .filter(|a| a.command_id().is_some())
                .cloned()
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (base, commands) = (p.url(""), commands.clone());
                let (stop, count) = (stop.clone(), count.clone());
                thread::spawn(move || client(base, iteration, t, commands, stop, count))
            })
            .collect();
        let waited = Instant::now();
        while count.load(Ordering::Relaxed) < kill_after {
            assert!(
                !clients.iter().any(|c| c.is_finished()),
                "{ctx}: a client stopped before the kill (see its panic above)"
            );
            assert!(
                waited.elapsed() < DEADLINE,
                "{ctx}: {} of {kill_after} appends acknowledged within {DEADLINE:?}",
                count.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_micros(200));
        }
        thread::sleep(delay);
        p.sigkill();
        stop.store(true, Ordering::Relaxed);
        let mut cut_off = Vec::new();
        let mut acks_now = 0;
        for c in clients {
            let run = c
                .join()
                .unwrap_or_else(|_| panic!("{ctx}: a client failed (see its panic above)"));
            acks_now += run.acks.len();
            retried += run.retried;
            unknown += run.unknown;
            cut_off.extend(run.cut_off);
            for a in run.acks {
                if let Some(old) = by_seq.insert(a.seq, a.id.clone()) {
                    panic!(
                        "{ctx}: seq {} was acknowledged as two different events ({old}, then {}): \
                         an acknowledged event was lost and its seq reused",
                        a.seq, a.id
                    );
                }
                acked.insert(a.id.clone(), a);
            }
        }
        most_acks = most_acks.max(acks_now);

        let torn_before = torn_tails_in(&p.log);
        p.launch();
        torn_tails += torn_tails_in(&p.log) - torn_before;
        let (log, streams) = served(&p, &ctx);
        check(&author, &log, &streams, &acked, &ctx);

        // The requests the kill cut off, sent again with their command id.
        let agent = agent();
        for (stream, body) in cut_off {
            let url = p.url(&format!("/v1/streams/{stream}/events"));
            let (code, v) = post(&agent, &url, &body)
                .unwrap_or_else(|e| panic!("{ctx}: the restarted server: {e}"));
            match code {
                200 => cut_off_found += 1,
                201 => cut_off_redone += 1,
                _ => panic!("{ctx}: a cut-off command sent again answered {code}: {v}"),
            }
            let a = Ack {
                stream,
                id: v["id"].as_str().expect("an id").to_string(),
                seq: v["seq"].as_u64().expect("a seq"),
                version: v["version"].as_u64().expect("a version"),
                body,
            };
            // Found or new, it was never acknowledged before.
            if let Some(old) = by_seq.insert(a.seq, a.id.clone()) {
                panic!(
                    "{ctx}: seq {} acknowledged before as {old}, now as {}",
                    a.seq, a.id
                );
            }
            acked.insert(a.id.clone(), a);
        }
        // Acknowledged commands, sent again to the recovered server.
        if !commands.is_empty() {
            for _ in 0..RETRIES_AFTER_RESTART {
                let a = &commands[rng.below(commands.len() as u64) as usize];
                retry(&agent, &p.url(""), a, &ctx)
                    .unwrap_or_else(|e| panic!("{ctx}: the restarted server: {e}"));
                retried += 1;
            }
        }
    }

    // One more kill with nothing in flight; the CLI, on the directory the
    // server left (its stale http.addr too), reads what it served.
    let ctx = format!("seed {SEED:#x}, after the last restart");
    let (log, streams) = served(&p, &ctx);
    check(&author, &log, &streams, &acked, &ctx);
    p.sigkill();
    let (cli_log, cli_streams, cli_stderr) = read_with_cli(&dir);
    torn_tails += cli_stderr.matches(TORN_TAIL).count();
    check(
        &author,
        &cli_log,
        &cli_streams,
        &acked,
        &format!("{ctx}, CLI"),
    );
    assert_eq!(cli_log, log, "{ctx}: the CLI reads another log");
    assert_eq!(cli_streams, streams, "{ctx}: the CLI folds other streams");

    let commands = acked.values().filter(|a| a.command_id().is_some()).count();
    // Straight to stderr, past libtest's capture: the figures of a long
    // run are its result.
    let _ = writeln!(
        std::io::stderr(),
        "crash_http (seed {SEED:#x}): {} kills, {iterations} restarts, {} acknowledged appends \
         ({commands} with a command id), {} events in the log, {retried} acknowledged commands \
         sent again and answered with their event, {cut_off_found}+{cut_off_redone} cut-off \
         commands found/appended on retry, {unknown} cut-off appends without one, \
         {torn_tails} torn tails cut, at most {most_acks} acks between two kills, {:.1?}",
        iterations + 1,
        acked.len(),
        log.len(),
        t0.elapsed()
    );
}
