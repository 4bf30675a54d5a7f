//! Guards a full disk on a running node (`weftlog run`, its data directory
//! on a small tmpfs): once a write runs out of space, appends and imports
//! are refused with 507 and a JSON error naming the cause, `status` (HTTP
//! and CLI) says writes are paused, every acknowledged event is still in
//! the log, and the append whose write failed is neither acknowledged nor
//! lost; once space is freed, with no restart, that append is acknowledged,
//! new appends work, a retried command id gives the existing event, and
//! after a stop the reopened log holds every acknowledged event with no
//! torn tail.
//!
//! Needs root to mount the tmpfs (CI runs as root); otherwise the test says
//! why on stderr and passes without running. The tmpfs is unmounted by a
//! drop guard, after the node is killed, whatever happens.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weftlog::node::Node;

/// How long any wait may take on a busy machine before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// Time between two polls of a condition.
const POLL: Duration = Duration::from_millis(50);
/// Size of the tmpfs: room for the node's files, one segment allocation
/// (4 MiB) and the filler file.
const TMPFS_SIZE: &str = "12m";
/// Space left free beside the filler file: less than the 4 MiB by which a
/// segment's allocation grows, so the first growth fails.
const LEFT_FREE_BYTES: u64 = 2 << 20;
/// Payload bytes of each filling append (under the 64 KiB payload limit).
const PAYLOAD_BYTES: usize = 60_000;
/// Filling appends made at most before the disk must have filled.
const MAX_FILL_APPENDS: usize = 200;

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy: detach it now, the kernel frees it when unused.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A `weftlog run` process; dropping it kills and reaps it.
struct Proc {
    child: Option<Child>,
    http: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `weftlog --data DIR run` on loopback and waits for its ready
    /// line; stderr goes to `log`.
    fn start(dir: &Path, log: &Path) -> Proc {
        let stderr = File::create(log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
            .arg("--data")
            .arg(dir)
            .args(["run", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .env("RUST_LOG", "weftlog=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn weftlog run");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = String::new();
            while matches!(reader.read_line(&mut rest), Ok(n) if n > 0) {
                rest.clear();
            }
        });
        let mut p = Proc {
            child: Some(child),
            http: String::new(),
            log: log.to_path_buf(),
        };
        let line = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no ready line; stderr:\n{}", p.stderr()));
        let ready: Value = serde_json::from_str(&line).unwrap();
        p.http = ready["http"].as_str().unwrap().to_string();
        p
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    fn status(&self) -> Value {
        let (code, v) = get(&self.url("/v1/status"));
        assert_eq!(code, 200, "{v}");
        v
    }

    /// The ids of the events in the durable log (`GET /v1/log`).
    fn log_ids(&self) -> BTreeSet<String> {
        let mut r = agent().get(self.url("/v1/log")).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .unwrap();
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["id"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: the pid is our child, not yet reaped.
        let r = unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0);
        let t0 = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "{status}; stderr:\n{}", self.stderr());
                return;
            }
            if t0.elapsed() > DEADLINE {
                let _ = c.kill();
                let _ = c.wait();
                panic!("still running after SIGTERM; stderr:\n{}", self.stderr());
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().unwrap();
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (code, serde_json::from_str(&text).unwrap())
}

/// POSTs `body`: status code and JSON answer, or the transport error.
fn try_post(url: &str, content_type: &str, body: Vec<u8>) -> Result<(u16, Value), ureq::Error> {
    let mut r = agent()
        .post(url)
        .header("content-type", content_type)
        .send(body)?;
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((code, v))
}

fn post(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    try_post(url, content_type, body).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// An append with a command id and a payload of `payload` bytes.
fn append_body(command: &str, payload: usize) -> Vec<u8> {
    json!({
        "kind": "Filled",
        "set": { "by": command },
        "payload": "x".repeat(payload),
        "command_id": command,
    })
    .to_string()
    .into_bytes()
}

/// The answer to an append started by [`append_async`], or the transport
/// error (the node went away).
type Answer = Result<(u16, Value), String>;

/// Starts an append on its own thread; its answer comes on the receiver.
fn append_async(p: &Proc, command: &str, payload: usize) -> mpsc::Receiver<Answer> {
    let url = p.url("/v1/streams/disk/events");
    let body = append_body(command, payload);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let r = try_post(&url, "application/json", body).map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    rx
}

fn append(p: &Proc, command: &str, payload: usize) -> (u16, Value) {
    post(
        &p.url("/v1/streams/disk/events"),
        "application/json",
        append_body(command, payload),
    )
}

/// Polls `p`'s status until `ok` holds for it; that status.
fn wait_status(p: &Proc, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = p.status();
        if ok(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}: {s}\nstderr:\n{}",
            p.stderr()
        );
        thread::sleep(POLL);
    }
}

/// A running node whose disk just filled. Fields drop in order: the
/// process, then the tmpfs, then the directory it is mounted on.
struct Full {
    p: Proc,
    filler: PathBuf,
    dir: PathBuf,
    /// Acknowledged appends: (command id, event id).
    acked: Vec<(String, String)>,
    /// The append whose write ran out of space, and where its answer comes.
    stuck: (String, mpsc::Receiver<Answer>),
    _tmpfs: Tmpfs,
    _root: tempfile::TempDir,
}

/// Mounts a tmpfs, starts a node on it, and fills the disk: one append
/// allocates the first 4 MiB of the segment, a filler file takes all but
/// [`LEFT_FREE_BYTES`] of what is left, and appends fill the allocation
/// until the one whose write needs the segment to grow gets no answer.
/// `None` (with a note on stderr) when a tmpfs cannot be mounted here.
fn fill(test: &str) -> Option<Full> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{test}: skipped: mounting a tmpfs needs root");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("mnt");
    let tmpfs = match Tmpfs::mount(&mnt, TMPFS_SIZE) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{test}: skipped: cannot mount a tmpfs on {mnt:?}: {e}");
            return None;
        }
    };
    let dir = mnt.join("node");
    let r = common::weftlog(&dir, &["init"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let p = Proc::start(&dir, &root.path().join("node.stderr"));

    let mut acked = Vec::new();
    let (code, v) = append(&p, "first", 10);
    assert_eq!(code, 201, "{v}");
    acked.push(("first".to_string(), v["id"].as_str().unwrap().to_string()));
    let s = p.status();
    assert_eq!(
        (&s["writes"], &s["disk_full"]),
        (&json!("ok"), &Value::Null)
    );
    let free = free_bytes(&mnt);
    assert!(free > LEFT_FREE_BYTES, "{free} bytes free");
    let filler = mnt.join("filler");
    let mut f = File::create(&filler).unwrap();
    let chunk = vec![0xa5u8; 1 << 16];
    let mut left = free - LEFT_FREE_BYTES;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    drop(f);

    for i in 0..MAX_FILL_APPENDS {
        let command = format!("fill-{i}");
        let rx = append_async(&p, &command, PAYLOAD_BYTES);
        let t0 = Instant::now();
        loop {
            if let Ok(answer) = rx.recv_timeout(POLL) {
                let (code, v) = answer.unwrap();
                assert_eq!(code, 201, "{command}: {v}");
                acked.push((command, v["id"].as_str().unwrap().to_string()));
                break;
            }
            // Appends are made one at a time: once the disk is full, the
            // unanswered one is in the batch that could not be written.
            if !p.status()["disk_full"].is_null() {
                eprintln!(
                    "{test}: the disk filled after {} acknowledged appends",
                    acked.len()
                );
                return Some(Full {
                    p,
                    filler,
                    dir,
                    acked,
                    stuck: (command, rx),
                    _tmpfs: tmpfs,
                    _root: root,
                });
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "{command}: no answer, disk not full"
            );
        }
    }
    panic!("the disk never filled");
}

/// Bytes free on the file system holding `dir` (`statvfs`).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is a writable statvfs
    // buffer; both live for the call.
    let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(r, 0, "statvfs {dir:?}");
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // Both are narrower than u64 on some targets.
    #[allow(clippy::unnecessary_cast)]
    let free = (st.f_bavail as u64) * (st.f_frsize as u64);
    free
}

/// The ids of the events in a stopped node's log, and whether its reopen
/// found a torn tail.
fn reopen(dir: &Path) -> BTreeSet<String> {
    let (node, recovery) = Node::open(dir).unwrap();
    assert_eq!(recovery.torn, None);
    let mut ids = BTreeSet::new();
    node.scan(|_, id| {
        ids.insert(id.to_string());
    })
    .unwrap();
    ids
}

#[test]
fn a_full_disk_pauses_appends_and_they_resume_when_space_is_freed() {
    let test = "a_full_disk_pauses_appends";
    let Some(mut full) = fill(test) else {
        return;
    };
    let Full {
        p,
        filler,
        dir,
        acked,
        stuck: (stuck_command, stuck_rx),
        ..
    } = &mut full;

    // Meanwhile: status says so, appends and imports are refused with 507.
    let s = p.status();
    eprintln!("{test}: GET /v1/status while full:\n{s:#}");
    assert_eq!(s["writes"], "paused: disk full", "{s}");
    let error = s["disk_full"]["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{s}");
    assert!(s["disk_full"]["since_ms"].as_u64().unwrap() > 0, "{s}");
    let (code, v) = append(p, "refused", 10);
    eprintln!("{test}: POST /v1/streams/disk/events while full: {code} {v}");
    assert_eq!(code, 507, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.starts_with("disk full (") && msg.contains("resume by themselves"),
        "{msg}"
    );
    let (code, v) = append(p, stuck_command, PAYLOAD_BYTES);
    assert_eq!(code, 507, "a retry of the kept append while full: {v}");
    let export = {
        let mut r = agent().post(p.url("/v1/export")).send(Vec::new()).unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap()
    };
    let (code, v) = post(
        &p.url("/v1/import"),
        "application/octet-stream",
        export.clone(),
    );
    eprintln!("{test}: POST /v1/import while full: {code} {v}");
    assert_eq!(code, 507, "an import while full: {v}");
    let cli = common::weftlog(dir, &["status"]);
    assert_eq!(cli.code, Some(0), "{}", cli.stderr);
    eprintln!("{test}: weftlog status while full:\n{}", cli.stdout);
    let cli: Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(cli["writes"], "paused: disk full");
    // Every acknowledged event is in the log, and only those; the kept
    // batch is tried again.
    let ids = p.log_ids();
    for (command, id) in acked.iter() {
        assert!(ids.contains(id), "{command} ({id}) was acknowledged");
    }
    assert_eq!(
        ids.len(),
        acked.len(),
        "only acknowledged events are durable"
    );
    wait_status(p, "a second try", |s| {
        s["disk_full"]["tries"].as_u64() >= Some(2)
    });
    assert!(
        stuck_rx.try_recv().is_err(),
        "the kept append was answered while the disk was full"
    );

    // Space is freed: the kept append is acknowledged, with no restart.
    fs::remove_file(&*filler).unwrap();
    let (code, v) = stuck_rx
        .recv_timeout(DEADLINE)
        .expect("the kept append is answered once space is freed")
        .unwrap();
    assert_eq!(code, 201, "{v}");
    let stuck_id = v["id"].as_str().unwrap().to_string();
    acked.push((stuck_command.clone(), stuck_id.clone()));
    let s = p.status();
    assert_eq!(
        (&s["writes"], &s["disk_full"]),
        (&json!("ok"), &Value::Null)
    );
    let (code, v) = append(p, "after", 10);
    assert_eq!(code, 201, "{v}");
    acked.push(("after".into(), v["id"].as_str().unwrap().to_string()));
    let (code, v) = append(p, stuck_command, PAYLOAD_BYTES);
    assert_eq!(
        code, 200,
        "a retried command id gives the existing event: {v}"
    );
    assert_eq!(v["id"], stuck_id.as_str());
    let (code, v) = post(&p.url("/v1/import"), "application/octet-stream", export);
    assert_eq!((code, &v["imported"]), (200, &json!(0)), "{v}");
    let stderr = p.stderr();
    assert!(
        stderr.contains("disk full") && stderr.contains("writes resume"),
        "{stderr}"
    );

    // Stopped and reopened: every acknowledged event, no torn tail.
    p.stop();
    let want: BTreeSet<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(reopen(dir), want);
    let cli = common::weftlog(dir, &["status"]);
    let cli: Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(cli["events"], acked.len());
}

/// SIGTERM while the disk is full does not wait for space: the node tries
/// the kept batch once more, gives up on it (it was never acknowledged),
/// and exits; the reopened log holds every acknowledged event and nothing
/// torn.
#[test]
fn sigterm_while_the_disk_is_full_exits_and_keeps_every_acknowledged_event() {
    let test = "sigterm_while_full";
    let Some(mut full) = fill(test) else {
        return;
    };
    let Full {
        p,
        dir,
        acked,
        stuck: (stuck_command, stuck_rx),
        ..
    } = &mut full;
    let t0 = Instant::now();
    p.stop();
    eprintln!("{test}: stopped {:?} after SIGTERM", t0.elapsed());
    // The kept append is never acknowledged: an error, or the connection
    // closed unanswered.
    if let Ok(Ok((code, v))) = stuck_rx.recv_timeout(DEADLINE) {
        assert!(code >= 500, "{stuck_command}: {code} {v}");
    }
    let stderr = p.stderr();
    assert!(stderr.contains("closing with the disk full"), "{stderr}");
    let want: BTreeSet<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(reopen(dir), want);
}
