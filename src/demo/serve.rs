//! `weftlog demo --serve`: the three demo desks with their pages, for a
//! person to try. Each desk is a real node (keys, log, fsync, QUIC with
//! mutual TLS on loopback) with its HTTP API and desk page on its own
//! port. A small conference is set up through desk A's own API, as a
//! client would: three sessions under the three seat policies, their seat
//! rights spread over the desks, and a few attendees. Each page has a
//! control that cuts its desk's network and heals it
//! ([`Daemon::set_demo`]), so a partition can be lived through from the
//! pages alone. Runs until Ctrl-C or SIGTERM; the data is removed then.

use std::io::Write;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tracing::warn;
use weftlog_proto::NodeId;

use super::{start_desks, until};
use crate::daemon::Daemon;
use crate::remote::Remote;

/// The desks' names, in order.
pub const NAMES: [&str; 3] = ["Desk A", "Desk B", "Desk C"];
/// The first desk's HTTP port unless `--port` says otherwise; the others
/// follow it.
pub const DEFAULT_PORT: u16 = 4281;

/// Starts the desks with their pages on ports `port`, `port + 1`,
/// `port + 2` of 127.0.0.1 (0: ports the system picks), prints where, and
/// serves until a signal.
pub fn serve(port: u16, out: &mut impl Write) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve_async(port, out))
}

async fn serve_async(port: u16, out: &mut impl Write) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("weftlog-demo-").tempdir()?;
    let (desks, ids) = start_desks(tmp.path()).await?;
    let desks: Vec<Arc<Daemon>> = desks.into_iter().map(Arc::new).collect();
    let result = serve_desks(port, out, &desks, &ids, tmp.path()).await;
    for d in &desks {
        d.shutdown().await;
    }
    result
}

async fn serve_desks(
    port: u16,
    out: &mut impl Write,
    desks: &[Arc<Daemon>],
    ids: &[NodeId],
    dir: &std::path::Path,
) -> Result<()> {
    let signals = crate::run::Signals::new();
    let mut addrs = Vec::new();
    for (i, d) in desks.iter().enumerate() {
        let want = match port {
            0 => 0,
            p => p.checked_add(i as u16).ok_or_else(|| {
                anyhow!("--port {port}: the three desks need {port}, {port}+1 and {port}+2; pass a lower port")
            })?,
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", want))
            .await
            .map_err(|e| {
                anyhow!("cannot serve {} on 127.0.0.1:{want}: {e}; pass --port with another first port, or --port 0 for ports the system picks", NAMES[i])
            })?;
        addrs.push(listener.local_addr()?);
        d.set_demo(true);
        let app = crate::http::router(d.clone());
        let mut stop = d.shutdown_signal();
        tokio::spawn(async move {
            let served = axum::serve(crate::http::nodelay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                warn!("HTTP server: {e}");
            }
        });
    }
    let connected = || {
        desks.iter().enumerate().all(|(i, d)| {
            ids.iter()
                .enumerate()
                .all(|(j, id)| i == j || d.is_connected(id))
        })
    };
    until("the desks connecting", connected).await?;
    for (d, name) in desks.iter().zip(NAMES) {
        crate::desk::name_desk(d.node(), name).await?;
    }
    let a = addrs[0].to_string();
    let others: Vec<String> = ids[1..].iter().map(ToString::to_string).collect();
    tokio::task::spawn_blocking(move || set_up(&Remote::at(&a), &others))
        .await
        .context("setting up the conference")??;
    // Every desk holds the conference before the pages open.
    let all = desks[0].node().durable_pos();
    until("the desks receiving the conference", || {
        desks.iter().all(|d| d.node().durable_pos() >= all)
    })
    .await?;

    writeln!(
        out,
        "weftlog demo --serve: three registration desks on this machine, real nodes syncing over QUIC\n"
    )?;
    for (name, addr) in NAMES.iter().zip(&addrs) {
        writeln!(out, "  {name}  http://{addr}/")?;
    }
    writeln!(
        out,
        "\nOpen each desk in its own window. \"Cut this desk's network\" on a page cuts that desk\n\
         off from the others; sell seats and edit the same attendee on both sides, then heal,\n\
         and watch every desk show the oversell, its compensation, the conflict and what\n\
         changed while it was away.\n\n\
         The desks' data is in {} and is removed when you stop.\n\
         Ctrl-C stops the desks.",
        dir.display()
    )?;
    out.flush()?;
    let signal = signals.wait().await;
    writeln!(out, "{signal}: stopping the desks")?;
    out.flush()?;
    Ok(())
}

/// The sessions: id, name, capacity, room, start, seat policy, and the
/// seats given to desks B and C (desk A keeps the rest).
const SESSIONS: [(&str, &str, u64, &str, &str, &str, u64); 3] = [
    (
        "keynote",
        "Opening keynote",
        300,
        "Main hall",
        "Thu 09:00",
        "escrow",
        100,
    ),
    (
        "workshop",
        "Workshop: offline-first apps",
        12,
        "Room 2",
        "Thu 11:00",
        "risk-window",
        4,
    ),
    ("tour", "Venue tour", 15, "Lobby", "Thu 16:00", "strict", 5),
];

/// Attendees: id, name, email, company, notes.
const ATTENDEES: [(&str, &str, &str, &str, &str); 8] = [
    (
        "a1001",
        "Mara Quint",
        "mara@quint.example",
        "Northwind Labs",
        "vegetarian",
    ),
    (
        "a1002",
        "Tomas Okafor",
        "tomas.okafor@example.org",
        "Riverbank Health",
        "",
    ),
    (
        "a1003",
        "Li Wen",
        "li.wen@example.com",
        "Harbor Freight Co",
        "needs step-free access",
    ),
    (
        "a1004",
        "Priya Natarajan",
        "priya@example.net",
        "Fieldstone",
        "",
    ),
    ("a1005", "Jonas Berg", "jonas.berg@example.org", "", ""),
    (
        "a1006",
        "Sofia Alvarez",
        "sofia@alvarez.example",
        "Blue Finch",
        "speaker",
    ),
    (
        "a1007",
        "Kwame Mensah",
        "kwame@example.com",
        "Volta Energy",
        "",
    ),
    (
        "a1008",
        "Hana Sato",
        "hana.sato@example.org",
        "Kestrel Systems",
        "",
    ),
];

/// Sets the conference up through desk A's API: what a client would send.
fn set_up(a: &Remote, others: &[String]) -> Result<()> {
    let mut n = 0;
    let mut command = |mut body: Value| -> Result<Value> {
        n += 1;
        body["command_id"] = json!(format!("demo-setup-{n}"));
        body["user"] = json!("setup");
        a.post_json("/v1/venue/commands", &body)
            .with_context(|| format!("the demo's command {body}"))
    };
    for (id, name, capacity, room, starts, mode, give) in SESSIONS {
        let mut policy = json!({ "mode": mode });
        if mode == "risk-window" {
            policy["max_overdraft"] = json!(3);
        }
        command(json!({
            "type": "ScheduleSession", "session_id": id, "name": name, "capacity": capacity,
            "room": room, "starts": starts, "policy": policy,
        }))?;
        for to in others {
            command(
                json!({ "type": "GiveSeatRights", "session_id": id, "to": to, "seats": give }),
            )?;
        }
    }
    for (id, name, email, company, notes) in ATTENDEES {
        let mut body =
            json!({ "type": "RegisterAttendee", "attendee_id": id, "name": name, "email": email });
        if !company.is_empty() {
            body["company"] = json!(company);
        }
        command(body)?;
        if !notes.is_empty() {
            command(json!({ "type": "EditNotes", "attendee_id": id, "splices": [[0, 0, notes]] }))?;
        }
    }
    for (attendee, session, seats) in [
        ("a1001", "keynote", 1),
        ("a1003", "keynote", 1),
        ("a1006", "workshop", 1),
    ] {
        command(
            json!({ "type": "PurchaseSeats", "session_id": session, "attendee_id": attendee, "seats": seats }),
        )?;
    }
    let sessions = a.get_json("/v1/venue/sessions")?;
    let listed = sessions["sessions"].as_array().map_or(0, Vec::len);
    if listed != SESSIONS.len() {
        bail!(
            "desk A lists {listed} sessions after the set-up, not {}",
            SESSIONS.len()
        );
    }
    Ok(())
}
