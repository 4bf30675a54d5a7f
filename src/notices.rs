//! Notifications that are not log events: what `GET /v1/notifications`
//! carries ([`crate::sse`]).
//!
//! The daemon publishes a [`Notice`] when it records a fork, when a sale is
//! first seen oversold or its compensation changes, when the log
//! starts a new epoch ([`crate::subscribe`]), and when a reconnect report
//! is made (`reconciled`, [`crate::reconnects`]). Notices are numbered from 1
//! in each run of the node; the last [`NOTICES_KEPT`] are kept, so a
//! client that reconnects with `Last-Event-ID` gets those it missed.
//! Notices describe the node's state at the moment; a client that needs
//! all of it reads the matching endpoint (`/v1/oversold`, `/v1/forks`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};
use tokio::sync::broadcast;
use weftlog_proto::state::State;

use crate::json;

/// Notices kept for clients that reconnect.
pub const NOTICES_KEPT: usize = 1024;

/// One notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// Its number in this run of the node, from 1.
    pub id: u64,
    /// `fork`, `oversold`, `epoch` or `reconciled`.
    pub kind: &'static str,
    /// What happened, as JSON.
    pub data: Value,
}

impl Notice {
    /// The notice as one SSE message.
    pub fn sse(&self) -> String {
        format!(
            "event: {}\nid: {}\ndata: {}\n\n",
            self.kind, self.id, self.data
        )
    }
}

struct Inner {
    next: u64,
    kept: VecDeque<Notice>,
    /// Per oversold sale (stream, counter, sale), its row as last
    /// published.
    oversold: BTreeMap<String, Value>,
}

/// The daemon's notices: a live channel and the last few kept.
pub struct Notices {
    tx: broadcast::Sender<Notice>,
    inner: Mutex<Inner>,
}

impl Default for Notices {
    fn default() -> Notices {
        Notices::new()
    }
}

impl Notices {
    /// No notices yet.
    pub fn new() -> Notices {
        Notices {
            tx: broadcast::channel(NOTICES_KEPT).0,
            inner: Mutex::new(Inner {
                next: 1,
                kept: VecDeque::new(),
                oversold: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing here holds an invariant a panic could break halfway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a notice.
    pub fn publish(&self, kind: &'static str, data: Value) {
        let mut g = self.lock();
        let n = Notice {
            id: g.next,
            kind,
            data,
        };
        g.next += 1;
        if g.kept.len() == NOTICES_KEPT {
            g.kept.pop_front();
        }
        g.kept.push_back(n.clone());
        // Under the lock, so that the channel carries notices in order.
        // No receiver is not an error: nobody listens.
        let _ = self.tx.send(n);
    }

    /// The kept notices after `after` (none when `after` is `u64::MAX`),
    /// and a receiver for the ones to come, with no gap between them.
    pub fn after(&self, after: u64) -> (Vec<Notice>, broadcast::Receiver<Notice>) {
        let g = self.lock();
        let rx = self.tx.subscribe();
        let missed = g.kept.iter().filter(|n| n.id > after).cloned().collect();
        (missed, rx)
    }

    /// Publishes an `oversold` notice for each sale that is newly oversold
    /// or whose row changed (a compensation came or changed) since the
    /// last call.
    pub fn note_oversold(&self, state: &State) {
        let rows = json::oversold_rows(state);
        let mut changed = Vec::new();
        {
            let mut g = self.lock();
            for row in rows {
                let key = format!(
                    "{}\u{0}{}\u{0}{}",
                    row["stream"], row["counter"], row["sale"]
                );
                if g.oversold.get(&key) != Some(&row) {
                    g.oversold.insert(key, row.clone());
                    changed.push(row);
                }
            }
        }
        for row in changed {
            self.publish("oversold", row);
        }
    }

    /// Publishes a `fork` notice.
    pub fn note_fork(&self, author: &str, seq: u64, peer: &str) {
        self.publish(
            "fork",
            json!({ "author": author, "seq": seq, "reported_by": peer }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnecting_client_gets_what_it_missed_and_then_the_live_ones() {
        let n = Notices::new();
        n.publish("epoch", json!({ "epoch": "a" }));
        n.publish("fork", json!({ "seq": 2 }));
        let (missed, mut rx) = n.after(1);
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].id, 2);
        n.publish("fork", json!({ "seq": 3 }));
        assert_eq!(rx.try_recv().unwrap().id, 3);
        let (none, _) = n.after(u64::MAX);
        assert!(none.is_empty());
        assert!(missed[0].sse().starts_with("event: fork\nid: 2\ndata: "));
    }
}
