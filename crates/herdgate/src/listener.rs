//! The accept loop: permit → accept → spawn, and nothing else.
//!
//! A permit bounds the connections that are not yet websocket sessions
//! (handshakes in progress, HTTP API keep-alives); sessions hold a separate
//! slot taken at upgrade time. The loop never does per-connection work, so a
//! slow or hostile client can delay only its own task, never the next accept.

use crate::state::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(shared.live().config.limits.max_handshakes));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shared.closing.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!("herdgate_accept_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.closing.cancelled() => return,
        };
        metrics::counter!("herdgate_tcp_accepted_total").increment(1);
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            serve(stream, peer, shared2).await;
            drop(permit);
        });
    }
}

/// One connection's task: TLS handshake (if configured) under its own
/// deadline, then HTTP. Nothing here runs in the accept loop.
async fn serve(mut stream: TcpStream, mut peer: std::net::SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (proxy_protocol, header_deadline) = {
        let live = shared.live();
        (
            live.config.server.proxy_protocol,
            live.config.server.handshake_timeout.get(),
        )
    };
    if proxy_protocol {
        match crate::realaddr::read_header(&mut stream, header_deadline).await {
            Ok(Some(client)) => peer = client,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "PROXY protocol header refused");
                metrics::counter!("herdgate_proxy_protocol_errors_total").increment(1);
                return;
            }
        }
    }
    let Some(tls) = &shared.tls else {
        return crate::http::serve_connection(stream, peer, shared).await;
    };
    let deadline = shared
        .live()
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout.get());
    let handshake = Box::pin(tls.acceptor.accept(stream));
    match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(stream)) => crate::http::serve_connection(stream, peer, shared).await,
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
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
