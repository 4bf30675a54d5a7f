//! `weftlog demo`: two registration desks work on one customer while the
//! venue Wi-Fi is down, then meet again through export files. Everything
//! runs on real nodes (keys, logs, fsync) in a temporary directory.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use serde_json::Value;
use weftlog_proto::state::Draft;
use weftlog_proto::{Meta, NodeId, Op};

use crate::json;
use crate::node::{self, Node};

const CUSTOMER: &str = "customer/20";
const SEATS: &str = "event/keynote";

fn set(stream: &str, kind: &str, fields: &[(&str, Value)]) -> Draft {
    Draft {
        stream: stream.into(),
        kind: kind.into(),
        ops: fields
            .iter()
            .map(|(f, v)| Op::Set {
                field: (*f).into(),
                value: serde_json::to_vec(v).expect("JSON value encodes"),
                supersedes: vec![],
            })
            .collect(),
        payload: Vec::new(),
        meta: Meta {
            command_id: None,
            user: Some("demo".into()),
        },
        expected_version: None,
    }
}

fn ops(stream: &str, kind: &str, ops: Vec<Op>) -> Draft {
    Draft {
        stream: stream.into(),
        kind: kind.into(),
        ops,
        ..Draft::default()
    }
}

/// Sends `from`'s events that `to` lacks, as an export file would.
fn exchange(from: &Node, to: &Node) -> Result<(usize, u64)> {
    let since: BTreeMap<NodeId, u64> = to.with_state(|s| {
        s.frontier()
            .into_iter()
            .map(|(a, (seq, _))| (a, seq))
            .collect()
    });
    let (file, n) = from.export(&since)?;
    let r = to.import(&file)?;
    Ok((n, r.imported))
}

fn hash(node: &Node) -> String {
    node.with_state(|s| json::status(&node.id(), s))["state_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Runs the demo, writing a narrative to `out`.
pub fn run(out: &mut impl Write) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (da, db) = (tmp.path().join("desk-a"), tmp.path().join("desk-b"));
    node::init(&da)?;
    node::init(&db)?;
    let (a, _) = Node::open(&da)?;
    let (b, _) = Node::open(&db)?;
    writeln!(
        out,
        "weftlog demo: two registration desks, one customer, no network\n"
    )?;
    writeln!(out, "desk A is node {}", a.id())?;
    writeln!(out, "desk B is node {}\n", b.id())?;

    writeln!(
        out,
        "1. Desk A registers customer 20 and opens 10 keynote seats; desk B syncs."
    )?;
    a.append(set(
        CUSTOMER,
        "CustomerRegistered",
        &[
            ("name", "Ada Lovelace".into()),
            ("email", "ada@example.org".into()),
            ("phone", "+44 20 0000".into()),
        ],
    ))?;
    a.append(ops(
        SEATS,
        "SeatsOpened",
        vec![Op::EscrowInit {
            counter: "seats".into(),
            capacity: 10,
        }],
    ))?;
    a.append(ops(
        SEATS,
        "SeatRightsMoved",
        vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to: b.id(),
            amount: 4,
        }],
    ))?;
    let (n, _) = exchange(&a, &b)?;
    writeln!(
        out,
        "   exported {n} events from A, imported on B; desk B may sell 4 seats, desk A 6\n"
    )?;

    writeln!(out, "2. The Wi-Fi drops. Both desks keep working:")?;
    a.append(set(
        CUSTOMER,
        "EmailChanged",
        &[("email", "ada@analytical.engine".into())],
    ))?;
    writeln!(out, "   desk A changes the email")?;
    b.append(set(
        CUSTOMER,
        "PhoneChanged",
        &[("phone", "+44 20 7946 0018".into())],
    ))?;
    writeln!(out, "   desk B changes the phone")?;
    a.append(set(
        CUSTOMER,
        "NameCorrected",
        &[("name", "Augusta Ada Lovelace".into())],
    ))?;
    b.append(set(
        CUSTOMER,
        "NameCorrected",
        &[("name", "Ada King".into())],
    ))?;
    writeln!(out, "   both desks change the name, differently")?;
    a.append(ops(
        SEATS,
        "SeatsSold",
        vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: 5,
        }],
    ))?;
    b.append(ops(
        SEATS,
        "SeatsSold",
        vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: 3,
        }],
    ))?;
    writeln!(out, "   desk A sells 5 seats, desk B sells 3")?;
    match b.append(ops(
        SEATS,
        "SeatsSold",
        vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: 2,
        }],
    )) {
        Err(e) => writeln!(
            out,
            "   desk B tries to sell 2 more: refused offline ({e})\n"
        )?,
        Ok(_) => anyhow::bail!("desk B oversold its escrow rights"),
    }

    writeln!(
        out,
        "3. The desks meet again and exchange exports both ways."
    )?;
    let (ab, _) = exchange(&a, &b)?;
    let (ba, _) = exchange(&b, &a)?;
    writeln!(out, "   A -> B: {ab} events, B -> A: {ba} events\n")?;

    writeln!(out, "4. Customer 20 on desk A (desk B shows the same):")?;
    let view = a.with_state(|s| json::stream(CUSTOMER, s.stream(CUSTOMER)));
    writeln!(out, "{}", serde_json::to_string_pretty(&view["fields"])?)?;
    writeln!(
        out,
        "   email and phone merged; the name is a conflict with both values kept\n   (shown: the later write, until someone resolves it)\n"
    )?;
    writeln!(out, "   conflicts on desk B:")?;
    for c in b.with_state(json::conflicts) {
        writeln!(out, "   {c}")?;
    }
    let seats = a.with_state(|s| json::stream(SEATS, s.stream(SEATS)));
    writeln!(out, "\n   seats: {}", seats["escrow"]["seats"])?;
    writeln!(out)?;

    writeln!(
        out,
        "5. Desk B resolves the name; the resolution supersedes both values."
    )?;
    b.append(set(
        CUSTOMER,
        "NameResolved",
        &[("name", "Augusta Ada King".into())],
    ))?;
    exchange(&b, &a)?;
    let view = a.with_state(|s| json::stream(CUSTOMER, s.stream(CUSTOMER)));
    writeln!(out, "   name on desk A: {}", view["fields"]["name"])?;
    writeln!(
        out,
        "   conflicts left: {}\n",
        a.with_state(json::conflicts).len()
    )?;

    let (ha, hb) = (hash(&a), hash(&b));
    writeln!(out, "6. State hashes:")?;
    writeln!(out, "   desk A {ha}")?;
    writeln!(out, "   desk B {hb}")?;
    if ha != hb {
        anyhow::bail!("the desks did not converge");
    }
    writeln!(
        out,
        "   equal: both desks hold the same events and show the same state"
    )?;
    Ok(())
}
