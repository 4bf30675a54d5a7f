//! Discovery: two nodes in their own network namespaces, joined by a veth
//! pair and given nothing but a member list and `--mdns`, find each other
//! and sync. A third node that is not a member announces itself too and is
//! never connected. Needs root (CI runs as root); set WEFTLOG_SKIP_NETNS=1
//! to skip where namespaces cannot be made.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Namespaces and processes, removed on drop (also on panic).
struct Lab {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn weftlog(ns: &str, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_weftlog"), "--data"])
        .arg(data)
        .args(args);
    c
}

fn status(ns: &str, data: &Path) -> Value {
    let out = weftlog(ns, data, &["status"]).output().unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn init(data: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(data)
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["node"].as_str().unwrap().to_string()
}

#[test]
fn members_find_each_other_with_mdns_alone() {
    if std::env::var_os("WEFTLOG_SKIP_NETNS").is_some() {
        eprintln!("skipped: WEFTLOG_SKIP_NETNS is set");
        return;
    }
    let tag = std::process::id() % 100_000;
    let ns: Vec<String> = (0..3).map(|i| format!("wfm{tag}n{i}")).collect();
    let mut lab = Lab {
        names: Vec::new(),
        children: Vec::new(),
    };
    for n in &ns {
        sh(&["ip", "netns", "add", n]);
        lab.names.push(n.clone());
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    // A bridge in namespace 0 joins all three (one LAN, as at a venue).
    sh(&["ip", "-n", &ns[0], "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &ns[0], "link", "set", "br0", "up"]);
    let net = format!("10.78.{}", tag % 250);
    // Namespace 0's node sits on the bridge itself.
    sh(&[
        "ip",
        "-n",
        &ns[0],
        "addr",
        "add",
        &format!("{net}.1/24"),
        "dev",
        "br0",
    ]);
    for (i, n) in ns.iter().enumerate().skip(1) {
        let (a, b) = (format!("wfm{tag}a{i}"), format!("wfm{tag}b{i}"));
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
        sh(&["ip", "link", "set", &a, "netns", &ns[0]]);
        sh(&["ip", "-n", &ns[0], "link", "set", &a, "master", "br0"]);
        sh(&["ip", "-n", &ns[0], "link", "set", &a, "up"]);
        sh(&["ip", "link", "set", &b, "netns", n]);
        let addr = format!("{net}.{}/24", i + 1);
        sh(&["ip", "-n", n, "addr", "add", &addr, "dev", &b]);
        sh(&["ip", "-n", n, "link", "set", &b, "up"]);
    }

    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let ids: Vec<String> = dirs.iter().map(|d| init(d)).collect();
    // Nodes 0 and 1 are members; node 2 is not.
    let members = tmp.path().join("members.txt");
    std::fs::write(&members, format!("{}\n{}\n", ids[0], ids[1])).unwrap();
    for (i, n) in ns.iter().enumerate() {
        let mut c = weftlog(
            n,
            &dirs[i],
            &[
                "run",
                "--listen",
                "0.0.0.0:4270",
                "--http",
                "127.0.0.1:4280",
                "--mdns",
                "--members",
                members.to_str().unwrap(),
            ],
        );
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("\"quic\""),
            "node {i} did not start: {line:?}"
        );
        lab.children.push(child);
    }
    let out = weftlog(
        &ns[1],
        &dirs[1],
        &[
            "append",
            "--stream",
            "customer/20",
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s0, s1) = (status(&ns[0], &dirs[0]), status(&ns[1], &dirs[1]));
        if s0["events"] == 1 && s0["state_hash"] == s1["state_hash"] {
            let peers = s0["peers"].as_array().unwrap();
            assert!(
                peers
                    .iter()
                    .any(|p| p["node"] == ids[1].as_str() && p["connected"] == true),
                "{peers:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the members did not find each other by mDNS:\n{s0}\n{s1}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The non-member heard the announcements but holds nothing, and no
    // member counts it as connected.
    let s2 = status(&ns[2], &dirs[2]);
    assert_eq!(s2["events"], 0, "{s2}");
    for (i, n) in ns.iter().take(2).enumerate() {
        let s = status(n, &dirs[i]);
        for p in s["peers"].as_array().unwrap() {
            assert!(
                !(p["node"] == ids[2].as_str() && p["connected"] == true),
                "member {i} connected the non-member: {s}"
            );
        }
    }
}
