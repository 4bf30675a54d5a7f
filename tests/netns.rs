//! Real partitions between real `weftlog run` processes: four nodes, each in
//! its own network namespace, joined by veth pairs to a Linux bridge in a
//! "switch" namespace. The links are shaped with nftables (no `tc netem`):
//!
//! - node b's link loses 25 % of IPv4 packets each way (`numgen random`);
//! - node d's link duplicates every packet each way (`dup to`, netdev
//!   egress hooks on both ends of its veth);
//! - a partition is an `inet` table in every node's namespace that drops
//!   traffic to and from the other side's addresses; healing deletes it.
//!
//! Before the daemons start, UDP probes (sockets opened in the namespaces)
//! check that the shaping really happens: every datagram over d's link
//! arrives exactly twice, about a quarter over b's link is lost, nothing
//! crosses a cut. Then: all nodes sync; the network is cut into {a, b} and
//! {c, d}; both sides append (one record: different fields on each side and
//! the same field on both, plus other streams); neither side sees the
//! other's events; the cut heals with loss and duplication still on; every
//! node converges to one state, the same-field edits show as exactly one
//! conflict on every node and the different-field edits are merged.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); fails loudly without
//! them unless WEFTLOG_SKIP_NETNS=1. The test creates and removes its
//! namespaces itself (a guard removes them on panic too). The daemons' log
//! tails are printed on failure, or always with WEFTLOG_NETNS_LOGS=1.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The nodes: name and last octet of the address (10.77.0.x/24).
const NODES: [(&str, u8); 4] = [("a", 1), ("b", 2), ("c", 3), ("d", 4)];
/// Node b's link drops this percentage of IPv4 packets, each way.
const LOSS_PERCENT: u32 = 25;
/// The node whose link loses packets.
const LOSSY: usize = 1;
/// The node whose link duplicates packets.
const DUPLICATING: usize = 3;
/// The two sides of the cut (indices into NODES).
const SIDES: [[usize; 2]; 2] = [[0, 1], [2, 3]];
/// Events each node appends to other streams while cut.
const OTHER_EVENTS: u64 = 6;
/// Payload size of the order events appended while cut.
const PAYLOAD_BYTES: usize = 16 * 1024;
/// QUIC port of every node (each in its own namespace).
const QUIC_PORT: u16 = 4270;

fn ip_of(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, octet)
}

/// Runs a command that must succeed; returns its stdout.
fn sh(program: &str, args: &[&str]) -> String {
    sh_input(program, args, None)
}

fn sh_input(program: &str, args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program}: {e}; this test needs iproute2 and nftables \
                 (apt-get install -y nftables iproute2) and root"
            )
        });
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}\ninput:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        input.unwrap_or("")
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Loads an nftables script in namespace `ns`.
fn nft(ns: &str, script: &str) {
    sh_input("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(script));
}

/// The packets a named nftables counter has counted.
fn nft_counter(ns: &str, family: &str, table: &str, counter: &str) -> u64 {
    let out = sh(
        "ip",
        &[
            "netns", "exec", ns, "nft", "-j", "list", "counter", family, table, counter,
        ],
    );
    let v: Value = serde_json::from_str(&out).expect("nft -j prints JSON");
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter {family} {table} {counter} in {out}"))
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it
/// opens stay in that namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let handle = thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd changes only this thread's
        // network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
        f()
    });
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Sends `n` numbered datagrams from node `from` to node `to` and returns
/// how many times each arrived.
fn udp_probe(lab: &Lab, from: usize, to: usize, port: u16, n: u32) -> Vec<u32> {
    let (from_ip, to_ip) = (ip_of(NODES[from].1), ip_of(NODES[to].1));
    let rx = in_netns(&lab.nodes[to].ns, move || {
        UdpSocket::bind(SocketAddrV4::new(to_ip, port)).expect("bind the probe receiver")
    });
    let tx = in_netns(&lab.nodes[from].ns, move || {
        UdpSocket::bind(SocketAddrV4::new(from_ip, 0)).expect("bind the probe sender")
    });
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let sent = Arc::new(AtomicBool::new(false));
    let done = sent.clone();
    let receiver = thread::spawn(move || {
        let mut counts = vec![0u32; n as usize];
        let mut buf = [0u8; 64];
        loop {
            match rx.recv(&mut buf) {
                Ok(4) => {
                    let i = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                    if let Some(c) = counts.get_mut(i as usize) {
                        *c += 1;
                    }
                }
                Ok(_) => {}
                // 300 ms of silence after the last send: all that comes came.
                Err(_) if done.load(Ordering::SeqCst) => return counts,
                Err(_) => {}
            }
        }
    });
    for i in 0..n {
        // A cut's output rule makes sends fail (EPERM); that is expected.
        let _ = tx.send_to(&i.to_be_bytes(), SocketAddrV4::new(to_ip, port));
        thread::sleep(Duration::from_millis(1));
    }
    sent.store(true, Ordering::SeqCst);
    receiver.join().expect("probe receiver")
}

/// One node: its namespace, data directory and (once started) process.
struct NodeNs {
    name: &'static str,
    ns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    log: PathBuf,
    id: String,
    child: Option<Child>,
    /// Kept open: the daemon's stdout after its ready line.
    _stdout: Option<ChildStdout>,
}

/// The namespaces, bridge, links and processes of the test. Dropping it
/// stops the processes and deletes the namespaces (and with them the veth
/// pairs, the bridge and every nftables rule), on panic too.
struct Lab {
    switch: String,
    nodes: Vec<NodeNs>,
    namespaces: Vec<String>,
    tmp: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut lab = Lab {
            switch: format!("wl{pid}sw"),
            nodes: Vec::new(),
            namespaces: Vec::new(),
            tmp,
        };
        let sw = lab.switch.clone();
        lab.add_netns(&sw);
        sh("ip", &["-n", &sw, "link", "set", "lo", "up"]);
        sh("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        for (name, octet) in NODES {
            let ns = format!("wl{pid}{name}");
            lab.add_netns(&ns);
            let port = format!("p{name}");
            // Both ends are created in their namespaces: nothing is left in
            // the host's namespace, whatever happens.
            sh(
                "ip",
                &[
                    "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                    "netns", &sw,
                ],
            );
            let cidr = format!("{}/24", ip_of(octet));
            sh("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            sh("ip", &["-n", &sw, "link", "set", &port, "master", "br0"]);
            sh("ip", &["-n", &sw, "link", "set", &port, "up"]);
            let dir = lab.tmp.path().join(name);
            let log = lab.tmp.path().join(format!("{name}.log"));
            lab.nodes.push(NodeNs {
                name,
                ns,
                ip: ip_of(octet),
                dir,
                log,
                id: String::new(),
                child: None,
                _stdout: None,
            });
        }
        lab
    }

    fn add_netns(&mut self, ns: &str) {
        let out = Command::new("ip")
            .args(["netns", "add", ns])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `ip netns add`: {e}; install iproute2 (apt-get install -y iproute2)")
            });
        assert!(
            out.status.success(),
            "`ip netns add {ns}` failed: {}; this test needs root and network namespaces \
             (set WEFTLOG_SKIP_NETNS=1 to skip it)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.namespaces.push(ns.to_string());
    }

    /// node b's link: loses LOSS_PERCENT % of IPv4 packets each way.
    fn make_lossy(&self, i: usize) {
        nft(
            &self.nodes[i].ns,
            &format!(
                r#"table netdev weftlog_loss {{
  counter dropped {{}}
  chain ingress {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    meta protocol ip numgen random mod 100 < {LOSS_PERCENT} counter name "dropped" drop
  }}
  chain egress {{
    type filter hook egress device "eth0" priority 0; policy accept;
    meta protocol ip numgen random mod 100 < {LOSS_PERCENT} counter name "dropped" drop
  }}
}}
"#
            ),
        );
    }

    /// node d's link: every packet is sent twice, each way. `dup to` the
    /// device a packet leaves by, in that device's egress hook; the copy
    /// passes the hook again, so a mark lets it through undoubled.
    fn make_duplicating(&self, i: usize) {
        let table = |dev: &str| {
            format!(
                r#"table netdev weftlog_dup {{
  counter copies {{}}
  chain egress {{
    type filter hook egress device "{dev}" priority 0; policy accept;
    meta mark 0x7765 counter name "copies" return
    meta mark set 0x7765 dup to "{dev}"
  }}
}}
"#
            )
        };
        // Outgoing: d's end of the veth. Incoming: the switch's end.
        nft(&self.nodes[i].ns, &table("eth0"));
        nft(&self.switch, &table(&format!("p{}", self.nodes[i].name)));
    }

    /// Packets the lossy link has dropped so far.
    fn lost(&self) -> u64 {
        nft_counter(&self.nodes[LOSSY].ns, "netdev", "weftlog_loss", "dropped")
    }

    /// Copies the duplicating link has delivered so far (both ways).
    fn copied(&self) -> u64 {
        nft_counter(
            &self.nodes[DUPLICATING].ns,
            "netdev",
            "weftlog_dup",
            "copies",
        ) + nft_counter(&self.switch, "netdev", "weftlog_dup", "copies")
    }

    /// Cuts the network between the two sides: every node drops traffic to
    /// and from the other side's addresses.
    fn cut(&self) {
        for (s, side) in SIDES.iter().enumerate() {
            let others: Vec<String> = SIDES[1 - s]
                .iter()
                .map(|&j| self.nodes[j].ip.to_string())
                .collect();
            let set = others.join(", ");
            for &i in side {
                nft(
                    &self.nodes[i].ns,
                    &format!(
                        r#"table inet weftlog_cut {{
  counter dropped {{}}
  chain input {{
    type filter hook input priority -10; policy accept;
    ip saddr {{ {set} }} counter name "dropped" drop
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    ip daddr {{ {set} }} counter name "dropped" drop
  }}
}}
"#
                    ),
                );
            }
        }
    }

    /// Heals the cut; returns the packets the cut dropped, per node.
    fn heal(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                let dropped = nft_counter(&n.ns, "inet", "weftlog_cut", "dropped");
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &n.ns,
                        "nft",
                        "delete",
                        "table",
                        "inet",
                        "weftlog_cut",
                    ],
                );
                dropped
            })
            .collect()
    }

    /// `weftlog --data DIR init` for every node, and the member list.
    fn init(&mut self) -> PathBuf {
        for n in &mut self.nodes {
            let out = Command::new(env!("CARGO_BIN_EXE_weftlog"))
                .arg("--data")
                .arg(&n.dir)
                .arg("init")
                .output()
                .expect("run weftlog init");
            assert!(out.status.success(), "init: {out:?}");
            let v: Value = serde_json::from_slice(&out.stdout).expect("init prints JSON");
            n.id = v["node"].as_str().expect("node id").to_string();
        }
        let members = self.tmp.path().join("members.txt");
        let text: String = self
            .nodes
            .iter()
            .map(|n| format!("# {}\n{}\n", n.name, n.id))
            .collect();
        std::fs::write(&members, text).expect("write members");
        members
    }

    /// Starts `weftlog run` in every node's namespace, dialling every other
    /// node, and waits for each ready line.
    fn start(&mut self, members: &Path) {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}:{QUIC_PORT}", n.ip))
            .collect();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let log = File::create(&n.log).expect("create log");
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &n.ns])
                .arg(env!("CARGO_BIN_EXE_weftlog"))
                .arg("--data")
                .arg(&n.dir)
                .args(["run", "--listen", &format!("0.0.0.0:{QUIC_PORT}")])
                .args(["--http", "127.0.0.1:4280", "--members"])
                .arg(members)
                .args(["--anti-entropy-ms", "500", "--idle-timeout-ms", "3000"]);
            for (j, a) in addrs.iter().enumerate() {
                if j != i {
                    cmd.args(["--peer", a]);
                }
            }
            // SAFETY: prctl is async-signal-safe. The daemon dies with the
            // test's thread even if the test is killed before its guard runs.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd
                .env("RUST_LOG", "weftlog=info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn weftlog run");
            let stdout = child.stdout.take().expect("stdout");
            n.child = Some(child);
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                let got = r.read_line(&mut line);
                let _ = tx.send((got.map(|_| line), r.into_inner()));
            });
            let (line, stdout) = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("node {} printed no ready line in 30 s", n.name));
            let line = line.expect("read the ready line");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!(
                    "node {}: the ready line is not JSON ({e}): {line:?}; log:\n{}",
                    n.name,
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            });
            assert_eq!(v["node"], n.id.as_str(), "{v}");
            assert_eq!(v["quic"], format!("0.0.0.0:{QUIC_PORT}"), "{v}");
            n._stdout = Some(stdout);
        }
    }

    /// Runs a CLI command on node `i` (through its running daemon).
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let n = &self.nodes[i];
        let out = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(env!("CARGO_BIN_EXE_weftlog"))
            .arg("--data")
            .arg(&n.dir)
            .args(args)
            .output()
            .expect("run weftlog");
        assert!(
            out.status.success(),
            "node {}: weftlog {args:?} failed:\nstdout: {}\nstderr: {}",
            n.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    fn json(&self, i: usize, args: &[&str]) -> Value {
        let out = self.cli(i, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn status(&self, i: usize) -> Value {
        self.json(i, &["status"])
    }

    fn conflicts(&self, i: usize) -> Vec<Value> {
        self.cli(i, &["conflicts"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn append(&self, i: usize, stream: &str, kind: &str, ops: &[&str]) -> Value {
        let mut args = vec!["append", "--stream", stream, "--kind", kind];
        args.extend_from_slice(ops);
        self.json(i, &args)
    }

    /// Stops the daemons with SIGTERM, one after the other (each must exit
    /// within 15 s); returns their exit codes. One at a time: when peers
    /// stop together, a surviving node can wedge (its `dial_loop`s spin on
    /// connections that are closed but not yet unregistered, and two of
    /// them starve the runtime), which is not what this test is about.
    fn stop(&mut self) -> Vec<(&'static str, Option<i32>)> {
        let mut codes = Vec::new();
        for n in &mut self.nodes {
            let Some(mut c) = n.child.take() else {
                continue;
            };
            // SAFETY: signalling our own child process by its pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            let code = loop {
                match c.try_wait().expect("try_wait") {
                    Some(s) => break s.code(),
                    None if Instant::now() > deadline => {
                        eprintln!(
                            "netns: node {} ignored SIGTERM for 15 s; its threads:\n{}",
                            n.name,
                            threads_of(c.id())
                        );
                        let _ = c.kill();
                        let _ = c.wait();
                        break None;
                    }
                    None => thread::sleep(Duration::from_millis(20)),
                }
            };
            codes.push((n.name, code));
        }
        codes
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            out.push_str(&format!("--- node {} ({}) log tail:\n", n.name, n.id));
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// What each thread of process `pid` is doing: name, state and kernel wait
/// channel from /proc, and the stacks if gdb is installed.
fn threads_of(pid: u32) -> String {
    let mut out = String::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for t in tasks.into_iter().flatten().flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The fields after the command name: state first, then utime (12th)
        // and stime (13th).
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|r| r.1.split_whitespace().collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "  {} {:<16} state {} utime {} stime {} wchan {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            rest.first().unwrap_or(&"?"),
            rest.get(11).unwrap_or(&"?"),
            rest.get(12).unwrap_or(&"?"),
            read("wchan").trim()
        ));
    }
    if let Ok(o) = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "thread apply all bt 30"])
        .output()
    {
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    out
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("WEFTLOG_NETNS_LOGS").is_some() {
            eprintln!("{}", self.log_tails());
        }
        self.stop();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls `check` until it returns `Ok`, or panics after `limit` with the
/// last error.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => {
                eprintln!(
                    "netns: {what}: after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                return v;
            }
            Err(e) if start.elapsed() > limit => {
                panic!("netns: {what}: not within {limit:?}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The `(events, state_hash, frontier)` of each of `nodes` if they all agree
/// and hold `events` events.
fn agree(lab: &Lab, nodes: &[usize], events: u64) -> Result<Value, String> {
    let statuses: Vec<Value> = nodes.iter().map(|&i| lab.status(i)).collect();
    let summary = |s: &Value| {
        serde_json::json!({
            "events": s["events"],
            "state_hash": s["state_hash"],
            "frontier": s["frontier"],
        })
    };
    let first = summary(&statuses[0]);
    let all_equal = statuses.iter().all(|s| summary(s) == first);
    if all_equal && first["events"] == events {
        Ok(statuses[0].clone())
    } else {
        Err(format!(
            "want {events} events on every node; statuses:\n{}",
            statuses
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

/// Whether every node has a live session with every other.
fn full_mesh(lab: &Lab) -> Result<(), String> {
    for (i, n) in lab.nodes.iter().enumerate() {
        let s = lab.status(i);
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let connected: BTreeSet<&str> = peers
            .iter()
            .filter(|p| p["connected"] == true)
            .filter_map(|p| p["node"].as_str())
            .collect();
        let want: BTreeSet<&str> = lab
            .nodes
            .iter()
            .filter(|m| m.name != n.name)
            .map(|m| m.id.as_str())
            .collect();
        if connected != want {
            return Err(format!("node {}: peers {}", n.name, s["peers"]));
        }
    }
    Ok(())
}

/// The seq of `author` in a status's frontier (0 if absent).
fn seq_of(status: &Value, author: &str) -> u64 {
    status["frontier"][author]["seq"].as_u64().unwrap_or(0)
}

#[test]
fn partition_with_loss_and_duplication_heals_and_converges() {
    if std::env::var("WEFTLOG_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("netns: skipped (WEFTLOG_SKIP_NETNS=1)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and needs root (CI runs as root); \
         set WEFTLOG_SKIP_NETNS=1 to skip it"
    );
    let started = Instant::now();
    let mut lab = Lab::new();
    let (a, b, c, d) = (0, 1, 2, 3);

    // The plain network delivers every datagram once.
    let plain = udp_probe(&lab, a, c, 9001, 200);
    assert!(plain.iter().all(|&k| k == 1), "a -> c: {plain:?}");

    // Shaping, checked with UDP before any node runs.
    lab.make_lossy(LOSSY);
    lab.make_duplicating(DUPLICATING);
    for (from, to, port) in [(a, DUPLICATING, 9002), (DUPLICATING, a, 9003)] {
        let got = udp_probe(&lab, from, to, port, 200);
        assert!(
            got.iter().all(|&k| k == 2),
            "{} -> {}: every datagram should arrive exactly twice: {got:?}",
            NODES[from].0,
            NODES[to].0
        );
    }
    let copies_out = nft_counter(
        &lab.nodes[DUPLICATING].ns,
        "netdev",
        "weftlog_dup",
        "copies",
    );
    let copies_in = nft_counter(&lab.switch, "netdev", "weftlog_dup", "copies");
    assert!(
        copies_out >= 200 && copies_in >= 200,
        "the dup rules copied {copies_out} out and {copies_in} in"
    );
    for (from, to, port) in [(a, LOSSY, 9004), (LOSSY, a, 9005)] {
        let got = udp_probe(&lab, from, to, port, 400);
        let arrived = got.iter().filter(|&&k| k > 0).count();
        assert!(got.iter().all(|&k| k <= 1), "loss must not duplicate");
        // 25 % loss: 300 expected, standard deviation about 9.
        assert!(
            (220..=370).contains(&arrived),
            "{} -> {}: {arrived} of 400 datagrams arrived over a {LOSS_PERCENT} % lossy link",
            NODES[from].0,
            NODES[to].0
        );
        eprintln!(
            "netns: {} -> {} over the lossy link: {arrived} of 400 datagrams arrived",
            NODES[from].0, NODES[to].0
        );
    }

    // The nodes.
    let members = lab.init();
    lab.start(&members);
    let ids: Vec<String> = lab.nodes.iter().map(|n| n.id.clone()).collect();
    lab.append(
        a,
        "customer/20",
        "Registered",
        &[
            "--set",
            "name=\"Ada\"",
            "--set",
            "email=\"ada@example.org\"",
            "--set",
            "city=\"London\"",
        ],
    );
    for i in [b, c, d] {
        let note = format!("note=\"hello from {}\"", NODES[i].0);
        lab.append(
            i,
            &format!("desk/{}", NODES[i].0),
            "Opened",
            &["--set", &note],
        );
    }
    let all = [a, b, c, d];
    let before_cut = wait_for("all four nodes in sync", Duration::from_secs(30), || {
        agree(&lab, &all, 4)
    });
    // Every node should see a live session with every other.
    wait_for(
        "every node connected to every other",
        Duration::from_secs(20),
        || full_mesh(&lab),
    );

    // Cut {a, b} | {c, d}.
    lab.cut();
    let across = udp_probe(&lab, a, c, 9006, 50);
    assert!(
        across.iter().all(|&k| k == 0),
        "the cut lets a -> c through"
    );
    let across = udp_probe(&lab, d, b, 9007, 50);
    assert!(
        across.iter().all(|&k| k == 0),
        "the cut lets d -> b through"
    );
    // The daemons notice the dead links (idle timeout 3 s).
    wait_for(
        "every node sees the other side disconnected",
        Duration::from_secs(20),
        || {
            for (s, side) in SIDES.iter().enumerate() {
                for &i in side {
                    let st = lab.status(i);
                    for p in st["peers"].as_array().cloned().unwrap_or_default() {
                        let other_side = SIDES[1 - s].iter().any(|&j| p["node"] == ids[j].as_str());
                        if other_side && p["connected"] == true {
                            return Err(format!("node {}: peers {}", NODES[i].0, st["peers"]));
                        }
                    }
                }
            }
            Ok(())
        },
    );

    let loss_before_cut_sync = lab.lost();
    // Both sides edit customer/20: different fields, and the name on both.
    lab.append(
        a,
        "customer/20",
        "EmailChanged",
        &["--set", "email=\"ada@side-one.example\""],
    );
    lab.append(
        b,
        "customer/20",
        "Renamed",
        &["--set", "name=\"Ada Lovelace\""],
    );
    lab.append(c, "customer/20", "Moved", &["--set", "city=\"Paris\""]);
    lab.append(d, "customer/20", "Renamed", &["--set", "name=\"Ada King\""]);
    // And other streams: a counter everyone adds to, and per-node orders.
    for i in all {
        for k in 0..OTHER_EVENTS {
            if k % 2 == 0 {
                lab.append(i, "stats/visits", "Visited", &["--add", "visits=1"]);
            } else {
                let item = format!("item=\"{}-{k}\"", NODES[i].0);
                let stream = format!("order/{}-{k}", NODES[i].0);
                // A payload of several packets, so that loss and
                // duplication hit whole events in flight.
                let filler: String = (0..PAYLOAD_BYTES)
                    .map(|x| char::from(b'a' + ((x * 7 + k as usize + i) % 26) as u8))
                    .collect();
                let payload = format!("{{\"note\":\"{filler}\"}}");
                lab.append(
                    i,
                    &stream,
                    "Ordered",
                    &["--set", &item, "--payload", &payload],
                );
            }
        }
    }
    let per_side = 2 * (1 + OTHER_EVENTS);
    let mut side_status = Vec::new();
    for side in SIDES {
        let names = format!("{} and {}", NODES[side[0]].0, NODES[side[1]].0);
        side_status.push(wait_for(
            &format!("{names} in sync while cut"),
            Duration::from_secs(30),
            || agree(&lab, &side, 4 + per_side),
        ));
    }
    let lost_in_cut = lab.lost() - loss_before_cut_sync;
    assert!(
        lost_in_cut > 0,
        "the lossy link lost nothing while a and b synced over it"
    );
    // A few anti-entropy rounds more: still nothing crosses.
    thread::sleep(Duration::from_millis(2000));
    for (s, side) in SIDES.iter().enumerate() {
        for &i in side {
            let st = lab.status(i);
            assert_eq!(
                st["events"],
                4 + per_side,
                "node {} saw events from across the cut: {st}",
                NODES[i].0
            );
            for &j in &SIDES[1 - s] {
                assert_eq!(
                    seq_of(&st, &ids[j]),
                    seq_of(&before_cut, &ids[j]),
                    "node {} saw node {}'s events across the cut: {st}",
                    NODES[i].0,
                    NODES[j].0
                );
            }
            assert_eq!(st["state_hash"], side_status[s]["state_hash"]);
            assert_eq!(
                lab.conflicts(i),
                Vec::<Value>::new(),
                "no conflict within a side"
            );
        }
    }
    let seen = lab.json(a, &["get", "--stream", "customer/20"]);
    assert_eq!(seen["fields"]["name"]["value"], "Ada Lovelace", "{seen}");
    assert_eq!(seen["fields"]["city"]["value"], "London", "{seen}");
    let seen = lab.json(d, &["get", "--stream", "customer/20"]);
    assert_eq!(seen["fields"]["name"]["value"], "Ada King", "{seen}");
    assert_eq!(
        seen["fields"]["email"]["value"], "ada@example.org",
        "{seen}"
    );

    // Heal, with loss and duplication still on.
    let (loss_before, dup_before) = (lab.lost(), lab.copied());
    let cut_drops = lab.heal();
    assert!(
        cut_drops.iter().all(|&n| n > 0),
        "every node's cut should have dropped packets: {cut_drops:?}"
    );
    let total = 4 + 2 * per_side;
    let converged = wait_for(
        "all four nodes converged after the heal",
        Duration::from_secs(45),
        || agree(&lab, &all, total),
    );
    let loss_during = lab.lost() - loss_before;
    let dup_during = lab.copied() - dup_before;
    eprintln!(
        "netns: the cut dropped {cut_drops:?} packets (a, b, c, d); the lossy link dropped \
         {lost_in_cut} while a and b synced during the cut and {loss_during} from the heal \
         to convergence; the duplicating link copied {dup_during} from the heal to convergence"
    );
    assert!(dup_during > 0, "no packet was duplicated during the heal");

    // Every node: one conflict (the name), the other edits merged.
    let mut first_conflicts = None;
    for i in all {
        let st = lab.status(i);
        assert_eq!(st["state_hash"], converged["state_hash"]);
        assert_eq!(st["frontier"], converged["frontier"]);
        assert_eq!(st["equivocations"], serde_json::json!([]), "{st}");
        let conflicts = lab.conflicts(i);
        assert_eq!(
            conflicts.len(),
            1,
            "node {}: want exactly one conflict: {conflicts:?}",
            NODES[i].0
        );
        let k = &conflicts[0];
        assert_eq!(k["stream"], "customer/20", "{k}");
        assert_eq!(k["field"], "name", "{k}");
        let values: BTreeSet<&str> = k["values"]
            .as_array()
            .expect("values")
            .iter()
            .filter_map(|v| v["value"].as_str())
            .collect();
        assert_eq!(
            values,
            BTreeSet::from(["Ada Lovelace", "Ada King"]),
            "node {}: {k}",
            NODES[i].0
        );
        let authors: BTreeSet<&str> = k["values"]
            .as_array()
            .expect("values")
            .iter()
            .filter_map(|v| v["author"].as_str())
            .collect();
        assert_eq!(authors, BTreeSet::from([ids[b].as_str(), ids[d].as_str()]));
        match &first_conflicts {
            None => first_conflicts = Some(conflicts),
            Some(f) => assert_eq!(&conflicts, f, "nodes show the conflict differently"),
        }

        let s = lab.json(i, &["get", "--stream", "customer/20"]);
        let fields = &s["fields"];
        assert_eq!(fields["email"]["value"], "ada@side-one.example", "{s}");
        assert_eq!(fields["city"]["value"], "Paris", "{s}");
        assert!(fields["email"].get("conflict").is_none(), "{s}");
        assert!(fields["city"].get("conflict").is_none(), "{s}");
        assert_eq!(
            fields["name"]["conflict"].as_array().map(Vec::len),
            Some(2),
            "{s}"
        );
        assert_eq!(s["version"], 5, "{s}");
        let visits = lab.json(i, &["get", "--stream", "stats/visits"]);
        let want = 4 * OTHER_EVENTS.div_ceil(2);
        assert_eq!(visits["counters"]["visits"], want, "{visits}");
        let order = lab.json(i, &["get", "--stream", "order/d-1"]);
        assert_eq!(order["fields"]["item"]["value"], "d-1", "{order}");
    }
    let authors = converged["frontier"].as_object().map(|f| f.len());
    assert_eq!(authors, Some(4), "{converged}");

    // The dial loops find every peer again, over the lossy and duplicating
    // links, and live pushes reach everyone.
    wait_for(
        "every node reconnected to every other after the heal",
        Duration::from_secs(30),
        || full_mesh(&lab),
    );
    let loss_before = lab.lost();
    for i in all {
        let filler = NODES[i].0.repeat(PAYLOAD_BYTES);
        let payload = format!("{{\"note\":\"{filler}\"}}");
        let stream = format!("order/{}-late", NODES[i].0);
        let item = format!("item=\"{}-late\"", NODES[i].0);
        lab.append(
            i,
            &stream,
            "Ordered",
            &["--set", &item, "--payload", &payload],
        );
    }
    wait_for(
        "all four nodes in sync again after appends on the healed network",
        Duration::from_secs(30),
        || agree(&lab, &all, total + 4),
    );
    let lost_late = lab.lost() - loss_before;
    eprintln!("netns: the lossy link dropped {lost_late} packets during the last round");
    for i in all {
        assert_eq!(
            Some(&lab.conflicts(i)),
            first_conflicts.as_ref(),
            "node {}: the conflict changed",
            NODES[i].0
        );
        let late = lab.json(i, &["get", "--stream", "order/b-late"]);
        assert_eq!(late["fields"]["item"]["value"], "b-late", "{late}");
    }

    // Clean shutdown, then the guard removes the namespaces.
    let codes = lab.stop();
    for (name, code) in &codes {
        assert_eq!(
            *code,
            Some(0),
            "node {name} did not stop cleanly on SIGTERM: {codes:?}"
        );
    }
    let namespaces = lab.namespaces.clone();
    drop(lab);
    let left = sh("ip", &["netns", "list"]);
    for ns in &namespaces {
        assert!(
            !left.split_whitespace().any(|w| w == ns),
            "namespace {ns} left behind: {left}"
        );
    }
    eprintln!("netns: done in {:.1} s", started.elapsed().as_secs_f64());
}
