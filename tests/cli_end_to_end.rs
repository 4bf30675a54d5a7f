//! Guards the `weftlog` command line end to end, through the real binary on
//! real data directories: the JSON each command prints, the errors it gives
//! (one sentence on stderr, non-zero exit, nothing written), and two nodes
//! that edit offline, exchange export files both ways and converge.

mod common;

use common::{fails, weftlog};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Runs a command that must succeed; returns its stdout.
fn ok(data: &Path, args: &[&str]) -> String {
    let r = weftlog(data, args);
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

/// Runs a command that must print one JSON object.
fn json(data: &Path, args: &[&str]) -> Value {
    let out = ok(data, args);
    assert_eq!(
        out.lines().count(),
        1,
        "weftlog {args:?} printed more than one line: {out}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("weftlog {args:?}: {e}: {out}"))
}

/// Runs a command that prints one JSON object per line.
fn json_lines(data: &Path, args: &[&str]) -> Vec<Value> {
    ok(data, args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}")))
        .collect()
}

/// Every file in the data directory and its bytes (the lock file aside).
fn files(data: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .expect("read data dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n != "LOCK") {
                let bytes = fs::read(&p).expect("read file");
                out.push((p, bytes));
            }
        }
    }
    let mut out = Vec::new();
    walk(data, &mut out);
    out
}

/// What must not change when a command is refused: `status` and every byte
/// of the data directory.
fn snapshot(data: &Path) -> (Value, Vec<(PathBuf, Vec<u8>)>) {
    (json(data, &["status"]), files(data))
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set_of<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

fn init(data: &Path) -> String {
    let v = json(data, &["init"]);
    v["node"].as_str().expect("node id").to_string()
}

fn hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The `(hlc, author, seq)` of a `log` line: the canonical order key.
fn order_key(e: &Value) -> (u64, String, u64) {
    (
        e["hlc"].as_u64().expect("hlc"),
        e["author"].as_str().expect("author").to_string(),
        e["seq"].as_u64().expect("seq"),
    )
}

#[test]
fn init_prints_node_and_data_and_refuses_a_second_init() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let v = json(&data, &["init"]);
    assert_eq!(keys(&v), set_of(&["node", "data"]));
    assert!(hex64(v["node"].as_str().unwrap()), "{v}");
    assert_eq!(v["data"], data.display().to_string());
    let status = json(&data, &["status"]);
    assert_eq!(status["node"], v["node"]);
    assert_eq!(status["events"], 0);

    let before = files(&data);
    let err = fails(&data, &["init"]);
    assert!(err.contains("already holds a node"), "{err}");
    assert!(err.contains(&data.display().to_string()), "{err}");
    assert_eq!(files(&data), before, "a refused init changed the directory");
    assert_eq!(json(&data, &["status"])["node"], v["node"]);
}

#[test]
fn append_prints_the_event_and_get_shows_fields_counters_and_escrow() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let me = init(&data);
    let other = init(&tmp.path().join("other"));

    let a = json(
        &data,
        &[
            "append",
            "--stream",
            "customer/20",
            "--kind",
            "CustomerRegistered",
            "--set",
            "name=\"Ada\"",
            "--set",
            "address={\"city\":\"London\",\"zip\":null}",
            "--add",
            "visits=3",
            "--add",
            "visits=-1",
            "--escrow-init",
            "seats=10",
            "--payload",
            "{\"b\": 1, \"a\": [true]}",
            "--user",
            "desk-a",
        ],
    );
    assert_eq!(
        keys(&a),
        set_of(&["id", "author", "seq", "hlc", "stream", "version"])
    );
    assert!(hex64(a["id"].as_str().unwrap()), "{a}");
    assert_eq!(a["author"], me.as_str());
    assert_eq!(a["seq"], 1);
    assert!(a["hlc"].as_u64().unwrap() > 0);
    assert_eq!(a["stream"], "customer/20");
    assert_eq!(a["version"], 1);

    let transfer = format!("seats={other}:4");
    let b = json(
        &data,
        &[
            "append",
            "--stream",
            "customer/20",
            "--kind",
            "SeatsMoved",
            "--escrow-transfer",
            &transfer,
            "--escrow-consume",
            "seats=2",
        ],
    );
    assert_eq!(b["seq"], 2);
    assert_eq!(b["version"], 2);
    assert!(b["hlc"].as_u64() > a["hlc"].as_u64());

    let g = json(&data, &["get", "--stream", "customer/20"]);
    assert_eq!(
        keys(&g),
        set_of(&["stream", "version", "fields", "counters", "escrow"])
    );
    assert_eq!(g["stream"], "customer/20");
    assert_eq!(g["version"], 2);
    assert_eq!(g["fields"]["name"], serde_json::json!({ "value": "Ada" }));
    assert_eq!(
        g["fields"]["address"],
        serde_json::json!({ "value": { "city": "London", "zip": null } })
    );
    assert_eq!(g["counters"], serde_json::json!({ "visits": 2 }));
    let seats = &g["escrow"]["seats"];
    assert_eq!(
        keys(seats),
        set_of(&[
            "capacity", "consumed", "rights", "policy", "oversold", "void", "waitlist", "honoured",
            "released"
        ])
    );
    // No policy set: escrow, with nothing oversold.
    assert_eq!(seats["policy"]["mode"], "escrow");
    assert_eq!(seats["oversold"], serde_json::json!({}));
    assert_eq!(seats["void"], serde_json::json!({}));
    assert_eq!(seats["waitlist"], serde_json::json!([]));
    assert_eq!(
        (&seats["honoured"], &seats["released"]),
        (&0.into(), &0.into())
    );
    assert_eq!(seats["capacity"], 10);
    assert_eq!(seats["consumed"], 2);
    assert_eq!(seats["rights"][&me], 4);
    assert_eq!(seats["rights"][&other], 4);

    // An unknown stream is empty, not an error.
    let empty = json(&data, &["get", "--stream", "customer/404"]);
    assert_eq!(empty["version"], 0);
    assert_eq!(empty["fields"], serde_json::json!({}));

    // `log` shows what was recorded: user, payload, ops.
    let log = json_lines(&data, &["log"]);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["id"], a["id"]);
    assert_eq!(log[0]["kind"], "CustomerRegistered");
    assert_eq!(log[0]["meta"]["user"], "desk-a");
    assert_eq!(
        log[0]["payload"],
        serde_json::json!({ "a": [true], "b": 1 })
    );
    assert_eq!(log[0]["prev"], Value::Null);
    assert_eq!(log[1]["prev"], a["id"]);
    assert_eq!(log[1]["payload"], Value::Null);
    assert_eq!(log[1]["ops"].as_array().unwrap().len(), 2);
}

#[test]
fn expect_version_mismatch_names_both_versions_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let set = |v: &str| format!("email=\"{v}\"");
    json(
        &data,
        &[
            "append",
            "--stream",
            "c/1",
            "--kind",
            "K",
            "--set",
            &set("a"),
        ],
    );
    let ok2 = json(
        &data,
        &[
            "append",
            "--stream",
            "c/1",
            "--kind",
            "K",
            "--set",
            &set("b"),
            "--expect-version",
            "1",
        ],
    );
    assert_eq!(ok2["version"], 2);

    let before = snapshot(&data);
    let err = fails(
        &data,
        &[
            "append",
            "--stream",
            "c/1",
            "--kind",
            "K",
            "--set",
            &set("c"),
            "--expect-version",
            "1",
        ],
    );
    assert!(err.contains("expected version 1"), "{err}");
    assert!(err.contains("at version 2"), "{err}");
    assert!(err.contains("c/1"), "{err}");
    assert_eq!(snapshot(&data), before, "a refused append wrote something");

    // Version 0 is "the stream must not exist yet".
    let err = fails(
        &data,
        &[
            "append",
            "--stream",
            "c/1",
            "--kind",
            "K",
            "--expect-version",
            "0",
        ],
    );
    assert!(
        err.contains("expected version 0") && err.contains("at version 2"),
        "{err}"
    );
    let fresh = json(
        &data,
        &[
            "append",
            "--stream",
            "c/2",
            "--kind",
            "K",
            "--expect-version",
            "0",
        ],
    );
    assert_eq!(fresh["version"], 1);
}

#[test]
fn command_id_twice_in_a_stream_returns_the_first_event_and_appends_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let args = [
        "append",
        "--stream",
        "order/7",
        "--kind",
        "SeatsPurchased",
        "--add",
        "seats=2",
        "--command-id",
        "cmd-42",
    ];
    let first = json(&data, &args);
    assert_eq!(first.get("existing"), None);
    let before = snapshot(&data);
    let second = json(&data, &args);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["seq"], first["seq"]);
    assert_eq!(second["hlc"], first["hlc"]);
    assert_eq!(second["version"], first["version"]);
    assert_eq!(second["existing"], true);
    assert_eq!(snapshot(&data), before, "a repeated command appended");

    // The same command id with a different body, in the same stream, is
    // still the first event.
    let third = json(
        &data,
        &[
            "append",
            "--stream",
            "order/7",
            "--kind",
            "Other",
            "--command-id",
            "cmd-42",
        ],
    );
    assert_eq!(third["id"], first["id"]);
    assert_eq!(third["existing"], true);
    assert_eq!(snapshot(&data), before);
    let g = json(&data, &["get", "--stream", "order/7"]);
    assert_eq!(g["counters"]["seats"], 2);
    assert_eq!(g["version"], 1);

    // The key is (stream, command id): in another stream it is another
    // command.
    let other = json(
        &data,
        &[
            "append",
            "--stream",
            "order/8",
            "--kind",
            "Other",
            "--command-id",
            "cmd-42",
        ],
    );
    assert_eq!(other.get("existing"), None);
    assert_eq!(other["stream"], "order/8");
    assert_ne!(other["id"], first["id"]);
}

#[test]
fn bad_flags_are_refused_with_a_clear_error_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let me = init(&data);
    json(
        &data,
        &[
            "append",
            "--stream",
            "ev/1",
            "--kind",
            "Opened",
            "--escrow-init",
            "seats=5",
            "--set",
            "title=\"Keynote\"",
        ],
    );
    let before = snapshot(&data);
    let base = ["append", "--stream", "ev/1", "--kind", "K"];
    let cases: &[(&[&str], &[&str])] = &[
        (&["--set", "title"], &["--set", "\"title\"", "FIELD=JSON"]),
        (&["--set", "=\"x\""], &["--set", "FIELD=JSON"]),
        (
            &["--set", "title=Keynote"],
            &["--set title=Keynote", "is not JSON"],
        ),
        (&["--set", "title={\"a\":"], &["is not JSON"]),
        (&["--payload", "{not json}"], &["--payload", "is not JSON"]),
        (&["--add", "n=abc"], &["--add", "\"abc\"", "not an integer"]),
        (&["--add", "n"], &["--add", "COUNTER=INT"]),
        (&["--escrow-init", "seats=-3"], &["--escrow-init", "\"-3\""]),
        (
            &["--escrow-transfer", "seats=zz:3"],
            &["--escrow-transfer", "node id", "64 hex digits", "\"zz\""],
        ),
        (
            &["--escrow-transfer", "seats=abcdef:1"],
            &["--escrow-transfer", "node id", "64 hex digits"],
        ),
        (
            &["--escrow-transfer", "seats=3"],
            &["--escrow-transfer", "COUNTER=NODE:N"],
        ),
        (
            &["--escrow-consume", "seats=6"],
            &["escrow \"seats\"", "rights to 5", "needs 6"],
        ),
        (
            &["--escrow-consume", "nosuch=1"],
            &["escrow \"nosuch\"", "rights to 0", "needs 1"],
        ),
        (
            &["--escrow-consume", "seats=0"],
            &["seats", "amount is zero"],
        ),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let err = fails(&data, &args);
        for w in *want {
            assert!(err.contains(w), "weftlog {args:?}: {err:?} lacks {w:?}");
        }
        assert_eq!(snapshot(&data), before, "weftlog {args:?} wrote something");
    }
    // Rights cannot move to their own holder.
    let to_self = format!("seats={me}:1");
    let err = fails(
        &data,
        &[&base[..], &["--escrow-transfer", &to_self]].concat(),
    );
    assert!(
        err.contains("seats") && err.contains("its own author"),
        "{err}"
    );
    assert_eq!(snapshot(&data), before);
    // Rights are per op in order: init then consume in one event is fine,
    // consuming more than that is not.
    let err = fails(
        &data,
        &[
            "append",
            "--stream",
            "ev/2",
            "--kind",
            "K",
            "--escrow-init",
            "s=2",
            "--escrow-consume",
            "s=3",
        ],
    );
    assert!(
        err.contains("rights to 2") && err.contains("needs 3"),
        "{err}"
    );
    assert_eq!(snapshot(&data), before);
}

#[test]
fn log_prints_canonical_order_and_filters_by_stream_and_conflicts_and_status_have_their_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let me = init(&data);
    let mut ids = Vec::new();
    for i in 0..6 {
        let stream = if i % 2 == 0 { "a/1" } else { "b/1" };
        let v = json(
            &data,
            &["append", "--stream", stream, "--kind", "K", "--add", "n=1"],
        );
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let log = json_lines(&data, &["log"]);
    assert_eq!(log.len(), 6);
    let got: Vec<&str> = log.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids, "one node's events in append order");
    assert!(log.windows(2).all(|w| order_key(&w[0]) < order_key(&w[1])));
    for e in &log {
        assert_eq!(
            keys(e),
            set_of(&[
                "id", "author", "seq", "prev", "deps", "hlc", "stream", "kind", "ops", "payload",
                "meta"
            ])
        );
    }
    let only_b = json_lines(&data, &["log", "--stream", "b/1"]);
    let expect_b: Vec<&Value> = log.iter().filter(|e| e["stream"] == "b/1").collect();
    assert_eq!(only_b.iter().collect::<Vec<_>>(), expect_b);
    assert!(json_lines(&data, &["log", "--stream", "none"]).is_empty());

    assert!(json_lines(&data, &["conflicts"]).is_empty());

    let s = json(&data, &["status"]);
    assert_eq!(
        keys(&s),
        set_of(&[
            "node",
            "events",
            "forks",
            "frontier",
            "state_hash",
            "ahead",
            "equivocations",
            "non_members"
        ])
    );
    assert_eq!(s["equivocations"], serde_json::json!([]));
    assert_eq!(s["non_members"], Value::Null, "no member list");
    assert_eq!(
        s["ahead"],
        serde_json::json!({"bound_ms": 60_000, "events": 0, "furthest": null})
    );
    assert_eq!(s["node"], me.as_str());
    assert_eq!(s["events"], 6);
    assert!(hex64(s["state_hash"].as_str().unwrap()));
    let f = s["frontier"].as_object().unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[&me], serde_json::json!({ "seq": 6, "head": ids[5] }));
}

#[test]
fn get_as_of_shows_the_state_before_a_later_change() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let append = |field: &str| {
        json(
            &data,
            &[
                "append", "--stream", "c/1", "--kind", "K", "--set", field, "--add", "n=1",
            ],
        )
    };
    let h1 = append("email=\"old@x\"")["hlc"].as_u64().unwrap();
    let h2 = append("email=\"new@x\"")["hlc"].as_u64().unwrap();
    let h3 = append("phone=\"123\"")["hlc"].as_u64().unwrap();
    assert!(h1 < h2 && h2 < h3);

    let at = |h: u64| {
        json(
            &data,
            &["get", "--stream", "c/1", "--as-of", &h.to_string()],
        )
    };
    let v1 = at(h1);
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["fields"]["email"]["value"], "old@x");
    assert_eq!(v1["fields"].get("phone"), None);
    assert_eq!(v1["counters"]["n"], 1);
    let v2 = at(h3 - 1);
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["fields"]["email"]["value"], "new@x");
    assert_eq!(v2["fields"].get("phone"), None);
    assert_eq!(at(h3), json(&data, &["get", "--stream", "c/1"]));
    assert_eq!(at(h1 - 1)["version"], 0);
}

#[test]
fn two_nodes_edit_offline_exchange_exports_and_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let file = |name: &str| tmp.path().join(name);
    let a = init(&da);
    let b = init(&db);
    let append = |data: &Path, stream: &str, kind: &str, flags: &[&str]| -> Value {
        let mut args = vec!["append", "--stream", stream, "--kind", kind];
        args.extend_from_slice(flags);
        json(data, &args)
    };
    let export = |data: &Path, since: Option<&Path>, out: &Path| -> Value {
        let out = out.to_str().unwrap();
        let mut args = vec!["export", "--out", out];
        if let Some(s) = since {
            args.extend(["--since", s.to_str().unwrap()]);
        }
        json(data, &args)
    };
    let import = |data: &Path, f: &Path| json(data, &["import", f.to_str().unwrap()]);
    let save_status = |data: &Path, name: &str| -> PathBuf {
        let p = file(name);
        fs::write(&p, ok(data, &["status"])).unwrap();
        p
    };

    // A registers the customer and opens seats; B gets everything.
    append(
        &da,
        "customer/20",
        "CustomerRegistered",
        &[
            "--set",
            "name=\"Ada\"",
            "--set",
            "email=\"ada@old\"",
            "--set",
            "phone=\"0\"",
        ],
    );
    append(
        &da,
        "event/keynote",
        "SeatsOpened",
        &["--escrow-init", "seats=10"],
    );
    let to_b = format!("seats={b}:4");
    append(
        &da,
        "event/keynote",
        "RightsMoved",
        &["--escrow-transfer", &to_b],
    );
    let e = export(&da, None, &file("a-all.wexp"));
    assert_eq!(e["exported"], 3);
    assert_eq!(e["out"], file("a-all.wexp").display().to_string());
    assert_eq!(
        e["bytes"].as_u64().unwrap(),
        fs::metadata(file("a-all.wexp")).unwrap().len()
    );
    let r = import(&db, &file("a-all.wexp"));
    assert_eq!(r, serde_json::json!({ "imported": 3, "duplicates": 0 }));
    let r = import(&db, &file("a-all.wexp"));
    assert_eq!(r, serde_json::json!({ "imported": 0, "duplicates": 3 }));
    assert_eq!(
        json(&da, &["status"])["state_hash"],
        json(&db, &["status"])["state_hash"]
    );

    // Offline: different fields, the same field, and seats on both sides.
    append(
        &da,
        "customer/20",
        "EmailChanged",
        &["--set", "email=\"ada@new\""],
    );
    append(
        &db,
        "customer/20",
        "PhoneChanged",
        &["--set", "phone=\"+44 20\""],
    );
    append(
        &da,
        "customer/20",
        "NameCorrected",
        &["--set", "name=\"Ada Lovelace\""],
    );
    append(
        &db,
        "customer/20",
        "NameCorrected",
        &["--set", "name=\"Ada King\""],
    );
    append(
        &da,
        "event/keynote",
        "SeatsSold",
        &["--escrow-consume", "seats=6"],
    );
    append(
        &db,
        "event/keynote",
        "SeatsSold",
        &["--escrow-consume", "seats=3"],
    );
    let before = snapshot(&db);
    let err = fails(
        &db,
        &[
            "append",
            "--stream",
            "event/keynote",
            "--kind",
            "SeatsSold",
            "--escrow-consume",
            "seats=2",
        ],
    );
    assert!(
        err.contains("rights to 1") && err.contains("needs 2"),
        "{err}"
    );
    assert_eq!(snapshot(&db), before);

    // Each side exports what the other lacks, by the other's status file.
    let sa = save_status(&da, "a-status.json");
    let sb = save_status(&db, "b-status.json");
    assert_eq!(export(&da, Some(&sb), &file("a-to-b.wexp"))["exported"], 3);
    assert_eq!(export(&db, Some(&sa), &file("b-to-a.wexp"))["exported"], 3);
    assert_eq!(
        import(&db, &file("a-to-b.wexp")),
        serde_json::json!({ "imported": 3, "duplicates": 0 })
    );
    assert_eq!(
        import(&da, &file("b-to-a.wexp")),
        serde_json::json!({ "imported": 3, "duplicates": 0 })
    );
    assert_eq!(
        import(&da, &file("b-to-a.wexp")),
        serde_json::json!({ "imported": 0, "duplicates": 3 })
    );

    let (ta, tb) = (json(&da, &["status"]), json(&db, &["status"]));
    assert_eq!(ta["node"], a.as_str());
    assert_eq!(tb["node"], b.as_str());
    assert_eq!(ta["events"], 9);
    assert_eq!(ta["events"], tb["events"]);
    assert_eq!(ta["frontier"], tb["frontier"]);
    assert_eq!(ta["state_hash"], tb["state_hash"]);
    assert_eq!(ta["frontier"][&a]["seq"], 6);
    assert_eq!(ta["frontier"][&b]["seq"], 3);
    // Replicas holding the same events print the same log, in canonical order.
    let (la, lb) = (ok(&da, &["log"]), ok(&db, &["log"]));
    assert_eq!(la, lb);
    let log = json_lines(&da, &["log"]);
    assert!(log.windows(2).all(|w| order_key(&w[0]) < order_key(&w[1])));

    for data in [&da, &db] {
        let g = json(data, &["get", "--stream", "customer/20"]);
        assert_eq!(g["version"], 5);
        assert_eq!(
            g["fields"]["email"],
            serde_json::json!({ "value": "ada@new" })
        );
        assert_eq!(
            g["fields"]["phone"],
            serde_json::json!({ "value": "+44 20" })
        );
        let name = &g["fields"]["name"];
        let values = name["conflict"].as_array().expect("name is a conflict");
        let shown: BTreeSet<&str> = values
            .iter()
            .map(|v| v["value"].as_str().unwrap())
            .collect();
        assert_eq!(shown, set_of(&["Ada Lovelace", "Ada King"]));
        assert_eq!(
            name["value"], values[0]["value"],
            "shown value is the first listed"
        );
        let authors: BTreeSet<&str> = values
            .iter()
            .map(|v| v["author"].as_str().unwrap())
            .collect();
        assert_eq!(authors, set_of(&[a.as_str(), b.as_str()]));

        let c = json_lines(data, &["conflicts"]);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0]["stream"], "customer/20");
        assert_eq!(c[0]["field"], "name");
        assert_eq!(&c[0]["values"], &name["conflict"]);

        let seats = &json(data, &["get", "--stream", "event/keynote"])["escrow"]["seats"];
        assert_eq!(seats["capacity"], 10);
        assert_eq!(seats["consumed"], 9);
        assert_eq!(seats["rights"][&a], 0);
        assert_eq!(seats["rights"][&b], 1);
    }
    // Both sides show the same display value for the conflict.
    assert_eq!(
        json(&da, &["get", "--stream", "customer/20"]),
        json(&db, &["get", "--stream", "customer/20"])
    );

    // A resolves the conflict; one more exchange carries it to B.
    append(
        &da,
        "customer/20",
        "NameResolved",
        &["--set", "name=\"Augusta Ada King\""],
    );
    let sb = save_status(&db, "b-status-2.json");
    assert_eq!(
        export(&da, Some(&sb), &file("a-to-b-2.wexp"))["exported"],
        1
    );
    assert_eq!(
        import(&db, &file("a-to-b-2.wexp")),
        serde_json::json!({ "imported": 1, "duplicates": 0 })
    );
    let sa = save_status(&da, "a-status-2.json");
    assert_eq!(
        export(&db, Some(&sa), &file("b-to-a-2.wexp"))["exported"],
        0
    );
    for data in [&da, &db] {
        assert!(json_lines(data, &["conflicts"]).is_empty());
        let g = json(data, &["get", "--stream", "customer/20"]);
        assert_eq!(
            g["fields"]["name"],
            serde_json::json!({ "value": "Augusta Ada King" })
        );
    }
    let (ta, tb) = (json(&da, &["status"]), json(&db, &["status"]));
    assert_eq!(ta["events"], 10);
    assert_eq!(ta["frontier"], tb["frontier"]);
    assert_eq!(ta["state_hash"], tb["state_hash"]);

    // A status file that is not one is refused clearly, and nothing is written.
    fs::write(file("junk.json"), "{\"events\": 3}").unwrap();
    let out = file("never.wexp");
    let err = fails(
        &da,
        &[
            "export",
            "--since",
            file("junk.json").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(err.contains("frontier"), "{err}");
    assert!(!out.exists());
}

#[test]
fn demo_runs_tells_the_oversell_story_and_reports_equal_state_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&tmp.path().join("unused"), &["demo"]);
    assert!(out.contains("equal"), "{out}");
    // The risk-window story: both sides sell on credit while cut off, one
    // sale beyond the policy's bound is refused with its reason, and after
    // the heal every desk lists the same two sales, each compensated once.
    for line in [
        "desk A sells 5 (its rights), then 2 more: accepted on credit, it owes 2",
        "desk B sells 5 (its rights), then 3 more: accepted on credit, it owes 3",
        "it would owe 4, the policy allows 3",
        "desk A counts 7 of 10 sold, desks B and C 8 of 10",
        "15 sold for 10 seats, 5 oversold; every desk lists the same 2 sales:",
        "released 5 seats; 2 sales on the waitlist",
        "honoured 3 (capacity 10 + 3), released 2, 1 sale on the waitlist",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let compensated: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("seats oversold -> waitlist (auto;"))
        .collect();
    assert_eq!(compensated.len(), 2, "{out}");
    assert!(
        compensated.iter().all(|l| l.contains("in effect once")),
        "{out}"
    );
    for sale in ["by desk A: 2 seats", "by desk B: 3 seats"] {
        assert!(compensated.iter().any(|l| l.contains(sale)), "{out}");
    }
    // The ending: desk A's read model in SQL, queried.
    assert!(out.contains("11. Desk A's read model in SQL"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("name")
            && l.contains("\"Augusta Ada King\"")
            && l.ends_with("| 0")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.trim().starts_with("10 | ")), "{out}");
    assert!(
        !tmp.path().join("unused").exists(),
        "demo must not touch --data"
    );
}

#[test]
fn commands_on_an_uninitialised_dir_fail_clearly_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("nothing-here");
    let export_out = tmp.path().join("out.wexp");
    let import_in = tmp.path().join("in.wexp");
    fs::write(&import_in, b"weftexp\0\x01\0\0\0\0\0\0\0").unwrap();
    let commands: &[&[&str]] = &[
        &["status"],
        &["get", "--stream", "c/1"],
        &["log"],
        &["conflicts"],
        &["append", "--stream", "c/1", "--kind", "K", "--set", "a=1"],
        &["export", "--out", export_out.to_str().unwrap()],
        &["import", import_in.to_str().unwrap()],
    ];
    for args in commands {
        let err = fails(&data, args);
        assert!(err.contains("no node in"), "{args:?}: {err}");
        assert!(err.contains("weftlog init"), "{args:?}: {err}");
        assert!(!data.exists(), "{args:?} created the data directory");
    }
    assert!(!export_out.exists());
    // An existing but empty directory is no node either.
    fs::create_dir(&data).unwrap();
    let err = fails(&data, &["status"]);
    assert!(err.contains("no node in"), "{err}");
    assert_eq!(fs::read_dir(&data).unwrap().count(), 0);
}
