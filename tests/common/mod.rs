//! Helpers shared by the integration tests: running the binary, a `weftlog
//! run` server process ([`server`]), loop counts from the environment, and a
//! small seeded generator so that every schedule and every garbage byte
//! replays.
#![allow(dead_code)] // each test file uses a subset

pub mod browser;
pub mod server;

use std::path::Path;
use std::process::Command;

use weftlog_proto::state::Draft;
use weftlog_proto::Op;

/// What one run of the binary did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `weftlog --data DATA ARGS…` and collects what it did.
pub fn weftlog(data: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run weftlog");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// A count taken from the environment variable `name`, `default` when it
/// is unset: how long a loop test runs (CI keeps the defaults; a longer run
/// sets the variable).
///
/// # Panics
///
/// If the variable is set but is not a positive integer: a run that asked
/// for a count should not quietly run another.
#[track_caller]
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => default,
        Err(std::env::VarError::NotUnicode(v)) => {
            panic!("{name}={v:?} is not a count: set it to a positive integer, or unset it for {default}")
        }
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!(
                "{name}={v:?} is not a count: set it to a positive integer, or unset it for {default}"
            ),
        },
    }
}

/// SplitMix64: a small seeded generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// An `Edited` event that sets one field of a stream to a JSON string.
pub fn set(stream: &str, field: &str, value: &str) -> Draft {
    Draft {
        stream: stream.into(),
        kind: "Edited".into(),
        ops: vec![Op::Set {
            field: field.into(),
            value: format!("\"{value}\"").into_bytes(),
            supersedes: vec![],
        }],
        ..Draft::default()
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn succeeds(data: &Path, args: &[&str]) -> String {
    let r = weftlog(data, args);
    assert_eq!(
        r.code,
        Some(0),
        "weftlog {args:?} failed:\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    r.stdout
}

/// Runs a command that must fail as the CLI promises: non-zero exit, nothing
/// on stdout, one line on stderr. Returns that line.
pub fn fails(data: &Path, args: &[&str]) -> String {
    let r = weftlog(data, args);
    assert_eq!(
        r.code,
        Some(1),
        "weftlog {args:?} should fail:\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout, "", "weftlog {args:?} failed but printed output");
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "weftlog {args:?}: the error is not one line: {:?}",
        r.stderr
    );
    let line = r.stderr.trim_end().to_string();
    assert!(line.starts_with("error: "), "{line}");
    line
}
