//! The daemon's QUIC transport: flow-control windows, the congestion
//! controller and the UDP socket, sized for catch-up across a WAN.
//!
//! A catch-up is one long stream, so its rate is what the link lets be in
//! flight divided by the round trip. With quinn's defaults the stream's
//! receive window (1.25 MB) caps that at any delay: 6 MB/s at 100 ms
//! one-way. Here every window is [`WINDOW_BYTES`] (16 MiB): the stream's
//! and the connection's receive windows, and the send window (bytes the
//! sender keeps until they are acknowledged). That fills 80 MB/s at a
//! 200 ms round trip.
//!
//! **Congestion control.** A loss-based controller (Cubic, quinn's
//! default) halves its window at each loss; at the 1 % loss of a venue's
//! Wi-Fi it keeps a few dozen packets in flight. BBR models the path's
//! bandwidth and round trip instead and does not treat random loss as
//! congestion. [`Congestion`] picks one (`weftlog run --congestion`); the
//! default is the one the WAN bench (`benches/wan.rs`) measured faster.
//!
//! **Memory.** A window costs memory only when it is used: received data
//! waits in quinn's buffers only while the session reads slower than the
//! peer sends, and sent data is kept only until it is acknowledged. At
//! worst a connection holds a full window each way. [`window_share`]
//! bounds a node's total: the node-wide [`WINDOW_BUDGET_BYTES`] is split
//! among the open connections, never below [`MIN_WINDOW_BYTES`] each (the
//! old default), so a node with many peers holds at most about
//! `max(budget, peers × 2 × MIN_WINDOW_BYTES)`.
//!
//! **The socket.** Bursts of datagrams that arrive while the runtime is
//! busy wait in the socket's receive buffer; the system default (208 KiB)
//! overflows during a catch-up, and each datagram dropped there is a loss
//! to QUIC, which slows the sender. [`bind`] asks for
//! [`SOCKET_BUFFER_BYTES`] each way, past `net.core.rmem_max` where the
//! process may (`SO_RCVBUFFORCE`, which needs `CAP_NET_ADMIN`), and
//! reports what the kernel granted; the daemon warns once if that is less.

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Each flow-control window of a connection at full size, bytes: the
/// stream's and the connection's receive windows and the send window.
pub const WINDOW_BYTES: u64 = 16 * 1024 * 1024;
// At least 16 MB in flight per connection at full window.
const _: () = assert!(WINDOW_BYTES >= 16_000_000);
/// The smallest share of [`WINDOW_BUDGET_BYTES`] a connection gets: quinn's
/// default stream window (what every connection had before).
pub const MIN_WINDOW_BYTES: u64 = 1_250_000;
/// Window bytes a node grants across its connections, each way, before
/// shares shrink ([`window_share`]): sixteen full windows.
pub const WINDOW_BUDGET_BYTES: u64 = 16 * WINDOW_BYTES;
/// The UDP socket buffers asked for, each way, bytes (the kernel reports
/// twice the granted size: it counts its bookkeeping too).
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The congestion controller of every connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Loss-based (quinn's default): the window halves at each loss.
    Cubic,
    /// Model-based: paces at the measured bandwidth; random loss does not
    /// cut it.
    #[default]
    Bbr,
}

impl Congestion {
    /// The controller's factory, for [`quinn::TransportConfig`].
    pub fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        })
    }
}

/// A congestion controller name that is neither `bbr` nor `cubic`.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?}; expected bbr or cubic")]
pub struct UnknownCongestion(String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;

    fn from_str(s: &str) -> Result<Congestion, UnknownCongestion> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            _ => Err(UnknownCongestion(s.to_string())),
        }
    }
}

/// The transport's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The congestion controller.
    pub congestion: Congestion,
    /// Each flow-control window at full size ([`WINDOW_BYTES`]); `None`
    /// keeps quinn's defaults (a 1.25 MB stream window, no connection
    /// limit beyond it, a 10 MB send window: what the node had before).
    pub window_bytes: Option<u64>,
    /// The socket buffers asked for, each way; 0 keeps the system's.
    pub socket_buffer_bytes: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            congestion: Congestion::default(),
            window_bytes: Some(WINDOW_BYTES),
            socket_buffer_bytes: SOCKET_BUFFER_BYTES,
        }
    }
}

/// The transport configuration of every connection: one sync stream, the
/// windows and controller of `settings`, `idle` as the idle timeout
/// (keep-alives at a third of it).
pub fn config(settings: &Settings, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One sync stream per connection; a peer cannot open more.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    if let Some(bytes) = settings.window_bytes {
        let window = quinn::VarInt::from_u64(bytes).unwrap_or(quinn::VarInt::MAX);
        t.stream_receive_window(window);
        t.receive_window(window);
        t.send_window(bytes);
    }
    t.congestion_controller_factory(settings.congestion.factory());
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(idle / 3));
    t
}

/// The window each of `connections` open connections gets out of
/// [`WINDOW_BUDGET_BYTES`]: at most `full`, at least [`MIN_WINDOW_BYTES`]
/// (or `full`, if that is smaller).
pub fn window_share(full: u64, connections: usize) -> u64 {
    let share = WINDOW_BUDGET_BYTES / connections.max(1) as u64;
    share.clamp(MIN_WINDOW_BYTES.min(full), full)
}

/// The socket buffers asked for and granted, bytes as the kernel reports
/// them (twice the size asked, when granted in full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    /// The size asked for, each way.
    pub asked: usize,
    /// The receive buffer granted.
    pub receive: usize,
    /// The send buffer granted.
    pub send: usize,
}

impl SocketBuffers {
    /// Whether the kernel granted less than asked (`net.core.rmem_max` or
    /// `wmem_max` capped it, and the process may not go past them).
    pub fn capped(&self) -> bool {
        self.asked > 0 && (self.receive < self.asked * 2 || self.send < self.asked * 2)
    }
}

/// Binds a UDP socket at `addr` and asks for buffers of `buffer_bytes`
/// each way (none if 0; see the module docs).
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<(UdpSocket, SocketBuffers)> {
    let socket = UdpSocket::bind(addr)?;
    if buffer_bytes > 0 {
        let fd = socket.as_fd();
        set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, buffer_bytes);
        set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, buffer_bytes);
    }
    let buffers = SocketBuffers {
        asked: buffer_bytes,
        receive: buffer_size(socket.as_fd(), libc::SO_RCVBUF)?,
        send: buffer_size(socket.as_fd(), libc::SO_SNDBUF)?,
    };
    Ok((socket, buffers))
}

/// Sets a socket buffer to `bytes`: with `force` if the process may,
/// otherwise with `plain` (which the kernel caps at its maximum). Failure
/// leaves the buffer as it was; the caller reads back what it got.
pub fn set_buffer(fd: BorrowedFd<'_>, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let want = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    for opt in [force, plain] {
        // SAFETY: `fd` is open while borrowed; the option value is a c_int
        // that outlives the call, and its size is given.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// A socket buffer's size as the kernel reports it (`getsockopt`).
pub fn buffer_size(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<usize> {
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as in `set_buffer`; `got` and `len` are valid for writes and
    // `len` gives `got`'s size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(got.max(0) as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::congestion::{Bbr, Cubic};
    use std::time::Instant;

    /// The configuration carries the windows asked for: the Debug text is
    /// the only view quinn gives of a built config.
    #[test]
    fn config_carries_the_windows() {
        let t = config(&Settings::default(), Duration::from_secs(10));
        let text = format!("{t:?}");
        let w = WINDOW_BYTES.to_string();
        for field in ["stream_receive_window", "receive_window", "send_window"] {
            assert!(
                text.contains(&format!("{field}: {w}")),
                "{field} is not {w} in {text}"
            );
        }
        let small = Settings {
            window_bytes: Some(2_000_000),
            ..Settings::default()
        };
        assert!(format!("{:?}", config(&small, Duration::from_secs(10)))
            .contains("stream_receive_window: 2000000"));
    }

    /// Each setting builds its own controller.
    #[test]
    fn congestion_builds_the_controller_chosen() {
        let now = Instant::now();
        let bbr = Congestion::Bbr.factory().build(now, 1200);
        assert!(bbr.into_any().downcast::<Bbr>().is_ok());
        let cubic = Congestion::Cubic.factory().build(now, 1200);
        assert!(cubic.into_any().downcast::<Cubic>().is_ok());
        assert_eq!("BBR".parse::<Congestion>().unwrap(), Congestion::Bbr);
        assert_eq!("cubic".parse::<Congestion>().unwrap(), Congestion::Cubic);
        assert!("reno".parse::<Congestion>().is_err());
        assert_eq!(Congestion::Bbr.to_string(), "bbr");
    }

    /// Two endpoints built as the daemon builds them connect, and the
    /// connection runs the controller chosen.
    #[tokio::test]
    async fn a_connection_runs_the_controller_chosen() {
        use crate::tls::{self, Members, SERVER_NAME};
        use weftlog_proto::Keypair;
        for congestion in [Congestion::Bbr, Congestion::Cubic] {
            let settings = Settings {
                congestion,
                ..Settings::default()
            };
            let t = Arc::new(config(&settings, Duration::from_secs(10)));
            let endpoint = |secret: u8| {
                let key = Keypair::from_secret([secret; 32]);
                let mut server = tls::server_config(&key, Members::Anyone, 1).unwrap();
                let mut client = tls::client_config(&key, Members::Anyone, 1).unwrap();
                server.transport_config(t.clone());
                client.transport_config(t.clone());
                let (socket, _) = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 0).unwrap();
                let mut e = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .unwrap();
                e.set_default_client_config(client);
                e
            };
            let (a, b) = (endpoint(1), endpoint(2));
            let a_addr = a.local_addr().unwrap();
            let accept = tokio::spawn(async move { a.accept().await.unwrap().await.unwrap() });
            let dialled = b.connect(a_addr, SERVER_NAME).unwrap().await.unwrap();
            let accepted = accept.await.unwrap();
            for conn in [&dialled, &accepted] {
                let state = conn.congestion_state().into_any();
                let is_bbr = state.is::<Bbr>();
                let is_cubic = state.is::<Cubic>();
                assert_eq!(
                    (is_bbr, is_cubic),
                    (
                        congestion == Congestion::Bbr,
                        congestion == Congestion::Cubic
                    )
                );
            }
        }
    }

    #[test]
    fn window_shares_stay_within_the_budget_and_the_floor() {
        assert_eq!(window_share(WINDOW_BYTES, 0), WINDOW_BYTES);
        assert_eq!(window_share(WINDOW_BYTES, 16), WINDOW_BYTES);
        assert_eq!(window_share(WINDOW_BYTES, 32), WINDOW_BYTES / 2);
        assert_eq!(window_share(WINDOW_BYTES, 10_000), MIN_WINDOW_BYTES);
        assert_eq!(window_share(1_000_000, 10_000), 1_000_000);
        for n in 1..500 {
            let s = window_share(WINDOW_BYTES, n);
            assert!(s as u128 * n as u128 <= WINDOW_BUDGET_BYTES as u128 || s == MIN_WINDOW_BYTES);
        }
    }

    /// The socket gets at least the system's buffers, and what was granted
    /// is reported as the kernel reads it back.
    #[test]
    fn bind_reports_the_buffers_granted() {
        let (plain, none) = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 0).unwrap();
        assert_eq!(none.asked, 0);
        assert!(!none.capped());
        let (s, got) = bind(SocketAddr::from(([127, 0, 0, 1], 0)), SOCKET_BUFFER_BYTES).unwrap();
        assert!(got.receive >= none.receive && got.send >= none.send);
        assert_eq!(
            got.receive,
            buffer_size(s.as_fd(), libc::SO_RCVBUF).unwrap()
        );
        assert_eq!(
            got.capped(),
            got.receive < 2 * SOCKET_BUFFER_BYTES || got.send < 2 * SOCKET_BUFFER_BYTES
        );
        drop(plain);
    }
}
