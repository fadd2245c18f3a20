//! A TCP relay a test puts between two processes (say herdgate and an etcd
//! member) to cut the link between them without touching either: a peer
//! that is gone ([`Mode::Reset`]) and a network that silently drops
//! everything ([`Mode::Blackhole`]) are different failures, and only the
//! second one needs timeouts and keepalives to be noticed.
//!
//! The relay runs on its own thread with its own current-thread tokio
//! runtime, so it works the same from sync and async tests (no runtime
//! needed) and keeps forwarding while a test thread blocks. Dropping the
//! [`Relay`] stops it and closes every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with connections; switch with [`Relay::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways (and half-closes), like a working network.
    Pass,
    /// Keep every connection open but forward nothing: bytes from either
    /// side are read and discarded, and new connections are accepted and
    /// held without connecting to the target. Like a network that silently
    /// drops packets, except that the sender's TCP sees its data
    /// acknowledged, so writes never block: only application-level timeouts
    /// and pings notice. A connection that was blackholed stays dead when
    /// the mode goes back to [`Mode::Pass`] (its bytes are lost, so the
    /// stream could not resume); only new connections forward again.
    Blackhole,
    /// Reset (RST, via SO_LINGER 0) every existing connection at once, and
    /// every new one as soon as it is accepted.
    Reset,
}

/// A direction of one relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Way {
    /// From the connecting client to the target.
    Up,
    /// From the target back to the client.
    Down,
}

/// Stalled directions, by the client's port: bytes read in a stalled
/// direction wait in the relay (and the kernel's buffers behind it) until
/// the stall ends, then go on, late: a delay, not a loss.
type Stalls = watch::Sender<std::collections::HashSet<(u16, Way)>>;

/// A running relay; see the module docs.
pub struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    stalls: Arc<Stalls>,
    stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    bytes: AtomicU64,
}

impl Relay {
    /// Listen on a fresh 127.0.0.1 port and relay each connection to
    /// `target`, starting in [`Mode::Pass`].
    pub fn start(target: SocketAddr) -> Relay {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let stalls = Arc::new(watch::channel(Default::default()).0);
        let thread_stalls = stalls.clone();
        let stats = Arc::new(Stats::default());
        let (shutdown, mut stop) = tokio::sync::oneshot::channel();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("relay listener");
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            accepted = listener.accept() => {
                                let Ok((conn, from)) = accepted else { continue };
                                thread_stats.connections.fetch_add(1, Ordering::Relaxed);
                                tokio::spawn(relay(
                                    conn,
                                    target,
                                    mode_rx.clone(),
                                    thread_stats.clone(),
                                    (from.port(), thread_stalls.subscribe()),
                                ));
                            }
                        }
                    }
                });
                // Dropping the runtime drops every connection task and its sockets.
            })
            .expect("relay thread");
        Relay {
            addr,
            mode,
            stalls,
            stats,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switch the mode. It applies to existing connections too, at once:
    /// no byte the relay reads after this returns is forwarded (bytes still
    /// in flight are lost); the resets and holds follow within moments.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Hold what the connection from client port `port` sends in direction
    /// `way` until [`Relay::unstall`]: a link delayed one way.
    pub fn stall(&self, port: u16, way: Way) {
        self.stalls.send_modify(|s| {
            s.insert((port, way));
        });
    }

    pub fn unstall(&self, port: u16, way: Way) {
        self.stalls.send_modify(|s| {
            s.remove(&(port, way));
        });
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// How many connections the relay has accepted so far (in any mode):
    /// wait for it to grow to see a client reconnect.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// How many bytes it has forwarded so far, both directions together
    /// (counted as they are handed to the receiving socket).
    pub fn bytes_forwarded(&self) -> u64 {
        self.stats.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One accepted connection, for its whole life.
async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stats: Arc<Stats>,
    (port, stalls): (u16, watch::Receiver<std::collections::HashSet<(u16, Way)>>),
) {
    let mut server = None;
    if *mode.borrow_and_update() == Mode::Pass {
        let connected = tokio::select! {
            s = TcpStream::connect(target) => s.ok(),
            _ = wait_not_pass(&mut mode) => None,
        };
        // An unreachable target shows as a reset, as a direct connection
        // would see it.
        let Some(mut s) = connected else {
            return end([Some(client), None], mode).await;
        };
        let _ = s.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let gate = mode.clone();
        let (cr, cw) = client.split();
        let (sr, sw) = s.split();
        let (up, down) = ((port, Way::Up, stalls.clone()), (port, Way::Down, stalls));
        let both = async {
            tokio::try_join!(
                pump(cr, sw, &gate, &stats, up),
                pump(sr, cw, &gate, &stats, down)
            )
        };
        tokio::select! {
            // Both sides closed (or one failed): drop both.
            _ = both => return,
            _ = wait_not_pass(&mut mode) => {}
        }
        server = Some(s);
    }
    end([Some(client), server], mode).await
}

/// Apply a mode other than Pass to the sockets: reset them, or blackhole
/// them until the mode becomes Reset.
async fn end(mut sockets: [Option<TcpStream>; 2], mut mode: watch::Receiver<Mode>) {
    if *mode.borrow_and_update() == Mode::Blackhole {
        let [a, b] = &mut sockets;
        tokio::select! {
            _ = async { tokio::join!(discard(a.as_mut()), discard(b.as_mut())) } => {}
            _ = mode.wait_for(|m| *m == Mode::Reset) => {}
        }
    }
    for s in sockets.into_iter().flatten() {
        // RST rather than FIN.
        let _ = s.set_zero_linger();
    }
}

/// Copy `from` to `to` until EOF, then pass the EOF on (half-close).
/// Forwards nothing once the mode is no longer Pass (then it never returns,
/// and the caller's own wait for the mode change takes over).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mode: &watch::Receiver<Mode>,
    stats: &Stats,
    (port, way, mut stalls): (
        u16,
        Way,
        watch::Receiver<std::collections::HashSet<(u16, Way)>>,
    ),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        // A stalled direction holds what it read until the stall ends.
        if stalls
            .wait_for(|s| !s.contains(&(port, way)))
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
        // Checked per chunk, so that nothing read after `Relay::set`
        // returned is forwarded, however late this task sees the change.
        if *mode.borrow() != Mode::Pass {
            std::future::pending::<()>().await;
        }
        if n == 0 {
            return to.shutdown().await;
        }
        // Counted before the write, so a reader that got the bytes sees them counted.
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}

async fn wait_not_pass(mode: &mut watch::Receiver<Mode>) {
    // Err: the relay is gone, and its runtime is about to drop this task.
    let _ = mode.wait_for(|m| *m != Mode::Pass).await;
}

/// Read and drop bytes forever. After EOF or an error keep the socket: a
/// FIN would not cross a blackhole either.
async fn discard(socket: Option<&mut TcpStream>) {
    if let Some(s) = socket {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::time::Duration;

    /// An echo server on a std thread; its address.
    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut back = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut conn, &mut back);
                });
            }
        });
        addr
    }

    fn connect(relay: &Relay) -> std::net::TcpStream {
        let c = std::net::TcpStream::connect(relay.addr()).unwrap();
        // Long: an echo on a busy machine is slow, not lost. `silent` uses
        // a short one of its own.
        c.set_read_timeout(Some(crate::WAIT)).unwrap();
        c
    }

    fn echoes(c: &mut std::net::TcpStream, msg: &[u8]) -> bool {
        c.write_all(msg).unwrap();
        let mut got = vec![0; msg.len()];
        c.read_exact(&mut got).is_ok() && got == msg
    }

    /// The read timed out: the connection is open but nothing arrives.
    fn silent(c: &mut std::net::TcpStream) {
        c.write_all(b"lost").unwrap();
        let mut buf = [0; 16];
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let got = c.read(&mut buf);
        c.set_read_timeout(Some(crate::WAIT)).unwrap();
        match got {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("expected a read timeout, got {other:?}"),
        }
    }

    fn is_reset(c: &mut std::net::TcpStream) {
        let mut buf = [0; 16];
        // Writing first makes a reset show even if its RST raced the read.
        let w = c.write_all(b"x");
        let r = c.read(&mut buf);
        assert!(
            w.is_err() || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "expected a reset, got write {w:?}, read {r:?}"
        );
    }

    #[test]
    fn pass_forwards_both_ways() {
        let relay = Relay::start(echo_server());
        assert_eq!(relay.mode(), Mode::Pass);
        let mut c = connect(&relay);
        assert!(echoes(&mut c, b"hello"));
        assert!(echoes(&mut c, b"again"));
        assert_eq!(relay.connections(), 1);
        assert_eq!(relay.bytes_forwarded(), 20);
        // A half-close crosses the relay: the echo server sees EOF and closes.
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn blackhole_holds_connections_silently_then_reset_cuts_them() {
        let relay = Relay::start(echo_server());
        let mut old = connect(&relay);
        assert!(echoes(&mut old, b"before"));
        relay.set(Mode::Blackhole);
        silent(&mut old);
        silent(&mut old);
        // New connections are accepted and held, not forwarded.
        let mut new = connect(&relay);
        silent(&mut new);
        let forwarded = relay.bytes_forwarded();
        assert_eq!(forwarded, 12);

        relay.set(Mode::Reset);
        is_reset(&mut old);
        is_reset(&mut new);
        let mut refused = connect(&relay);
        is_reset(&mut refused);
        assert_eq!(relay.connections(), 3);

        relay.set(Mode::Pass);
        let mut fresh = connect(&relay);
        assert!(echoes(&mut fresh, b"after"));
        assert_eq!(relay.bytes_forwarded(), forwarded + 10);
    }

    #[test]
    fn blackholed_connections_stay_dead_after_pass() {
        let relay = Relay::start(echo_server());
        let mut old = connect(&relay);
        assert!(echoes(&mut old, b"before"));
        relay.set(Mode::Blackhole);
        silent(&mut old);
        relay.set(Mode::Pass);
        silent(&mut old);
        let mut fresh = connect(&relay);
        assert!(echoes(&mut fresh, b"after"));
    }

    #[test]
    fn an_unreachable_target_resets_the_client() {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = gone.local_addr().unwrap();
        drop(gone);
        let relay = Relay::start(target);
        let mut c = connect(&relay);
        is_reset(&mut c);
    }
}
