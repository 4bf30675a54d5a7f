//! The desk: the web page registration staff use, served by `weftlog run`
//! at `/`.
//!
//! The page is three embedded files (HTML, CSS, JavaScript, no framework):
//! nothing is fetched from the network at run time, so a desk whose venue
//! Wi-Fi is down still loads it from its own node. It reads the generic API
//! and the conference endpoints ([`crate::venue`]), sends every change as a
//! conference command, and follows the node over server-sent events:
//! `/v1/events` for what the log holds, `/v1/notifications` for oversells,
//! reconnect reports and forks.
//!
//! **Desk names.** A desk is named in the log itself: `run --name "Desk A"`
//! writes the register `name` of the stream `desk/<node id>` (once, and
//! again only when the name changes), so every replica, and every page,
//! shows the same name for it. [`desk`] serves this node's id and name,
//! the names of all desks it has heard of, and its wall clock (the page
//! counts risk windows and override deadlines against it).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use weftlog_proto::state::{shown, Draft};
use weftlog_proto::{Meta, Op, State};

use crate::daemon::Daemon;
use crate::node::{AppendError, Node};

const INDEX: &str = include_str!("index.html");
const CSS: &str = include_str!("desk.css");
const JS: &str = include_str!("desk.js");

/// The prefix of the streams that name desks: `desk/<node id>`.
pub const DESK_PREFIX: &str = "desk/";
/// The event kind that names a desk.
pub const NAMED_KIND: &str = "DeskNamed";
/// The longest desk name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The page's routes: `/`, its two assets, and `GET /v1/desk`.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/", get(index))
        .route("/desk.css", get(css))
        .route("/desk.js", get(js))
        .route("/v1/desk", get(desk))
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

async fn css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", JS)
}

/// An embedded file. `no-cache`: a browser revalidates, so a new build's
/// page is never mixed with an old one's script.
fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// `GET /v1/desk`: `node`, `name` (null until named), `desks` (node id →
/// name, every desk named in the log), `now_ms` (this node's wall clock),
/// `demo` (whether the page offers to cut this desk's network).
async fn desk(AxState(d): AxState<Arc<Daemon>>) -> Json<Value> {
    let node = d.node();
    let me = node.id().to_string();
    let desks = node.with_state(names);
    Json(json!({
        "node": me,
        "name": desks.get(&me),
        "desks": desks,
        "now_ms": crate::node::wall_ms(),
        "demo": d.is_demo(),
    }))
}

/// Every desk named in the log: node id (hex) → the name shown.
pub fn names(state: &State) -> BTreeMap<String, String> {
    state
        .streams()
        .range(DESK_PREFIX.to_string()..)
        .take_while(|(s, _)| s.starts_with(DESK_PREFIX))
        .filter_map(|(s, stream)| {
            let (_, w) = shown(stream.fields.get("name")?)?;
            let name: String = serde_json::from_slice(&w.value).ok()?;
            Some((s[DESK_PREFIX.len()..].to_string(), name))
        })
        .collect()
}

/// A desk name that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// Empty, or only spaces.
    #[error("a desk name cannot be empty")]
    Empty,
    /// Longer than [`MAX_NAME_BYTES`].
    #[error("a desk name is at most {MAX_NAME_BYTES} bytes; this one has {0}")]
    TooLong(usize),
    /// Holds a control character.
    #[error("a desk name cannot hold control characters")]
    Control,
    /// Appending the name failed.
    #[error("cannot record the desk's name: {0}")]
    Append(#[from] AppendError),
}

/// `name` trimmed, if it can name a desk.
pub fn check_name(name: &str) -> Result<&str, NameError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(name)
}

/// Names this node's desk `name` in the log, unless it already is: a
/// register in the stream `desk/<node id>`, which only this node writes.
/// An ordinary append: at start it waits, like any other, until a peer
/// confirmed this node's own log (a restored copy does not fork over its
/// name). Returns whether it wrote an event.
pub async fn name_desk(node: &Node, name: &str) -> Result<bool, NameError> {
    let name = check_name(name)?;
    let me = node.id().to_string();
    if node.with_state(names).get(&me).map(String::as_str) == Some(name) {
        return Ok(false);
    }
    let draft = Draft {
        stream: format!("{DESK_PREFIX}{me}"),
        kind: NAMED_KIND.into(),
        ops: vec![Op::Set {
            field: "name".into(),
            value: serde_json::to_vec(name).expect("a string encodes as JSON"),
            supersedes: vec![],
        }],
        meta: Meta::default(),
        ..Draft::default()
    };
    node.append_async(draft).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> (tempfile::TempDir, Node) {
        let dir = tempfile::tempdir().unwrap();
        crate::node::init(dir.path()).unwrap();
        let (node, _) = Node::open(dir.path()).unwrap();
        (dir, node)
    }

    #[tokio::test]
    async fn a_desk_is_named_once_and_renamed_when_the_name_changes() {
        let (_dir, node) = node();
        assert!(name_desk(&node, " Desk A ").await.unwrap());
        let again = name_desk(&node, "Desk A").await.unwrap();
        assert!(!again, "the same name again writes nothing");
        assert!(name_desk(&node, "Desk B").await.unwrap());
        let names = node.with_state(names);
        assert_eq!(
            names.get(&node.id().to_string()).map(String::as_str),
            Some("Desk B")
        );
        assert_eq!(names.len(), 1);
    }

    #[tokio::test]
    async fn bad_names_are_refused_with_the_reason() {
        let (_dir, node) = node();
        assert!(matches!(
            name_desk(&node, "  ").await,
            Err(NameError::Empty)
        ));
        let long = "x".repeat(65);
        assert!(matches!(
            name_desk(&node, &long).await,
            Err(NameError::TooLong(65))
        ));
        assert!(matches!(
            name_desk(&node, "a\u{7}b").await,
            Err(NameError::Control)
        ));
        assert!(node.with_state(names).is_empty());
    }

    #[test]
    fn the_assets_are_the_page_the_script_and_the_styles() {
        assert!(INDEX.contains("<script src=\"/desk.js\">"));
        assert!(INDEX.contains("/desk.css"));
        assert!(JS.contains("/v1/venue/commands"));
        assert!(
            !INDEX.contains("http://") && !INDEX.contains("https://"),
            "nothing fetched from the network"
        );
        assert!(!JS.contains("http://") && !JS.contains("https://"));
        assert!(!CSS.contains("url("));
    }
}
