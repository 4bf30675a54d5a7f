//! `weftlog run`: the node daemon as a process. It opens the node, starts
//! the sync daemon ([`crate::daemon`]) and the HTTP API ([`crate::http`]),
//! prints where they listen, and serves until SIGTERM or SIGINT, then
//! shuts down in order: HTTP stops taking requests, peer connections close,
//! received events are made durable, and the node closes its log.
//! Acknowledged appends were durable before they were acknowledged.
//!
//! The HTTP API is open on loopback; on any other address `run` refuses to
//! start without `--tokens` ([`crate::auth`]). With tokens, each run writes
//! a fresh admin token to the data directory for the CLI's remote mode,
//! and removes it at stop. With `--notify-url`, a task POSTs the oversell
//! compensations this node writes ([`crate::notify`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tracing::{info, warn};

use crate::auth::{Auth, LOCAL_TOKEN_FILE};
use crate::cli::{self, RunArgs};
use crate::daemon::{cluster_id, Config, Daemon};
use crate::remote::HTTP_ADDR_FILE;
use crate::tls::Members;

/// Runs the daemon until a signal; see the module docs.
pub fn run(dir: &Path, args: RunArgs, out: &mut impl Write) -> Result<()> {
    check_http_addr(&args)?;
    if let Some(url) = &args.notify_url {
        crate::notify::check_url(url)?;
    }
    serve(dir, args, out)
}

/// Refuses an HTTP address beyond loopback without tokens.
fn check_http_addr(args: &RunArgs) -> Result<()> {
    if args.tokens.is_none() && !args.http.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve HTTP on {} without --tokens: the API is not authenticated without \
             tokens, so anyone who can reach that address could read and change this node's log; \
             pass --tokens FILE, or listen on 127.0.0.1",
            args.http
        );
    }
    Ok(())
}

/// Removes a file when dropped: the local token, on every way out.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn serve(dir: &Path, args: RunArgs, out: &mut impl Write) -> Result<()> {
    let members = cli::read_members(args.members.as_deref())?;
    if matches!(members, Members::Anyone) {
        warn!("no --members: any node that proves its id may sync with this one");
    }
    let node = Arc::new(cli::open(dir)?);
    // The directory is locked: a local token left by an earlier run
    // (killed) is this process's to replace. Declared after the node, the
    // guard removes the token before the node lets the lock go.
    let token_guard = RemoveOnDrop(dir.join(LOCAL_TOKEN_FILE));
    let _ = std::fs::remove_file(&token_guard.0);
    let auth = Arc::new(match &args.tokens {
        None => Auth::off(),
        Some(path) => {
            let local = crate::auth::write_local_token(dir)?;
            Auth::on(path, dir, &local)?
        }
    });
    if let Members::Only(set) = &members {
        if !set.contains(&node.id()) {
            warn!(node = %node.id(), "this node is not on its own member list; peers that use the same list will refuse it");
        }
    }
    if let Some(name) = &args.name {
        crate::desk::check_name(name).context("--name")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weftlog-rt")
        .build()
        .context("cannot start the async runtime")?;
    let mut config = Config::new(args.listen);
    config.peers = args.peers.clone();
    config.members = members;
    config.cluster = cluster_id(&args.cluster);
    config.policy.anti_entropy_ms = args.anti_entropy_ms;
    config.policy.idle_timeout_ms = args.idle_timeout_ms;
    config.transport.congestion = args.congestion;
    config.mdns = args.mdns;
    config.confirm_wait = Duration::from_millis(args.confirm_wait_ms);
    let addr_file = dir.join(HTTP_ADDR_FILE);
    // The SQL mirror catches up before the node takes traffic, then
    // follows the durable feed on its own thread.
    let sql_url = match args.sql.as_deref() {
        None => None,
        Some("") => Some(crate::sql::Url::default_for(dir)),
        Some(u) => Some(crate::sql::Url::parse(u)?),
    };
    let mut sql = match &sql_url {
        None => None,
        Some(url) => Some(
            crate::sql::Live::start(node.clone(), url, rt.handle().clone())
                .with_context(|| format!("cannot mirror into {url}"))?,
        ),
    };
    let result = rt.block_on(async {
        let daemon = Arc::new(Daemon::start(node.clone(), config).await?);
        if let Some(live) = &sql {
            daemon.set_sql_lag(live.lag());
        }
        if let Some(name) = args.name.clone() {
            // After the daemon started: the append waits for a peer to
            // confirm this node's own log, as every append at start does.
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::desk::name_desk(&node, &name).await {
                    warn!("{e}");
                }
            });
        }
        let listener = match tokio::net::TcpListener::bind(args.http).await {
            Ok(l) => l,
            Err(e) => {
                daemon.shutdown().await;
                return Err(anyhow::anyhow!("cannot serve HTTP on {}: {e}", args.http));
            }
        };
        // Signals are caught from before the ready line: a SIGTERM right
        // after it still shuts down in order.
        let signals = Signals::new();
        let http = listener.local_addr()?;
        cli::write_file(&addr_file, http.to_string().as_bytes())?;
        let mut ready = json!({
            "node": node.id().to_string(),
            "quic": daemon.local_addr().to_string(),
            "http": http.to_string(),
            "data": dir.display().to_string(),
        });
        if let Some(url) = &sql_url {
            ready["sql"] = url.to_string().into();
        }
        writeln!(out, "{ready}")?;
        out.flush()?;
        info!(node = %node.id(), quic = %daemon.local_addr(), %http, "node running");
        let notifier = match &args.notify_url {
            None => None,
            Some(url) => Some(crate::notify::Notifier::start(
                node.clone(),
                url,
                dir,
                daemon.shutdown_signal(),
            )?),
        };
        let app = crate::http::router_with(daemon.clone(), auth);
        let mut stop = daemon.shutdown_signal();
        let server = tokio::spawn(async move {
            axum::serve(crate::http::nodelay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
        let signal = signals.wait().await;
        info!("{signal}: shutting down");
        daemon.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!("HTTP server: {e}"),
            Ok(Err(e)) => warn!("HTTP server task: {e}"),
            Err(_) => warn!("HTTP clients still connected after 5 s; closing"),
        }
        if let Some(n) = notifier {
            // It ends at the shutdown signal, or once a request under way
            // answers or times out.
            let _ = n.await;
        }
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_file(&addr_file);
    if let Some(live) = sql.take() {
        // What is durable in the feed is committed, with a final checkpoint.
        if let Err(e) = live.stop() {
            warn!("SQL mirror: {e}");
        }
    }
    drop(rt);
    drop(token_guard);
    // The last handle: closing it lets the committer finish what is queued.
    drop(node);
    info!("stopped");
    result
}

/// SIGTERM and SIGINT, caught from when this is made.
pub(crate) struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(crate) fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let catch = |kind, name| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot catch {name}: {e}");
                None
            }
        };
        Signals {
            term: catch(SignalKind::terminate(), "SIGTERM"),
            int: catch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    pub(crate) async fn wait(mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => "SIGTERM",
            _ = recv(&mut self.int) => "SIGINT",
        }
    }
}
