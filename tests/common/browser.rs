//! The browser harness's Rust side: runs a script of `tests/browser/` with
//! Node (playwright-core driving Debian's headless Chromium) and talks to
//! it over its stdio, one JSON line per step. `.ci/run` installs Node,
//! Chromium and the script's packages; where one is missing, [`missing`]
//! says which, and the test prints that it was skipped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

/// The folder of the scripts.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the harness lacks on this machine, if anything.
pub fn missing() -> Option<String> {
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".into());
    }
    let chromium = std::env::var("CHROMIUM").ok().map(PathBuf::from);
    let found = chromium
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from))
        .any(|p| p.exists());
    if !found {
        return Some("chromium is not installed".into());
    }
    if !scripts().join("node_modules/playwright-core").exists() {
        return Some("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    None
}

/// A running script.
pub struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl Script {
    /// Runs `tests/browser/NAME` with `args`; screenshots go to
    /// `target/browser-artifacts`.
    pub fn start(name: &str, args: &[&str]) -> Script {
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
        let mut child = Command::new("node")
            .arg(scripts().join(name))
            .args(args)
            .env("WEFTLOG_ARTIFACTS", &artifacts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Script {
            child,
            stdin,
            lines,
            name: name.into(),
        }
    }

    /// The script's next JSON line, within `wait`.
    pub fn next(&mut self, wait: Duration) -> Value {
        let line = self.lines.recv_timeout(wait).unwrap_or_else(|_| {
            let status = self.child.try_wait().ok().flatten();
            panic!("{}: no line within {wait:?} (exit: {status:?})", self.name)
        });
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: {line:?} is not JSON: {e}", self.name))
    }

    /// Sends the script a line (a go-ahead).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the script to exit successfully.
    pub fn finish(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}: {status}", self.name);
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
