//! The conference desk's HTTP API: commands and the reads the page makes
//! ([`weftlog_proto::conference`] has the domain model).
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/venue/commands` | 201 `{"event", "stream", "kind"}` (`event` as `append` prints it; 200 with `"existing": true` for a retried command id); 400 naming the field; 404 for an unknown session, attendee or stream; 409 when the id is taken or the expected version does not match; 422 for a refused sale or a cancellation of seats not held |
//! | `GET /v1/venue/sessions` | `{"sessions": [...]}`, sorted by id |
//! | `GET /v1/venue/attendees?q=TEXT[&limit=N]` | `{"attendees": [...], "total"}` matching `q` |
//! | `GET /v1/venue/attendees/{id}` | one attendee with every field's standing writes, notes and seats; 404 when unknown |
//!
//! A command is appended like any append (`Node::append_async`): a sale
//! waits for rights as `POST /v1/streams/{stream}/events` does, and the
//! node's admission turns a consume into an overdraft under `risk-window`.
//! Every read is the fold's, so every desk holding the same events
//! answers the same, but for `rule` (this desk's seat rule now).
//!
//! A session's seat figures, from its `seats` escrow counter and the
//! `held/{attendee}` counters: `sold` is the seats attendees hold less the
//! oversold units released by compensation; `available` is the capacity
//! (inits, cancellations included, plus honoured units) not consumed,
//! counting released units as free again; `oversold` the units sold beyond
//! that capacity that no compensation released or honoured yet; and
//! `capacity` is `sold + available - oversold`, the seats there are now.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use weftlog_proto::admission::RuleNow;
use weftlog_proto::conference::{self, Planned, Refusal, Request, NOTES, SEATS};
use weftlog_proto::state::{shown, Stream, WriteId, Written};
use weftlog_proto::text::Hex;
use weftlog_proto::State;

use crate::daemon::Daemon;
use crate::http::ApiError;
use crate::json;
use crate::node::Node;

/// Attendees listed when the query names no limit.
pub const ATTENDEES_DEFAULT: usize = 50;

/// Most attendees one query lists.
pub const ATTENDEES_MAX: usize = 500;

/// Most conflicting writes of one field whose user is read back from the
/// log for `GET /v1/venue/attendees/{id}`.
pub const CONFLICT_USERS_MAX: usize = 16;

/// The attendee register fields, in the order the page shows them.
const ATTENDEE_FIELDS: [&str; 4] = ["name", "email", "phone", "company"];

type Shared = AxState<Arc<Daemon>>;

/// A register field of an attendee: its name, shown value, and its
/// standing writes when more than one stands.
type FieldWrites = (String, Value, Option<BTreeMap<WriteId, Written>>);

/// The venue's routes.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/venue/commands", post(command))
        .route("/v1/venue/sessions", get(sessions))
        .route("/v1/venue/attendees", get(attendees))
        .route("/v1/venue/attendees/{id}", get(attendee))
}

fn refusal(r: Refusal) -> ApiError {
    let code = match &r {
        _ if r.is_unknown() => StatusCode::NOT_FOUND,
        Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(code, r.to_string())
}

async fn command(AxState(d): Shared, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req =
        Request::parse(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    // Checked against the state now; a concurrent command may change it
    // before the append (a cancellation then rests on the PN counter, which
    // shows the attendee's holding going below zero rather than losing it).
    let planned = d.node().with_state(|s| req.draft(s)).map_err(refusal)?;
    let (a, kind) = match planned {
        Planned::Append(draft) => {
            let kind = draft.kind.clone();
            (d.node().append_async(draft).await?, kind)
        }
        Planned::Decide { sale, action } => {
            let a = crate::http::decide_sale(&d, sale, action, req.user.clone()).await?;
            (a, weftlog_proto::admission::COMPENSATED_KIND.to_string())
        }
    };
    let code = if a.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        code,
        Json(json!({ "event": json::appended(&a), "stream": a.stream, "kind": kind })),
    ))
}

/// A register's shown value, `null` if never written.
fn value(s: &Stream, field: &str) -> Value {
    s.shown(field)
        .map_or(Value::Null, |(_, w)| json::bytes_value(&w.value))
}

/// Fields with more than one standing write, ascending.
fn conflicted(s: &Stream) -> Vec<String> {
    s.fields
        .iter()
        .filter(|(_, w)| w.len() > 1)
        .map(|(f, _)| f.clone())
        .collect()
}

fn num(n: i128) -> Value {
    i64::try_from(n).map_or_else(|_| Value::String(n.to_string()), Value::from)
}

/// One session's JSON (module docs), with this desk's `rule` if its
/// counter has one.
fn session(id: &str, s: &Stream, rule: Option<&(String, String, RuleNow)>) -> Value {
    let held: Map<String, Value> = s
        .counters
        .iter()
        .filter_map(|(c, n)| Some((c.strip_prefix("held/")?.to_string(), num(*n))))
        .filter(|(_, n)| n.as_i64() != Some(0))
        .collect();
    let mut waiting: Vec<(&WriteId, &Written, &str)> = s
        .fields
        .iter()
        .filter_map(|(f, writes)| {
            let (w, v) = shown(writes)?;
            Some((w, v, f.strip_prefix("waitlist/")?))
        })
        .collect();
    waiting.sort_by_key(|(w, v, _)| (v.hlc, **w));
    let waitlist: Vec<Value> = waiting
        .into_iter()
        .filter_map(|(_, v, attendee)| {
            let value = json::bytes_value(&v.value);
            let seats = value.get("seats")?.clone();
            Some(json!({ "attendee": attendee, "seats": seats, "hlc": v.hlc.0 }))
        })
        .collect();
    let held_sum: i128 = s
        .counters
        .iter()
        .filter(|(c, _)| c.starts_with("held/"))
        .map(|(_, n)| *n)
        .sum();
    let (sold, available, oversold, policy) = match s.escrow.get(SEATS) {
        Some(e) => {
            let capacity = (e.capacity + e.honoured) as i128;
            let taken = e.consumed as i128 - e.released as i128;
            (
                (held_sum - e.released as i128).max(0),
                (capacity - taken).max(0),
                (taken - capacity).max(0),
                json::policy(&e.policy()),
            )
        }
        None => (held_sum.max(0), 0, 0, Value::Null),
    };
    let rule = rule.map_or(Value::Null, |r| {
        json::seat_status(std::slice::from_ref(r))
            .as_array()
            .and_then(|a| a.first().cloned())
            .unwrap_or(Value::Null)
    });
    json!({
        "id": id,
        "name": value(s, "name"),
        "starts": value(s, "starts"),
        "room": value(s, "room"),
        "capacity": num(sold + available - oversold),
        "sold": num(sold),
        "available": num(available),
        "oversold": num(oversold),
        "policy": policy,
        "rule": rule,
        "held": held,
        "waitlist": waitlist,
        "conflicts": conflicted(s),
        "version": s.version,
    })
}

async fn sessions(AxState(d): Shared) -> Json<Value> {
    let rules = d.node().seat_rules();
    let list = d.node().with_state(|state| {
        state
            .streams()
            .iter()
            .filter_map(|(name, s)| Some((name, name.strip_prefix("session/")?, s)))
            .map(|(name, id, s)| {
                let rule = rules.iter().find(|(st, c, _)| st == name && c == SEATS);
                session(id, s, rule)
            })
            .collect::<Vec<_>>()
    });
    Json(json!({ "sessions": list }))
}

/// An attendee's summary: the fields the list shows.
fn summary(id: &str, s: &Stream) -> Value {
    let mut v = json!({
        "id": id,
        "badge_printed": value(s, "badge_printed") == Value::Bool(true),
        "version": s.version,
        "conflicts": conflicted(s),
    });
    for f in ATTENDEE_FIELDS {
        v[f] = value(s, f);
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Search {
    #[serde(default)]
    q: String,
    limit: Option<usize>,
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_lowercase(),
        Value::Null => String::new(),
        other => other.to_string().to_lowercase(),
    }
}

async fn attendees(AxState(d): Shared, Query(q): Query<Search>) -> Json<Value> {
    let needle = q.q.trim().to_lowercase();
    let limit = q.limit.unwrap_or(ATTENDEES_DEFAULT).min(ATTENDEES_MAX);
    let mut found = d.node().with_state(|state| {
        state
            .streams()
            .iter()
            .filter_map(|(name, s)| Some((name.strip_prefix("attendee/")?, s)))
            .map(|(id, s)| summary(id, s))
            .filter(|v| {
                needle.is_empty()
                    || ["id", "name", "email", "company", "phone"]
                        .iter()
                        .any(|f| text_of(&v[*f]).contains(&needle))
            })
            .collect::<Vec<_>>()
    });
    found.sort_by_cached_key(|v| (text_of(&v["name"]), text_of(&v["id"])));
    let total = found.len();
    found.truncate(limit);
    Json(json!({ "attendees": found, "total": total }))
}

/// The standing writes of a field, shown value first, each with the user
/// its event names (read back from the log, for the first
/// [`CONFLICT_USERS_MAX`]).
fn writes(node: &Node, writes: &BTreeMap<WriteId, Written>) -> Vec<Value> {
    let mut all = json::conflict_values(writes);
    for v in all.iter_mut().take(CONFLICT_USERS_MAX) {
        let Some(id) = v["event"].as_str().and_then(|e| e.parse().ok()) else {
            continue;
        };
        if let Some(user) = node.durable_event(&id).and_then(|e| e.meta.user) {
            v["user"] = Value::String(user);
        }
    }
    all
}

async fn attendee(AxState(d): Shared, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let node = d.node().clone();
    let stream = conference::attendee_stream(&id);
    let found = node.with_state(|state: &State| {
        let s = state.stream(&stream).filter(|s| s.version > 0)?;
        let fields: Vec<FieldWrites> = s
            .fields
            .iter()
            .map(|(f, w)| {
                let shown = shown(w).map_or(Value::Null, |(_, v)| json::bytes_value(&v.value));
                (f.clone(), shown, (w.len() > 1).then(|| w.clone()))
            })
            .collect();
        let notes = s.text(NOTES);
        let seats: Vec<Value> = state
            .streams()
            .iter()
            .filter_map(|(name, st)| Some((name.strip_prefix("session/")?, st)))
            .filter_map(|(sid, st)| {
                let held = *st.counters.get(&conference::held_counter(&id))?;
                (held != 0).then(
                    || json!({ "session": sid, "name": value(st, "name"), "held": num(held) }),
                )
            })
            .collect();
        Some((
            summary(&id, s),
            fields,
            notes.map_or(String::new(), |t| t.text.clone()),
            notes.map_or(Vec::new(), |t| {
                t.heads.iter().map(|h| Hex(h).to_string()).collect()
            }),
            seats,
        ))
    });
    let Some((mut v, fields, notes, heads, seats)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no attendee {id:?}"),
        ));
    };
    // Reading users back from the log is IO: off the runtime.
    let fields = tokio::task::spawn_blocking(move || {
        fields
            .into_iter()
            .map(|(f, shown, conflict)| {
                let mut fv = json!({ "value": shown });
                if let Some(w) = conflict {
                    fv["conflict"] = Value::Array(writes(&node, &w));
                }
                (f, fv)
            })
            .collect::<Map<String, Value>>()
    })
    .await
    .map_err(crate::http::internal)?;
    v["fields"] = Value::Object(fields);
    v["notes"] = Value::String(notes);
    v["notes_heads"] = json!(heads);
    v["seats"] = Value::Array(seats);
    Ok(Json(v))
}
