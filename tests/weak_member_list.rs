//! Guards `weftlog run` against a member list naming a weak (small-order) or
//! non-canonically encoded ed25519 key: under a weak key anyone can sign, so
//! admitting it would let any peer claim to be that member. The node refuses
//! to start, with a message naming the file, the line and the key.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::weftlog;
use weftlog_proto::Keypair;

/// How long `weftlog run` may take to refuse its arguments.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `weftlog run` with `members` as the member list; returns its exit
/// code and stderr. A run still serving after [`REFUSAL_TIMEOUT`] is killed
/// and fails the test.
fn run_with(members: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let r = weftlog(&data, &["init"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let list = dir.path().join("members.txt");
    std::fs::write(&list, members).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(&data)
        .args(["run", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--members")
        .arg(&list)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weftlog");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > REFUSAL_TIMEOUT {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "weftlog run started with this member list:\n{members}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_member_list_with_a_weak_key_stops_the_node_from_starting() {
    let a = Keypair::from_secret([1; 32]).node_id();
    let identity = "0100000000000000000000000000000000000000000000000000000000000000";
    let order_8 = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a";
    // y = p + 3: a point of large order, but not its canonical encoding.
    let non_canonical = "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";
    for (list, line, key, why) in [
        (
            format!("# desks\n{a}\n{identity}\n"),
            3,
            identity,
            "is a weak (small-order) ed25519 key",
        ),
        (
            format!("{order_8}\n{a}\n"),
            1,
            order_8,
            "is a weak (small-order) ed25519 key",
        ),
        (
            format!("{a}\n\n{non_canonical}\n"),
            3,
            non_canonical,
            "is not a canonical point encoding",
        ),
    ] {
        let (code, stdout, stderr) = run_with(&list);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stdout, "");
        let msg = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(msg.contains("member list "), "{msg}");
        assert!(
            msg.contains(&format!("members.txt: line {line}: node id {key} {why}")),
            "{msg}"
        );
    }
}
