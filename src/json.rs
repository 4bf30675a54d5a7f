//! The JSON the CLI prints (and the HTTP API will serve). Objects are
//! `serde_json::Map`s, which keep keys sorted, so output is deterministic.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use weftlog_proto::admission::RuleNow;
use weftlog_proto::event::Policy;
use weftlog_proto::fork_proof::{BuildError, ForkProof};
use weftlog_proto::hlc::MAX_CLOCK_AHEAD_MS;
use weftlog_proto::seats::{By, Compensated, Oversold};
use weftlog_proto::since::MAX_SINCE_HEADS;
use weftlog_proto::state::{shown, Escrow, Fork, Stream, WriteId, Written};
use weftlog_proto::sync::Head;
use weftlog_proto::text::Hex;
use weftlog_proto::{Event, EventId, NodeId, State};

use crate::node::{Appended, OwnFrontier};
use crate::tls::Members;

/// Register values and payloads are JSON text by convention; anything else
/// is shown as `{"hex": "…"}`.
pub fn bytes_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "hex": hex(bytes) }))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The output of `append`.
pub fn appended(a: &Appended) -> Value {
    let mut v = json!({
        "id": a.id.to_string(),
        "author": a.author.to_string(),
        "seq": a.seq,
        "hlc": a.hlc.0,
        "stream": a.stream,
        "version": a.version,
    });
    if a.existing {
        v["existing"] = Value::Bool(true);
    }
    v
}

/// The seat rule that applies now on each escrow counter, for `status`:
/// the effective policy, the rights this node holds, how many seats it may
/// sell now, and what limits it.
pub fn seat_status(rules: &[(String, String, RuleNow)]) -> Value {
    Value::Array(
        rules
            .iter()
            .map(|(stream, counter, r)| {
                json!({
                    "stream": stream,
                    "counter": counter,
                    "policy": policy(&r.policy),
                    "held": number(r.held),
                    "may_sell": number(r.may_sell as i128),
                    "limited_by": r.limited_by,
                })
            })
            .collect(),
    )
}

/// A seat policy, as the HTTP body and the JSON forms spell it.
pub fn policy(p: &Policy) -> Value {
    crate::event_view::policy_value(p)
}

/// One event, as `log` prints it ([`crate::event_view`]).
pub fn event(e: &Event, id: &EventId) -> Value {
    crate::event_view::EventView::new(e, id).value()
}

/// Marks an event object as `log` prints it with `"non_member": true` if
/// `members` does not name its author. Only a mark: such an event is as
/// valid as any other (membership gates connections, not validity).
pub fn mark_non_member(v: &mut Value, author: &weftlog_proto::NodeId, members: &Members) {
    if !members.admits(author) {
        v["non_member"] = Value::Bool(true);
    }
}

/// `status`'s `non_members`: `null` without a member list; otherwise the
/// authors of events this node holds that the list does not name, as
/// `authors` (`author`, `seq`: its highest seq held, ascending by author)
/// and `events` (the sum of those seqs).
pub fn non_members(state: &State, members: &Members) -> Value {
    if matches!(members, Members::Anyone) {
        return Value::Null;
    }
    // Per author its highest seq, on any branch.
    let mut highest: std::collections::BTreeMap<weftlog_proto::NodeId, u64> = Default::default();
    for (a, seq, _) in state.frontier() {
        if !members.admits(&a) {
            let e = highest.entry(a).or_default();
            *e = (*e).max(seq);
        }
    }
    let authors: Vec<(String, u64)> = highest
        .into_iter()
        .map(|(a, seq)| (a.to_string(), seq))
        .collect();
    let events: u64 = authors.iter().map(|(_, s)| s).sum();
    json!({
        "authors": authors
            .iter()
            .map(|(a, s)| json!({ "author": a, "seq": s }))
            .collect::<Vec<_>>(),
        "events": events,
    })
}

/// `status`'s `own_frontier`: whether a peer confirmed this node's own log
/// since it started (`confirmed`), `by` which peers, `at_ms` (wall clock,
/// the first), `seq` (its highest own seq then), and `wait_until_ms`: until
/// when appends waited for it (`null` if they were not held: no peers).
pub fn own_frontier(o: &OwnFrontier) -> Value {
    json!({
        "confirmed": o.confirmed,
        "by": o.by.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "at_ms": o.at_ms,
        "seq": o.seq,
        "wait_until_ms": o.wait_until_ms,
    })
}

fn written(d: &WriteId, w: &Written) -> Value {
    json!({
        "value": bytes_value(&w.value),
        "author": d.author.to_string(),
        "seq": d.seq,
        "event": d.event.to_string(),
        "hlc": w.hlc.0,
    })
}

/// The standing writes of a field, shown value first: descending
/// `(hlc, author, seq, event)`.
pub fn conflict_values(writes: &std::collections::BTreeMap<WriteId, Written>) -> Vec<Value> {
    let mut all: Vec<_> = writes.iter().collect();
    all.sort_by_key(|(d, w)| std::cmp::Reverse((w.hlc, **d)));
    all.into_iter().map(|(d, w)| written(d, w)).collect()
}

/// A stream's read model, as `get` prints it.
pub fn stream(name: &str, s: Option<&Stream>) -> Value {
    let empty = Stream::default();
    let s = s.unwrap_or(&empty);
    let mut fields = Map::new();
    for (f, writes) in &s.fields {
        let Some((_, w)) = shown(writes) else {
            continue;
        };
        let mut v = json!({ "value": bytes_value(&w.value) });
        if writes.len() > 1 {
            v["conflict"] = Value::Array(conflict_values(writes));
        }
        fields.insert(f.clone(), v);
    }
    let counters: Map<String, Value> = s
        .counters
        .iter()
        .map(|(c, n)| (c.clone(), number(*n)))
        .collect();
    let escrow: Map<String, Value> = s
        .escrow
        .iter()
        .map(|(c, e)| {
            let rights: Map<String, Value> = e
                .accounts
                .iter()
                .map(|(n, a)| (n.to_string(), number(a.rights() as i128)))
                .collect();
            let mut v = json!({
                "capacity": number(e.capacity as i128),
                "consumed": number(e.consumed as i128),
                "rights": rights,
            });
            if !e.overdrawn.is_empty() {
                // Oversold, or a debt: who owes how many rights, and a
                // forked author's spends past the fork.
                let owed: Map<String, Value> = e
                    .overdrawn
                    .iter()
                    .map(|(n, o)| {
                        (
                            n.to_string(),
                            json!({
                                "owed": number(o.owed as i128),
                                "events": o.events.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            }),
                        )
                    })
                    .collect();
                v["overdrawn"] = Value::Object(owed);
            }
            seat_rules(&mut v, e);
            (c.clone(), v)
        })
        .collect();
    let mut v = json!({
        "stream": name,
        "version": s.version,
        "fields": fields,
        "counters": counters,
        "escrow": escrow,
    });
    if s.texts().next().is_some() {
        // The merged text per field, and the heads a client names as
        // `base` when it sends splices made against that text.
        let texts: Map<String, Value> = s
            .texts()
            .map(|(f, t)| (f.to_string(), json!(t.text)))
            .collect();
        let heads: Map<String, Value> = s
            .texts()
            .map(|(f, t)| {
                let heads: Vec<String> = t.heads.iter().map(|h| Hex(h).to_string()).collect();
                (f.to_string(), json!(heads))
            })
            .collect();
        v["texts"] = Value::Object(texts);
        v["text_heads"] = Value::Object(heads);
    }
    if !s.duplicates.is_empty() {
        let dups: Map<String, Value> = s
            .duplicates
            .iter()
            .map(|(c, d)| {
                (
                    c.clone(),
                    json!({
                        "took_effect": d.took_effect.to_string(),
                        "ignored": d.ignored.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        v["duplicates"] = Value::Object(dups);
    }
    v
}

/// The seat rules of one escrow counter, added to its object: the
/// effective `policy`, the standing `policies` when more than one stands
/// (a conflict), the oversold sales with their compensation, the void
/// compensations, the waitlist, and the units honoured and released.
fn seat_rules(v: &mut Value, e: &Escrow) {
    v["policy"] = policy(&e.policy());
    if e.policies.len() > 1 {
        v["policies"] = Value::Array(
            e.policies
                .iter()
                .map(|(w, p)| {
                    let mut p = policy(p);
                    p["write"] = write_id(w);
                    p
                })
                .collect(),
        );
    }
    let oversold: Map<String, Value> = e
        .oversold
        .iter()
        .map(|(id, m)| (id.to_string(), oversold(m)))
        .collect();
    let void: Map<String, Value> = e
        .void
        .iter()
        .map(|(id, c)| (id.to_string(), compensated(c)))
        .collect();
    v["oversold"] = Value::Object(oversold);
    v["void"] = Value::Object(void);
    v["waitlist"] = e.waitlist.iter().map(ToString::to_string).collect();
    v["honoured"] = number(e.honoured as i128);
    v["released"] = number(e.released as i128);
}

/// One oversold mark: its units, the sale's author and hlc, and its
/// compensation (null while none stands).
pub fn oversold(m: &Oversold) -> Value {
    json!({
        "units": m.units,
        "author": m.author.to_string(),
        "hlc": m.hlc.0,
        "compensation": m.compensation.as_ref().map(compensated),
    })
}

/// A compensation standing for a sale: the action, who decided it, and
/// the write it stands as.
pub fn compensated(c: &Compensated) -> Value {
    json!({
        "action": c.action.name(),
        "by": c.by.name(),
        "write": write_id(&c.write),
    })
}

fn write_id(w: &WriteId) -> Value {
    json!({ "author": w.author.to_string(), "seq": w.seq, "event": w.event.to_string() })
}

/// A fork record ([`State::forks`]): the author, the seq where its branches
/// diverge, the events there, and each branch's head.
pub fn fork(f: &Fork) -> Value {
    json!({
        "author": f.author.to_string(),
        "seq": f.seq,
        "events": f.events.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "heads": f.heads.iter().map(|(s, id)| json!({ "seq": s, "head": id.to_string() })).collect::<Vec<_>>(),
    })
}

/// A fork record with its proof ([`ForkProof::of_fork`]): [`fork`], and
/// `"proof"`, the JSON form of the proof (`PROTOCOL.md` §9.6.1), or `null`
/// with `"proof_error"` saying why this node cannot make it yet.
pub fn fork_with_proof(f: &Fork, proof: &Result<ForkProof, BuildError>) -> Value {
    let mut v = fork(f);
    match proof {
        Ok(p) => v["proof"] = fork_proof(p),
        Err(e) => {
            v["proof"] = Value::Null;
            v["proof_error"] = e.to_string().into();
        }
    }
    v
}

/// The JSON form of a fork proof (`PROTOCOL.md` §9.6.1).
pub fn fork_proof(p: &ForkProof) -> Value {
    // Strings and numbers only: serialising them cannot fail.
    serde_json::to_value(p.to_json()).expect("a fork proof is JSON")
}

/// An integer as a JSON number (i64 when it fits, else a decimal string).
pub(crate) fn number(n: i128) -> Value {
    i64::try_from(n).map_or_else(|_| Value::String(n.to_string()), Value::from)
}

/// The lines `conflicts` prints.
pub fn conflicts(state: &State) -> Vec<Value> {
    state
        .conflicts()
        .map(|(s, f, w)| json!({ "stream": s, "field": f, "values": conflict_values(w) }))
        .collect()
}

/// Every branch head in another node's `status` output ([`status_at`]):
/// per author in `"frontier"`, each of its `"branches"` (`{"seq","head"}`)
/// if it lists them (an author that forked), else its own `"seq"` and
/// `"head"`. Ascending by `(author, seq, id)`. Refuses what is not that
/// shape, naming the entry: no `"frontier"` object, an author or id that
/// does not parse, a seq that is not a positive integer, a top-level head
/// missing from the author's branches, more than [`MAX_SINCE_HEADS`] heads.
pub fn heads_of(v: &Value) -> Result<Vec<Head>> {
    let f = v
        .get("frontier")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            anyhow!("no \"frontier\" object; pass another node's `weftlog status` output")
        })?;
    let mut out = Vec::new();
    for (name, entry) in f {
        let author: NodeId = name
            .parse()
            .map_err(|e| anyhow!("frontier entry {name:?}: not a node id ({e})"))?;
        let top = head_of(author, entry).with_context(|| format!("frontier entry {name}"))?;
        match entry.get("branches") {
            None => out.push(top),
            Some(b) => {
                let b = b.as_array().ok_or_else(|| {
                    anyhow!("frontier entry {name}: \"branches\" is not an array")
                })?;
                let mut found = false;
                for (i, branch) in b.iter().enumerate() {
                    let h = head_of(author, branch)
                        .with_context(|| format!("frontier entry {name}, branch {i}"))?;
                    found |= h == top;
                    out.push(h);
                    if out.len() > MAX_SINCE_HEADS {
                        break;
                    }
                }
                if !found {
                    bail!("frontier entry {name}: its \"head\" is not among its \"branches\"");
                }
            }
        }
        if out.len() > MAX_SINCE_HEADS {
            bail!("the frontier names more than {MAX_SINCE_HEADS} heads");
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// One `{"seq","head"}` object of a frontier entry.
fn head_of(author: NodeId, v: &Value) -> Result<Head> {
    let seq = v
        .get("seq")
        .and_then(Value::as_u64)
        .filter(|&s| s > 0)
        .ok_or_else(|| anyhow!("no positive integer \"seq\""))?;
    let id: EventId = v
        .get("head")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no \"head\" (the id of the event at that seq)"))?
        .parse()
        .map_err(|e| anyhow!("\"head\" is not an event id ({e})"))?;
    Ok(Head { author, seq, id })
}

/// The output of `status`, at this host's wall time ([`status_at`]).
pub fn status(node: &weftlog_proto::NodeId, state: &State) -> Value {
    status_at(node, state, crate::node::wall_ms())
}

/// The output of `status` at wall time `now_ms`: `node`, `events`,
/// `frontier`, `state_hash`, and `ahead`: the events beyond the clock's
/// horizon ([`State::ahead`]: stored, but not yet followed by this node's
/// clock), as `bound_ms` ([`MAX_CLOCK_AHEAD_MS`]), `events` (how many) and
/// `furthest` (`author`, `seq`, `id`, `hlc`, `ahead_ms`: how far its hlc is
/// ahead of `now_ms`; `null` when there is none).
pub fn status_at(node: &weftlog_proto::NodeId, state: &State, now_ms: u64) -> Value {
    let ahead = state.ahead(now_ms);
    let furthest = ahead.furthest.map_or(Value::Null, |f| {
        json!({
            "author": f.author.to_string(),
            "seq": f.seq,
            "id": f.id.to_string(),
            "hlc": f.hlc.0,
            "ahead_ms": f.ahead_ms,
        })
    });
    // Per author its highest head; an author that forked lists every
    // branch head too.
    let mut frontier: Map<String, Value> = Map::new();
    for (a, seq, head) in state.frontier() {
        let branch = json!({ "seq": seq, "head": head.to_string() });
        match frontier.get_mut(&a.to_string()) {
            None => {
                frontier.insert(a.to_string(), branch);
            }
            Some(v) => {
                let first = json!({ "seq": v["seq"], "head": v["head"] });
                let branches = v
                    .as_object_mut()
                    .and_then(|o| o.get_mut("branches"))
                    .and_then(Value::as_array_mut);
                match branches {
                    Some(b) => b.push(branch.clone()),
                    None => v["branches"] = json!([first, branch.clone()]),
                }
                // Ascending by (seq, id): the last is the highest.
                v["seq"] = branch["seq"].clone();
                v["head"] = branch["head"].clone();
            }
        }
    }
    let forks: Vec<Value> = state.forks().iter().map(fork).collect();
    let hash: String = state
        .state_hash()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    json!({
        "node": node.to_string(),
        "events": state.len(),
        "frontier": frontier,
        "forks": forks,
        "state_hash": hash,
        "ahead": {
            "bound_ms": MAX_CLOCK_AHEAD_MS,
            "events": ahead.events,
            "furthest": furthest,
        },
    })
}

/// Every oversold sale the state marks, in stream and counter order, then
/// canonical order, with its compensation (`null` while none stands), then
/// every void compensation (its sale no longer marked): what `weftlog
/// oversold` prints and `GET /v1/oversold` serves.
pub fn oversold_rows(state: &State) -> Vec<Value> {
    let mut rows: Vec<Value> = state
        .oversold()
        .into_iter()
        .map(|(stream, counter, sale, m)| {
            let mut v = oversold(&m);
            v["stream"] = json!(stream);
            v["counter"] = json!(counter);
            v["sale"] = json!(sale.to_string());
            v["state"] = json!(if m.compensation.is_some() {
                "compensated"
            } else {
                "pending"
            });
            // Staff may override an automatic compensation until then.
            let until = m.compensation.filter(|c| c.by == By::Auto).map(|c| {
                let policy = state.policy_of(&stream, &counter);
                weftlog_proto::admission::override_until(state, &policy, &c)
            });
            v["override_until_ms"] = json!(until);
            v
        })
        .collect();
    for (stream, s) in state.streams() {
        for (counter, e) in &s.escrow {
            for (sale, c) in &e.void {
                rows.push(json!({
                    "stream": stream,
                    "counter": counter,
                    "sale": sale.to_string(),
                    "compensation": compensated(c),
                    "state": "void",
                }));
            }
        }
    }
    rows
}
