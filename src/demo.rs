//! `weftlog demo`: three registration desks run real nodes (keys, logs,
//! fsync, QUIC with mutual TLS on loopback) in a temporary directory. The
//! network between them is cut, both sides edit one customer and sell seats,
//! the network heals, and every desk converges.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;
use weftlog_proto::state::Draft;
use weftlog_proto::{Meta, NodeId, Op};

use crate::daemon::{cluster_id, Config, Daemon};
use crate::json;
use crate::node::{self, Node};
use crate::tls::Members;

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
        texts: Vec::new(),
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

fn hash(node: &Node) -> String {
    node.with_state(|s| json::status(&node.id(), s))["state_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until `done` holds (checked every 5 ms), for at most 20 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("gave up waiting: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(start.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn same(nodes: &[&Node]) -> bool {
    let h = hash(nodes[0]);
    nodes.iter().all(|n| hash(n) == h)
}

fn sell(n: u64) -> Draft {
    ops(
        SEATS,
        "SeatsSold",
        vec![Op::EscrowConsume {
            counter: "seats".into(),
            amount: n,
        }],
    )
}

/// Runs the demo, writing a narrative to `out`.
pub fn run(out: &mut impl Write) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(out))
}

async fn run_async(out: &mut impl Write) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let names = ["desk-a", "desk-b", "desk-c"];
    let mut ids = Vec::new();
    for n in names {
        ids.push(node::init(&tmp.path().join(n))?);
    }
    let members = Members::Only(Arc::new(ids.iter().copied().collect()));
    let mut desks: Vec<Daemon> = Vec::new();
    for n in names {
        let (node, _) = Node::open(&tmp.path().join(n))?;
        let mut config = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.members = members.clone();
        config.cluster = cluster_id("weftlog-demo");
        config.peers = desks.iter().map(|d| d.local_addr().to_string()).collect();
        desks.push(Daemon::start(Arc::new(node), config).await?);
    }
    let r = story(out, &desks, &ids).await;
    for d in &desks {
        d.shutdown().await;
    }
    r
}

async fn story(out: &mut impl Write, desks: &[Daemon], ids: &[NodeId]) -> Result<()> {
    let (da, db, dc) = (&desks[0], &desks[1], &desks[2]);
    let (a, b, c) = (&**da.node(), &**db.node(), &**dc.node());
    writeln!(
        out,
        "weftlog demo: three registration desks, real nodes syncing over QUIC on loopback\n"
    )?;
    for (name, d) in ["A", "B", "C"].iter().zip(desks) {
        writeln!(
            out,
            "desk {name}: node {} at {}",
            d.node().id(),
            d.local_addr()
        )?;
    }
    let connected = || {
        desks.iter().enumerate().all(|(i, d)| {
            ids.iter()
                .enumerate()
                .all(|(j, id)| i == j || d.is_connected(id))
        })
    };
    let t = until("the desks connecting", connected).await?;
    writeln!(
        out,
        "all three connected (mutual TLS, members only) in {}\n",
        ms(t)
    )?;

    writeln!(
        out,
        "1. Desk A registers customer 20, opens 10 keynote seats and gives desk B rights to 4."
    )?;
    a.append_async(set(
        CUSTOMER,
        "CustomerRegistered",
        &[
            ("name", "Ada Lovelace".into()),
            ("email", "ada@example.org".into()),
            ("phone", "+44 20 0000".into()),
        ],
    ))
    .await?;
    a.append_async(ops(
        SEATS,
        "SeatsOpened",
        vec![Op::EscrowInit {
            counter: "seats".into(),
            capacity: 10,
        }],
    ))
    .await?;
    a.append_async(ops(
        SEATS,
        "SeatRightsMoved",
        vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to: b.id(),
            amount: 4,
        }],
    ))
    .await?;
    let t = until("the first events reaching every desk", || same(&[a, b, c])).await?;
    writeln!(
        out,
        "   pushed live: every desk holds the 3 events {} after the last append\n",
        ms(t)
    )?;

    writeln!(
        out,
        "2. The Wi-Fi splits the venue: desk A on one side, desks B and C on the other."
    )?;
    da.set_blocked([b.id(), c.id()].into_iter().collect());
    until("the partition taking effect", || {
        !db.is_connected(&a.id()) && !dc.is_connected(&a.id())
    })
    .await?;
    writeln!(
        out,
        "   (desk A blocks B and C, as POST /v1/admin/partition does: both directions are cut)"
    )?;
    a.append_async(set(
        CUSTOMER,
        "EmailChanged",
        &[("email", "ada@analytical.engine".into())],
    ))
    .await?;
    writeln!(out, "   desk A changes the email")?;
    b.append_async(set(
        CUSTOMER,
        "PhoneChanged",
        &[("phone", "+44 20 7946 0018".into())],
    ))
    .await?;
    writeln!(out, "   desk B changes the phone")?;
    a.append_async(set(
        CUSTOMER,
        "NameCorrected",
        &[("name", "Augusta Ada Lovelace".into())],
    ))
    .await?;
    b.append_async(set(
        CUSTOMER,
        "NameCorrected",
        &[("name", "Ada King".into())],
    ))
    .await?;
    writeln!(out, "   both change the name, differently")?;
    a.append_async(sell(5)).await?;
    b.append_async(sell(3)).await?;
    writeln!(out, "   desk A sells 5 seats, desk B sells 3")?;
    match b.append_async(sell(2)).await {
        Err(e) => writeln!(out, "   desk B tries to sell 2 more: refused ({e})")?,
        Ok(_) => bail!("desk B oversold its escrow rights"),
    }
    until("desk C seeing desk B's edits", || same(&[b, c])).await?;
    writeln!(
        out,
        "   desk C, on B's side, sees B's edits at once; desk A sees none of them\n"
    )?;
    if same(&[a, c]) {
        bail!("the partition leaked");
    }

    writeln!(out, "3. The Wi-Fi comes back (desk A unblocks its peers).")?;
    da.set_blocked(Default::default());
    let t = until("the desks converging after the heal", || same(&[a, b, c])).await?;
    writeln!(
        out,
        "   reconnected and converged in {}: the sync exchanged only what each side lacked\n",
        ms(t)
    )?;

    writeln!(out, "4. Customer 20 on desk C (every desk shows the same):")?;
    let view = c.with_state(|s| json::stream(CUSTOMER, s.stream(CUSTOMER)));
    writeln!(out, "{}", serde_json::to_string_pretty(&view["fields"])?)?;
    writeln!(
        out,
        "   email and phone merged; the name is a conflict with both values kept\n   (shown: the later write, until someone resolves it)"
    )?;
    for d in desks {
        let n = d.node().with_state(json::conflicts).len();
        if n != 1 {
            bail!("desk {} shows {n} conflicts, not 1", d.node().id());
        }
    }
    let seats = c.with_state(|s| json::stream(SEATS, s.stream(SEATS)));
    writeln!(out, "   seats: {}", seats["escrow"]["seats"])?;
    writeln!(
        out,
        "   8 of 10 sold across the partition; no oversell possible\n"
    )?;

    writeln!(
        out,
        "5. Desk C resolves the name; the resolution supersedes both values."
    )?;
    c.append_async(set(
        CUSTOMER,
        "NameResolved",
        &[("name", "Augusta Ada King".into())],
    ))
    .await?;
    let t = until("the resolution reaching every desk", || same(&[a, b, c])).await?;
    let view = a.with_state(|s| json::stream(CUSTOMER, s.stream(CUSTOMER)));
    writeln!(
        out,
        "   name on desk A {} later: {}; conflicts left: {}\n",
        ms(t),
        view["fields"]["name"],
        a.with_state(json::conflicts).len()
    )?;

    writeln!(out, "6. State hashes:")?;
    for (name, d) in ["A", "B", "C"].iter().zip(desks) {
        writeln!(out, "   desk {name} {}", hash(d.node()))?;
    }
    if !same(&[a, b, c]) {
        bail!("the desks did not converge");
    }
    writeln!(
        out,
        "   equal: every desk holds the same events and shows the same state"
    )?;
    Ok(())
}
