//! Server-sent event streams of `weftlog run`: the catch-up subscription to
//! the log (`GET /v1/events`) and the node's notifications
//! (`GET /v1/notifications`).
//!
//! `GET /v1/events?from=POS[&stream_prefix=P][&kind=K]` replays the durable
//! log after `POS` and then continues live, each event once, in log order
//! ([`Node::subscribe_from`]). `POS` is a token `EPOCH-POS-CHECK` as the
//! `id:` of every event carries it ([`Token`]), a bare position (`0`: from
//! the beginning), or absent (from now on). A `Last-Event-ID` header, which
//! an `EventSource` sends by itself when it reconnects, wins over `from`.
//! A token from another history (another epoch, a position past the end,
//! or a check that names another event) starts the client again from the
//! beginning, and the first message says so (`event: restart`, data
//! `{"reason", "epoch"}`). If the node finds its log restored while a
//! client reads, the client gets `event: reset` and the stream ends; the
//! `EventSource` reconnects and starts again from the beginning.
//!
//! Each event is `event: event`, `id: TOKEN`, and as data the event as
//! `log` prints it plus its `pos`. The filters keep the events whose
//! stream starts with `stream_prefix` and whose kind is `kind`. A client
//! too slow for the live feed is caught up from the log, never dropped. A
//! comment line keeps idle connections open every [`KEEP_ALIVE`].
//!
//! `GET /v1/notifications` carries what is not an event: forks
//! (`event: fork`), sales found oversold (`event: oversold`) and a new
//! epoch (`event: epoch`), as [`crate::notices::Notice`]s, each with an
//! `id:` counting from 1 in this run of the node; a reconnect with
//! `Last-Event-ID` gets those it missed that the node still holds (the
//! last [`crate::notices::NOTICES_KEPT`]).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use weftlog_proto::Event;

use crate::daemon::Daemon;
use crate::event_view::{self, EventView};
use crate::http::ApiError;
use crate::node::Node;
use crate::notices::Notice;
use crate::subscribe::{check_of, Epoch, LogSubscription, Positioned, ReadError, Resume, Token};
use crate::tls::Members;

/// How long an `EventSource` waits before it reconnects (the `retry:` of
/// every stream), in ms.
pub const RECONNECT_MS: u64 = 1000;

/// How often an idle stream sends a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

type Shared = AxState<Arc<Daemon>>;

/// Query of `GET /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    from: Option<String>,
    stream: Option<String>,
    stream_prefix: Option<String>,
    kind: Option<String>,
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Events of exactly this stream.
    pub stream: Option<String>,
    /// Events whose stream starts with this.
    pub stream_prefix: Option<String>,
    /// Events of this kind.
    pub kind: Option<String>,
}

impl Filter {
    /// Whether `e` passes.
    pub fn admits(&self, e: &Event) -> bool {
        self.stream.as_deref().is_none_or(|s| e.stream == s)
            && self
                .stream_prefix
                .as_deref()
                .is_none_or(|p| e.stream.starts_with(p))
            && self.kind.as_deref().is_none_or(|k| e.kind == k)
    }
}

/// Where a subscriber asked to start, before it is weighed against the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// From the end of the log as it is now.
    Now,
    /// After a bare position, taken on trust.
    Pos(u64),
    /// After a token's position, if the token names this history.
    Token(Token),
}

impl std::str::FromStr for From {
    type Err = String;

    fn from_str(s: &str) -> Result<From, String> {
        let s = s.trim();
        if s.is_empty() || s == "now" {
            return Ok(From::Now);
        }
        if let Ok(pos) = s.parse::<u64>() {
            return Ok(From::Pos(pos));
        }
        s.parse::<Token>().map(From::Token).map_err(|e| {
            format!("{e} (a position is a number, 0 for the beginning, or the id of an event)")
        })
    }
}

/// Resolves where a subscriber starts: the position to read after, and
/// the reason when its token named another history.
pub fn start(node: &Node, from: &From) -> Result<(u64, Option<String>), ReadError> {
    Ok(match from {
        From::Now => (node.durable_pos(), None),
        From::Pos(p) => (*p, None),
        From::Token(t) => match node.resume(t)? {
            Resume::After(p) => (p, None),
            Resume::Restart(why) => (0, Some(why)),
        },
    })
}

/// What one `/v1/events` stream holds between polls.
struct EventStream {
    sub: LogSubscription,
    filter: Filter,
    members: Members,
    shutdown: watch::Receiver<bool>,
    node: Arc<Node>,
    /// Text waiting to be sent (a restart notice).
    pending: Option<String>,
    done: bool,
}

/// The resume token of the event at `e`.
fn token_of(epoch: Epoch, e: &Positioned) -> Token {
    Token {
        epoch,
        pos: e.pos,
        check: Some(check_of(&e.id)),
    }
}

/// An event as `log` prints it, with its position and the member mark.
fn view<'a>(e: &Positioned, event: &'a Event, members: &Members) -> EventView<'a> {
    EventView::new(event, &e.id)
        .non_member(!members.admits(&event.author))
        .pos(e.pos)
}

/// Appends `e` as one SSE message to `out`: written straight to text,
/// with no `Value` built ([`crate::event_view`]).
pub fn render(out: &mut Vec<u8>, epoch: Epoch, e: &Positioned, event: &Event, members: &Members) {
    // Writing to a Vec cannot fail.
    let _ = std::io::Write::write_fmt(
        out,
        format_args!("event: event\nid: {}\ndata: ", token_of(epoch, e)),
    );
    event_view::write_line(out, &view(e, event, members));
    out.extend_from_slice(b"\n\n");
}

/// The durable events after `from` that pass `filter`, in log order, one
/// JSON object per line as `log` prints them with their `pos` and
/// `token`: what `weftlog log --from` and `GET /v1/log?from=` give.
pub fn lines_after(
    node: &Node,
    from: &From,
    filter: &Filter,
    members: &Members,
) -> Result<(String, Option<String>), ReadError> {
    let (mut pos, restart) = start(node, from)?;
    let epoch = node.epoch();
    let end = node.durable_pos();
    let mut out = Vec::new();
    while pos < end {
        let batch = node.read_from(pos, crate::subscribe::READ_CHUNK)?;
        let Some(last) = batch.last() else { break };
        pos = last.pos;
        for e in &batch {
            // The node wrote these bytes after checking them.
            let Ok(event) = Event::decode_trusted(&e.bytes) else {
                continue;
            };
            if filter.admits(&event) {
                let token = token_of(epoch, e).to_string();
                event_view::write_line(&mut out, &view(e, &event, members).token(token));
                out.push(b'\n');
            }
        }
    }
    // serde_json and the token write UTF-8 only.
    let out = String::from_utf8(out).expect("event lines are UTF-8");
    Ok((out, restart))
}

impl EventStream {
    fn render_batch(&self, batch: &[Positioned]) -> Vec<u8> {
        let mut out = Vec::with_capacity(batch.len() * 256);
        for e in batch {
            // The node wrote these bytes after checking them.
            let Ok(event) = Event::decode_trusted(&e.bytes) else {
                continue;
            };
            if self.filter.admits(&event) {
                render(&mut out, self.sub.epoch(), e, &event, &self.members);
            }
        }
        out
    }

    /// The next chunk of the body, or `None` at its end.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        if let Some(p) = self.pending.take() {
            return Some(p.into_bytes());
        }
        loop {
            if self.done {
                return None;
            }
            if *self.shutdown.borrow() {
                // The node stops: what is durable is sent, then the stream
                // ends.
                self.done = true;
                let end = self.node.durable_pos();
                let mut out = Vec::new();
                while self.sub.pos() < end {
                    match self.sub.next_batch().await {
                        Some(Ok(b)) if !b.is_empty() => out.extend(self.render_batch(&b)),
                        _ => break,
                    }
                }
                return Some(out);
            }
            let next = tokio::select! {
                b = self.sub.next_batch() => b,
                changed = self.shutdown.changed() => {
                    if changed.is_err() && !*self.shutdown.borrow() {
                        return None;
                    }
                    continue;
                }
                _ = tokio::time::sleep(KEEP_ALIVE) => return Some(b":\n\n".to_vec()),
            };
            match next {
                Some(Ok(batch)) => {
                    let text = self.render_batch(&batch);
                    if !text.is_empty() {
                        return Some(text);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    let event = match e {
                        ReadError::EpochChanged { .. } => "reset",
                        ReadError::Log(_) => "error",
                    };
                    let data = json!({ "reason": e.to_string() });
                    return Some(format!("event: {event}\ndata: {data}\n\n").into_bytes());
                }
                None => return None,
            }
        }
    }
}

fn sse_response(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The `Last-Event-ID` header, if any.
fn last_event_id(headers: &HeaderMap) -> Option<&str> {
    headers.get("last-event-id").and_then(|v| v.to_str().ok())
}

/// `GET /v1/events` (module docs).
pub async fn events(
    AxState(d): Shared,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let asked = last_event_id(&headers)
        .map(str::to_string)
        .or(q.from)
        .unwrap_or_default();
    let from: From = asked
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let node = d.node().clone();
    let (pos, restart) = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || start(&node, &from))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let sub = node.subscribe_from(pos);
    // An EventSource reconnects after RECONNECT_MS when the stream ends.
    let mut pending = format!("retry: {RECONNECT_MS}\n\n");
    if let Some(why) = restart {
        let data = json!({ "reason": why, "epoch": sub.epoch().to_string() });
        let _ = write!(pending, "event: restart\ndata: {data}\n\n");
    }
    let stream = EventStream {
        sub,
        filter: Filter {
            stream: q.stream,
            stream_prefix: q.stream_prefix,
            kind: q.kind,
        },
        members: d.members().clone(),
        shutdown: d.shutdown_signal(),
        node,
        pending: Some(pending),
        done: false,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.chunk().await?;
        Some((Ok::<_, Infallible>(Bytes::from(chunk)), s))
    });
    Ok(sse_response(Body::from_stream(body)))
}

/// `GET /v1/notifications` (module docs).
pub async fn notifications(AxState(d): Shared, headers: HeaderMap) -> Response {
    let after = last_event_id(&headers)
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let (missed, rx) = d.notices_after(after);
    let shutdown = d.shutdown_signal();
    let first: String = missed.iter().map(Notice::sse).collect();
    let state = (Some(first), rx, shutdown);
    let body = futures_util::stream::unfold(state, |(first, mut rx, mut shutdown)| async move {
        if let Some(f) = first.filter(|f| !f.is_empty()) {
            return Some((Ok::<_, Infallible>(Bytes::from(f)), (None, rx, shutdown)));
        }
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let text = tokio::select! {
                n = rx.recv() => match n {
                    Ok(n) => n.sse(),
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        format!("event: lagged\ndata: {}\n\n", json!({ "missed": k }))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                changed = shutdown.changed() => {
                    if changed.is_err() && !*shutdown.borrow() {
                        return None;
                    }
                    continue;
                }
                _ = tokio::time::sleep(KEEP_ALIVE) => ":\n\n".to_string(),
            };
            return Some((Ok(Bytes::from(text)), (None, rx, shutdown)));
        }
    });
    sse_response(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_a_subscriber_starts_is_parsed_or_refused_with_a_reason() {
        assert_eq!("".parse::<From>().unwrap(), From::Now);
        assert_eq!("0".parse::<From>().unwrap(), From::Pos(0));
        assert_eq!("17".parse::<From>().unwrap(), From::Pos(17));
        assert!(matches!(
            "0123456789abcdef-3-0badf00d".parse::<From>().unwrap(),
            From::Token(Token { pos: 3, .. })
        ));
        let e = "yesterday".parse::<From>().unwrap_err();
        assert!(e.contains("a position is"), "{e}");
    }
}
