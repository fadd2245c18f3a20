//! Permit → accept → hand off: the one loop every listener runs (the public
//! listener, the admin listener and a worker's link listener).
//!
//! The permit comes first, so a listener never holds more connections than
//! it has permits for: at the limit, new connections wait in the kernel's
//! backlog rather than in this process. The loop does no per-connection
//! work: `handle` only spawns, so a slow or hostile peer delays its own task,
//! never the next accept. An `accept()` error (typically `EMFILE`) backs off
//! rather than spinning, and is counted per listener.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long the loop waits after an `accept()` error.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accept on `listener` until `stop`: take a permit, accept one
/// connection, hand both to `handle`. `name` labels
/// `herdgate_accept_errors_total{listener}` and the log.
pub async fn run<P, F>(
    listener: TcpListener,
    stop: CancellationToken,
    name: &'static str,
    mut permit: impl FnMut() -> F,
    mut handle: impl FnMut(TcpStream, SocketAddr, P),
) where
    F: Future<Output = P>,
{
    loop {
        let permit = tokio::select! {
            p = permit() => p,
            _ = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => handle(stream, peer, permit),
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                metrics::counter!("herdgate_accept_errors_total", "listener" => name).increment(1);
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    #[tokio::test]
    async fn no_connection_is_accepted_without_a_permit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let permits = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let looping = tokio::spawn(run(
            listener,
            stop.clone(),
            "test",
            {
                let permits = permits.clone();
                move || permits.clone().acquire_owned()
            },
            move |stream, _, permit| {
                let _ = tx.try_send((stream, permit.unwrap()));
            },
        ));
        let _a = TcpStream::connect(addr).await.unwrap();
        let (first, permit) = rx.recv().await.unwrap();
        // The only permit is held: the next connection waits in the backlog.
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        drop((first, permit));
        let (_second, _permit) = rx.recv().await.unwrap();
        stop.cancel();
        looping.await.unwrap();
    }
}
