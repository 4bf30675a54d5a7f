//! An event as `log` prints it, as one serde view: [`crate::json::event`]
//! turns it into a `Value`, and the streams that print many events
//! (`GET /v1/events`, `GET /v1/log?from=`, `log --from`) write it straight
//! to text with [`write_line`], without building a `Value` tree per event,
//! which cost more than the rest of the stream together. One shape, two
//! ways out: the two texts are equal (a test says so).
//!
//! Keys are in ascending order, as a `serde_json::Map` (a `BTreeMap`)
//! prints them, so the text is the same whichever way it was made.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;
use weftlog_proto::event::Policy;
use weftlog_proto::{Dot, Event, EventId, NodeId, Op};

/// Serializes with `Display` (ids: 64 lowercase hex).
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Bytes that are JSON text by convention: that JSON, or `{"hex": …}`
/// ([`crate::json::bytes_value`]).
struct JsonBytes<'a>(&'a [u8]);

impl Serialize for JsonBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::json::bytes_value(self.0).serialize(s)
    }
}

#[derive(Serialize)]
struct DotView {
    author: Shown<NodeId>,
    seq: u64,
}

fn dots(d: &[Dot]) -> Vec<DotView> {
    d.iter()
        .map(|d| DotView {
            author: Shown(d.author),
            seq: d.seq,
        })
        .collect()
}

#[derive(Serialize)]
struct PolicyView<'a> {
    max_overdraft: u64,
    min_remaining_pct: u8,
    mode: &'a str,
    on_oversell: &'a str,
    override_s: u32,
    window_s: u32,
}

impl<'a> PolicyView<'a> {
    fn of(p: &'a Policy) -> PolicyView<'a> {
        PolicyView {
            max_overdraft: p.max_overdraft,
            min_remaining_pct: p.min_remaining_pct,
            mode: p.mode.name(),
            on_oversell: p.on_oversell.name(),
            override_s: p.override_s,
            window_s: p.window_s,
        }
    }
}

/// The policy's JSON form ([`crate::json::policy`]).
pub fn policy_value(p: &Policy) -> Value {
    // Numbers and strings only: this cannot fail.
    serde_json::to_value(PolicyView::of(p)).expect("a policy is JSON")
}

/// One op, as `{"set": {...}}` and the like.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum OpView<'a> {
    Set {
        field: &'a str,
        supersedes: Vec<DotView>,
        value: JsonBytes<'a>,
    },
    Add {
        counter: &'a str,
        delta: i64,
    },
    EscrowInit {
        capacity: u64,
        counter: &'a str,
    },
    EscrowTransfer {
        amount: u64,
        counter: &'a str,
        to: Shown<NodeId>,
    },
    EscrowConsume {
        amount: u64,
        counter: &'a str,
    },
    EscrowPolicy {
        counter: &'a str,
        policy: PolicyView<'a>,
        supersedes: Vec<DotView>,
    },
    EscrowOverdraw {
        amount: u64,
        counter: &'a str,
        remaining_at_sync: u64,
        synced_ms_ago: u64,
    },
    Text {
        change: String,
        field: &'a str,
    },
}

impl<'a> OpView<'a> {
    fn of(o: &'a Op) -> OpView<'a> {
        match o {
            Op::Set {
                field,
                value,
                supersedes,
            } => OpView::Set {
                field,
                supersedes: dots(supersedes),
                value: JsonBytes(value),
            },
            Op::Add { counter, delta } => OpView::Add {
                counter,
                delta: *delta,
            },
            Op::EscrowInit { counter, capacity } => OpView::EscrowInit {
                capacity: *capacity,
                counter,
            },
            Op::EscrowTransfer {
                counter,
                to,
                amount,
            } => OpView::EscrowTransfer {
                amount: *amount,
                counter,
                to: Shown(*to),
            },
            Op::EscrowConsume { counter, amount } => OpView::EscrowConsume {
                amount: *amount,
                counter,
            },
            Op::EscrowPolicy {
                counter,
                policy,
                supersedes,
            } => OpView::EscrowPolicy {
                counter,
                policy: PolicyView::of(policy),
                supersedes: dots(supersedes),
            },
            Op::EscrowOverdraw {
                counter,
                amount,
                synced_ms_ago,
                remaining_at_sync,
            } => OpView::EscrowOverdraw {
                amount: *amount,
                counter,
                remaining_at_sync: *remaining_at_sync,
                synced_ms_ago: *synced_ms_ago,
            },
            Op::Text { field, change } => OpView::Text {
                change: crate::json::hex(change),
                field,
            },
        }
    }
}

/// `meta`: only the keys that are set.
struct MetaView<'a>(&'a weftlog_proto::Meta);

impl Serialize for MetaView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let len = usize::from(m.command_id.is_some()) + usize::from(m.user.is_some());
        let mut map = s.serialize_map(Some(len))?;
        if let Some(c) = &m.command_id {
            map.serialize_entry("command_id", c)?;
        }
        if let Some(u) = &m.user {
            map.serialize_entry("user", u)?;
        }
        map.end()
    }
}

/// An event as `log` prints it, with the marks a listing adds.
#[derive(Serialize)]
pub struct EventView<'a> {
    author: Shown<NodeId>,
    deps: Vec<Shown<EventId>>,
    hlc: u64,
    id: Shown<EventId>,
    kind: &'a str,
    meta: MetaView<'a>,
    /// `true` when the node's member list does not name the author.
    #[serde(skip_serializing_if = "Option::is_none")]
    non_member: Option<bool>,
    ops: Vec<OpView<'a>>,
    payload: Option<JsonBytes<'a>>,
    /// Its position in this node's log, in positioned listings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pos: Option<u64>,
    prev: Option<Shown<EventId>>,
    seq: u64,
    stream: &'a str,
    /// Its resume token, in `log --from` lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl<'a> EventView<'a> {
    /// `e`, whose id is `id`.
    pub fn new(e: &'a Event, id: &EventId) -> EventView<'a> {
        EventView {
            author: Shown(e.author),
            deps: e.deps.iter().copied().map(Shown).collect(),
            hlc: e.hlc.0,
            id: Shown(*id),
            kind: &e.kind,
            meta: MetaView(&e.meta),
            non_member: None,
            ops: e.ops.iter().map(OpView::of).collect(),
            payload: (!e.payload.is_empty()).then(|| JsonBytes(&e.payload)),
            pos: None,
            prev: e.prev.map(Shown),
            seq: e.seq,
            stream: &e.stream,
            token: None,
        }
    }

    /// Marks the author as not on the member list.
    pub fn non_member(mut self, yes: bool) -> Self {
        self.non_member = yes.then_some(true);
        self
    }

    /// Adds the event's position.
    pub fn pos(mut self, pos: u64) -> Self {
        self.pos = Some(pos);
        self
    }

    /// Adds the event's resume token.
    pub fn token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }

    /// As a `Value`.
    pub fn value(&self) -> Value {
        // Strings, numbers and JSON values only: this cannot fail.
        serde_json::to_value(self).expect("an event view is JSON")
    }
}

/// Appends `view` to `out` as one line of compact JSON (no newline in it:
/// a server-sent event's `data:` line stays one line).
pub fn write_line(out: &mut Vec<u8>, view: &EventView) {
    // Writing to a Vec cannot fail, and every part is JSON.
    serde_json::to_writer(&mut *out, view).expect("an event view is JSON");
}

#[cfg(test)]
mod tests {
    use super::*;
    use weftlog_proto::event::{Compensation, PolicyMode};
    use weftlog_proto::{Hlc, Meta};

    fn event(ops: Vec<Op>, payload: &[u8]) -> Event {
        let author: NodeId = "5".repeat(64).parse().unwrap();
        Event {
            version: 2,
            author,
            seq: 3,
            prev: Some(EventId([1; 32])),
            deps: vec![EventId([2; 32]), EventId([3; 32])],
            hlc: Hlc(77 << 16),
            stream: "attendee/7".into(),
            kind: "EmailChanged".into(),
            ops,
            payload: payload.to_vec(),
            meta: Meta {
                command_id: Some("c-1".into()),
                user: Some("ana".into()),
            },
        }
    }

    fn every_op() -> Vec<Op> {
        let to: NodeId = "6".repeat(64).parse().unwrap();
        let dot = Dot { author: to, seq: 9 };
        let mut policy = Policy::new(PolicyMode::RiskWindow);
        policy.on_oversell = Compensation::Honour;
        vec![
            Op::Set {
                field: "email".into(),
                value: br#"{"a": [1, 2.5, "x\ny"]}"#.to_vec(),
                supersedes: vec![dot],
            },
            Op::Set {
                field: "blob".into(),
                value: vec![0xff, 0, 1],
                supersedes: vec![],
            },
            Op::Add {
                counter: "n".into(),
                delta: -4,
            },
            Op::EscrowInit {
                counter: "seats".into(),
                capacity: 10,
            },
            Op::EscrowTransfer {
                counter: "seats".into(),
                to,
                amount: 2,
            },
            Op::EscrowConsume {
                counter: "seats".into(),
                amount: 1,
            },
            Op::EscrowPolicy {
                counter: "seats".into(),
                policy,
                supersedes: vec![dot],
            },
            Op::EscrowOverdraw {
                counter: "seats".into(),
                amount: 3,
                synced_ms_ago: 1200,
                remaining_at_sync: 8,
            },
            Op::Text {
                field: "notes".into(),
                change: vec![0xab, 0xcd],
            },
        ]
    }

    #[test]
    fn the_streamed_text_is_the_value_s_text() {
        let id = EventId([9; 32]);
        for payload in [&b""[..], br#"{"k": true}"#, &[0xfe, 0x01]] {
            let e = event(every_op(), payload);
            let view = EventView::new(&e, &id)
                .non_member(true)
                .pos(42)
                .token("t".into());
            let mut out = Vec::new();
            write_line(&mut out, &view);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text, view.value().to_string());
            assert!(!text.contains('\n'), "one line: {text}");
        }
    }

    #[test]
    fn the_view_has_the_shape_log_prints() {
        let id = EventId([9; 32]);
        let e = event(every_op(), b"");
        let v = EventView::new(&e, &id).value();
        assert_eq!(v["id"], "09".repeat(32));
        assert_eq!(v["author"], "5".repeat(64));
        assert_eq!(v["prev"], "01".repeat(32));
        assert_eq!(v["deps"][1], "03".repeat(32));
        assert_eq!(v["hlc"], 77 << 16);
        assert_eq!(v["payload"], Value::Null);
        assert_eq!(
            v["meta"],
            serde_json::json!({"command_id": "c-1", "user": "ana"})
        );
        assert!(v.get("non_member").is_none() && v.get("pos").is_none());
        let ops = &v["ops"];
        assert_eq!(ops[0]["set"]["value"]["a"][2], "x\ny");
        assert_eq!(ops[0]["set"]["supersedes"][0]["seq"], 9);
        assert_eq!(ops[1]["set"]["value"], serde_json::json!({"hex": "ff0001"}));
        assert_eq!(ops[2]["add"]["delta"], -4);
        assert_eq!(ops[4]["escrow_transfer"]["to"], "6".repeat(64));
        assert_eq!(ops[6]["escrow_policy"]["policy"]["mode"], "risk-window");
        assert_eq!(ops[6]["escrow_policy"]["policy"]["on_oversell"], "honour");
        assert_eq!(ops[7]["escrow_overdraw"]["remaining_at_sync"], 8);
        assert_eq!(ops[8]["text"]["change"], "abcd");
    }
}
