//! A `weftlog run` process on loopback, for the tests that drive the real
//! server: started with system-picked ports, ready once it prints its ready
//! line, talked to over HTTP, killed (SIGKILL or SIGTERM) and restarted on
//! the same data directory. A [`Proc`] kills and reaps its process when
//! dropped, so a failing test leaves nothing running.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long any wait (startup, convergence, exit) may take on a busy
/// machine before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Anti-entropy period of the test nodes: short, so that a missed push is
/// repaired quickly.
pub const ANTI_ENTROPY_MS: &str = "300";

/// An HTTP client that hands back every status as an answer (not an
/// error), with a generous timeout.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A `weftlog run` process. Dropping it kills and reaps the process.
pub struct Proc {
    pub name: String,
    pub dir: PathBuf,
    /// Where its stderr goes (appended over restarts).
    pub log: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub id: String,
    pub quic: String,
    pub http: String,
    pub agent: ureq::Agent,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Options of [`Proc::start`].
#[derive(Default)]
pub struct Opts<'a> {
    pub peers: Vec<String>,
    pub members: Option<&'a Path>,
    /// The QUIC address (default: a free loopback port).
    pub listen: Option<String>,
    /// The HTTP address (default: a free loopback port, another at each
    /// launch).
    pub http: Option<String>,
    /// More arguments of `run`.
    pub extra: Vec<&'a str>,
    /// More environment variables of the process (on every launch).
    pub env: Vec<(&'a str, &'a str)>,
}

/// One server-sent event: (event name, id, data as JSON).
pub type SseMessage = (String, Option<String>, Value);

/// A loopback address with a port free right now (for a node that must
/// keep its HTTP address across restarts).
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Two nodes `a` and `b` made under `root`, each dialling the other on a
/// fixed loopback port, with `extra` arguments of `run`.
pub fn pair(root: &Path, extra: &[&str]) -> [Proc; 2] {
    let dirs = [root.join("a"), root.join("b")];
    for d in &dirs {
        init(d);
    }
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().to_string()
        })
        .collect();
    let start = |i: usize| {
        Proc::start(
            ["a", "b"][i],
            &dirs[i],
            Opts {
                peers: vec![ports[1 - i].clone()],
                listen: Some(ports[i].clone()),
                extra: extra.to_vec(),
                ..Default::default()
            },
        )
    };
    [start(0), start(1)]
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    /// Starts `weftlog --data DIR run` on loopback (ports picked by the
    /// system) and waits for its ready line.
    pub fn start(name: &str, dir: &Path, opts: Opts) -> Proc {
        let listen = opts.listen.as_deref().unwrap_or("127.0.0.1:0");
        let mut args: Vec<String> = [
            "run",
            "--listen",
            listen,
            "--http",
            opts.http.as_deref().unwrap_or("127.0.0.1:0"),
            "--anti-entropy-ms",
            ANTI_ENTROPY_MS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for p in &opts.peers {
            args.push("--peer".into());
            args.push(p.clone());
        }
        if let Some(m) = opts.members {
            args.push("--members".into());
            args.push(m.display().to_string());
        }
        args.extend(opts.extra.iter().map(|s| s.to_string()));
        let log = dir.with_extension("stderr");
        let mut p = Proc {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            log,
            args,
            env: opts
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            id: String::new(),
            quic: String::new(),
            http: String::new(),
            agent: agent(),
        };
        p.launch();
        p
    }

    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "{}: already running", self.name);
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
            .arg("--data")
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "weftlog=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn weftlog run");
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep the pipe open (and drained) while the process lives.
            let mut rest = String::new();
            while matches!(reader.read_line(&mut rest), Ok(n) if n > 0) {
                rest.clear();
            }
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "{}: no ready line within {DEADLINE:?}; stderr:\n{}",
                self.name,
                tail(&self.log, 30)
            )
        });
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{}: the ready line {line:?} is not JSON ({e}); stderr:\n{}",
                self.name,
                tail(&self.log, 30)
            )
        });
        let field = |k: &str| {
            ready[k]
                .as_str()
                .unwrap_or_else(|| panic!("{}: ready line without {k}: {ready}", self.name))
                .to_string()
        };
        let id = field("node");
        assert!(
            self.id.is_empty() || self.id == id,
            "{}: restarted as another node",
            self.name
        );
        self.id = id;
        self.quic = field("quic");
        self.http = field("http");
        assert_eq!(field("data"), self.dir.display().to_string());
        assert_eq!(
            fs::read_to_string(self.dir.join("http.addr"))
                .unwrap()
                .trim(),
            self.http,
            "{}: http.addr does not hold the address in the ready line",
            self.name
        );
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("running").id() as libc::pid_t
    }

    /// SIGKILL, and reap.
    pub fn sigkill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        let status = c.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", self.name);
    }

    /// SIGTERM, and wait (up to [`DEADLINE`]) for the exit: its status and
    /// how long it took.
    pub fn sigterm(&mut self) -> (ExitStatus, Duration) {
        // SAFETY: the pid is our child, not yet reaped.
        let r = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(r, 0, "{}: kill(SIGTERM) failed", self.name);
        let t0 = Instant::now();
        let mut c = self.child.take().unwrap();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return (status, t0.elapsed());
            }
            if t0.elapsed() > DEADLINE {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{}: still running {DEADLINE:?} after SIGTERM; stderr:\n{}",
                    self.name,
                    tail(&self.log, 40)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server-sent events of `GET path`, read in a thread, sent to
    /// the channel as (event name, id, data) (messages with data only).
    pub fn sse(&self, path: &str, last_event_id: Option<&str>) -> mpsc::Receiver<SseMessage> {
        let (tx, rx) = mpsc::channel();
        let url = self.url(path);
        let last = last_event_id.map(str::to_string);
        thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
            let mut req = agent.get(&url);
            if let Some(l) = &last {
                req = req.header("last-event-id", l);
            }
            let Ok(r) = req.call() else { return };
            let reader = BufReader::new(r.into_body().into_reader());
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let v = serde_json::from_str(&data).unwrap_or(Value::Null);
                        if tx.send((event.clone(), id.clone(), v)).is_err() {
                            return;
                        }
                    }
                    (event, id, data) = (String::new(), None, String::new());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.into();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.into());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
        });
        rx
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// GET `path`: status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = self
            .agent
            .get(self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("{}: GET {path}: {e}", self.name));
        let code = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .unwrap();
        (code, body)
    }

    /// GET `path`, which must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "{}: GET {path}: {body}", self.name);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// POST JSON: status code and JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post(&self.agent, &self.url(path), body)
            .unwrap_or_else(|e| panic!("{}: POST {path}: {e}", self.name))
    }

    pub fn status(&self) -> Value {
        self.get_json("/v1/status")
    }

    /// Appends through the API; the event, which must be new (201).
    pub fn append(&self, stream: &str, body: Value) -> Value {
        let (code, v) = self.post(&format!("/v1/streams/{stream}/events"), &body);
        assert_eq!(code, 201, "{}: append to {stream}: {v}", self.name);
        v
    }

    /// The ids of the events in `GET /v1/log`, in order.
    pub fn log_ids(&self) -> Vec<String> {
        let (code, body) = self.get("/v1/log");
        assert_eq!(code, 200, "{}: GET /v1/log: {body}", self.name);
        body.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["id"].as_str().unwrap().to_string()
            })
            .collect()
    }

    pub fn partition(&self, block: &[&str]) {
        let (code, v) = self.post("/v1/admin/partition", &json!({ "block": block }));
        assert_eq!(code, 200, "{}: partition: {v}", self.name);
        let got: BTreeSet<&str> = v["blocked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap())
            .collect();
        assert_eq!(got, block.iter().copied().collect(), "{}", self.name);
    }
}

/// POST JSON with `agent`: the status code and the JSON answer, or the
/// transport error.
pub fn post(agent: &ureq::Agent, url: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    let mut r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())?;
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((code, v))
}

/// `weftlog --data DIR init`: the node id.
pub fn init(dir: &Path) -> String {
    let r = super::weftlog(dir, &["init"]);
    assert_eq!(r.code, Some(0), "init: {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v["node"].as_str().unwrap().to_string()
}

/// Waits (polling every 50 ms, up to [`DEADLINE`]) until every node holds
/// `events` events and all state hashes are equal; returns the hash.
pub fn converge_to(nodes: &[&Proc], events: u64) -> String {
    let t0 = Instant::now();
    loop {
        let statuses: Vec<Value> = nodes.iter().map(|p| p.status()).collect();
        let hashes: BTreeSet<&str> = statuses
            .iter()
            .map(|s| s["state_hash"].as_str().unwrap())
            .collect();
        if hashes.len() == 1 && statuses.iter().all(|s| s["events"] == events) {
            return hashes.into_iter().next().unwrap().to_string();
        }
        if t0.elapsed() > DEADLINE {
            let mut msg = format!("no convergence to {events} events:\n");
            for (p, s) in nodes.iter().zip(&statuses) {
                msg.push_str(&format!(
                    "{}: {} events, hash {}\n--- stderr (tail):\n{}\n",
                    p.name,
                    s["events"],
                    s["state_hash"],
                    tail(&p.log, 20)
                ));
            }
            panic!("{msg}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Copies a directory tree (files and subdirectories): a data directory's
/// backup, as an operator takes one.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}
