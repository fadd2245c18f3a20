//! What every connection task shares: config, apps, the router, admission
//! counters and the shutdown signal.

use crate::apps::Apps;
use crate::config::Config;
use crate::router::Router;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Shared {
    pub config: Config,
    pub apps: Apps,
    pub router: Router,
    pub sessions: Arc<SessionSlots>,
    /// Cancelled when the server stops taking and serving connections.
    pub shutdown: CancellationToken,
    /// Cancelled when shutdown has finished; the admin listener stops last.
    pub stopped: CancellationToken,
    /// Upgraded websockets leave hyper's connection tracking, so sessions are tracked here.
    pub tasks: TaskTracker,
    pub ws_config: WebSocketConfig,
    pub tls: Option<Tls>,
}

/// TLS termination: the swappable certificate and the acceptor over it.
pub struct Tls {
    pub store: Arc<crate::tls::CertStore>,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl Shared {
    pub fn new(config: Config) -> Result<Arc<Shared>, crate::tls::TlsError> {
        let tls = match &config.tls {
            Some(t) => {
                let store = Arc::new(crate::tls::CertStore::load(
                    t.cert.as_ref(),
                    t.key.as_ref(),
                )?);
                let acceptor =
                    tokio_rustls::TlsAcceptor::from(crate::tls::server_config(store.clone())?);
                Some(Tls { store, acceptor })
            }
            None => None,
        };
        let l = &config.limits;
        let router = Router::local(
            config.worker_count(),
            l.worker_mailbox,
            l.max_presence_members,
        );
        let ws_config = WebSocketConfig::default()
            // Read buffer: sized for typical Pusher frames, not tungstenite's
            // 128 KiB default, because it is allocated for every socket up front.
            .read_buffer_size(2048)
            // Write straight through; our own outbound queue does the batching.
            .write_buffer_size(0)
            .max_write_buffer_size(l.outbound_queue_bytes + l.max_message_bytes)
            .max_message_size(Some(l.max_message_bytes))
            .max_frame_size(Some(l.max_message_bytes));
        Ok(Arc::new(Shared {
            apps: Apps::new(&config.apps),
            sessions: Arc::new(SessionSlots::new(l.max_connections)),
            router,
            config,
            shutdown: CancellationToken::new(),
            stopped: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ws_config,
            tls,
        }))
    }
}

/// Open websocket sessions, with a cap. Taking a slot checks and counts in
/// one atomic step; the slot gives itself back exactly once, when dropped.
pub struct SessionSlots {
    open: AtomicUsize,
    max: usize,
}

impl SessionSlots {
    pub fn new(max: usize) -> SessionSlots {
        SessionSlots {
            open: AtomicUsize::new(0),
            max,
        }
    }

    pub fn try_take(self: &Arc<Self>) -> Option<SessionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!("herdgate_connections_open").increment(1.0);
        Some(SessionSlot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

pub struct SessionSlot(Arc<SessionSlots>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("herdgate_connections_open").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_and_release_once() {
        let slots = Arc::new(SessionSlots::new(2));
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop(a);
        assert_eq!(slots.open(), 1);
        let c = slots.try_take().unwrap();
        drop((b, c));
        assert_eq!(slots.open(), 0);
    }
}
