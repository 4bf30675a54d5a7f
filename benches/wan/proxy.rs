//! A userspace WAN link: a UDP proxy between one client and one server on
//! loopback that delays, drops and (with jitter) reorders datagrams, for
//! machines where `tc netem` is not available.
//!
//! The proxy owns two UDP sockets. The client dials the **client side**
//! ([`Proxy::addr`]); the proxy latches the client's address from the first
//! datagram that arrives there and from then on takes datagrams only from
//! it. Each one leaves through the **server side** socket to the server
//! address. Datagrams that arrive on the server side from the server go out
//! through the client side to the latched address. Each end therefore sees
//! the other as one fixed address, so QUIC works through it unchanged, and a
//! server that dials back the address it saw reaches the client too.
//!
//! Each direction is one task (both on one current-thread tokio runtime on
//! a thread of its own) with its own delay queue, a binary heap ordered by
//! release time. A datagram is received, dropped with probability
//! [`Link::loss`] (a seeded generator, one per direction), or else stamped
//! with its release time `arrival + delay ± jitter` (uniform, clamped at
//! the arrival) and queued; the task sleeps until the earliest release time
//! or the next datagram, whichever comes first, and sends everything that is
//! due in release order (ties in arrival order). Without jitter the release
//! times are monotonic, so order is kept; with jitter a datagram may
//! overtake another, as on a real path with `netem`'s jitter. Nothing
//! sleeps per datagram: a burst due in the same instant goes out in one
//! pass. tokio's timer has millisecond resolution, so a datagram leaves up
//! to about 1 ms after its release time.
//!
//! Losses the proxy did not choose are counted too: datagrams beyond
//! [`MAX_QUEUED`] in one direction's queue, datagrams from a foreign source,
//! and the kernel's drops on the proxy's sockets when their receive buffers
//! ([`SOCKET_BUFFER_BYTES`]) overflowed (from `/proc/net/udp`, see
//! [`udp_drops`]).
//!
//! There is no bandwidth limit: the link is as fast as the proxy forwards.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use weftlog::transport;

use super::common::splitmix;

/// Largest datagram received (UDP's limit; QUIC sends at most ~1.5 kB).
pub const MAX_DATAGRAM: usize = 65_535;
/// Datagrams one direction may hold in its delay queue; more are dropped
/// and counted as overflow. At 100 ms and 100 MB/s about 7,000 are queued.
pub const MAX_QUEUED: usize = 1 << 16;
/// Receive and send buffer asked for on each proxy socket (forced past
/// `net.core.rmem_max` when the process may).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;
/// Datagrams received per wake-up before the due ones are sent, so a
/// flood one way cannot hold back releases.
const DRAIN_BATCH: usize = 64;

/// What the link does to each datagram, the same both ways.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Each datagram's delay is `delay` plus a uniform value in
    /// `[-jitter, +jitter]` (never below zero); reorders when non-zero.
    pub jitter: Duration,
    /// Probability that a datagram is dropped, each independently.
    pub loss: f64,
    /// Seed of the loss and jitter generators.
    pub seed: u64,
}

/// Counters of one direction, read while the proxy runs.
#[derive(Default, Debug)]
struct DirCounters {
    received: AtomicU64,
    received_bytes: AtomicU64,
    lost: AtomicU64,
    overflow: AtomicU64,
    foreign: AtomicU64,
    no_client: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    reordered: AtomicU64,
    recv_errors: AtomicU64,
    send_errors: AtomicU64,
    max_queued: AtomicU64,
}

/// A snapshot of one direction's counters.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct DirStats {
    /// Datagrams received on this direction's incoming socket.
    pub received: u64,
    /// Their bytes (UDP payload).
    pub received_bytes: u64,
    /// Dropped by the loss model.
    pub lost: u64,
    /// Dropped because the delay queue held [`MAX_QUEUED`].
    pub overflow: u64,
    /// Dropped because they came from an address other than the latched
    /// client (client side) or the server (server side).
    pub foreign: u64,
    /// Server-to-client datagrams dropped before any client was seen.
    pub no_client: u64,
    /// Datagrams sent on.
    pub sent: u64,
    /// Their bytes.
    pub sent_bytes: u64,
    /// Sent after a datagram that arrived later (only with jitter).
    pub reordered: u64,
    /// Errors from `recv_from` (e.g. ICMP reports), each skipped.
    pub recv_errors: u64,
    /// Errors from `send_to`; the datagram is dropped.
    pub send_errors: u64,
    /// Most datagrams held in the delay queue at once.
    pub max_queued: u64,
}

impl DirCounters {
    fn snapshot(&self) -> DirStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirStats {
            received: g(&self.received),
            received_bytes: g(&self.received_bytes),
            lost: g(&self.lost),
            overflow: g(&self.overflow),
            foreign: g(&self.foreign),
            no_client: g(&self.no_client),
            sent: g(&self.sent),
            sent_bytes: g(&self.sent_bytes),
            reordered: g(&self.reordered),
            recv_errors: g(&self.recv_errors),
            send_errors: g(&self.send_errors),
            max_queued: g(&self.max_queued),
        }
    }
}

fn bump(a: &AtomicU64, by: u64) {
    a.fetch_add(by, Ordering::Relaxed);
}

/// Everything the proxy counted, at its stop.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Client to server.
    pub to_server: DirStats,
    /// Server to client.
    pub to_client: DirStats,
    /// The kernel's drops on the client-side and server-side sockets
    /// (receive buffer full); `None` where `/proc/net/udp` did not say.
    pub socket_drops: [Option<u64>; 2],
    /// The receive buffer the kernel granted each socket, in bytes.
    pub socket_rcvbuf: [usize; 2],
    /// CPU seconds of the proxy's thread.
    pub cpu_secs: Option<f64>,
}

impl Stats {
    /// Datagrams lost other than by the loss model: queue overflow, send
    /// errors and the kernel's drops on the proxy's sockets.
    pub fn unplanned_drops(&self) -> u64 {
        let d = |s: &DirStats| s.overflow + s.send_errors;
        d(&self.to_server) + d(&self.to_client) + self.socket_drops.iter().flatten().sum::<u64>()
    }
}

/// A running proxy; [`Proxy::stop`] ends it.
pub struct Proxy {
    addr: SocketAddr,
    counters: [Arc<DirCounters>; 2],
    stop: watch::Sender<bool>,
    thread: thread::JoinHandle<Stats>,
}

impl Proxy {
    /// Starts a proxy that forwards to `server` over `link`, on an
    /// ephemeral loopback port for the client side.
    pub fn start(server: SocketAddr, link: Link) -> io::Result<Proxy> {
        let client_std = StdUdpSocket::bind(("127.0.0.1", 0))?;
        let server_std = StdUdpSocket::bind(("127.0.0.1", 0))?;
        let rcvbuf = [set_buffers(&client_std), set_buffers(&server_std)];
        client_std.set_nonblocking(true)?;
        server_std.set_nonblocking(true)?;
        let addr = client_std.local_addr()?;
        let server_side = server_std.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .enable_io()
            .build()?;
        let (client_sock, server_sock) = {
            let _guard = rt.enter();
            (
                Arc::new(UdpSocket::from_std(client_std)?),
                Arc::new(UdpSocket::from_std(server_std)?),
            )
        };
        let counters = [
            Arc::new(DirCounters::default()),
            Arc::new(DirCounters::default()),
        ];
        let (stop, stop_rx) = watch::channel(false);
        let c = counters.clone();
        let thread = thread::Builder::new()
            .name("wan-proxy".into())
            .spawn(move || {
                let client = Arc::new(OnceLock::new());
                rt.block_on(async {
                    let up = pump(
                        Route::ToServer {
                            client: client.clone(),
                            server,
                        },
                        client_sock.clone(),
                        server_sock.clone(),
                        link,
                        link.seed,
                        c[0].clone(),
                        stop_rx.clone(),
                    );
                    let down = pump(
                        Route::ToClient { client, server },
                        server_sock.clone(),
                        client_sock.clone(),
                        link,
                        splitmix(link.seed ^ 0x5eed_d0e5),
                        c[1].clone(),
                        stop_rx,
                    );
                    tokio::join!(up, down);
                });
                // Read before the sockets close.
                Stats {
                    to_server: c[0].snapshot(),
                    to_client: c[1].snapshot(),
                    socket_drops: [udp_drops(addr), udp_drops(server_side)],
                    socket_rcvbuf: rcvbuf,
                    cpu_secs: thread_cpu_secs(),
                }
            })?;
        Ok(Proxy {
            addr,
            counters,
            stop,
            thread,
        })
    }

    /// The client side: the address the client dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters so far: client to server, server to client.
    pub fn snapshot(&self) -> [DirStats; 2] {
        [self.counters[0].snapshot(), self.counters[1].snapshot()]
    }

    /// Stops forwarding (queued datagrams are dropped) and returns the
    /// counts.
    pub fn stop(self) -> Stats {
        let _ = self.stop.send(true);
        // The thread only runs the two pumps, which do not panic.
        self.thread.join().unwrap_or_default()
    }
}

/// Where a direction takes datagrams from and sends them to.
enum Route {
    ToServer {
        client: Arc<OnceLock<SocketAddr>>,
        server: SocketAddr,
    },
    ToClient {
        client: Arc<OnceLock<SocketAddr>>,
        server: SocketAddr,
    },
}

/// A datagram in a delay queue, ordered by release time, then arrival.
struct Queued {
    release: Instant,
    seq: u64,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.release, self.seq) == (other.release, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.release, self.seq).cmp(&(other.release, other.seq))
    }
}

/// One direction: receive from `rx`, delay, send through `tx`.
async fn pump(
    route: Route,
    rx: Arc<UdpSocket>,
    tx: Arc<UdpSocket>,
    link: Link,
    seed: u64,
    c: Arc<DirCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = seed;
    let mut queue: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut next_seq = 0u64;
    let mut highest_sent: Option<u64> = None;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let jitter_ns = link.jitter.as_nanos() as u64;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        let next = queue.peek().map(|q| q.0.release);
        if let Some(t) = next {
            if armed != Some(t) {
                timer.as_mut().reset(t);
                armed = Some(t);
            }
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            r = rx.readable() => {
                if r.is_err() {
                    bump(&c.recv_errors, 1);
                }
                for _ in 0..DRAIN_BATCH {
                    let (len, from) = match rx.try_recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            bump(&c.recv_errors, 1);
                            continue;
                        }
                    };
                    let now = Instant::now();
                    bump(&c.received, 1);
                    bump(&c.received_bytes, len as u64);
                    let to = match &route {
                        Route::ToServer { client, server } => {
                            if *client.get_or_init(|| from) != from {
                                bump(&c.foreign, 1);
                                continue;
                            }
                            *server
                        }
                        Route::ToClient { client, server } => {
                            if from != *server {
                                bump(&c.foreign, 1);
                                continue;
                            }
                            match client.get() {
                                Some(a) => *a,
                                None => {
                                    bump(&c.no_client, 1);
                                    continue;
                                }
                            }
                        }
                    };
                    if link.loss > 0.0 && unit(&mut rng) < link.loss {
                        bump(&c.lost, 1);
                        continue;
                    }
                    if queue.len() >= MAX_QUEUED {
                        bump(&c.overflow, 1);
                        continue;
                    }
                    let mut release = now + link.delay;
                    if jitter_ns > 0 {
                        rng = splitmix(rng);
                        let j = rng % (2 * jitter_ns + 1);
                        release = if j >= jitter_ns {
                            release + Duration::from_nanos(j - jitter_ns)
                        } else {
                            release
                                .checked_sub(Duration::from_nanos(jitter_ns - j))
                                .unwrap_or(now)
                                .max(now)
                        };
                    }
                    queue.push(Reverse(Queued {
                        release,
                        seq: next_seq,
                        to,
                        data: buf[..len].to_vec(),
                    }));
                    next_seq += 1;
                    c.max_queued.fetch_max(queue.len() as u64, Ordering::Relaxed);
                }
            }
            _ = &mut timer, if next.is_some() => armed = None,
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|q| q.0.release <= now) {
            let Some(Reverse(q)) = queue.pop() else { break };
            if highest_sent.is_some_and(|h| q.seq < h) {
                bump(&c.reordered, 1);
            }
            highest_sent = Some(highest_sent.map_or(q.seq, |h| h.max(q.seq)));
            match tx.send_to(&q.data, q.to).await {
                Ok(n) => {
                    bump(&c.sent, 1);
                    bump(&c.sent_bytes, n as u64);
                }
                Err(_) => bump(&c.send_errors, 1),
            }
        }
    }
}

/// A uniform value in [0, 1).
fn unit(rng: &mut u64) -> f64 {
    *rng = splitmix(*rng);
    (*rng >> 11) as f64 / (1u64 << 53) as f64
}

/// Asks for [`SOCKET_BUFFER_BYTES`] both ways on `s`; returns the receive
/// buffer granted.
pub fn set_buffers(s: &impl AsFd) -> usize {
    let s = s.as_fd();
    transport::set_buffer(
        s,
        libc::SO_SNDBUFFORCE,
        libc::SO_SNDBUF,
        SOCKET_BUFFER_BYTES,
    );
    set_rcvbuf(s, SOCKET_BUFFER_BYTES)
}

/// Asks for a receive buffer of `bytes` on `s` (forced past
/// `net.core.rmem_max` when the process may); returns the buffer granted.
pub fn set_rcvbuf(s: BorrowedFd<'_>, bytes: usize) -> usize {
    transport::set_buffer(s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes);
    rcvbuf(s)
}

/// The receive buffer of `s` in bytes, as the kernel reports it (twice what
/// was asked: it counts its bookkeeping too).
pub fn rcvbuf(s: BorrowedFd<'_>) -> usize {
    transport::buffer_size(s, libc::SO_RCVBUF).unwrap_or(0)
}

/// The IPv4 address `fd` is bound to, if it is such a socket.
pub fn bound_v4(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is open while borrowed; `sa` and `len` are valid for
    // writes of `len` bytes, and the kernel writes at most that.
    let r = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    (r == 0 && sa.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
        SocketAddr::from((
            u32::from_be(sa.sin_addr.s_addr).to_be_bytes(),
            u16::from_be(sa.sin_port),
        ))
    })
}

/// The kernel's count of datagrams dropped on the IPv4 UDP socket bound to
/// `addr` (its receive buffer was full), from the last column of
/// `/proc/net/udp`; `None` if no such socket is listed.
pub fn udp_drops(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(a) = addr else {
        return None;
    };
    let table = fs::read_to_string("/proc/net/udp").ok()?;
    // `local_address` is the address as a host-order u32 and the port, in hex.
    let want_ip = u32::from_ne_bytes(a.ip().octets());
    table.lines().skip(1).find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let (ip, port) = fields.get(1)?.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        (port == a.port() && (ip == want_ip || ip == 0))
            .then(|| fields.last()?.parse().ok())
            .flatten()
    })
}

/// CPU seconds of the calling thread (`/proc/thread-self/stat`).
fn thread_cpu_secs() -> Option<f64> {
    let stat = fs::read_to_string("/proc/thread-self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 here.
    let t = |i: usize| f.get(i)?.parse::<f64>().ok();
    Some((t(11)? + t(12)?) / 100.0)
}
