//! The sync protocol over QUIC: one round of a [`Session`] on a
//! bidirectional stream of an authenticated connection (see [`crate::tls`]).
//!
//! The shell is a thin loop, as the core's docs ask: write everything the
//! session wants to send, read one length-prefixed message (the length is
//! checked against [`MAX_MESSAGE_BYTES`] before anything is allocated),
//! hand it to the session, and repeat until the round is over. The session
//! does all checking; the node's [`SyncStore`] stores what it accepts.
//!
//! One round on its own is what a one-off exchange needs (and what the
//! tests of the protocol over QUIC use); the daemon ([`crate::daemon`])
//! keeps a live session per peer instead.

use weftlog_proto::sync::{
    message_len, Session, SessionConfig, SessionEvent, SyncError, LENGTH_PREFIX_BYTES,
};
use weftlog_proto::NodeId;

use crate::node::{Node, SyncStore};
use crate::tls::peer_id;

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The connection or stream failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing failed.
    #[error("send: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading failed or the peer closed the stream mid-round.
    #[error("receive: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer's messages were refused.
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    /// The handshake did not yield a node id (cannot happen with
    /// [`crate::tls`] configurations).
    #[error("the peer proved no node id")]
    NoPeerId,
}

/// What a round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// The peer.
    pub peer: Option<NodeId>,
    /// The replicas were already in sync (one round trip).
    pub in_sync: bool,
    /// Events received and stored.
    pub received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
}

/// Runs one sync round with the peer of `conn`: the dialer (`open`) opens
/// the stream, the other side accepts it. Returns when both ends are done.
pub async fn sync_round(
    node: &Node,
    conn: &quinn::Connection,
    cluster: [u8; 32],
    open: bool,
) -> Result<Round, NetError> {
    let peer = peer_id(conn).ok_or(NetError::NoPeerId)?;
    let (mut send, mut recv) = if open {
        conn.open_bi().await?
    } else {
        conn.accept_bi().await?
    };
    // A store per call: it holds the node's state lock from its first
    // insert until dropped (see `SyncStore`).
    let store = || -> SyncStore<'_> { node.sync_store() };
    let mut config = SessionConfig::new(cluster, node.id());
    config.peer = Some(peer);
    let mut session = Session::new(config, &store());
    let mut round = Round {
        peer: Some(peer),
        ..Round::default()
    };
    loop {
        while let Some(msg) = session.poll_transmit(&store()) {
            round.bytes_sent += msg.len() as u64;
            send.write_all(&msg).await?;
        }
        let mut over = false;
        while let Some(e) = session.poll_event() {
            match e {
                SessionEvent::InSync => {
                    round.in_sync = true;
                    over = true;
                }
                SessionEvent::RoundDone => over = true,
                SessionEvent::Received { count, .. } => round.received += count,
                SessionEvent::Failed(e) => return Err(e.into()),
                SessionEvent::PeerDone
                | SessionEvent::Equivocation(_)
                | SessionEvent::Announced { .. }
                | SessionEvent::Grafted
                | SessionEvent::Pruned
                | SessionEvent::Missing { .. }
                | SessionEvent::Asked(_) => {}
            }
        }
        if over {
            // Nothing more will be said in this round.
            let _ = send.finish();
            return Ok(round);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await?;
        let len = message_len(prefix)?;
        let mut msg = vec![0u8; LENGTH_PREFIX_BYTES + len];
        msg[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix);
        recv.read_exact(&mut msg[LENGTH_PREFIX_BYTES..]).await?;
        if let Err(e) = session.handle_message(&msg, &mut store()) {
            // Tell the peer why (the session queued an Error message).
            while let Some(msg) = session.poll_transmit(&store()) {
                let _ = send.write_all(&msg).await;
            }
            let _ = send.finish();
            return Err(e.into());
        }
    }
}
