//! `weftlog append --batch FILE`: many events from a file of JSON lines,
//! each line the body of `POST /v1/streams/{stream}/events` (the fields of
//! `weftlog append`; [`AppendBody`]), all to the stream `--stream` names.
//!
//! Lines go in chunks ([`DEFAULT_CHUNK`] by default, at most
//! [`MAX_APPEND_MANY`], and at most [`CHUNK_BYTES`] of text): each chunk is
//! one [`Node::append_many`] on a stopped node, or one array body to the
//! running node's HTTP API, so each chunk is one group commit either way.
//!
//! A malformed line (not JSON, an unknown field, a bad value) stops the run
//! before anything of its chunk is sent, naming the line. A file is checked
//! whole before the first chunk goes, so a malformed line in a file applies
//! nothing; standard input is read as it comes, so there the chunks before
//! the malformed line's are applied, and the error says which lines those
//! were. (A file whose lines carry `command_id`s may be sent again after a
//! fix: the lines already applied give their existing events.)
//!
//! Output: one JSON line per event, in order, with its `line` number: the
//! event as `append` prints it, or `{"line", "error"}` for a refused one
//! (`--quiet`: the refused ones only). A summary and, for long runs,
//! progress go to stderr. The exit code is 1 if any event was refused.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use weftlog_proto::state::Draft;

use crate::http::AppendBody;
use crate::json;
use crate::node::{Node, MAX_APPEND_MANY};
use crate::remote::{self, Remote};

/// Lines sent as one batch (one group commit) unless `--chunk` says.
pub const DEFAULT_CHUNK: usize = 1_000;

/// Bytes of line text one chunk holds at most: well below the HTTP API's
/// limit on an array body ([`crate::http::MAX_BATCH_BODY_BYTES`]).
pub const CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// How often progress goes to stderr during a long run.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the events go.
pub enum Sink {
    /// A stopped node, opened by this process.
    Local(Node),
    /// The HTTP API of the `weftlog run` that holds the directory.
    Remote(Remote),
}

/// What `append --batch` was asked to do.
pub struct Job<'a> {
    /// The stream every line appends to.
    pub stream: &'a str,
    /// The file, or `-` for standard input.
    pub source: &'a Path,
    /// Lines per batch.
    pub chunk: usize,
    /// Print only the refused events.
    pub quiet: bool,
}

/// One parsed line.
struct Line {
    number: usize,
    /// The body as sent to a running node.
    body: Value,
    /// The draft made from it (the same checks as the server's).
    draft: Draft,
    bytes: usize,
}

/// Counts for the summary.
#[derive(Default)]
struct Counts {
    made: u64,
    existing: u64,
    refused: u64,
    /// The last line number sent (applied or refused).
    last_line: usize,
}

/// Parses line `number` into a body and its draft: `None` for a blank line.
fn parse(stream: &str, name: &str, number: usize, text: &str) -> Result<Option<Line>> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let body: Value = serde_json::from_str(trimmed)
        .map_err(|e| anyhow!("{name} line {number}: not JSON: {e}"))?;
    let parsed: AppendBody = serde_json::from_value(body.clone())
        .map_err(|e| anyhow!("{name} line {number}: not a valid append request: {e}"))?;
    let draft = parsed
        .draft(stream.to_string())
        .map_err(|e| anyhow!("{name} line {number}: {e}"))?;
    Ok(Some(Line {
        number,
        body,
        draft,
        bytes: trimmed.len(),
    }))
}

fn open(source: &Path) -> Result<Box<dyn BufRead>> {
    if source == Path::new("-") {
        return Ok(Box::new(BufReader::new(io::stdin())));
    }
    let f = File::open(source).with_context(|| format!("cannot read {}", source.display()))?;
    Ok(Box::new(BufReader::new(f)))
}

/// Runs `job` against `sink`, printing one line per event to `out`.
pub fn run(sink: &Sink, job: &Job<'_>, out: &mut impl Write) -> Result<()> {
    if job.chunk == 0 || job.chunk > MAX_APPEND_MANY {
        bail!("--chunk must be between 1 and {MAX_APPEND_MANY}");
    }
    let stdin = job.source == Path::new("-");
    let name = if stdin {
        "standard input".to_string()
    } else {
        job.source.display().to_string()
    };
    if !stdin {
        // A file is checked whole first: a malformed line applies nothing.
        for (i, text) in open(job.source)?.lines().enumerate() {
            let text = text.with_context(|| format!("reading {name} line {}", i + 1))?;
            parse(job.stream, &name, i + 1, &text)?;
        }
    }
    let started = Instant::now();
    let mut progress_at = started + PROGRESS_EVERY;
    let mut counts = Counts::default();
    let mut chunk: Vec<Line> = Vec::new();
    let mut chunk_bytes = 0usize;
    for (i, text) in open(job.source)?.lines().enumerate() {
        let text = text.with_context(|| format!("reading {name} line {}", i + 1))?;
        let line = parse(job.stream, &name, i + 1, &text).map_err(|e| {
            let sent = match counts.last_line {
                0 => "nothing was sent".to_string(),
                n => format!("lines 1 to {n} were sent (their results are above)"),
            };
            let from = chunk.first().map_or(i + 1, |l| l.number);
            anyhow!("{e:#}; {sent}, nothing from line {from} on")
        });
        let Some(line) = line? else { continue };
        chunk_bytes += line.bytes;
        chunk.push(line);
        if chunk.len() >= job.chunk || chunk_bytes >= CHUNK_BYTES {
            send(sink, job, std::mem::take(&mut chunk), &mut counts, out)?;
            chunk_bytes = 0;
            if Instant::now() >= progress_at {
                progress_at = Instant::now() + PROGRESS_EVERY;
                eprintln!(
                    "weftlog: {} events sent so far (up to line {}), {:.0} events/s",
                    counts.made + counts.existing + counts.refused,
                    counts.last_line,
                    (counts.made + counts.existing + counts.refused) as f64
                        / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    if !chunk.is_empty() {
        send(sink, job, chunk, &mut counts, out)?;
    }
    out.flush()?;
    let total = counts.made + counts.existing + counts.refused;
    eprintln!(
        "weftlog: {total} events from {name}: {} appended, {} existing (command id already in the stream), {} refused, in {:.2} s",
        counts.made,
        counts.existing,
        counts.refused,
        started.elapsed().as_secs_f64()
    );
    if counts.refused > 0 {
        bail!(
            "{} of {total} events were refused (the lines with \"error\")",
            counts.refused
        );
    }
    Ok(())
}

/// Sends one chunk as one batch and prints its results.
fn send(
    sink: &Sink,
    job: &Job<'_>,
    chunk: Vec<Line>,
    counts: &mut Counts,
    out: &mut impl Write,
) -> Result<()> {
    let numbers: Vec<usize> = chunk.iter().map(|l| l.number).collect();
    let results: Vec<Result<Value, String>> = match sink {
        Sink::Local(node) => {
            let drafts = chunk.into_iter().map(|l| l.draft).collect();
            node.append_many(drafts)
                .into_iter()
                .map(|o| o.map(|a| json::appended(&a)).map_err(|e| e.to_string()))
                .collect()
        }
        Sink::Remote(r) => {
            let path = format!("/v1/streams/{}/events", remote::encode(job.stream, true));
            let body = Value::Array(chunk.into_iter().map(|l| l.body).collect());
            let answer = r.post_json(&path, &body).with_context(|| {
                format!(
                    "the batch of lines {} to {}",
                    numbers.first().copied().unwrap_or(0),
                    numbers.last().copied().unwrap_or(0)
                )
            })?;
            let Value::Array(items) = answer else {
                bail!("the running node answered a batch with {answer}, not an array");
            };
            if items.len() != numbers.len() {
                bail!(
                    "the running node answered a batch of {} events with {} results",
                    numbers.len(),
                    items.len()
                );
            }
            items
                .into_iter()
                .map(|item| {
                    let body = item.get("body").cloned().unwrap_or(Value::Null);
                    match body.get("error").and_then(Value::as_str) {
                        Some(e) => Err(e.to_string()),
                        None => Ok(body),
                    }
                })
                .collect()
        }
    };
    for (number, result) in numbers.into_iter().zip(results) {
        counts.last_line = number;
        let line = match result {
            Ok(mut v) => {
                if v.get("existing").and_then(Value::as_bool) == Some(true) {
                    counts.existing += 1;
                } else {
                    counts.made += 1;
                }
                if job.quiet {
                    continue;
                }
                if let Value::Object(m) = &mut v {
                    m.insert("line".into(), number.into());
                }
                v
            }
            Err(e) => {
                counts.refused += 1;
                serde_json::json!({ "line": number, "error": e })
            }
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
