//! The SQL read model (`weftlog sql`, `weftlog run --sql`) equals the
//! node's own read model (`get`) for every stream, resumes exactly once
//! after a stop or a SIGKILL (ending identical to a rebuild from scratch),
//! rebuilds when its checkpoint does not match the log, and two nodes
//! mirror equal read models after they sync. SQLite always; PostgreSQL when
//! `WEFTLOG_TEST_POSTGRES` names a server (`.ci/postgres` starts one),
//! each test in a database of its own.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use weftlog::sql::{self, Url};

use common::server::{self, Opts, Proc, DEADLINE};
use common::succeeds;

/// A fresh PostgreSQL database named after the test, or `None` (the test
/// says it skipped) without `WEFTLOG_TEST_POSTGRES`.
fn postgres_db(test: &str) -> Option<String> {
    let Ok(base) = std::env::var("WEFTLOG_TEST_POSTGRES") else {
        eprintln!("skipped: WEFTLOG_TEST_POSTGRES not set");
        return None;
    };
    let name = format!("weftlog_{test}_{}", std::process::id());
    let mut c = postgres::Client::connect(&base, postgres::NoTls).expect("connect to PostgreSQL");
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    // The database is the URL's path; keep the rest (host, port, user).
    let (head, _) = base.rsplit_once('/').expect("a URL with a database path");
    let query = base.split_once('?').map(|(_, q)| format!("?{q}"));
    Some(format!("{head}/{name}{}", query.unwrap_or_default()))
}

fn json_line(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn sql_cli(dir: &Path, url: &str, rebuild: bool) -> Value {
    let mut args = vec!["sql", "--url", url];
    if rebuild {
        args.push("--rebuild");
    }
    json_line(&succeeds(dir, &args))
}

/// A number as `get` prints it (a JSON number or a decimal string), as text.
fn num(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cell(row: &[Option<String>], i: usize) -> &str {
    row[i].as_deref().unwrap_or("NULL")
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("column is not JSON ({e}): {s}"))
}

/// Per stream, the read model the SQL tables hold, in a shape both sides
/// can be brought to: version, fields (value; the standing writes when more
/// than one), counters, escrow (capacity, consumed, rights), numbers as
/// text.
fn sql_model(d: &sql::Dump) -> Map<String, Value> {
    let mut out = Map::new();
    for r in &d["streams"] {
        out.insert(
            cell(r, 0).into(),
            json!({"version": cell(r, 1), "fields": {}, "counters": {}, "escrow": {}}),
        );
    }
    for r in &d["fields"] {
        let standing = parse(cell(r, 4));
        let conflict = matches!(cell(r, 3), "1" | "true");
        assert_eq!(
            conflict,
            standing.as_array().unwrap().len() > 1,
            "conflict flag and standing writes disagree: {r:?}"
        );
        assert_eq!(
            standing[0]["value"],
            parse(cell(r, 2)),
            "shown value is the first standing: {r:?}"
        );
        out[cell(r, 0)]["fields"][cell(r, 1)] = json!({
            "value": parse(cell(r, 2)),
            "conflict": if conflict { standing } else { Value::Null },
        });
    }
    for r in &d["counters"] {
        out[cell(r, 0)]["counters"][cell(r, 1)] = json!(cell(r, 2));
    }
    for r in &d["escrow"] {
        out[cell(r, 0)]["escrow"][cell(r, 1)] =
            json!({"capacity": cell(r, 2), "consumed": cell(r, 3), "rights": {}});
    }
    for r in &d["escrow_rights"] {
        out[cell(r, 0)]["escrow"][cell(r, 1)]["rights"][cell(r, 2)] = json!(cell(r, 3));
    }
    out
}

/// `get`'s output for one stream in [`sql_model`]'s shape.
fn get_model(v: &Value) -> Value {
    let mut fields = Map::new();
    for (f, x) in v["fields"].as_object().unwrap() {
        fields.insert(
            f.clone(),
            json!({"value": x["value"], "conflict": x.get("conflict").cloned().unwrap_or(Value::Null)}),
        );
    }
    let counters: Map<String, Value> = v["counters"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(c, n)| (c.clone(), json!(num(n))))
        .collect();
    let escrow: Map<String, Value> = v["escrow"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(c, e)| {
            let rights: Map<String, Value> = e["rights"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(n, r)| (n.clone(), json!(num(r))))
                .collect();
            (
                c.clone(),
                json!({"capacity": num(&e["capacity"]), "consumed": num(&e["consumed"]), "rights": rights}),
            )
        })
        .collect();
    json!({"version": v["version"].to_string(), "fields": fields, "counters": counters, "escrow": escrow})
}

/// The database at `url` holds `events` events and, for every stream, what
/// `get` shows; returns the dump.
fn assert_matches_get(url: &str, events: u64, get: impl Fn(&str) -> Value) -> sql::Dump {
    let d = sql::dump(&Url::parse(url).unwrap()).unwrap();
    assert_eq!(d["events"].len() as u64, events, "{url}: events rows");
    assert_eq!(
        cell(&d["weftlog_checkpoint"][0], 2),
        events.to_string(),
        "{url}: checkpoint position"
    );
    let streams: std::collections::BTreeSet<&str> =
        d["events"].iter().map(|r| cell(r, 5)).collect();
    let model = sql_model(&d);
    assert_eq!(
        model
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        streams,
        "{url}: the streams table names every stream of the events"
    );
    for (stream, rows) in &model {
        assert_eq!(rows, &get_model(&get(stream)), "{url}: stream {stream}");
    }
    d
}

fn cli_get(dir: &Path) -> impl Fn(&str) -> Value + '_ {
    move |s| json_line(&succeeds(dir, &["get", "--stream", s]))
}

fn status_events(dir: &Path) -> u64 {
    json_line(&succeeds(dir, &["status"]))["events"]
        .as_u64()
        .unwrap()
}

/// Two nodes (CLI, export/import): a field in conflict, counters (one past
/// 64 bits), escrow with rights moved and used, a payload, a user and a
/// command id. Returns A's dir.
fn small_log(root: &Path) -> std::path::PathBuf {
    let (a, b) = (root.join("a"), root.join("b"));
    server::init(&a);
    let b_id = server::init(&b);
    let ap = |args: &[&str]| {
        succeeds(&a, &[&["append"][..], args].concat());
    };
    ap(&[
        "--stream",
        "customer/1",
        "--kind",
        "Registered",
        "--set",
        "name=\"Ada\"",
        "--set",
        "email=\"ada@example.org\"",
        "--add",
        "visits=3",
        "--user",
        "desk-1",
        "--command-id",
        "reg-1",
        "--payload",
        "{\"via\":\"desk\"}",
    ]);
    ap(&[
        "--stream",
        "venue/1",
        "--kind",
        "Opened",
        "--escrow-init",
        "seats=10",
    ]);
    ap(&[
        "--stream",
        "venue/1",
        "--kind",
        "Moved",
        "--escrow-transfer",
        &format!("seats={b_id}:4"),
    ]);
    ap(&[
        "--stream",
        "venue/1",
        "--kind",
        "Sold",
        "--escrow-consume",
        "seats=2",
    ]);
    ap(&[
        "--stream",
        "big/1",
        "--kind",
        "Grew",
        "--add",
        "n=9223372036854775807",
    ]);
    ap(&[
        "--stream",
        "big/1",
        "--kind",
        "Grew",
        "--add",
        "n=9223372036854775807",
    ]);
    let exchange = |from: &Path, to: &Path| {
        let file = root.join("x.weft");
        succeeds(from, &["export", "--out", file.to_str().unwrap()]);
        succeeds(to, &["import", file.to_str().unwrap()]);
    };
    exchange(&a, &b);
    // Both rename concurrently: a conflict once they exchange.
    succeeds(
        &b,
        &[
            "append",
            "--stream",
            "customer/1",
            "--kind",
            "Renamed",
            "--set",
            "name=\"Bea\"",
        ],
    );
    succeeds(
        &b,
        &[
            "append",
            "--stream",
            "venue/1",
            "--kind",
            "Sold",
            "--escrow-consume",
            "seats=1",
        ],
    );
    ap(&[
        "--stream",
        "customer/1",
        "--kind",
        "Renamed",
        "--set",
        "name=\"Ann\"",
    ]);
    exchange(&b, &a);
    a
}

fn small_log_case(url: &str) {
    let root = tempfile::tempdir().unwrap();
    let a = small_log(root.path());
    let events = status_events(&a);
    let out = sql_cli(&a, url, false);
    assert_eq!(out["position"], events);
    assert_eq!(out["rebuilt"], "a new database");
    let d = assert_matches_get(url, events, cli_get(&a));
    let name = d["fields"]
        .iter()
        .find(|r| cell(r, 0) == "customer/1" && cell(r, 1) == "name")
        .expect("customer/1 name row");
    assert!(
        matches!(cell(name, 3), "1" | "true"),
        "name is in conflict: {name:?}"
    );
    assert_eq!(parse(cell(name, 4)).as_array().unwrap().len(), 2);
    let big = d["counters"]
        .iter()
        .find(|r| cell(r, 0) == "big/1")
        .unwrap();
    assert_eq!(cell(big, 2), "18446744073709551614");
    let reg = d["events"]
        .iter()
        .find(|r| cell(r, 6) == "Registered")
        .unwrap();
    assert_eq!((cell(reg, 7), cell(reg, 8)), ("desk-1", "reg-1"));
    assert_eq!(parse(cell(reg, 9)), json!({"via": "desk"}));
    let rights = &d["escrow_rights"];
    assert_eq!(rights.len(), 2, "{rights:?}");
    let total: u64 = rights
        .iter()
        .map(|r| cell(r, 3).parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 10 - 3, "rights left: capacity less seats sold");
    if let Url::Sqlite(path) = Url::parse(url).unwrap() {
        // Past 64 bits the counter is text, below an integer.
        let c = rusqlite::Connection::open(path).unwrap();
        let ty = |s: &str| -> String {
            c.query_row(
                "SELECT typeof(value) FROM counters WHERE stream = ?1",
                [s],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(
            (ty("big/1").as_str(), ty("customer/1").as_str()),
            ("text", "integer")
        );
    }
    // Again: nothing new to mirror, the checkpoint resumes.
    let again = sql_cli(&a, url, false);
    assert_eq!(
        (again["mirrored"].as_u64(), &again["rebuilt"]),
        (Some(0), &Value::Null)
    );
}

#[test]
fn small_log_rows_equal_get_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    small_log_case(&format!("sqlite:{}", dir.path().join("r.db").display()));
}

#[test]
fn small_log_rows_equal_get_postgres() {
    if let Some(url) = postgres_db("small") {
        small_log_case(&url);
    }
}

/// Appends `n` events of several kinds to a stopped node.
fn append_some(dir: &Path, tag: &str, n: usize) {
    for i in 0..n {
        let stream = format!("s/{}", i % 3);
        let set = format!("f{}=\"{tag}{i}\"", i % 2);
        succeeds(
            dir,
            &[
                "append", "--stream", &stream, "--kind", "Edited", "--set", &set, "--add", "n=1",
            ],
        );
    }
}

fn resume_and_mismatch_case(url: &str, other: &str) {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a");
    server::init(&a);
    append_some(&a, "x", 6);
    let backup = root.path().join("backup");
    server::copy_dir(&a, &backup);
    assert_eq!(sql_cli(&a, url, false)["position"], 6);
    // Resume after a stop: only the new events are mirrored.
    append_some(&a, "y", 5);
    let out = sql_cli(&a, url, false);
    assert_eq!(
        (out["mirrored"].as_u64(), &out["rebuilt"]),
        (Some(5), &Value::Null)
    );
    let resumed = assert_matches_get(url, 11, cli_get(&a));
    sql_cli(&a, other, true);
    assert_eq!(
        resumed,
        sql::dump(&Url::parse(other).unwrap()).unwrap(),
        "resumed == rebuilt"
    );

    // The log restored from the backup, then other events: position 11
    // names another event, so the mirror rebuilds.
    std::fs::remove_dir_all(&a).unwrap();
    server::copy_dir(&backup, &a);
    append_some(&a, "z", 7);
    let out = sql_cli(&a, url, false);
    let why = out["rebuilt"].as_str().expect("rebuilt");
    assert!(why.contains("the event at position 11"), "{why}");
    assert_matches_get(url, 13, cli_get(&a));

    // Another epoch: rebuilt.
    std::fs::write(a.join("epoch"), "00000000000000ab").unwrap();
    let out = sql_cli(&a, url, false);
    let why = out["rebuilt"].as_str().expect("rebuilt");
    assert!(why.contains("epoch"), "{why}");
    assert_matches_get(url, 13, cli_get(&a));
}

#[test]
fn resume_and_mismatch_rebuild_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = |n: &str| format!("sqlite:{}", dir.path().join(n).display());
    resume_and_mismatch_case(&db("r.db"), &db("other.db"));
}

#[test]
fn resume_and_mismatch_rebuild_postgres() {
    if let (Some(url), Some(other)) = (postgres_db("resume"), postgres_db("resume_other")) {
        resume_and_mismatch_case(&url, &other);
    }
}

/// Waits until the mirror at `url` has reached `events`.
fn await_mirrored(url: &str, events: u64, p: &Proc) {
    let url = Url::parse(url).unwrap();
    let t0 = Instant::now();
    loop {
        let at = sql::checkpoint(&url).ok().flatten().map(|c| c.position);
        if at == Some(events) {
            return;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "{}: the mirror is at {at:?}, not {events}; stderr:\n{}",
            p.name,
            server::tail(&p.log, 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn sigkill_case(url: &str, rebuilt: &str) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    server::init(&dir);
    let mut p = Proc::start(
        "a",
        &dir,
        Opts {
            extra: vec!["--sql", url],
            ..Opts::default()
        },
    );
    p.append(
        "venue1",
        json!({"kind": "Opened", "escrow_init": {"seats": 1_000_000}}),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, done, http) = (stop.clone(), done.clone(), p.http.clone());
        thread::spawn(move || {
            let agent = server::agent();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = if i.is_multiple_of(5) {
                    json!({"kind": "Sold", "escrow_consume": {"seats": 1}})
                } else {
                    json!({"kind": "Edited", "set": {format!("f{}", i % 4): i}, "add": {"n": 1}})
                };
                let stream = if i.is_multiple_of(5) {
                    "venue1".to_string()
                } else {
                    format!("s{}", i % 7)
                };
                let url = format!("http://{http}/v1/streams/{stream}/events");
                match server::post(&agent, &url, &body) {
                    Ok((201, _)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
                i += 1;
            }
        })
    };
    // Killed while the mirror follows the appends.
    let t0 = Instant::now();
    while done.load(Ordering::Relaxed) < 150 && t0.elapsed() < DEADLINE {
        thread::sleep(Duration::from_millis(5));
    }
    p.sigkill();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        done.load(Ordering::Relaxed) >= 150,
        "appends went through before the kill"
    );
    p.launch();
    for i in 0..40 {
        p.append(
            &format!("s{}", i % 3),
            json!({"kind": "After", "set": {"g": i}, "add": {"n": 2}}),
        );
    }
    let events = p.status()["events"].as_u64().unwrap();
    await_mirrored(url, events, &p);
    let get = |s: &str| p.get_json(&format!("/v1/streams/{s}"));
    assert_matches_get(url, events, get);
    p.sigterm();
    // The final checkpoint (with its hash) is written at the stop; a
    // rebuild from scratch writes the same database.
    let live = sql::dump(&Url::parse(url).unwrap()).unwrap();
    sql_cli(&dir, rebuilt, true);
    assert_eq!(
        live,
        sql::dump(&Url::parse(rebuilt).unwrap()).unwrap(),
        "live+SIGKILL == rebuilt"
    );
}

#[test]
fn sigkill_while_mirroring_resumes_to_a_rebuild_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = |n: &str| format!("sqlite:{}", dir.path().join(n).display());
    sigkill_case(&db("live.db"), &db("rebuilt.db"));
}

#[test]
fn sigkill_while_mirroring_resumes_to_a_rebuild_postgres() {
    if let (Some(url), Some(other)) = (postgres_db("kill"), postgres_db("kill_rebuilt")) {
        sigkill_case(&url, &other);
    }
}

/// A row of a read-model table with its JSON cells parsed and booleans
/// spelled one way, so two backends compare.
fn normal(rows: &[Vec<Option<String>>]) -> Vec<Vec<Value>> {
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|c| match c.as_deref() {
                    None => Value::Null,
                    Some("true") => json!(1),
                    Some("false") => json!(0),
                    Some(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                })
                .collect()
        })
        .collect()
}

#[test]
fn two_nodes_two_databases_equal_after_sync() {
    let root = tempfile::tempdir().unwrap();
    let (da, db) = (root.path().join("a"), root.path().join("b"));
    server::init(&da);
    server::init(&db);
    let url_a = format!("sqlite:{}", root.path().join("a.db").display());
    // B mirrors into PostgreSQL when there is one: two backends, one model.
    let url_b = postgres_db("two")
        .unwrap_or_else(|| format!("sqlite:{}", root.path().join("b.db").display()));
    let a = Proc::start(
        "a",
        &da,
        Opts {
            extra: vec!["--sql", &url_a],
            ..Opts::default()
        },
    );
    let b = Proc::start(
        "b",
        &db,
        Opts {
            peers: vec![a.quic.clone()],
            extra: vec!["--sql", &url_b],
            ..Opts::default()
        },
    );
    a.append(
        "venue",
        json!({"kind": "Opened", "escrow_init": {"seats": 50}}),
    );
    a.append("venue", json!({"kind": "Moved", "escrow_transfer": [{"counter": "seats", "to": b.id, "amount": 20}]}));
    for i in 0..30 {
        let (p, q) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        p.append(
            &format!("s{}", i % 4),
            json!({"kind": "Edited", "set": {"who": q, format!("f{i}"): i}, "add": {"n": 1}}),
        );
    }
    server::converge_to(&[&a, &b], 32);
    b.append(
        "venue",
        json!({"kind": "Sold", "escrow_consume": {"seats": 3}}),
    );
    // The sale may add a rights transfer (rebalancing), which can arrive
    // after the states first look equal at 33: wait for equal states of at
    // least the 33 events appended, both mirrors at that count, and the
    // states still equal at that count after.
    let t0 = Instant::now();
    let at = |url: &str| {
        sql::checkpoint(&Url::parse(url).unwrap())
            .ok()
            .flatten()
            .map(|c| c.position)
    };
    let events = loop {
        let (sa, sb) = (a.status(), b.status());
        let n = sa["events"].as_u64().unwrap();
        if sa["state_hash"] == sb["state_hash"]
            && n >= 33
            && at(&url_a) == Some(n)
            && at(&url_b) == Some(n)
            && a.status()["state_hash"] == sa["state_hash"]
            && b.status()["state_hash"] == sb["state_hash"]
        {
            break n;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "no convergence: {sa} {sb}; mirrors at {:?} and {:?}; stderr of a:\n{}",
            at(&url_a),
            at(&url_b),
            server::tail(&a.log, 30)
        );
        thread::sleep(Duration::from_millis(50));
    };
    let da_ = assert_matches_get(&url_a, events, |s| a.get_json(&format!("/v1/streams/{s}")));
    let db_ = assert_matches_get(&url_b, events, |s| b.get_json(&format!("/v1/streams/{s}")));
    for t in ["streams", "fields", "counters", "escrow", "escrow_rights"] {
        assert_eq!(normal(&da_[t]), normal(&db_[t]), "table {t}");
    }
    let ids = |d: &sql::Dump| {
        let mut v: Vec<String> = d["events"].iter().map(|r| cell(r, 1).to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&da_), ids(&db_));
}
