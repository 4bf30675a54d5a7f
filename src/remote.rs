//! The CLI's way to a running node: while `weftlog run` holds a data
//! directory's lock, the other commands given that directory talk to its
//! HTTP API, whose address the daemon writes to [`HTTP_ADDR_FILE`]. When
//! the node runs with tokens, every request carries the run's local admin
//! token ([`crate::auth::LOCAL_TOKEN_FILE`]).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// The file in a data directory that holds the running daemon's HTTP
/// address.
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// A running node's HTTP API.
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    /// `Bearer <the node's local admin token>`, when it runs with tokens
    /// ([`crate::auth::LOCAL_TOKEN_FILE`]).
    bearer: Option<String>,
}

/// Percent-encodes `s` for a URL path (keeping `/`) or query value.
pub fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Remote {
    /// The node running on `dir`, if its address file is there.
    pub fn of(dir: &Path) -> Result<Remote> {
        let path = dir.join(HTTP_ADDR_FILE);
        let addr = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is locked by another process, but {} is missing: is a `weftlog run` starting or stopping?",
                dir.display(),
                path.display()
            )
        })?;
        let mut remote = Remote::at(addr.trim());
        remote.bearer = crate::auth::local_token(dir).map(|t| format!("Bearer {t}"));
        Ok(remote)
    }

    /// The node whose HTTP API listens at `addr` (`host:port`).
    pub fn at(addr: &str) -> Remote {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Remote {
            base: format!("http://{addr}"),
            agent,
            bearer: None,
        }
    }

    fn answer(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Vec<u8>, Option<String>)> {
        let mut r = r.map_err(|e| {
            anyhow!(
                "the running node at {} did not answer {what}: {e}",
                self.base
            )
        })?;
        let status = r.status().as_u16();
        let exported = r
            .headers()
            .get("x-weftlog-exported")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .with_context(|| format!("reading the answer to {what}"))?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("{msg}");
        }
        Ok((status, body, exported))
    }

    /// GET `path`: the body.
    pub fn get(&self, path: &str) -> Result<Vec<u8>> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(b) = &self.bearer {
            req = req.header("authorization", b);
        }
        let r = req.call();
        Ok(self.answer(&format!("GET {path}"), r)?.1)
    }

    /// GET `path`: its JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        Ok(serde_json::from_slice(&self.get(path)?)?)
    }

    /// POST `body` to `path`: the body and the exported count header.
    pub fn post(&self, path: &str, body: &[u8], json: bool) -> Result<(Vec<u8>, Option<String>)> {
        let ct = if json {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", ct);
        if let Some(b) = &self.bearer {
            req = req.header("authorization", b);
        }
        let r = req.send(body);
        let (_, body, exported) = self.answer(&format!("POST {path}"), r)?;
        Ok((body, exported))
    }

    /// POST JSON to `path`: its JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let (b, _) = self.post(path, body.to_string().as_bytes(), true)?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// GETs the server-sent event stream at `path` and hands each message
    /// (its `event:` name, `id:` and `data:`) to `f` until the stream ends
    /// or `f` says stop (`false`). No timeout: a stream may idle for long.
    pub fn follow(
        &self,
        path: &str,
        last_event_id: Option<&str>,
        mut f: impl FnMut(&SseMessage) -> Result<bool>,
    ) -> Result<()> {
        use std::io::BufRead;
        let mut req = self
            .agent
            .get(format!("{}{path}", self.base))
            .config()
            .timeout_global(None)
            .build();
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        if let Some(b) = &self.bearer {
            req = req.header("authorization", b);
        }
        let what = format!("GET {path}");
        let r = req.call().map_err(|e| {
            anyhow!(
                "the running node at {} did not answer {what}: {e}",
                self.base
            )
        })?;
        if !r.status().is_success() {
            return self.answer(&what, Ok(r)).map(drop);
        }
        let reader = std::io::BufReader::new(r.into_body().into_reader());
        let mut msg = SseMessage::default();
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading {what}"))?;
            if line.is_empty() {
                if (!msg.data.is_empty() || !msg.event.is_empty()) && !f(&msg)? {
                    return Ok(());
                }
                msg = SseMessage::default();
            } else if let Some(v) = line.strip_prefix("event: ") {
                msg.event = v.to_string();
            } else if let Some(v) = line.strip_prefix("id: ") {
                msg.id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                msg.data.push_str(v);
            }
        }
        Ok(())
    }
}

/// One server-sent event message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// Its `event:` name (empty: none).
    pub event: String,
    /// Its `id:`.
    pub id: Option<String>,
    /// Its `data:` lines, joined.
    pub data: String,
}
