//! What every connection task shares: the live config and apps (swapped
//! whole on reload), the router, admission counters and the lifecycle tokens.

use crate::apps::Apps;
use crate::config::Config;
use crate::router::Router;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Shared {
    live: ArcSwap<Live>,
    pub router: Router,
    pub sessions: Arc<SessionSlots>,
    /// Cancelled when shutdown begins: `/readyz` turns 503, everything else
    /// keeps serving through the load balancer's deregistration delay.
    pub draining: CancellationToken,
    /// Cancelled when the listener closes: HTTP connections finish their
    /// in-flight request, sessions close in a jittered spread over the drain period.
    pub closing: CancellationToken,
    /// Cancelled when shutdown has finished; the admin listener stops last.
    pub stopped: CancellationToken,
    /// Upgraded websockets leave hyper's connection tracking, so sessions are tracked here.
    pub tasks: TaskTracker,
    pub tls: Option<Tls>,
}

/// The part of the configuration that a reload (SIGHUP) swaps while serving.
pub struct Live {
    pub config: Config,
    pub apps: Apps,
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
        let router = Router::local(config.worker_count(), l.worker_mailbox);
        Ok(Arc::new(Shared {
            sessions: Arc::new(SessionSlots::new(l.max_connections)),
            router,
            live: ArcSwap::from_pointee(Live {
                apps: Apps::new(&config.apps),
                config,
            }),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            stopped: CancellationToken::new(),
            tasks: TaskTracker::new(),
            tls,
        }))
    }

    /// The configuration in force now. Cheap: an atomic load and a refcount.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Put a new (validated) configuration in force for everything that reads it from now on.
    pub fn swap_live(&self, config: Config) {
        self.sessions.set_max(config.limits.max_connections);
        self.live.store(Arc::new(Live {
            apps: Apps::new(&config.apps),
            config,
        }));
    }
}

impl Live {
    /// Websocket settings for a new socket.
    pub fn ws_config(&self) -> WebSocketConfig {
        let l = &self.config.limits;
        WebSocketConfig::default()
            // Read buffer: sized for typical Pusher frames, not tungstenite's
            // 128 KiB default, because it is allocated for every socket up front.
            .read_buffer_size(2048)
            // Write straight through; our own outbound queue does the batching.
            .write_buffer_size(0)
            .max_write_buffer_size(l.outbound_queue_bytes + l.max_message_bytes)
            .max_message_size(Some(l.max_message_bytes))
            .max_frame_size(Some(l.max_message_bytes))
    }
}

/// Open websocket sessions, with a cap. Taking a slot checks and counts in
/// one atomic step; the slot gives itself back exactly once, when dropped.
pub struct SessionSlots {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl SessionSlots {
    pub fn new(max: usize) -> SessionSlots {
        SessionSlots {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    pub fn try_take(self: &Arc<Self>) -> Option<SessionSlot> {
        let max = self.max.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!("herdgate_connections_open").increment(1.0);
        Some(SessionSlot(self.clone()))
    }

    /// A lower cap never closes open sessions; it only refuses new ones.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
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
