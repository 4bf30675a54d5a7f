//! The pool of received events waiting for a dependency: authenticated,
//! not yet stored, shared by the sessions of one store. Apart from the
//! session because it outlives sessions and belongs to the store; the
//! session decides what to put in and when to drain it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::error::SyncError;
use super::limits::{MAX_MISSING_DEPS, MAX_POOL_BYTES, MAX_POOL_EVENTS, MAX_POOL_MAIL};
use crate::event::{Event, Signature};
use crate::hlc::Hlc;
use crate::id::{EventId, EventRef, NodeId};

/// Key of a pooled event: canonical order, then the id (two branches of a
/// fork may share everything else).
pub(super) type PoolKey = (Hlc, NodeId, u64, EventId);

/// Authenticated events waiting for their chain predecessor or a dependency,
/// shared by the sessions of one store ([`Store::pool`](super::Store::pool)).
///
/// Over a tree of eager links an event and its dependency may arrive over
/// different connections, in either order. The one that arrives first
/// waits here, whichever session received it, and any session that stores
/// events stores the waiting ones whose past is then complete. Every event
/// here has passed the checks up to its author's signature, and remembers
/// the session that received it (its *origin*), so that limits, forks and
/// refusals are charged to that session.
///
/// A pool outlives its sessions: events a closed session left keep waiting
/// until their past arrives and count against the pool's limits;
/// [`Pool::clear`] drops them.
#[derive(Clone, Debug)]
pub struct Pool {
    max_events: usize,
    max_bytes: usize,
    pub(super) entries: BTreeMap<PoolKey, Box<Pending>>,
    ids: BTreeMap<EventId, PoolKey>,
    bytes: usize,
    /// Per origin: the events and bytes it holds here.
    held: BTreeMap<u64, (usize, usize)>,
    next_origin: u64,
    /// What one session's drain found about another's events (a fork, a
    /// refusal), until that session collects it.
    mail: VecDeque<(u64, Mail)>,
}

/// A report for the origin of a pooled event.
#[derive(Clone, Debug)]
pub(super) enum Mail {
    /// The store refused a pooled event.
    Refused(SyncError),
}

impl Pool {
    /// An empty pool with the default limits ([`MAX_POOL_EVENTS`],
    /// [`MAX_POOL_BYTES`]).
    pub fn new() -> Pool {
        Pool::with_limits(MAX_POOL_EVENTS, MAX_POOL_BYTES)
    }

    /// An empty pool that holds at most `max_events` events and
    /// `max_bytes` bytes of them; the session whose event would pass a
    /// limit fails ([`SyncError::PoolFull`]).
    pub fn with_limits(max_events: usize, max_bytes: usize) -> Pool {
        Pool {
            max_events,
            max_bytes,
            entries: BTreeMap::new(),
            ids: BTreeMap::new(),
            bytes: 0,
            held: BTreeMap::new(),
            next_origin: 0,
            mail: VecDeque::new(),
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the events waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the event waits here.
    pub fn contains(&self, id: &EventId) -> bool {
        self.ids.contains_key(id)
    }

    /// Drops every waiting event and every undelivered report.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.ids.clear();
        self.bytes = 0;
        self.held.clear();
        self.mail.clear();
    }

    /// A new origin tag for a session.
    pub(super) fn join(&mut self) -> u64 {
        let o = self.next_origin;
        self.next_origin += 1;
        o
    }

    /// Events and bytes `origin` holds here.
    pub(super) fn held(&self, origin: u64) -> (usize, usize) {
        self.held.get(&origin).copied().unwrap_or((0, 0))
    }

    /// Adds an authenticated run of one author, whose signed event is at
    /// seq `seg`, received by `origin`. Events already here are skipped
    /// (returned: the number skipped); the segments they belong to are
    /// merged with the run's into one, stored whole, labelled by the
    /// highest signed seq among them. Nothing is added if the run would
    /// pass a limit.
    pub(super) fn add_run(
        &mut self,
        run: Vec<Pending>,
        seg: (u64, EventId),
        origin: u64,
    ) -> Result<u64, SyncError> {
        let Some(author) = run.first().map(|p| p.event.author) else {
            return Ok(0);
        };
        let bytes: usize = run.iter().map(|p| p.bytes.len()).sum();
        if self.entries.len() + run.len() > self.max_events || self.bytes + bytes > self.max_bytes {
            return Err(SyncError::PoolFull {
                max_events: self.max_events,
                max_bytes: self.max_bytes,
            });
        }
        let merged: BTreeSet<(u64, EventId)> = run
            .iter()
            .filter_map(|p| self.ids.get(&p.id))
            .filter_map(|k| self.entries.get(k).map(|e| e.seg))
            .collect();
        let label = merged.last().map_or(seg, |&m| m.max(seg));
        if !merged.is_empty() {
            for (k, e) in self.entries.iter_mut() {
                if k.1 == author && merged.contains(&e.seg) {
                    e.seg = label;
                }
            }
        }
        let mut skipped = 0;
        for mut p in run {
            if self.ids.contains_key(&p.id) {
                skipped += 1;
                continue;
            }
            p.seg = label;
            p.origin = origin;
            let key = (p.event.hlc, author, p.event.seq, p.id);
            self.bytes += p.bytes.len();
            let h = self.held.entry(origin).or_insert((0, 0));
            h.0 += 1;
            h.1 += p.bytes.len();
            self.ids.insert(p.id, key);
            self.entries.insert(key, Box::new(p));
        }
        Ok(skipped)
    }

    /// Takes an event out.
    pub(super) fn take(&mut self, key: &PoolKey) -> Option<Box<Pending>> {
        let p = self.entries.remove(key)?;
        self.ids.remove(&p.id);
        self.bytes -= p.bytes.len();
        if let Some(h) = self.held.get_mut(&p.origin) {
            h.0 -= 1;
            h.1 -= p.bytes.len();
            if h.0 == 0 {
                self.held.remove(&p.origin);
            }
        }
        Some(p)
    }

    /// Drops `author`'s events that `origin` received.
    pub(super) fn drop_author(&mut self, author: NodeId, origin: u64) {
        let keys: Vec<PoolKey> = self
            .entries
            .iter()
            .filter(|(k, p)| k.1 == author && p.origin == origin)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.take(&k);
        }
    }

    pub(super) fn post(&mut self, origin: u64, mail: Mail) {
        if self.mail.len() >= MAX_POOL_MAIL {
            self.mail.pop_front();
        }
        self.mail.push_back((origin, mail));
    }

    /// Takes the reports for `origin`.
    pub(super) fn collect_mail(&mut self, origin: u64) -> Vec<Mail> {
        if self.mail.iter().all(|(o, _)| *o != origin) {
            return Vec::new();
        }
        let (mine, rest) = std::mem::take(&mut self.mail)
            .into_iter()
            .partition(|(o, _)| *o == origin);
        self.mail = rest;
        mine.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
    }

    /// What `origin`'s waiting events wait for: the predecessors and deps that
    /// neither the store (`stored`) nor the pool holds, followed through the
    /// pooled events they wait on; ascending, at most [`MAX_MISSING_DEPS`].
    pub(super) fn missing(&self, origin: u64, stored: impl Fn(&EventId) -> bool) -> Vec<EventId> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<&Pending> = self
            .entries
            .values()
            .filter(|p| p.origin == origin)
            .map(|p| &**p)
            .collect();
        let mut seen: BTreeSet<EventId> = stack.iter().map(|p| p.id).collect();
        while let Some(p) = stack.pop() {
            for d in p.event.prev.iter().chain(&p.event.deps) {
                if stored(d) {
                    continue;
                }
                match self.ids.get(d).and_then(|k| self.entries.get(k)) {
                    Some(q) => {
                        if seen.insert(*d) {
                            stack.push(q);
                        }
                    }
                    None => {
                        out.insert(*d);
                        if out.len() >= MAX_MISSING_DEPS {
                            return out.into_iter().collect();
                        }
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

/// A received event not yet stored.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    pub(super) event: Event,
    pub(super) id: EventId,
    pub(super) bytes: Vec<u8>,
    pub(super) sig: Option<Signature>,
    /// The seq and id of the signed event that ends its segment (set on
    /// release).
    pub(super) seg: (u64, EventId),
    /// The pool tag of the session that received it (set on release).
    pub(super) origin: u64,
}

impl Pending {
    pub(super) fn eref(&self) -> EventRef {
        EventRef {
            id: self.id,
            author: self.event.author,
            seq: self.event.seq,
        }
    }
}
