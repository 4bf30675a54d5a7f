//! Guards that a fork is recorded as a proof a third party can check: two
//! data directories sharing a key (a copied desk) both append at one seq,
//! one imports the other's export and holds the fork; `weftlog forks
//! --proof` prints its proof (from the directory, and through the running
//! node), and `weftlog verify-fork` on a machine state with no data
//! directory says it is valid, and refuses it once a byte is changed. A
//! node that learns the fork by sync writes the proof to
//! `equivocations.jsonl`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{copy_dir, init, Opts, Proc, DEADLINE};
use common::succeeds;
use serde_json::Value;

/// `weftlog --data DATA verify-fork -` with `input` on stdin: exit code,
/// stdout, stderr.
fn verify_stdin(data: &Path, input: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(data)
        .args(["verify-fork", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weftlog");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn append(data: &Path, field: &str, value: &str) -> Value {
    let set = format!("{field}=\"{value}\"");
    let out = succeeds(
        data,
        &[
            "append",
            "--stream",
            "attendee/1",
            "--kind",
            "Edited",
            "--set",
            &set,
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// Two copies of one desk append at seq 2; `a` imports `b`'s events.
/// Returns `a`'s node id and both seq-2 event ids.
fn forked(a: &Path, b: &Path, tmp: &Path) -> (String, [String; 2]) {
    let id = init(a);
    append(a, "name", "Ada");
    copy_dir(a, b);
    let ea = append(a, "phone", "555");
    let eb = append(b, "phone", "556");
    append(b, "email", "ada@x");
    assert_eq!((ea["seq"].as_u64(), eb["seq"].as_u64()), (Some(2), Some(2)));
    let file = tmp.join("b.weft");
    succeeds(b, &["export", "--out", file.to_str().unwrap()]);
    succeeds(a, &["import", file.to_str().unwrap()]);
    let ids = [ea, eb].map(|e| e["id"].as_str().unwrap().to_string());
    (id, ids)
}

/// Waits for the running node to record a fork with its proof (its
/// `status.equivocations`) and returns that record.
fn fork_record_with_proof(p: &Proc) -> Value {
    let t0 = Instant::now();
    loop {
        let s = p.status();
        let found = s["equivocations"]
            .as_array()
            .and_then(|e| e.iter().find(|f| f.get("fork_proof").is_some()).cloned());
        if let Some(f) = found {
            return f;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "no fork proof recorded: {s}\n--- stderr:\n{}",
            common::server::tail(&p.log, 30)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_fork_proof_from_one_node_verifies_on_a_machine_with_no_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (author, ids) = forked(&a, &b, tmp.path());

    let listed = succeeds(&a, &["forks"]);
    let fork: Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert_eq!(fork["author"], author.as_str());
    assert_eq!(fork["seq"], 2);
    assert_eq!(fork["heads"].as_array().unwrap().len(), 2, "{fork}");
    assert!(fork.get("proof").is_none(), "{fork}");

    let proofs = succeeds(&a, &["forks", "--proof"]);
    let line: Value = serde_json::from_str(proofs.trim()).unwrap();
    let proof = &line["proof"];
    assert_eq!(proof["author"], author.as_str(), "{line}");
    assert_eq!(proof["seq"], 2);
    let lens: Vec<usize> = proof["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["events"].as_array().unwrap().len())
        .collect();
    // Each append is a group commit of its own, so signed: each branch is
    // its event at the fork seq alone (longer branches: the unit tests).
    assert_eq!(lens, [1, 1], "each branch up to its signed event: {line}");

    // Another machine: no data directory, nothing created.
    let elsewhere = tmp.path().join("no-such-node");
    let (code, out, err) = verify_stdin(&elsewhere, &proofs);
    assert_eq!(code, Some(0), "verify-fork failed: {err}");
    assert!(!elsewhere.exists(), "verify-fork made a data directory");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["author"], author.as_str());
    assert_eq!(v["seq"], 2);
    let mut events: Vec<String> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    events.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(events, want, "{v}");
    let mut heads: Vec<u64> = v["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["seq"].as_u64().unwrap())
        .collect();
    heads.sort();
    assert_eq!(heads, [2, 2], "each branch's signed event: {v}");

    // The proof alone, from a file, verifies too.
    let file = tmp.path().join("proof.json");
    std::fs::write(&file, proof.to_string()).unwrap();
    let out = succeeds(&elsewhere, &["verify-fork", file.to_str().unwrap()]);
    assert!(out.contains("\"valid\":true"), "{out}");

    // One hex digit of a signature changed: refused, exit 1, nothing on
    // stdout, the reason on stderr.
    let mut bad = line.clone();
    let sig = bad["proof"]["branches"][0]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    bad["proof"]["branches"][0]["signature"] = format!("{flipped}{}", &sig[1..]).into();
    let (code, out, err) = verify_stdin(&elsewhere, &bad.to_string());
    assert_eq!(code, Some(1), "a tampered proof passed: {out}");
    assert_eq!(out, "");
    assert!(
        err.contains("fork proof 1 is refused") && err.contains("branch 1"),
        "{err}"
    );
    // Not a proof at all.
    let (code, _, err) = verify_stdin(&elsewhere, "{\"author\":\"x\",\"seq\":2}\n");
    assert_eq!(code, Some(1));
    assert!(err.contains("has no proof"), "{err}");

    // Through the running node: the same proof.
    let node = Proc::start("a", &a, Opts::default());
    let remote = succeeds(&a, &["forks", "--proof"]);
    assert_eq!(remote, proofs, "through the running node");
    let (code, _, err) = verify_stdin(&elsewhere, &remote);
    assert_eq!(code, Some(0), "{err}");
    drop(node);
}

#[test]
fn a_node_that_learns_a_fork_by_sync_records_its_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let (author, _) = forked(&a, &b, tmp.path());
    // C holds one branch (the copy's, by file) before it meets A, which
    // holds both: the session sees a seq held with another id.
    init(&c);
    succeeds(&c, &["import", tmp.path().join("b.weft").to_str().unwrap()]);
    let pc = Proc::start("c", &c, Opts::default());
    let pa = Proc::start(
        "a",
        &a,
        Opts {
            peers: vec![pc.quic.clone()],
            ..Opts::default()
        },
    );
    // C learns the other branch from A, reports the fork and, once both
    // are durable, records the proof.
    let record = fork_record_with_proof(&pc);
    assert_eq!(record["author"], author.as_str(), "{record}");
    let lines = std::fs::read_to_string(c.join("equivocations.jsonl")).unwrap();
    let with_proof: Vec<&str> = lines.lines().filter(|l| l.contains("fork_proof")).collect();
    assert!(!with_proof.is_empty(), "{lines}");
    let (code, out, err) = verify_stdin(&tmp.path().join("nowhere"), &with_proof.join("\n"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"valid\":true"), "{out}");
    drop(pa);
}

/// A node that meets a forked author for the first time receives both
/// branches in one session, before either is stored, so the session sees
/// no seq held with another id: the daemon finds the fork in its state
/// and records it, with its proof, all the same.
#[test]
fn a_node_that_receives_both_branches_at_once_records_the_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("d"),
    );
    let (author, ids) = forked(&a, &b, tmp.path());
    init(&d);
    let pd = Proc::start("d", &d, Opts::default());
    let pa = Proc::start(
        "a",
        &a,
        Opts {
            peers: vec![pd.quic.clone()],
            ..Opts::default()
        },
    );
    let record = fork_record_with_proof(&pd);
    assert_eq!(record["author"], author.as_str(), "{record}");
    assert_eq!(record["seq"], 2, "{record}");
    let mut both = [
        record["held"].as_str().unwrap().to_string(),
        record["other"].as_str().unwrap().to_string(),
    ];
    both.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(both, want, "{record}");
    let log = std::fs::read_to_string(&pd.log).unwrap();
    assert!(log.contains("equivocation"), "no warning in d's log");
    let lines = std::fs::read_to_string(d.join("equivocations.jsonl")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("fork_proof")).count(),
        1,
        "one record with its proof: {lines}"
    );
    drop(pa);
}
