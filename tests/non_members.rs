//! Membership never affects validity: events by a node on no member list,
//! arriving by sync, are stored and forwarded by every node, with a list or
//! without, so all converge to one state; nodes with a list mark them in
//! `log` and `status`. Only the edge refuses them: `import` (CLI and HTTP)
//! names the authors and stores nothing unless asked to accept them.
//! Both directions: from a node without a list into nodes with one, and
//! from a node with a list (where they were imported on purpose) to a node
//! without one.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use common::server::{converge_to, init, Opts, Proc};
use common::{fails, weftlog};

fn members_file(path: &Path, ids: &[&str]) {
    let mut text = String::from("# desks\n");
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

/// A node that never runs: `n` events appended offline, exported to a file.
fn outsider(tmp: &Path, name: &str, n: usize) -> (String, PathBuf) {
    let dir = tmp.join(name);
    let id = init(&dir);
    for i in 0..n {
        let r = weftlog(
            &dir,
            &[
                "append",
                "--stream",
                &format!("{name}/1"),
                "--kind",
                "Edited",
                "--set",
                &format!("n={i}"),
            ],
        );
        assert_eq!(r.code, Some(0), "append on {name}: {}", r.stderr);
    }
    let file = tmp.join(format!("{name}.export"));
    let r = weftlog(&dir, &["export", "--out", file.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "export of {name}: {}", r.stderr);
    (id, file)
}

/// POSTs an export file to `/v1/import[?query]`: the status and the answer.
fn import(p: &Proc, query: &str, file: &Path) -> (u16, Value) {
    let mut r = p
        .agent
        .post(p.url(&format!("/v1/import{query}")))
        .header("content-type", "application/octet-stream")
        .send(fs::read(file).unwrap())
        .unwrap();
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (code, serde_json::from_str(&text).unwrap())
}

/// The authors `GET /v1/log` marks `non_member`, and the authors of all
/// its events.
fn marks(p: &Proc) -> (BTreeSet<String>, BTreeSet<String>) {
    let (code, body) = p.get("/v1/log");
    assert_eq!(code, 200, "{}: {body}", p.name);
    let mut marked = BTreeSet::new();
    let mut all = BTreeSet::new();
    for line in body.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let author = v["author"].as_str().unwrap().to_string();
        if v.get("non_member") == Some(&Value::Bool(true)) {
            marked.insert(author.clone());
        } else {
            assert!(v.get("non_member").is_none(), "{}: {v}", p.name);
        }
        all.insert(author);
    }
    (marked, all)
}

/// `status`'s `non_members` authors and event count.
fn non_members(p: &Proc) -> Option<(BTreeSet<String>, u64)> {
    let s = p.status();
    let n = &s["non_members"];
    if n.is_null() {
        return None;
    }
    let authors = n["authors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["author"].as_str().unwrap().to_string())
        .collect();
    Some((authors, n["events"].as_u64().unwrap()))
}

#[test]
fn events_by_non_members_are_stored_forwarded_and_marked_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (x, x_file) = outsider(t, "x", 2);
    let (y, y_file) = outsider(t, "y", 3);
    let (da, db, dc) = (t.join("a"), t.join("b"), t.join("c"));
    let (ia, ib, ic) = (init(&da), init(&db), init(&dc));
    let list = t.join("members.txt");
    members_file(&list, &[&ia, &ib, &ic]);

    // A runs without a list; B and C with one that names A, B and C.
    // A — B — C in a line, so C hears only what B forwards.
    let a = Proc::start("a", &da, Opts::default());
    let b = Proc::start(
        "b",
        &db,
        Opts {
            peers: vec![a.quic.clone()],
            members: Some(&list),
            ..Opts::default()
        },
    );
    let c = Proc::start(
        "c",
        &dc,
        Opts {
            peers: vec![b.quic.clone()],
            members: Some(&list),
            ..Opts::default()
        },
    );
    a.append("desk/a", serde_json::json!({ "kind": "Opened" }));
    converge_to(&[&a, &b, &c], 1);
    assert_eq!(non_members(&a), None, "a has no list");
    assert_eq!(non_members(&b), Some((BTreeSet::new(), 0)));

    // Without a list → with one: A imports X's events (nothing to refuse
    // them by); B stores them by sync and forwards them to C.
    let (code, v) = import(&a, "", &x_file);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["imported"], 2);
    converge_to(&[&a, &b, &c], 3);
    let only_x: BTreeSet<String> = [x.clone()].into();
    for p in [&b, &c] {
        let (marked, all) = marks(p);
        assert_eq!(marked, only_x, "{} marks X's events only", p.name);
        assert!(all.contains(&ia), "{}", p.name);
        assert_eq!(non_members(p), Some((only_x.clone(), 2)), "{}", p.name);
    }
    assert_eq!(marks(&a).0, BTreeSet::new(), "a has no list: no marks");

    // The edge of a node with a list: Y's events are refused, naming Y and
    // the way to accept them; nothing is stored.
    let (code, v) = import(&b, "", &y_file);
    assert_eq!(code, 403, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains(&y), "{err}");
    assert!(err.contains("allow_non_members"), "{err}");
    assert_eq!(b.status()["events"], 3);

    // With a list → without one: accepted at B on purpose, Y's events
    // reach A (stored, unmarked: A has no list) and C (stored, marked).
    let (code, v) = import(&b, "?allow_non_members=true", &y_file);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["imported"], 3);
    converge_to(&[&a, &b, &c], 6);
    let x_and_y: BTreeSet<String> = [x.clone(), y.clone()].into();
    for p in [&b, &c] {
        assert_eq!(marks(p).0, x_and_y, "{}", p.name);
        assert_eq!(non_members(p), Some((x_and_y.clone(), 5)), "{}", p.name);
    }
    let (marked, all) = marks(&a);
    assert_eq!(marked, BTreeSet::new());
    assert!(all.contains(&y));
    assert_eq!(non_members(&a), None);

    // The CLI of a running node goes through its API and its list.
    let line = fails(&dc, &["import", y_file.to_str().unwrap()]);
    assert!(line.contains(&y), "{line}");
    let r = weftlog(
        &dc,
        &["import", "--allow-non-members", y_file.to_str().unwrap()],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["duplicates"], 3, "{v}");

    // Offline, the CLI takes the list as --members.
    drop((a, b, c));
    let list_arg = list.to_str().unwrap();
    let r = weftlog(&dc, &["log", "--members", list_arg]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let marked: BTreeSet<String> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["non_member"] == Value::Bool(true))
        .map(|v| v["author"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(marked, x_and_y);
    let r = weftlog(&dc, &["log"]);
    assert!(!r.stdout.contains("non_member"), "no list, no marks");
    let r = weftlog(&dc, &["status", "--members", list_arg]);
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["non_members"]["events"], 5, "{s}");
    let (z, z_file) = outsider(t, "z", 1);
    let line = fails(
        &dc,
        &["import", "--members", list_arg, z_file.to_str().unwrap()],
    );
    assert!(
        line.contains(&z) && line.contains("--allow-non-members"),
        "{line}"
    );
    let r = weftlog(
        &dc,
        &[
            "import",
            "--members",
            list_arg,
            "--allow-non-members",
            z_file.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}
