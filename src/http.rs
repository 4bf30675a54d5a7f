//! The HTTP API of `weftlog run`, for local clients (and for the CLI while
//! the node runs: see [`crate::cli`]). JSON in and out; the shapes are those
//! the CLI prints.
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/streams/{stream}/events` | 201 and the event as `append` prints it; 409 when `expected_version` does not match, or a text `base` names heads this node does not hold; 422 when the command is refused (an oversell, say); 400 on a malformed body; 507 while the disk is full (nothing stored; appends resume by themselves once space is freed) |
//! | `POST /v1/streams/{stream}/events` with a JSON array of such bodies | a batch ([`Node::append_many`](crate::node::Node::append_many)): 200 and a JSON array with one `{"status", "body"}` per event, in order, each the status and body a single append would have got; the events made are acknowledged together after one group commit, and a refused one (its `status` 409, 422 …) does not stop the others. An empty array: 200 and `[]`. 400 naming the index of a malformed element (nothing applied); 413 over [`MAX_BATCH_EVENTS`] events or [`MAX_BATCH_BODY_BYTES`] bytes |
//! | `GET /v1/streams/{stream}[?as_of=HLC]` | the stream as `get` prints it |
//! | `GET /v1/log[?stream=S][&from=POS]` | events as `log` prints them, one JSON object per line; with `--members`, events by authors not on the list carry `"non_member": true`; with `from`, the durable events after `POS` in log order with `pos` and `token` (a token of another history: from the beginning, with the reason in the `x-weftlog-restart` header) |
//! | `GET /v1/conflicts` | a JSON array of what `conflicts` prints |
//! | `GET /v1/status` | `status` (with `writes` and `disk_full`), plus `peers`, `blocked`, `equivocations`, `non_members` (`null` without `--members`) and `own_frontier` (whether, by whom and when a peer confirmed this node's own log since it started) |
//! | `GET /v1/forks[?proof=true]` | a JSON array of what `forks` prints: each fork the log holds (`author`, `seq`, `events`, `heads`), with `proof=true` its fork proof in JSON form (`proof`, or `null` and `proof_error`), which `weftlog verify-fork` checks with no data directory |
//! | `GET /v1/events[?from=POS][&stream=S][&stream_prefix=P][&kind=K]` | server-sent events: the durable log after `POS` (a number, `0` for the beginning, or a token `EPOCH-POS-CHECK`; absent: from now on), then every event as it becomes durable, each once, in log order (`event: event`, `id:` its token, data as `log` prints it plus `pos`); a `Last-Event-ID` header wins over `from`; a token of another history starts again from the beginning (`event: restart` first, with the reason); see [`crate::sse`] |
//! | `GET /v1/notifications` | server-sent events that are not log events: `fork`, `oversold`, `epoch`, `reconciled` ([`crate::notices`]) |
//! | `GET /v1/projections` | `{"projections": [...]}`: each ordered projection's `name`, `version`, `position` (events applied), `lag` (durable events not yet applied) and `hash` (its state hash, hex) ([`crate::projections`]) |
//! | `GET /v1/projections/{name}` | one projection: the same fields and `view`, its JSON view; 404 naming it if there is none |
//! | `POST /v1/export` | an export file (body: optional, another node's status JSON, to export only what it lacks) |
//! | `POST /v1/import[?allow_non_members=true]` | imports an export file (body: its bytes); `{"imported","duplicates"}`; 403 naming them when, with `--members`, it holds events by authors not on the list (nothing stored; the query accepts them); 507 while the disk is full |
//! | `GET /v1/reconnects[?limit=N]` | `{"reconnects": [...]}`, newest first (default 100, at most 1,000): per disconnected period that ended, what others did concurrently with this node's own events of it, by stream and field, with the conflicts ([`crate::reconnects`]) |
//! | `POST /v1/admin/partition` | `{"block":[node ids]}` cuts this node off from those peers; `{"block":[]}` heals |
//! | `GET /` | the desk page ([`crate::desk`]); `GET /v1/desk`: this desk's id, name, the names of every desk, its clock |
//! | `POST /v1/venue/commands` | a conference command: 201 `{"event", "stream", "kind"}` (200 with `"existing": true` for a retried command id); 400 naming the field; 404 for an unknown session, attendee or stream; 409 and 422 as for an append ([`crate::venue`]) |
//! | `GET /v1/venue/sessions` | `{"sessions": [...]}`: each session's fields, seat figures, policy, this desk's rule, holdings, waitlist and conflicts ([`crate::venue`]) |
//! | `GET /v1/venue/attendees?q=TEXT[&limit=N]` | `{"attendees": [...], "total"}`: attendees matching `TEXT`, by name then id ([`crate::venue`]) |
//! | `GET /v1/venue/attendees/{id}` | one attendee with every field's standing writes, notes and seats; 404 when unknown ([`crate::venue`]) |
//! | `GET /v1/whoami` | `{"role", "name", "auth"}`: who the request is from ([`crate::auth`]; `auth` false when tokens are off) |
//! | `GET /login`, `POST /login`, `POST /logout` | the login form, signing in (form fields `token`, `name`; a session cookie and 303 to `/`), signing out |
//! | `GET /metrics` | Prometheus metrics, every name prefixed `weftlog_` ([`crate::metrics`] lists them): OpenMetrics text when the `Accept` header asks for it, else the classic text format |
//!
//! With `--tokens`, every request needs a token (`Authorization: Bearer
//! TOKEN`) or a session cookie, and a role: GET `read`, POST under
//! `/v1/streams`, `/v1/venue`, `/v1/oversold` `desk`, the rest `admin`
//! ([`crate::auth`]); 401 and 403 are JSON errors too.
//!
//! Stream names may contain `/` (`customer/20`), in the path as they are or
//! percent-encoded. Errors are `{"error": "one sentence"}` with the status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use weftlog_proto::event::{Compensation, Policy};
use weftlog_proto::state::{Draft, PrepareError};
use weftlog_proto::text::{self, EditError, Splice, TextEdit};
use weftlog_proto::{EventId, Hlc, Meta, NodeId, Op};

use crate::auth::Auth;
use crate::daemon::Daemon;
use crate::json;
use crate::node::{AppendError, Appended, ExportError, NodeImportError};

/// Largest request body: an export file up to the import limit.
pub const MAX_BODY_BYTES: usize = weftlog_proto::exchange::MAX_EXPORT_BYTES as usize;

/// Events one array body of `POST /v1/streams/{stream}/events` may hold.
pub const MAX_BATCH_EVENTS: usize = crate::node::MAX_APPEND_MANY;

/// Bytes one array body of `POST /v1/streams/{stream}/events` may hold:
/// checked before the array is parsed.
pub const MAX_BATCH_BODY_BYTES: usize = 64 * 1024 * 1024;

/// `listener` with `TCP_NODELAY` on every connection it accepts: a
/// streamed answer (server-sent events) goes out as it is written, not
/// after the client's delayed acknowledgement of the segment before.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an HTTP connection: {e}");
        }
    })
}

/// The router over a running daemon, with tokens off (every request
/// passes: for an HTTP address on loopback).
pub fn router(daemon: Arc<Daemon>) -> Router {
    router_with(daemon, Arc::new(Auth::off()))
}

/// The router over a running daemon, every route behind `auth`'s guard
/// ([`crate::auth::guard`]).
pub fn router_with(daemon: Arc<Daemon>, auth: Arc<Auth>) -> Router {
    Router::new()
        .route("/v1/streams/{*rest}", get(get_stream).post(post_event))
        .route("/v1/log", get(log))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/status", get(status))
        .route("/v1/forks", get(forks))
        .route("/v1/oversold", get(oversold))
        .route("/v1/oversold/{sale}", post(decide))
        .route("/v1/events", get(crate::sse::events))
        .route("/v1/notifications", get(crate::sse::notifications))
        .route("/v1/projections", get(projections))
        .route("/v1/projections/{name}", get(projection))
        .route("/v1/export", post(export))
        .route("/v1/import", post(import))
        .route("/v1/admin/partition", post(partition))
        .route("/metrics", get(metrics))
        .merge(crate::desk::routes())
        .merge(crate::venue::routes())
        .merge(crate::auth::routes())
        .merge(crate::reconnects::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Last: every route above, and the fallback, pass the guard.
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::guard,
        ))
        .with_state(daemon)
}

type Shared = AxState<Arc<Daemon>>;

/// An error answer: a status and one sentence.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// An answer with `status` and the sentence `msg`.
    pub fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(status, msg.into())
    }

    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> ApiError {
        let code = match &e {
            AppendError::Refused(PrepareError::VersionMismatch { .. })
            | AppendError::Refused(PrepareError::Text(EditError::UnknownBase { .. })) => {
                StatusCode::CONFLICT
            }
            AppendError::Refused(_) | AppendError::Seats(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppendError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn projections(AxState(d): Shared) -> Json<Value> {
    Json(d.projections().list_json())
}

async fn projection(AxState(d): Shared, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    d.projections().get_json(&name).map(Json).ok_or_else(|| {
        let msg = format!("no projection named {name:?}; GET /v1/projections lists them");
        ApiError(StatusCode::NOT_FOUND, msg)
    })
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; see `weftlog run --help` for the API".into(),
    )
}

/// A seat policy from its JSON form (`json::policy` prints the same keys):
/// `mode` is required, the other settings default to [`Policy::new`]'s
/// ([`weftlog_proto::conference::policy_from_json`]).
pub fn policy_from_json(spec: &Map<String, Value>) -> Result<Policy, String> {
    weftlog_proto::conference::policy_from_json(spec)
}

/// An escrow transfer in an append body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// The escrow counter.
    pub counter: String,
    /// The node receiving the rights.
    pub to: String,
    /// How many.
    pub amount: u64,
}

/// The body of `POST /v1/streams/{stream}/events`: the fields of
/// `weftlog append`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// Event kind.
    pub kind: String,
    /// Fields to set: name → any JSON value.
    #[serde(default)]
    pub set: Map<String, Value>,
    /// Counters to change: name → signed integer.
    #[serde(default)]
    pub add: BTreeMap<String, i64>,
    /// Escrow capacity to add: counter → amount.
    #[serde(default)]
    pub escrow_init: BTreeMap<String, u64>,
    /// Escrow rights to move to other nodes.
    #[serde(default)]
    pub escrow_transfer: Vec<Transfer>,
    /// Escrow rights to use: counter → amount.
    #[serde(default)]
    pub escrow_consume: BTreeMap<String, u64>,
    /// Seat policies to set: counter → `{"mode": …, "window_s": …,
    /// "min_remaining_pct": …, "max_overdraft": …, "on_oversell": …,
    /// "override_s": …}`; every key but `mode` is optional (its default is
    /// [`Policy::new`]'s).
    #[serde(default)]
    pub escrow_policy: BTreeMap<String, Map<String, Value>>,
    /// Text edits: field → splices `[pos, delete, "insert"]`, applied in
    /// order; positions and lengths count UTF-16 code units.
    #[serde(default)]
    pub text: BTreeMap<String, Vec<(u64, u64, String)>>,
    /// Per text field, the heads the client saw (64 hex digits each): the
    /// splices apply to the text at those heads, and automerge merges
    /// them with what came since. Unknown heads: 409.
    #[serde(default)]
    pub base: BTreeMap<String, Vec<String>>,
    /// Application payload.
    #[serde(default)]
    pub payload: Option<Value>,
    /// Refuse unless the stream is at this version.
    #[serde(default)]
    pub expected_version: Option<u64>,
    /// Idempotency key.
    #[serde(default)]
    pub command_id: Option<String>,
    /// The acting user.
    #[serde(default)]
    pub user: Option<String>,
}

impl AppendBody {
    /// The draft for `stream`.
    pub fn draft(mut self, stream: String) -> Result<Draft, String> {
        let mut texts = Vec::new();
        for (field, splices) in std::mem::take(&mut self.text) {
            let base = match self.base.remove(&field) {
                None => None,
                Some(heads) => Some(
                    heads
                        .iter()
                        .map(|h| {
                            text::parse_head(h)
                                .ok_or_else(|| format!("base {field}: {h:?} is not 64 hex digits"))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let splices = splices
                .into_iter()
                .map(|(pos, delete, insert)| Splice {
                    pos,
                    delete,
                    insert,
                })
                .collect();
            texts.push(TextEdit {
                field,
                splices,
                base,
            });
        }
        if let Some(field) = self.base.keys().next() {
            return Err(format!("base {field}: no text splices for that field"));
        }
        let mut ops = Vec::new();
        for (field, v) in self.set {
            ops.push(Op::Set {
                field,
                value: serde_json::to_vec(&v).map_err(|e| e.to_string())?,
                supersedes: vec![],
            });
        }
        for (counter, delta) in self.add {
            ops.push(Op::Add { counter, delta });
        }
        for (counter, capacity) in self.escrow_init {
            ops.push(Op::EscrowInit { counter, capacity });
        }
        for t in self.escrow_transfer {
            let to: NodeId =
                t.to.parse()
                    .map_err(|e| format!("escrow_transfer to {:?}: {e}", t.to))?;
            ops.push(Op::EscrowTransfer {
                counter: t.counter,
                to,
                amount: t.amount,
            });
        }
        for (counter, amount) in self.escrow_consume {
            ops.push(Op::EscrowConsume { counter, amount });
        }
        for (counter, spec) in self.escrow_policy {
            let policy =
                policy_from_json(&spec).map_err(|e| format!("escrow_policy {counter:?}: {e}"))?;
            ops.push(Op::EscrowPolicy {
                counter,
                policy,
                supersedes: vec![],
            });
        }
        let payload = match self.payload {
            Some(p) => serde_json::to_vec(&p).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        Ok(Draft {
            stream,
            kind: self.kind,
            ops,
            payload,
            meta: Meta {
                command_id: self.command_id,
                user: self.user,
            },
            expected_version: self.expected_version,
            texts,
        })
    }
}

async fn post_event(
    AxState(d): Shared,
    Path(rest): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(stream) = rest.strip_suffix("/events").filter(|s| !s.is_empty()) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("POST /v1/streams/{rest}: append to /v1/streams/{{stream}}/events"),
        ));
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return post_events(&d, stream, &body).await;
    }
    let body: AppendBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body is not a valid append request: {e}")))?;
    let draft = body.draft(stream.to_string()).map_err(ApiError::bad)?;
    let a = d.node().append_async(draft).await?;
    Ok((appended_status(&a), Json(json::appended(&a))))
}

/// The status of a single append's answer: 200 for a retried command id.
fn appended_status(a: &Appended) -> StatusCode {
    if a.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// A batch: an array of append bodies, each parsed and turned into a draft
/// before any is applied (a malformed one refuses the request, naming its
/// index), then appended together ([`crate::node::Node::append_many`]).
async fn post_events(
    d: &Daemon,
    stream: &str,
    body: &[u8],
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.len() > MAX_BATCH_BODY_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch may hold at most {MAX_BATCH_BODY_BYTES} bytes, this one holds {}; send it in smaller arrays",
                body.len()
            ),
        ));
    }
    let items: Vec<Value> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!(
            "the body is not a JSON array of append requests: {e}"
        ))
    })?;
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch may hold at most {MAX_BATCH_EVENTS} events, this one holds {}; send it in smaller arrays",
                items.len()
            ),
        ));
    }
    let drafts = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = |e: String| ApiError::bad(format!("element {i} of the array: {e}"));
            let body: AppendBody = serde_json::from_value(v)
                .map_err(|e| bad(format!("not a valid append request: {e}")))?;
            body.draft(stream.to_string()).map_err(bad)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes = d.node().append_many_async(drafts).await;
    let answers = outcomes
        .into_iter()
        .map(|o| match o {
            Ok(a) => json!({ "status": appended_status(&a).as_u16(), "body": json::appended(&a) }),
            Err(e) => {
                let ApiError(code, msg) = ApiError::from(e);
                json!({ "status": code.as_u16(), "body": { "error": msg } })
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(Value::Array(answers))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AsOf {
    as_of: Option<u64>,
}

async fn get_stream(
    AxState(d): Shared,
    Path(stream): Path<String>,
    Query(q): Query<AsOf>,
) -> Result<Json<Value>, ApiError> {
    let node = d.node().clone();
    Ok(Json(match q.as_of {
        None => node.with_state(|s| json::stream(&stream, s.stream(&stream))),
        Some(at) => tokio::task::spawn_blocking(move || {
            crate::cli::state_as_of(&node, Hlc(at))
                .map(|past| json::stream(&stream, past.stream(&stream)))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    stream: Option<String>,
    from: Option<String>,
}

async fn log(AxState(d): Shared, Query(q): Query<LogQuery>) -> Result<Response, ApiError> {
    let node = d.node().clone();
    let members = d.members().clone();
    if let Some(from) = q.from {
        let from: crate::sse::From = from.parse().map_err(ApiError::bad)?;
        let filter = crate::sse::Filter {
            stream: q.stream,
            ..Default::default()
        };
        let (text, restart) = tokio::task::spawn_blocking(move || {
            crate::sse::lines_after(&node, &from, &filter, &members)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let mut r = ([(header::CONTENT_TYPE, "application/x-ndjson")], text).into_response();
        if let Some(why) = restart.and_then(|w| header::HeaderValue::from_str(&w).ok()) {
            r.headers_mut().insert("x-weftlog-restart", why);
        }
        return Ok(r);
    }
    let text = tokio::task::spawn_blocking(move || {
        crate::cli::log_lines(&node, q.stream.as_deref(), &members)
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], text).into_response())
}

async fn conflicts(AxState(d): Shared) -> Json<Value> {
    Json(Value::Array(d.node().with_state(json::conflicts)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForksQuery {
    #[serde(default)]
    proof: bool,
}

async fn forks(AxState(d): Shared, Query(q): Query<ForksQuery>) -> Result<Json<Value>, ApiError> {
    let node = d.node().clone();
    let rows = tokio::task::spawn_blocking(move || crate::cli::fork_lines(&node, q.proof))
        .await
        .map_err(internal)?;
    Ok(Json(Value::Array(rows)))
}

async fn oversold(AxState(d): Shared) -> Json<Value> {
    Json(Value::Array(d.node().with_state(json::oversold_rows)))
}

/// The body of `POST /v1/oversold/{sale}`: a staff decision.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    /// `cancel`, `waitlist`, `honour` or `notify`.
    action: String,
    /// Who decided.
    #[serde(default)]
    user: Option<String>,
}

async fn decide(
    AxState(d): Shared,
    Path(sale): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sale: EventId = sale
        .parse()
        .map_err(|e| ApiError::bad(format!("sale {sale:?}: {e}")))?;
    let body: Decision = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body is not a decision: {e}")))?;
    let action = body.action.parse().map_err(ApiError::bad)?;
    let a = decide_sale(&d, sale, action, body.user).await?;
    Ok((StatusCode::CREATED, Json(json::appended(&a))))
}

/// A staff decision on an oversold sale ([`crate::node::Node::decide`]),
/// off the async runtime: for `POST /v1/oversold/{sale}` and the
/// `DecideOversell` command ([`crate::venue`]).
pub(crate) async fn decide_sale(
    d: &Arc<Daemon>,
    sale: EventId,
    action: Compensation,
    user: Option<String>,
) -> Result<Appended, ApiError> {
    let node = d.node().clone();
    Ok(
        tokio::task::spawn_blocking(move || node.decide(&sale, action, user))
            .await
            .map_err(internal)??,
    )
}

async fn status(AxState(d): Shared) -> Json<Value> {
    Json(d.status().await)
}

async fn export(AxState(d): Shared, body: Bytes) -> Result<Response, ApiError> {
    let since = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("the body is not a status JSON: {e}")))?;
        json::heads_of(&v).map_err(|e| ApiError::bad(format!("{e:#}")))?
    };
    let node = d.node().clone();
    let (data, n) = tokio::task::spawn_blocking(move || node.export(&since))
        .await
        .map_err(internal)?
        .map_err(|e| match e {
            // The heads contradict what this node holds: the caller's input.
            ExportError::Since(e) => ApiError::bad(format!("the other node's frontier: {e}")),
            e => internal(e),
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-weftlog-exported"),
                n.to_string(),
            ),
        ],
        data,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// Store events by authors not on the member list too.
    #[serde(default)]
    allow_non_members: bool,
}

async fn import(
    AxState(d): Shared,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let node = d.node().clone();
    let members = d.members().clone();
    let r = tokio::task::spawn_blocking(move || {
        node.import_admitting(&body, |a| q.allow_non_members || members.admits(a))
    })
    .await
    .map_err(internal)?;
    match r {
        Ok(r) => Ok(Json(
            json!({ "imported": r.imported, "duplicates": r.duplicates }),
        )),
        Err(e @ NodeImportError::Refused(_)) => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("import refused, nothing stored: {e}"),
        )),
        Err(e @ NodeImportError::NonMembers(_)) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("import refused: {e}"),
        )),
        Err(e @ NodeImportError::DiskFull(_)) => {
            Err(ApiError(StatusCode::INSUFFICIENT_STORAGE, e.to_string()))
        }
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Partition {
    block: Vec<String>,
}

async fn partition(AxState(d): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let p: Partition = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body must be {{\"block\": [node ids]}}: {e}")))?;
    let mut nodes = BTreeSet::new();
    for s in &p.block {
        let id: NodeId = s
            .parse()
            .map_err(|e| ApiError::bad(format!("block: {s:?}: {e}")))?;
        nodes.insert(id);
    }
    d.set_blocked(nodes);
    let blocked: Vec<String> = d.blocked().iter().map(|n| n.to_string()).collect();
    Ok(Json(json!({ "blocked": blocked })))
}

async fn metrics(AxState(d): Shared, headers: header::HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::metrics::wants_openmetrics);
    let (ctype, text) = crate::metrics::render(&d, openmetrics).await;
    ([(header::CONTENT_TYPE, ctype)], text).into_response()
}
