//! `weftlog simulate`: everything but the argument parser and the progress
//! bar, so that the node's CLI (clap) only maps its flags onto
//! [`SimulateArgs`] and draws [`Update`]s.
//!
//! ```text
//! weftlog simulate [--scenario NAME|FILE] [--nodes N] [--seed S | --seeds A..B]
//!                  [--duration T] [--json] [--report FILE] [--long]
//!                  [--jobs J] [--check-determinism]
//! ```
//!
//! Without `--scenario`, every built-in scenario runs with its own seeds
//! (what CI runs); `--long` takes each scenario's long seed range instead.
//! Seeds run in parallel on `--jobs` threads (default: the cores); each run
//! is single-threaded and deterministic, so the results do not depend on
//! the number of jobs. A failing seed is run a second time to check that it
//! replays identically, and its replay command is printed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crate::report::{RunReport, Summary, Violation};
use crate::scenario::{Scenario, ScenarioError, SeedRange};
use crate::{run_with, Progress, RunOptions};

/// The command's arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimulateArgs {
    /// A built-in scenario name or a scenario file; all built-ins if `None`.
    pub scenario: Option<String>,
    /// Replaces the scenario's node count.
    pub nodes: Option<usize>,
    /// The seeds (`--seed S` is `S..S+1`); the scenario's own if `None`.
    pub seeds: Option<SeedRange>,
    /// Replaces the scenario's duration, seconds.
    pub duration_s: Option<f64>,
    /// Print the summary as JSON.
    pub json: bool,
    /// Write an HTML report here.
    pub report: Option<PathBuf>,
    /// Use each scenario's long seed range.
    pub long: bool,
    /// Worker threads; 0 for the number of cores.
    pub jobs: usize,
    /// Run every seed twice and compare trace hashes.
    pub check_determinism: bool,
    /// Text output: one line per seed too.
    pub verbose: bool,
    /// The venue's seat policy for every run (`--policy SPEC`).
    pub policy: Option<String>,
}

/// Why the command could not run (a failing seed is not an error: see
/// [`Outcome::failed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimulateError {
    /// The scenario could not be loaded.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The arguments are wrong.
    #[error("{0}")]
    Usage(String),
    /// The report could not be written.
    #[error("cannot write the report {path}: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Progress, for a bar: one per sample period of a running seed, and one
/// per finished seed.
#[derive(Clone, Debug)]
pub struct Update {
    /// Scenario name.
    pub scenario: String,
    /// Seeds finished, over all scenarios of this invocation.
    pub seeds_done: u64,
    /// Seeds to run, over all scenarios.
    pub seeds_total: u64,
    /// Failing seeds so far.
    pub failures: u64,
    /// The running seed's progress (`None` when a seed just finished).
    pub run: Option<Progress>,
}

/// What the command found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One summary per scenario.
    pub summaries: Vec<Summary>,
    /// Every run, by scenario then seed.
    pub runs: Vec<RunReport>,
}

impl Outcome {
    /// Whether any seed failed (the process should exit non-zero).
    pub fn failed(&self) -> bool {
        self.runs.iter().any(|r| !r.passed())
    }

    /// One line per seed: its numbers, trace hash and violations.
    pub fn per_seed(&self) -> String {
        let mut o = String::new();
        for r in &self.runs {
            let (p50, _, max) = crate::report::percentiles(&r.convergence_ms);
            o.push_str(&format!(
                "{} seed {}: {} events, {} faults, {} conflicts, convergence after {} heals p50 {p50} ms max {max} ms, final {} ms, trace {}{}\n",
                r.scenario,
                r.seed,
                r.events,
                r.faults.values().sum::<u64>(),
                r.conflicts,
                r.convergence_ms.len(),
                r.final_convergence_ms.map_or("-".to_string(), |m| m.to_string()),
                r.trace_hash.get(..16).unwrap_or(""),
                if r.passed() { String::new() } else { format!(", {} VIOLATIONS", r.violations.len()) }
            ));
        }
        o
    }

    /// The summaries as text, or as one JSON document.
    pub fn render(&self, json: bool) -> String {
        if json {
            let v: Vec<&Summary> = self.summaries.iter().collect();
            // Plain data: serialising cannot fail.
            let mut s = serde_json::to_string_pretty(&serde_json::json!({
                "passed": !self.failed(),
                "scenarios": v,
            }))
            .expect("summary serialises");
            s.push('\n');
            s
        } else {
            self.summaries.iter().map(Summary::to_text).collect()
        }
    }
}

/// Parses a duration: `90`, `90s`, `1500ms`, `5m`, `2h`. Returns seconds.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "ms" => x / 1000.0,
        "s" => x,
        "m" | "min" => x * 60.0,
        "h" => x * 3600.0,
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (ms, s, m, h)"
            ))
        }
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(secs)
}

/// Parses the command's flags (for callers without clap, such as the
/// crate's example).
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<SimulateArgs, String> {
    let mut out = SimulateArgs::default();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--scenario" => out.scenario = Some(value("--scenario")?),
            "--nodes" => {
                let v = value("--nodes")?;
                out.nodes = Some(
                    v.parse()
                        .map_err(|_| format!("--nodes {v:?}: not a number"))?,
                );
            }
            "--seed" => {
                let v = value("--seed")?;
                let s: u64 = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?}: not a number"))?;
                out.seeds = Some(SeedRange::one(s));
            }
            "--seeds" => out.seeds = Some(value("--seeds")?.parse()?),
            "--duration" => out.duration_s = Some(parse_duration(&value("--duration")?)?),
            "--json" => out.json = true,
            "--policy" => out.policy = Some(value("--policy")?),
            "--report" => out.report = Some(PathBuf::from(value("--report")?)),
            "--long" => out.long = true,
            "--jobs" => {
                let v = value("--jobs")?;
                out.jobs = v
                    .parse()
                    .map_err(|_| format!("--jobs {v:?}: not a number"))?;
            }
            "--check-determinism" => out.check_determinism = true,
            "--verbose" | "-v" => out.verbose = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(out)
}

/// Runs the command: every seed of every chosen scenario, then the HTML
/// report if asked for. The caller prints [`Outcome::render`] and exits
/// non-zero if [`Outcome::failed`].
pub fn simulate(
    args: &SimulateArgs,
    progress: &mut dyn FnMut(&Update),
) -> Result<Outcome, SimulateError> {
    let scenarios: Vec<(Scenario, Option<String>)> = match &args.scenario {
        Some(s) => vec![(Scenario::load(s)?, Some(s.clone()))],
        None => Scenario::ci().into_iter().map(|s| (s, None)).collect(),
    };
    if let Some(n) = args.nodes {
        if n < 2 {
            return Err(SimulateError::Usage("--nodes must be at least 2".into()));
        }
    }
    let plan: Vec<(Scenario, RunOptions, SeedRange)> = scenarios
        .into_iter()
        .map(|(sc, arg)| {
            let seeds = args
                .seeds
                .unwrap_or(if args.long { sc.long_seeds() } else { sc.seeds });
            let opts = RunOptions {
                nodes: args.nodes,
                duration_s: args.duration_s,
                scenario_arg: arg,
                policy: args.policy.clone(),
                log: std::env::var("WEFTLOG_SIM_LOG")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                ..RunOptions::default()
            };
            (sc, opts, seeds)
        })
        .collect();
    for (sc, opts, _) in &plan {
        opts.apply(sc)
            .validate()
            .map_err(|m| SimulateError::Usage(format!("scenario {}: {m}", sc.name)))?;
    }
    let total: u64 = plan.iter().map(|p| p.2.len()).sum();
    let jobs = if args.jobs == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.jobs
    };
    let mut outcome = Outcome::default();
    let mut done = 0u64;
    let mut failures = 0u64;
    for (sc, opts, seeds) in &plan {
        let started = Instant::now();
        let mut runs = run_seeds(
            sc,
            opts,
            *seeds,
            jobs,
            args.check_determinism,
            &mut |u| match u {
                Some(p) => progress(&Update {
                    scenario: sc.name.clone(),
                    seeds_done: done,
                    seeds_total: total,
                    failures,
                    run: Some(*p),
                }),
                None => {
                    done += 1;
                    progress(&Update {
                        scenario: sc.name.clone(),
                        seeds_done: done,
                        seeds_total: total,
                        failures,
                        run: None,
                    });
                }
            },
        );
        // A failing seed must replay exactly: run it again and compare.
        for r in runs.iter_mut().filter(|r| !r.passed()) {
            failures += 1;
            let again = run_with(sc, r.seed, opts, &mut |_| {});
            if again.trace_hash != r.trace_hash {
                r.violations.push(Violation {
                    oracle: "determinism".into(),
                    at_ms: 0,
                    detail: format!(
                        "the replay gave trace hash {} (first run {})",
                        again.trace_hash, r.trace_hash
                    ),
                });
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let mut summary = Summary::of(&runs, wall);
        summary.nodes = opts.apply(sc).nodes;
        outcome.summaries.push(summary);
        outcome.runs.extend(runs);
    }
    if let Some(path) = &args.report {
        let html = crate::html::report(&outcome);
        std::fs::write(path, html).map_err(|source| SimulateError::Report {
            path: path.clone(),
            source,
        })?;
    }
    Ok(outcome)
}

/// Runs `seeds` on `jobs` threads; reports progress (`Some`) and finished
/// seeds (`None`) on the calling thread. Returns the runs by seed.
pub fn run_seeds(
    sc: &Scenario,
    opts: &RunOptions,
    seeds: SeedRange,
    jobs: usize,
    check_determinism: bool,
    progress: &mut dyn FnMut(Option<&Progress>),
) -> Vec<RunReport> {
    enum Msg {
        Progress(Progress),
        Done(Box<RunReport>),
    }
    let list: Vec<u64> = seeds.iter().collect();
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut runs = Vec::with_capacity(list.len());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, list.len().max(1)) {
            let tx = tx.clone();
            let (list, next) = (&list, &next);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = list.get(i) else {
                    break;
                };
                let ptx = tx.clone();
                let mut r = run_with(sc, seed, opts, &mut |p| {
                    // The receiver lives until every worker is done.
                    let _ = ptx.send(Msg::Progress(*p));
                });
                if check_determinism {
                    let again = run_with(sc, seed, opts, &mut |_| {});
                    if again.trace_hash != r.trace_hash {
                        r.violations.push(Violation {
                            oracle: "determinism".into(),
                            at_ms: 0,
                            detail: format!(
                                "a second run gave trace hash {} (first {})",
                                again.trace_hash, r.trace_hash
                            ),
                        });
                    }
                }
                let _ = tx.send(Msg::Done(Box::new(r)));
            });
        }
        drop(tx);
        for m in rx {
            match m {
                Msg::Progress(p) => progress(Some(&p)),
                Msg::Done(r) => {
                    runs.push(*r);
                    progress(None);
                }
            }
        }
    });
    runs.sort_by_key(|r| r.seed);
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_flags_parse() {
        assert_eq!(parse_duration("90").unwrap(), 90.0);
        assert_eq!(parse_duration("1500ms").unwrap(), 1.5);
        assert_eq!(parse_duration("5m").unwrap(), 300.0);
        assert_eq!(parse_duration("2h").unwrap(), 7200.0);
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-3s").is_err());
        let a = parse_args(
            [
                "--scenario",
                "venue",
                "--seeds",
                "1..9",
                "--json",
                "--nodes",
                "4",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!(a.scenario.as_deref(), Some("venue"));
        assert_eq!(a.seeds.unwrap().len(), 8);
        assert!(a.json);
        assert_eq!(a.nodes, Some(4));
        assert!(parse_args(["--bogus".to_string()]).is_err());
    }
}
