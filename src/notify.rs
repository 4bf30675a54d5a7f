//! Staff notification: `weftlog run --notify-url URL` POSTs each oversell
//! compensation this node wrote to a URL (a pager, a chat hook, a desk
//! manager's inbox).
//!
//! **What is sent.** When an oversold sale is detected, every node that
//! sees the mark writes the policy's automatic compensation, the register
//! `oversold/<sale id>` under the command id of the same name
//! ([`weftlog_proto::admission::compensations`]); the first in canonical
//! order takes effect, the others are duplicates with no effect. A node
//! notifies for a compensation when the event that wrote it is its own
//! and durable, and, [`SETTLE`] after it reached the notifier, is still
//! the one that took effect: a compensation another desk wrote
//! concurrently and that won is that desk's to send. A late event can
//! still win after a node has sent, so a receiver may get the same sale
//! from two desks: it drops duplicates by the key. Staff decisions
//! (`POST /v1/oversold/{sale}`, `by: staff`) are not oversells and are not
//! sent.
//!
//! **The request.** `POST URL` with `Content-Type: application/json`,
//! `Idempotency-Key: <sale id>` and the body `{"sale", "stream",
//! "counter", "action", "seats", "node", "event"}`: the sale's event id,
//! its stream and escrow counter, the compensation's action (`waitlist`,
//! `notify`, `cancel`, `honour`), the seats marked oversold (`counter` and
//! `seats` are `null` if the mark is gone by then), this node's id, and
//! the compensation event's id.
//!
//! **Delivery.** One request at a time, in log order, from a task that
//! follows the durable log ([`Node::subscribe_from`]); the blocking call
//! runs off the runtime. A failure (no answer, or a status other than
//! 2xx) is retried after [`BACKOFF_FIRST`], doubling up to
//! [`BACKOFF_MAX`], for as long as the node runs. Each sale acknowledged
//! with a 2xx is appended (and fsynced) to [`NOTIFIED_FILE`] in the data
//! directory; at start the notifier reads the whole log again and sends
//! what is not listed there, so a restart sends what was not yet
//! delivered and nothing twice that was acknowledged (a crash between the
//! answer and the fsync sends that one again, with the same key).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use weftlog_proto::event::Event;
use weftlog_proto::seats::{self, By, COMPENSATION_PREFIX};
use weftlog_proto::state::State;
use weftlog_proto::{EventId, Op};

use crate::node::Node;

/// The file in a data directory listing the sales delivered, one JSON
/// object per line.
pub const NOTIFIED_FILE: &str = "notified.jsonl";
/// The first wait after a failed delivery.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between deliveries of one notification.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a compensation reaches the notifier it checks whether
/// it took effect: time for a concurrent one from another desk to arrive.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Longest URL accepted.
pub const MAX_URL_CHARS: usize = 2048;

/// Checks a `--notify-url`: `http://HOST[:PORT][/PATH]` (this build has
/// no TLS client: put a relay on the loopback for an https receiver).
pub fn check_url(url: &str) -> Result<()> {
    if url.len() > MAX_URL_CHARS {
        bail!("--notify-url is longer than {MAX_URL_CHARS} characters");
    }
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "--notify-url {url:?}: only http:// URLs are supported (for https, relay through a local proxy)"
        );
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("--notify-url {url:?} is not a URL of the form http://HOST[:PORT]/PATH");
    }
    Ok(())
}

/// A compensation this node wrote, waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    sale: EventId,
    stream: String,
    action: &'static str,
    event: EventId,
}

/// The automatic compensations `event` (with id `id`) writes, if `me`
/// authored it.
fn compensations_in(event: &Event, id: EventId, me: &weftlog_proto::NodeId) -> Vec<Pending> {
    if event.author != *me {
        return Vec::new();
    }
    event
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Set { field, value, .. } if field.starts_with(COMPENSATION_PREFIX) => {
                let sale = seats::compensation_sale(field)?;
                let (action, by) = seats::parse_compensation(value)?;
                (by == By::Auto).then(|| Pending {
                    sale,
                    stream: event.stream.clone(),
                    action: action.name(),
                    event: id,
                })
            }
            _ => None,
        })
        .collect()
}

/// Whether `p`'s event is the compensation of its sale that took effect
/// in `state` (the first of the events with its command id).
fn took_effect(state: &State, p: &Pending) -> bool {
    let field = seats::compensation_field(&p.sale);
    state
        .stream(&p.stream)
        .and_then(|s| s.duplicates.get(&field))
        .is_none_or(|d| d.took_effect == p.event)
}

/// The JSON body for `p`, with the counter and seats of its mark in
/// `state`.
fn body(state: &State, p: &Pending, node: &weftlog_proto::NodeId) -> Value {
    let mark = state
        .oversold()
        .into_iter()
        .find(|(stream, _, sale, _)| *stream == p.stream && *sale == p.sale);
    let (counter, seats) = match mark {
        Some((_, counter, _, m)) => (json!(counter), json!(m.units)),
        None => (Value::Null, Value::Null),
    };
    json!({
        "sale": p.sale.to_string(),
        "stream": p.stream,
        "counter": counter,
        "action": p.action,
        "seats": seats,
        "node": node.to_string(),
        "event": p.event.to_string(),
    })
}

/// The sales listed in `path` (a torn last line is skipped).
fn read_notified(path: &Path) -> Result<BTreeSet<EventId>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = BTreeSet::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let sale = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["sale"].as_str().and_then(|s| s.parse::<EventId>().ok()));
        match sale {
            Some(s) => {
                out.insert(s);
            }
            None => warn!(
                "{} line {}: not a delivery record; skipped",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

/// Appends a delivery record to `path` and fsyncs it.
fn record(path: &Path, p: &Pending, status: u16) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let line = json!({
        "sale": p.sale.to_string(),
        "event": p.event.to_string(),
        "status": status,
        "at_ms": crate::node::wall_ms(),
    });
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// The notifier: a task that follows the log and POSTs (module docs).
pub struct Notifier {
    node: Arc<Node>,
    url: String,
    path: PathBuf,
    agent: ureq::Agent,
    delivered: BTreeSet<EventId>,
    stop: watch::Receiver<bool>,
}

impl Notifier {
    /// Starts the notifier for `node` (whose data directory is `dir`) on
    /// the current runtime; it ends when `stop` turns true.
    pub fn start(
        node: Arc<Node>,
        url: &str,
        dir: &Path,
        stop: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        check_url(url)?;
        let path = dir.join(NOTIFIED_FILE);
        let delivered = read_notified(&path)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let n = Notifier {
            node,
            url: url.to_string(),
            path,
            agent,
            delivered,
            stop,
        };
        info!(url = %n.url, delivered = n.delivered.len(), "staff notification on");
        Ok(tokio::spawn(n.run()))
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps until `until`; false if the node stops first.
    async fn sleep_until(&mut self, until: Instant) -> bool {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }

    async fn run(mut self) {
        let me = self.node.id();
        let mut sub = self.node.subscribe_from(0);
        loop {
            if self.stopped() {
                return;
            }
            let next = tokio::select! {
                n = sub.next() => n,
                _ = self.stop.wait_for(|s| *s) => return,
            };
            let e = match next {
                None => return,
                Some(Ok(e)) => e,
                Some(Err(err)) => {
                    // The delivered list keeps a new reading from sending
                    // anything twice.
                    warn!("staff notification: {err}; reading the log again from the beginning");
                    if !self.sleep_until(Instant::now() + BACKOFF_FIRST).await {
                        return;
                    }
                    sub = self.node.subscribe_from(0);
                    continue;
                }
            };
            let event = match Event::decode_trusted(&e.bytes) {
                Ok(ev) => ev,
                Err(err) => {
                    warn!(event = %e.id, "staff notification: a durable event does not decode: {err}");
                    continue;
                }
            };
            let seen = Instant::now();
            for p in compensations_in(&event, e.id, &me) {
                if self.delivered.contains(&p.sale) {
                    continue;
                }
                if !self.sleep_until(seen + SETTLE).await {
                    return;
                }
                if !self.node.with_state(|s| took_effect(s, &p)) {
                    info!(sale = %p.sale, "another desk's compensation of this sale took effect: its desk notifies");
                    continue;
                }
                if !self.deliver(&p).await {
                    return;
                }
            }
        }
    }

    /// Sends `p` until a 2xx answers, and records it; false if the node
    /// stops first.
    async fn deliver(&mut self, p: &Pending) -> bool {
        let me = self.node.id();
        let body = self.node.with_state(|s| body(s, p, &me)).to_string();
        let mut wait = BACKOFF_FIRST;
        loop {
            let agent = self.agent.clone();
            let url = self.url.clone();
            let key = p.sale.to_string();
            let text = body.clone();
            let sent = tokio::task::spawn_blocking(move || {
                agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", &key)
                    .send(text.as_bytes())
                    .map(|r| r.status().as_u16())
            })
            .await;
            let why = match sent {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    info!(sale = %p.sale, status, "staff notified of an oversold sale");
                    if let Err(e) = record(&self.path, p, status) {
                        warn!("cannot record the delivery in {}: {e}; it may be sent again after a restart", self.path.display());
                    }
                    self.delivered.insert(p.sale);
                    return true;
                }
                Ok(Ok(status)) => format!("answered {status}"),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("the request task failed: {e}"),
            };
            warn!(sale = %p.sale, url = %self.url, "staff notification not delivered ({why}); again in {wait:?}");
            if !self.sleep_until(Instant::now() + wait).await {
                debug!(sale = %p.sale, "stopping with a notification undelivered");
                return false;
            }
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_urls_are_http() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://staff.example").is_ok());
        let e = check_url("https://x.example/").unwrap_err().to_string();
        assert!(e.contains("only http://"), "{e}");
        assert!(check_url("http:///path").is_err());
        assert!(check_url("http://a b").is_err());
    }

    #[test]
    fn the_delivered_list_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NOTIFIED_FILE);
        assert!(read_notified(&path).unwrap().is_empty());
        let sale = EventId([3; 32]);
        let p = Pending {
            sale,
            stream: "session/1".into(),
            action: "waitlist",
            event: EventId([4; 32]),
        };
        record(&path, &p, 200).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"sale\": \"ab").unwrap();
        assert_eq!(read_notified(&path).unwrap(), BTreeSet::from([sale]));
    }
}
