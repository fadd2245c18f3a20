//! The public listener: permit → accept → spawn ([`crate::accept`]), then
//! each connection's own task.
//!
//! A permit bounds the connections that are not yet websocket sessions
//! (handshakes in progress, HTTP API keep-alives); sessions hold a separate
//! slot taken at upgrade time. The loop never does per-connection work, so a
//! slow or hostile client can delay only its own task, never the next accept.

use crate::outbound::{DirectSocket, SharedTcp};
use crate::state::Front;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub async fn accept_loop(listener: TcpListener, front: Arc<Front>) {
    let stop = front.node.life.closing.clone();
    let permits = front.clone();
    crate::accept::run(
        listener,
        stop,
        "public",
        move || {
            let front = permits.clone();
            async move { front.gate.accept.acquire().await }
        },
        |stream, peer, permit| {
            metrics::counter!("herdgate_tcp_accepted_total").increment(1);
            let accepted = Instant::now();
            let front2 = front.clone();
            front.node.life.tasks.spawn(async move {
                serve(stream, peer, front2, accepted).await;
                drop(permit);
            });
        },
    )
    .await
}

/// One connection's task, from accept to upgrade under one deadline
/// (`server.handshake_timeout`): the PROXY header if configured, the
/// per-IP cap on connections not yet upgraded, TLS, then HTTP. Nothing here
/// runs in the accept loop.
async fn serve(mut stream: TcpStream, peer: SocketAddr, front: Arc<Front>, accepted: Instant) {
    let _ = stream.set_nodelay(true);
    let (proxy_protocol, deadline, lowat, from_proxy) = {
        let live = front.live();
        let c = &live.config;
        // With `trusted_proxies` set, only those peers may say who the
        // client is: anyone else could claim an address inside them and
        // escape the per-IP caps. Without it, every peer is the proxy
        // (the listener is reachable only through it).
        let t = &live.trusted_proxies;
        (
            c.server.proxy_protocol,
            accepted + c.server.handshake_timeout.get(),
            c.limits.tcp_notsent_lowat,
            t.is_empty() || t.iter().any(|cidr| cidr.contains(peer.ip())),
        )
    };
    if proxy_protocol && !from_proxy {
        // Said once at warn (a load balancer missing from trusted_proxies
        // would otherwise lose every connection quietly), then at debug.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(%peer, "PROXY protocol connection from a peer outside server.trusted_proxies: closed (list your load balancers there)");
        }
        tracing::debug!(%peer, "PROXY protocol connection from a peer outside server.trusted_proxies");
        metrics::counter!("herdgate_proxy_protocol_errors_total").increment(1);
        return;
    }
    if lowat > 0 {
        crate::sys::set_notsent_lowat(&stream, lowat);
    }
    if !proxy_protocol {
        let Some(_place) = front.gate.handshake(&front.live(), peer.ip()) else {
            return;
        };
        let stream = SharedTcp::new(stream);
        return tls_then_http(stream.handle(), stream, peer, front, deadline).await;
    }
    let header = tokio::time::timeout_at(deadline, crate::realaddr::read_header(&mut stream));
    let (client, rest) = match header.await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "PROXY protocol header refused");
            metrics::counter!("herdgate_proxy_protocol_errors_total").increment(1);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "PROXY protocol header not received in time");
            metrics::counter!("herdgate_proxy_protocol_errors_total").increment(1);
            return;
        }
    };
    let peer = client.unwrap_or(peer);
    let Some(_place) = front.gate.handshake(&front.live(), peer.ip()) else {
        return;
    };
    let stream = SharedTcp::new(stream);
    let direct = stream.handle();
    let stream = crate::realaddr::Rewind::new(rest, stream);
    tls_then_http(direct, stream, peer, front, deadline).await
}

/// `direct` is the socket under `io`: a plain connection's websocket lets
/// rooms write it in place ([`crate::outbound::direct`]); TLS drops it.
async fn tls_then_http<I>(
    direct: DirectSocket,
    io: I,
    peer: SocketAddr,
    front: Arc<Front>,
    deadline: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(tls) = &front.tls else {
        return crate::http::serve_connection(io, Some(direct), peer, front, deadline).await;
    };
    drop(direct);
    let tls_deadline = front.live().config.tls.as_ref().map_or(deadline, |t| {
        deadline.min(Instant::now() + t.handshake_timeout.get())
    });
    let handshake = Box::pin(crate::tls::stream::TlsStream::accept(
        tls.config.clone(),
        io,
    ));
    match tokio::time::timeout_at(tls_deadline, handshake).await {
        Ok(Ok(stream)) => crate::http::serve_connection(stream, None, peer, front, deadline).await,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            metrics::counter!("herdgate_tls_handshake_failures_total", "reason" => "error")
                .increment(1);
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            metrics::counter!("herdgate_tls_handshake_failures_total", "reason" => "timeout")
                .increment(1);
        }
    }
}

/// Bind a listening socket with an explicit accept backlog: the OS default
/// (128 through mio) overflows under a connection storm and turns into 1 s
/// SYN retransmits for the clients. The kernel caps it at `net.core.somaxconn`.
/// With `reuse_port`, other processes may bind the same address
/// (`SO_REUSEPORT`) and the kernel spreads connections over them.
pub fn bind(
    addr: std::net::SocketAddr,
    backlog: u32,
    reuse_port: bool,
) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(backlog)
}
