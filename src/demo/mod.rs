//! `weftlog demo`: three registration desks run real nodes (keys, logs,
//! fsync, QUIC with mutual TLS on loopback) in a temporary directory. The
//! network between them is cut, both sides edit one customer and sell seats,
//! the network heals, and every desk converges. Then a workshop sells its
//! seats under the risk-window policy: cut off again, both sides sell on
//! credit past their rights; after the heal every desk marks the same sales
//! oversold and compensates each once (the node's own rules, the demo only
//! sells and reads), and a staff decision on one desk shows on the others.
//! At the end, desk A's read model is mirrored into SQLite and queried.
//! The demo fails if the desks disagree.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use weftlog_proto::admission::RuleNow;
use weftlog_proto::event::{Compensation, Policy};
use weftlog_proto::seats::COMPENSATION_PREFIX;
use weftlog_proto::state::Draft;
use weftlog_proto::{EventId, Meta, NodeId, Op};

use crate::daemon::{cluster_id, Config, Daemon};
use crate::json;
use crate::node::{self, Node};
use crate::tls::Members;

pub mod serve;

const CUSTOMER: &str = "customer/20";
const SEATS: &str = "event/keynote";
/// The risk-window story (steps 6 to 9): a workshop whose seats may be
/// sold on credit while a desk is cut off.
const WORKSHOP: &str = "session/workshop";
const COUNTER: &str = "seats";
const WORKSHOP_SEATS: u64 = 10;
const WORKSHOP_POLICY: &str = "risk-window,max_overdraft=3";
/// Desk B's rights; desk A keeps the rest.
const B_RIGHTS: u64 = 5;
const A_RIGHTS: u64 = WORKSHOP_SEATS - B_RIGHTS;
/// Seats each side sells beyond its rights while cut off (within the
/// policy's `max_overdraft`).
const A_CREDIT: u64 = 2;
const B_CREDIT: u64 = 3;

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
    let (desks, ids) = start_desks(tmp.path()).await?;
    let r = story(out, &desks, &ids).await;
    for d in &desks {
        d.shutdown().await;
    }
    r
}

/// The demo's three desks: nodes made in `dir` (`desk-a`, `desk-b`,
/// `desk-c`), each on the member list of all, syncing over QUIC on
/// loopback, each dialling the ones started before it.
async fn start_desks(dir: &std::path::Path) -> Result<(Vec<Daemon>, Vec<NodeId>)> {
    let names = ["desk-a", "desk-b", "desk-c"];
    let mut ids = Vec::new();
    for n in names {
        ids.push(node::init(&dir.join(n))?);
    }
    let members = Members::Only(Arc::new(ids.iter().copied().collect()));
    let mut desks: Vec<Daemon> = Vec::new();
    for n in names {
        let (node, _) = Node::open(&dir.join(n))?;
        let mut config = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.members = members.clone();
        config.cluster = cluster_id("weftlog-demo");
        config.peers = desks.iter().map(|d| d.local_addr().to_string()).collect();
        desks.push(Daemon::start(Arc::new(node), config).await?);
    }
    Ok((desks, ids))
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
    let seats = &seats["escrow"]["seats"];
    let rights: Vec<String> = seats["rights"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, n)| format!("desk {} {n}", desk_of(desks, id)))
        .collect();
    writeln!(
        out,
        "   seats: capacity {}, sold {}, rights left: {}",
        seats["capacity"],
        seats["consumed"],
        rights.join(", ")
    )?;
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

    oversell(out, desks).await?;

    writeln!(out, "10. State hashes:")?;
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
    sql_mirror(out, a)?;
    Ok(())
}

/// Step 11: desk A's read model mirrored into SQLite (`weftlog sql`), and
/// two queries a back office would run on it.
fn sql_mirror(out: &mut impl Write, a: &Node) -> Result<()> {
    let db = a.dir().join(crate::sql::DEFAULT_DB);
    let url = crate::sql::Url::Sqlite(db.clone());
    let (checkpoint, _) = crate::sql::mirror_once(a, &url, false)?;
    writeln!(
        out,
        "\n11. Desk A's read model in SQL (`weftlog sql --url sqlite:read.db`): its log \
         mirrored up to position {}.",
        checkpoint.position
    )?;
    let conn = rusqlite::Connection::open(&db)?;
    writeln!(
        out,
        "   sqlite> SELECT field, value, conflict FROM fields WHERE stream = '{CUSTOMER}';"
    )?;
    let mut q =
        conn.prepare("SELECT field, value, conflict FROM fields WHERE stream = ?1 ORDER BY field")?;
    let rows = q.query_map([CUSTOMER], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (field, value, conflict) = row?;
        writeln!(out, "   {field:<6} | {value:<28} | {conflict}")?;
    }
    writeln!(
        out,
        "   sqlite> SELECT capacity, consumed FROM escrow WHERE stream = '{WORKSHOP}';"
    )?;
    let (capacity, consumed): (i64, i64) = conn.query_row(
        "SELECT capacity, consumed FROM escrow WHERE stream = ?1 AND counter = ?2",
        [WORKSHOP, COUNTER],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    writeln!(out, "   {capacity} | {consumed}")?;
    Ok(())
}

/// The seat rule that applies now on `node` to the workshop's counter.
fn rule(node: &Node) -> Option<RuleNow> {
    node.seat_rules()
        .into_iter()
        .find(|(s, c, _)| s == WORKSHOP && c == COUNTER)
        .map(|(_, _, r)| r)
}

/// The workshop's counter as `node` shows it.
fn workshop(node: &Node) -> Value {
    node.with_state(|s| json::stream(WORKSHOP, s.stream(WORKSHOP)))["escrow"][COUNTER].clone()
}

/// The oversold sales `node` lists (`weftlog oversold`), when there are
/// `n` and every one is compensated.
fn compensated(node: &Node, n: usize) -> Option<Vec<Value>> {
    let rows = node.with_state(json::oversold_rows);
    (rows.len() == n && rows.iter().all(|r| r["state"] == "compensated")).then_some(rows)
}

/// How many events wrote the compensation of `sale` (its command id,
/// `oversold/<sale>`, takes effect once however many desks wrote it).
fn compensation_writes(node: &Node, sale: &str) -> usize {
    let command = format!("{COMPENSATION_PREFIX}{sale}");
    node.with_state(|s| {
        s.stream(WORKSHOP)
            .and_then(|st| st.duplicates.get(&command))
            .map_or(1, |d| 1 + d.ignored.len())
    })
}

/// The name of the desk whose node id is `id` (hex).
fn desk_of(desks: &[Daemon], id: &str) -> &'static str {
    desks
        .iter()
        .zip(["A", "B", "C"])
        .find(|(d, _)| d.node().id().to_string() == id)
        .map_or("?", |(_, n)| n)
}

fn short(id: &str) -> String {
    format!("{}…", id.get(..8).unwrap_or(id))
}

fn sell_workshop(n: u64) -> Draft {
    ops(
        WORKSHOP,
        "SeatsSold",
        vec![Op::EscrowConsume {
            counter: COUNTER.into(),
            amount: n,
        }],
    )
}

/// Steps 6 to 9: the risk-window policy sells past the rights on both
/// sides of a partition; after the heal every desk marks the same sales
/// oversold and compensates each once; a staff decision on one desk shows
/// on the others. Every rule applied is the node's own (admission, marks,
/// automatic compensation): the demo only sells, waits and reads.
async fn oversell(out: &mut impl Write, desks: &[Daemon]) -> Result<()> {
    let da = &desks[0];
    let (a, b, c) = (&**desks[0].node(), &**desks[1].node(), &**desks[2].node());
    let policy = Policy::parse_spec(WORKSHOP_POLICY)
        .map_err(|e| anyhow!("the demo's policy {WORKSHOP_POLICY:?}: {e}"))?;
    writeln!(
        out,
        "6. Desk A opens a workshop of {WORKSHOP_SEATS} seats under the risk-window policy\n   \
         ({WORKSHOP_POLICY}) and gives desk B rights to {B_RIGHTS}."
    )?;
    a.append_async(ops(
        WORKSHOP,
        "SessionOpened",
        vec![
            Op::EscrowInit {
                counter: COUNTER.into(),
                capacity: WORKSHOP_SEATS,
            },
            Op::EscrowPolicy {
                counter: COUNTER.into(),
                policy,
                supersedes: vec![],
            },
            Op::EscrowTransfer {
                counter: COUNTER.into(),
                to: b.id(),
                amount: B_RIGHTS,
            },
        ],
    ))
    .await?;
    // A sync round after the opening: the seats unsold then admit credit.
    let credit = policy.max_overdraft;
    let may_sell =
        |n: &Node, rights: u64| rule(n).is_some_and(|r| r.may_sell == u128::from(rights + credit));
    until("a sync round after the workshop opened", || {
        same(&[a, b, c]) && may_sell(a, A_RIGHTS) && may_sell(b, B_RIGHTS)
    })
    .await?;
    for (name, rights) in [("A", A_RIGHTS), ("B", B_RIGHTS)] {
        writeln!(
            out,
            "   desk {name} holds {rights} and may sell {}: its own and {credit} on credit",
            rights + credit
        )?;
    }
    writeln!(
        out,
        "   (the node's rule: synced within {} s, with at least {} % of the seats unsold then)\n",
        policy.window_s, policy.min_remaining_pct
    )?;

    writeln!(
        out,
        "7. The Wi-Fi splits again: desk A alone, desks B and C. Both sides keep selling."
    )?;
    da.set_blocked([b.id(), c.id()].into_iter().collect());
    until("the second partition taking effect", || {
        !desks[1].is_connected(&a.id()) && !desks[2].is_connected(&a.id())
    })
    .await?;
    for (name, n, rights, more) in [("A", a, A_RIGHTS, A_CREDIT), ("B", b, B_RIGHTS, B_CREDIT)] {
        n.append_async(sell_workshop(rights)).await?;
        n.append_async(sell_workshop(more)).await?;
        let held = rule(n).map_or(0, |r| r.held);
        if held != -i128::from(more) {
            bail!("desk {name} holds {held} rights after selling on credit, not -{more}");
        }
        writeln!(
            out,
            "   desk {name} sells {rights} (its rights), then {more} more: accepted on credit, \
             it owes {}",
            -held
        )?;
    }
    match b.append_async(sell_workshop(1)).await {
        Err(e) => writeln!(out, "   desk B tries 1 more: refused ({e})")?,
        Ok(_) => bail!("desk B sold beyond the policy's max_overdraft"),
    }
    until("desk C seeing desk B's sales", || same(&[b, c])).await?;
    let sold = |n: &Node| workshop(n)["consumed"].as_u64().unwrap_or_default();
    writeln!(
        out,
        "   alone, neither side sees an oversell: desk A counts {} of {WORKSHOP_SEATS} sold, \
         desks B and C {} of {WORKSHOP_SEATS}\n",
        sold(a),
        sold(c)
    )?;
    for (name, n) in [("A", a), ("B", b), ("C", c)] {
        if !n.with_state(json::oversold_rows).is_empty() {
            bail!("desk {name} marks an oversell before the heal");
        }
    }

    writeln!(out, "8. The Wi-Fi comes back.")?;
    da.set_blocked(Default::default());
    let oversold = usize::from(A_CREDIT > 0) + usize::from(B_CREDIT > 0);
    let t = until("every desk compensating the oversold sales", || {
        same(&[a, b, c]) && [a, b, c].iter().all(|n| compensated(n, oversold).is_some())
    })
    .await?;
    let Some(rows) = compensated(c, oversold) else {
        bail!("desk C no longer lists {oversold} compensated sales");
    };
    for (name, n) in [("A", a), ("B", b)] {
        if compensated(n, oversold).as_ref() != Some(&rows) {
            bail!("desk {name} lists other oversold sales than desk C");
        }
    }
    let seats = workshop(c);
    let consumed = seats["consumed"].as_u64().unwrap_or_default();
    let units: u64 = rows.iter().filter_map(|r| r["units"].as_u64()).sum();
    writeln!(
        out,
        "   converged in {}: {consumed} sold for {WORKSHOP_SEATS} seats, {units} oversold; \
         every desk lists the same {} sales:",
        ms(t),
        rows.len()
    )?;
    for r in &rows {
        let sale = r["sale"].as_str().unwrap_or_default();
        let writes = compensation_writes(c, sale);
        writeln!(
            out,
            "   sale {} by desk {}: {} seats oversold -> {} ({}; written by {writes} desk{}, \
             in effect once)",
            short(sale),
            desk_of(desks, r["author"].as_str().unwrap_or_default()),
            r["units"],
            r["compensation"]["action"].as_str().unwrap_or_default(),
            r["compensation"]["by"].as_str().unwrap_or_default(),
            if writes == 1 { "" } else { "s" },
        )?;
    }
    writeln!(
        out,
        "   released {} seats; {} sales on the waitlist\n",
        seats["released"],
        seats["waitlist"].as_array().map_or(0, Vec::len)
    )?;

    writeln!(
        out,
        "9. Desk C's staff honour desk B's oversold sale instead (the tickets stand)."
    )?;
    let of_b = rows
        .iter()
        .find(|r| r["author"] == b.id().to_string().as_str())
        .ok_or_else(|| anyhow!("desk B's sale is not marked oversold"))?;
    let decided = of_b["sale"].as_str().unwrap_or_default().to_string();
    let sale: EventId = decided
        .parse()
        .map_err(|e| anyhow!("oversold sale {decided:?}: {e}"))?;
    let node = desks[2].node().clone();
    tokio::task::spawn_blocking(move || {
        node.decide(&sale, Compensation::Honour, Some("front-desk".into()))
    })
    .await??;
    let honoured = |n: &Node| {
        n.with_state(json::oversold_rows).iter().any(|r| {
            r["sale"] == decided.as_str()
                && r["compensation"]["by"] == "staff"
                && r["compensation"]["action"] == "honour"
        })
    };
    let t = until("the staff decision reaching every desk", || {
        same(&[a, b, c]) && [a, b].iter().all(|n| honoured(n))
    })
    .await?;
    let seats = workshop(a);
    writeln!(
        out,
        "   desks A and B show it {} later: honoured {} (capacity {WORKSHOP_SEATS} + {}), \
         released {}, {} sale on the waitlist\n",
        ms(t),
        seats["honoured"],
        seats["honoured"],
        seats["released"],
        seats["waitlist"].as_array().map_or(0, Vec::len)
    )?;
    Ok(())
}
