//! `export --since` sends what the other node lacks by its branch heads,
//! not by one seq per author: an author forks (two directories sharing a
//! key, each appending), B holds one branch, and an export from a node
//! holding both carries exactly the other branch above the divergence
//! (none of what B had), so that B ends with both branches and the
//! exporter's state hash; an export of everything carries both branches;
//! locally and through a running node, with status files that contradict
//! the exporter's log or are malformed refused.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use common::server::{copy_dir, Opts, Proc};
use common::{fails, succeeds};

/// Runs a command that must succeed and print one JSON object.
fn ok(data: &Path, args: &[&str]) -> Value {
    let out = succeeds(data, args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn append(data: &Path, n: u64) {
    for i in 0..n {
        let value = format!("n={i}");
        ok(
            data,
            &[
                "append", "--stream", "desk/a", "--kind", "Sold", "--set", &value,
            ],
        );
    }
}

fn export(data: &Path, since: Option<&Path>, out: &Path) -> Value {
    let mut args = vec!["export", "--out", out.to_str().unwrap()];
    if let Some(s) = since {
        args.extend(["--since", s.to_str().unwrap()]);
    }
    ok(data, &args)
}

fn import(data: &Path, file: &Path) -> Value {
    ok(data, &["import", file.to_str().unwrap()])
}

fn save_status(data: &Path, to: PathBuf) -> PathBuf {
    let v = ok(data, &["status"]);
    fs::write(&to, v.to_string()).unwrap();
    to
}

/// The branch heads `(seq, head)` a status lists for `author`.
fn branches(status: &Value, author: &str) -> Vec<(u64, String)> {
    let e = &status["frontier"][author];
    let one = |b: &Value| {
        (
            b["seq"].as_u64().unwrap(),
            b["head"].as_str().unwrap().to_string(),
        )
    };
    match e.get("branches") {
        Some(b) => b.as_array().unwrap().iter().map(one).collect(),
        None => vec![one(e)],
    }
}

#[test]
fn an_export_since_a_node_holding_one_branch_carries_the_other_and_nothing_it_had() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (x, y, b, c) = (t.join("x"), t.join("y"), t.join("b"), t.join("c"));
    // The desk writes 2 events, then a copy of its directory and the
    // original go on with one key: x writes seqs 3..=4, y seqs 3..=5.
    let desk = common::server::init(&x);
    append(&x, 2);
    copy_dir(&x, &y);
    append(&x, 2);
    append(&y, 3);
    common::server::init(&b);
    common::server::init(&c);
    // B holds y's branch (a node without forks: its status has no
    // branches), and writes one event of its own.
    export(&y, None, &t.join("y.weft"));
    import(&b, &t.join("y.weft"));
    append(&b, 1);
    let b_status = save_status(&b, t.join("b.status"));
    let sb: Value = serde_json::from_str(&fs::read_to_string(&b_status).unwrap()).unwrap();
    assert_eq!(sb["frontier"][&desk]["seq"], 5, "{sb}");
    assert!(sb["frontier"][&desk].get("branches").is_none(), "{sb}");
    // C holds both branches, and writes one event of its own.
    export(&x, None, &t.join("x.weft"));
    import(&c, &t.join("x.weft"));
    import(&c, &t.join("y.weft"));
    append(&c, 1);
    let sc = ok(&c, &["status"]);
    assert_eq!(branches(&sc, &desk).len(), 2, "{sc}");
    // A file may carry both branches: all of C, into a new node.
    let d = t.join("d");
    common::server::init(&d);
    let all = export(&c, None, &t.join("c-all.weft"));
    assert_eq!(all["exported"], 2 + 2 + 3 + 1, "{all}");
    assert_eq!(
        import(&d, &t.join("c-all.weft")),
        json!({ "imported": 8, "duplicates": 0 })
    );
    let sd = ok(&d, &["status"]);
    assert_eq!(sd["state_hash"], sc["state_hash"]);
    assert_eq!(sd["frontier"], sc["frontier"]);

    // By seq, B (at 5) would be sent nothing of the desk; by heads it is
    // sent x's 3 and 4, and C's own event: nothing B had.
    let to_b = t.join("c-to-b.weft");
    let e = export(&c, Some(&b_status), &to_b);
    assert_eq!(e["exported"], 3, "{e}");
    assert_eq!(
        import(&b, &to_b),
        json!({ "imported": 3, "duplicates": 0 }),
        "the file holds nothing B had"
    );
    let sb = ok(&b, &["status"]);
    assert_eq!(branches(&sb, &desk), branches(&sc, &desk));
    // B's own event goes back the same way; then both hold the same.
    let c_status = save_status(&c, t.join("c.status"));
    let to_c = t.join("b-to-c.weft");
    assert_eq!(export(&b, Some(&c_status), &to_c)["exported"], 1);
    assert_eq!(import(&c, &to_c), json!({ "imported": 1, "duplicates": 0 }));
    let (sb, sc) = (ok(&b, &["status"]), ok(&c, &["status"]));
    assert_eq!(sb["state_hash"], sc["state_hash"]);
    assert_eq!(sb["frontier"], sc["frontier"]);
    // Equal now: nothing either way.
    let c_status = save_status(&c, t.join("c2.status"));
    assert_eq!(
        export(&b, Some(&c_status), &t.join("none.weft"))["exported"],
        0
    );

    // A head whose seq contradicts the event C holds by that id is
    // refused, and nothing is written.
    let mut bad = sb.clone();
    let (seq, head) = branches(&sb, &desk)[0].clone();
    bad["frontier"][&desk] = json!({ "seq": seq + 1, "head": head });
    let bad_path = t.join("bad.status");
    fs::write(&bad_path, bad.to_string()).unwrap();
    let never = t.join("never.weft");
    let args = [
        "export",
        "--since",
        bad_path.to_str().unwrap(),
        "--out",
        never.to_str().unwrap(),
    ];
    let err = fails(&c, &args);
    assert!(err.contains("frontier") && err.contains(&head), "{err}");
    // Malformed: branches that are not an array, a head that is no id.
    let mut branchless = sb.clone();
    branchless["frontier"][&desk]["branches"] = json!(7);
    fs::write(&bad_path, branchless.to_string()).unwrap();
    let err = fails(&c, &args);
    assert!(err.contains("branches"), "{err}");
    let mut no_id = sb.clone();
    no_id["frontier"][&desk] = json!({ "seq": 3, "head": "xyz" });
    fs::write(&bad_path, no_id.to_string()).unwrap();
    let err = fails(&c, &args);
    assert!(err.contains("head"), "{err}");
    assert!(!never.exists());

    // The same through a running node: the CLI checks the file, the node
    // checks the heads against its log.
    let node = Proc::start("c", &c, Opts::default());
    let remote = t.join("remote.weft");
    let e = export(&c, Some(&b_status), &remote);
    assert_eq!(e["exported"], 3, "the same rule as offline: {e}");
    assert_eq!(fs::read(&remote).unwrap(), fs::read(&to_b).unwrap());
    fs::write(&bad_path, bad.to_string()).unwrap();
    let err = fails(&c, &args);
    assert!(err.contains(&head), "{err}");
    let (code, v) = node.post("/v1/export", &bad);
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains(&head), "{v}");
    assert!(!never.exists());
}
