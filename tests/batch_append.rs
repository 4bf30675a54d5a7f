//! Batch append does what single appends in a row would do, in one group
//! commit: `Node::append_many` writes a batch with one commit; the HTTP
//! array form answers one result per event in order (a refused event in
//! the middle does not stop the others, a later event sees the earlier
//! ones, a command id retried inside and across batches takes effect
//! once), refuses a malformed element or an array over the limit with
//! nothing applied; and `weftlog append --batch` does the same from a file
//! or standard input, on a stopped node and through a running one, naming
//! a malformed line.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::server::{init, post, Opts, Proc};
use common::weftlog;
use serde_json::{json, Value};
use weftlog::node::{self, Node, MAX_APPEND_MANY};
use weftlog_proto::log::{decode_frame, HEADER_BYTES};
use weftlog_proto::{Draft, Meta, Op};

/// Records and signed records (one per group commit) in a node's log.
fn commits(node_dir: &Path) -> (u64, u64) {
    let mut segs: Vec<PathBuf> = fs::read_dir(node_dir.join(node::LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let (mut records, mut signed) = (0, 0);
    for seg in segs {
        let data = fs::read(&seg).unwrap();
        let mut off = HEADER_BYTES;
        while off < data.len() && data[off..].iter().any(|&b| b != 0) {
            let (frame, used) = decode_frame(&data[off..]).unwrap();
            records += 1;
            signed += u64::from(frame.sig.is_some());
            off += used;
        }
    }
    (records, signed)
}

fn add(stream: &str, expected_version: Option<u64>, command_id: Option<&str>) -> Draft {
    Draft {
        stream: stream.into(),
        kind: "Counted".into(),
        ops: vec![Op::Add {
            counter: "n".into(),
            delta: 1,
        }],
        payload: Vec::new(),
        meta: Meta {
            command_id: command_id.map(str::to_string),
            user: None,
        },
        expected_version,
        texts: Vec::new(),
    }
}

#[test]
fn append_many_makes_one_group_commit_and_answers_each_draft_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    node::init(&dir).unwrap();
    let (node, _) = Node::open(&dir).unwrap();
    let mut drafts: Vec<Draft> = (0..999).map(|_| add("s", None, None)).collect();
    // The 501st expects the version the 500 before it made: made. The
    // 502nd expects one it cannot be at: refused, the rest go on.
    drafts.insert(500, add("s", Some(500), None));
    drafts.insert(501, add("s", Some(7), None));
    let outcomes = node.append_many(drafts);
    assert_eq!(outcomes.len(), 1001);
    let mut version = 0;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 501 {
            let e = o.as_ref().unwrap_err().to_string();
            assert!(
                e.contains('7'),
                "the refusal names the expected version: {e}"
            );
            continue;
        }
        version += 1;
        assert_eq!(o.as_ref().unwrap().version, version, "draft {i}");
    }
    // Retried inside one batch and across batches: one event.
    let again = node.append_many(vec![add("t", None, Some("c")), add("t", None, Some("c"))]);
    let later = node.append_many(vec![add("t", None, Some("c"))]);
    let first = again[0].as_ref().unwrap();
    for o in [&again[1], &later[0]] {
        let o = o.as_ref().unwrap();
        assert!(o.existing);
        assert_eq!(o.id, first.id);
    }
    assert!(node.append_many(Vec::new()).is_empty());
    drop(node);
    // 1000 events in one commit, then one event in the next.
    assert_eq!(commits(&dir), (1001, 2));
}

#[test]
#[should_panic(expected = "at most")]
fn append_many_refuses_more_than_its_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    node::init(&dir).unwrap();
    let (node, _) = Node::open(&dir).unwrap();
    node.append_many(
        (0..=MAX_APPEND_MANY)
            .map(|_| add("s", None, None))
            .collect(),
    );
}

fn statuses(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect()
}

#[test]
fn the_http_array_answers_each_event_in_order_and_refuses_bad_batches_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    init(&dir);
    let p = Proc::start("node", &dir, Opts::default());
    let path = "/v1/streams/customer/20/events";
    let (code, v) = p.post(
        path,
        &json!([
            {"kind": "Registered", "set": {"name": "Ada"}},
            {"kind": "Late", "expected_version": 5},
            {"kind": "Emailed", "set": {"email": "ada@example.org"}, "command_id": "c1"},
            {"kind": "Emailed", "set": {"email": "other@example.org"}, "command_id": "c1"},
            {"kind": "Checked", "expected_version": 2},
        ]),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(statuses(&v), [201, 409, 201, 200, 201]);
    let body = |i: usize| v[i]["body"].clone();
    assert_eq!(
        [
            body(0)["version"].clone(),
            body(2)["version"].clone(),
            body(4)["version"].clone()
        ],
        [json!(1), json!(2), json!(3)]
    );
    assert!(body(1)["error"].as_str().unwrap().contains('5'), "{v}");
    assert_eq!(body(3)["id"], body(2)["id"]);
    assert_eq!(body(3)["existing"], true);
    // Retried in a later batch: the same event again, nothing appended.
    let (code, again) = p.post(path, &json!([{"kind": "Emailed", "command_id": "c1"}]));
    assert_eq!(code, 200);
    assert_eq!(statuses(&again), [200]);
    assert_eq!(again[0]["body"]["id"], body(2)["id"]);
    let stream = p.get_json("/v1/streams/customer/20");
    assert_eq!(stream["version"], 3, "{stream}");
    assert_eq!(p.status()["events"], 3);

    // Refused whole, nothing applied: a malformed element, too many.
    let (code, bad) = p.post(
        path,
        &json!([{"kind": "A"}, {"kind": "B"}, {"kind": "C", "colour": "red"}]),
    );
    assert_eq!(code, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("element 2"),
        "{bad}"
    );
    let over = Value::Array(vec![json!({"kind": "A"}); MAX_APPEND_MANY + 1]);
    let (code, big) = p.post(path, &over);
    assert_eq!(code, 413, "{big}");
    assert!(
        big["error"]
            .as_str()
            .unwrap()
            .contains(&MAX_APPEND_MANY.to_string()),
        "{big}"
    );
    assert_eq!(p.status()["events"], 3);
    // An empty array appends nothing; a single object is answered as ever.
    let (code, empty) = p.post(path, &json!([]));
    assert_eq!((code, empty), (200, json!([])));
    let one = p.append("customer/20", json!({"kind": "Single"}));
    assert_eq!(one["version"], 4);
    // As many as the limit allow go in one request.
    let full = Value::Array(vec![json!({"kind": "A"}); MAX_APPEND_MANY]);
    let (code, all) = post(&p.agent, &p.url("/v1/streams/bulk/events"), &full).unwrap();
    assert_eq!(code, 200);
    assert!(statuses(&all).iter().all(|&s| s == 201));
    assert_eq!(all[MAX_APPEND_MANY - 1]["body"]["version"], MAX_APPEND_MANY);
}

/// Runs `weftlog --data DATA ARGS…` with `input` on standard input.
fn with_stdin(data: &Path, args: &[&str], input: &str) -> common::Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    common::Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const FILE: &str = r#"{"kind": "Registered", "set": {"name": "Ada"}, "command_id": "r1"}

{"kind": "Late", "expected_version": 9}
{"kind": "Counted", "add": {"visits": 2}}
{"kind": "Registered", "set": {"name": "Bea"}, "command_id": "r1"}
"#;

/// What `FILE` must print: line numbers, one refusal, one existing event.
fn check_file_output(run: &common::Run) {
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("1 of 4 events were refused"),
        "{}",
        run.stderr
    );
    let out = lines(&run.stdout);
    let numbers: Vec<u64> = out.iter().map(|v| v["line"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 3, 4, 5]);
    assert_eq!(out[0]["version"], 1);
    assert!(
        out[1]["error"].as_str().unwrap().contains('9'),
        "{}",
        out[1]
    );
    assert_eq!(out[2]["version"], 2);
    assert_eq!(out[3]["existing"], true);
    assert_eq!(out[3]["id"], out[0]["id"]);
}

#[test]
fn append_batch_on_a_stopped_node_from_a_file_and_from_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let file = tmp.path().join("events.jsonl");
    fs::write(&file, FILE).unwrap();
    let run = weftlog(
        &data,
        &[
            "append",
            "--stream",
            "customer/1",
            "--batch",
            file.to_str().unwrap(),
        ],
    );
    check_file_output(&run);
    // The same lines on stdin, to another stream, one per batch; --quiet
    // prints the refused one only.
    let run = with_stdin(
        &data,
        &[
            "append",
            "--stream",
            "customer/2",
            "--batch",
            "-",
            "--chunk",
            "1",
            "--quiet",
        ],
        FILE,
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let out = lines(&run.stdout);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["line"], 3);
    let get = |s: &str| -> Value {
        let r = weftlog(&data, &["get", "--stream", s]);
        serde_json::from_str(&r.stdout).unwrap()
    };
    for s in ["customer/1", "customer/2"] {
        let v = get(s);
        assert_eq!(v["version"], 2, "{v}");
        assert_eq!(v["counters"]["visits"], 2, "{v}");
    }
}

#[test]
fn a_malformed_line_is_named_and_what_was_applied_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let text = "{\"kind\": \"A\"}\n{\"kind\": \"B\"}\n{\"kind\": \"C\"}\n{\"kind\": \"D\", \"sett\": {}}\n{\"kind\": \"E\"}\n";
    // A file is checked whole first: nothing applied.
    let file = tmp.path().join("bad.jsonl");
    fs::write(&file, text).unwrap();
    let run = weftlog(
        &data,
        &["append", "--stream", "s", "--batch", file.to_str().unwrap()],
    );
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("line 4"), "{}", run.stderr);
    assert!(run.stderr.contains("sett"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    // Standard input, batches of two: lines 1 and 2 went, the batch of
    // lines 3 and 4 did not (not half of it).
    let run = with_stdin(
        &data,
        &["append", "--stream", "s", "--batch", "-", "--chunk", "2"],
        text,
    );
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("line 4"), "{}", run.stderr);
    assert!(
        run.stderr.contains("lines 1 to 2 were sent")
            && run.stderr.contains("nothing from line 3 on"),
        "{}",
        run.stderr
    );
    assert_eq!(lines(&run.stdout).len(), 2);
    let r = weftlog(&data, &["get", "--stream", "s"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["version"], 2, "{v}");
}

#[test]
fn append_batch_through_a_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    init(&data);
    let p = Proc::start("node", &data, Opts::default());
    let file = tmp.path().join("events.jsonl");
    fs::write(&file, FILE).unwrap();
    let run = weftlog(
        &data,
        &[
            "append",
            "--stream",
            "customer/1",
            "--batch",
            file.to_str().unwrap(),
        ],
    );
    check_file_output(&run);
    let run = with_stdin(
        &data,
        &[
            "append",
            "--stream",
            "customer/2",
            "--batch",
            "-",
            "--chunk",
            "2",
        ],
        FILE,
    );
    check_file_output(&run);
    assert_eq!(p.status()["events"], 4);
    let v = p.get_json("/v1/streams/customer/2");
    assert_eq!(v["counters"]["visits"], 2, "{v}");
}
