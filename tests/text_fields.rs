//! Guards text fields end to end, through the real binary: two desks edit
//! one registrant's notes offline with `weftlog append --splice`, exchange
//! export files, and show the same merged text; then a running node takes
//! splices over HTTP (and from the CLI, which sends them there), rebases a
//! splice made against stale heads, answers 409 for heads it does not hold
//! and 422 for a position inside a character.

mod common;

use std::path::Path;

use common::server::{init, Opts, Proc};
use common::{fails, succeeds};
use serde_json::{json, Value};

fn get(data: &Path) -> Value {
    let out = succeeds(data, &["get", "--stream", "attendee/7"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("get: {e}: {out}"))
}

/// `append` of one splice to attendee 7's notes.
fn splice_args(spec: &str) -> [&str; 7] {
    [
        "append",
        "--stream",
        "attendee/7",
        "--kind",
        "NotesEdited",
        "--splice",
        spec,
    ]
}

fn splice(data: &Path, spec: &str) {
    succeeds(data, &splice_args(spec));
}

/// Everything `from` holds that `to` lacks, carried by an export file.
fn exchange(from: &Path, to: &Path, tmp: &Path) {
    let status = tmp.join("to.status");
    let file = tmp.join("x.weft");
    std::fs::write(&status, succeeds(to, &["status"])).unwrap();
    succeeds(
        from,
        &[
            "export",
            "--since",
            status.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ],
    );
    succeeds(to, &["import", file.to_str().unwrap()]);
}

#[test]
fn two_desks_edit_one_note_offline_and_a_node_takes_splices_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("desk-a"), tmp.path().join("desk-b"));
    init(&a);
    init(&b);
    splice(&a, "notes=0:0:vegan");
    exchange(&a, &b, tmp.path());
    assert_eq!(get(&b)["texts"], json!({ "notes": "vegan" }));
    // Offline, at once: one prepends, the other appends (an emoji is two
    // UTF-16 units).
    splice(&a, "notes=0:0:strict ");
    splice(&b, "notes=5:0:, no nuts 🥜");
    exchange(&a, &b, tmp.path());
    exchange(&b, &a, tmp.path());
    let (ga, gb) = (get(&a), get(&b));
    assert_eq!(ga["texts"]["notes"], "strict vegan, no nuts 🥜");
    assert_eq!(ga["texts"], gb["texts"]);
    assert_eq!(ga["text_heads"], gb["text_heads"]);
    assert_eq!(ga["text_heads"]["notes"].as_array().unwrap().len(), 2);
    let status = |d: &Path| -> Value { serde_json::from_str(&succeeds(d, &["status"])).unwrap() };
    assert_eq!(status(&a)["state_hash"], status(&b)["state_hash"]);
    // A position inside the emoji (units 22 and 23) is refused locally.
    let err = fails(&a, &splice_args("notes=23:0:x"));
    assert!(err.contains("UTF-16"), "{err}");

    // A running node: splices over HTTP.
    let node = Proc::start("desk-a", &a, Opts::default());
    let stale = get(&a)["text_heads"]["notes"].clone();
    node.append(
        "attendee/7",
        json!({ "kind": "NotesEdited", "text": { "notes": [[0, 6, "Strict"]] } }),
    );
    // Made against the heads before that edit: rebased over it.
    node.append(
        "attendee/7",
        json!({ "kind": "NotesEdited", "text": { "notes": [[12, 0, " (gluten ok)"]] },
                "base": { "notes": stale } }),
    );
    let shown = node.get_json("/v1/streams/attendee/7");
    assert_eq!(
        shown["texts"]["notes"],
        "Strict vegan (gluten ok), no nuts 🥜"
    );
    let (code, v) = node.post(
        "/v1/streams/attendee/7/events",
        &json!({ "kind": "NotesEdited", "text": { "notes": [[0, 0, "x"]] },
                 "base": { "notes": ["00".repeat(32)] } }),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = node.post(
        "/v1/streams/attendee/7/events",
        &json!({ "kind": "NotesEdited", "text": { "notes": [[35, 0, "x"]] } }),
    );
    assert_eq!(code, 422, "{v}");
    // The CLI sends its splices to the running node.
    splice(&a, "notes=0:0:» ");
    let shown = node.get_json("/v1/streams/attendee/7");
    assert_eq!(
        shown["texts"]["notes"],
        "» Strict vegan (gluten ok), no nuts 🥜"
    );
    assert_eq!(shown["version"], 6);
}
