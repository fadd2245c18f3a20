//! What every connection task shares: the live config and apps (swapped
//! whole on reload), the router, admission counters and the lifecycle tokens.

use crate::apps::Apps;
use crate::config::Config;
use crate::router::Router;
use arc_swap::ArcSwap;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Shared {
    live: ArcSwap<Live>,
    pub router: Router,
    pub sessions: Arc<crate::admission::Admission>,
    /// Connections not yet upgraded, per client IP (`limits.max_handshakes_per_ip`).
    pub handshakes: Arc<crate::admission::PerIp>,
    /// The public listener's accept permits (`limits.max_handshakes`), and
    /// whether its accept loop is waiting for one: a node whose permits are
    /// all held accepts nobody, so it says it is not ready.
    pub accept: crate::admission::AcceptPermits,
    /// Bytes of unfinished fragmented messages, node-wide (`limits.max_fragmented_bytes`).
    pub fragments: Arc<crate::ratelimit::FragmentBudget>,
    pub overload: crate::overload::Overload,
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
    /// A cluster worker's ring handle (etcd), for the drain on shutdown.
    pub worker: std::sync::OnceLock<crate::cluster::worker_node::scale::Scale>,
    /// A cluster worker's view of the cluster, for `/status`.
    pub worker_status: Arc<std::sync::OnceLock<crate::cluster::worker_node::StatusFn>>,
    /// Webhooks, where this node owns rooms (standalone, worker); edges emit none.
    pub hooks: Option<Arc<crate::webhook::Hooks>>,
    /// Per-app quota state on this node (limits from the live app config).
    pub quotas: crate::apps::Quotas,
    /// First answers to keyed (idempotent) HTTP API publishes.
    pub replays: crate::replays::Replays,
    /// Open HTTP fallback sessions (`xhr_streaming`, `xhr_polling`).
    pub pipes: crate::pipe::Pipes,
}

/// The part of the configuration that a reload (SIGHUP) swaps while serving.
pub struct Live {
    pub config: Config,
    pub apps: Apps,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<crate::config::Cidr>,
}

impl Live {
    fn new(config: Config) -> Live {
        let trusted_proxies = config
            .server
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        Live {
            apps: Apps::new(&config.apps),
            trusted_proxies,
            config,
        }
    }
}

/// TLS termination: the swappable certificate and the config over it.
pub struct Tls {
    pub store: Arc<crate::tls::CertStore>,
    pub config: Arc<rustls::ServerConfig>,
}

impl Shared {
    pub fn new(config: Config) -> Result<Arc<Shared>, crate::tls::TlsError> {
        let tls = match &config.tls {
            Some(t) => {
                let store = Arc::new(crate::tls::CertStore::load(
                    t.cert.as_ref(),
                    t.key.as_ref(),
                )?);
                let config = crate::tls::server_config(store.clone())?;
                Some(Tls { store, config })
            }
            None => None,
        };
        let l = &config.limits;
        let cl = &config.cluster;
        let stopped = CancellationToken::new();
        let overload = crate::overload::Overload::default();
        let mut webhooks = None;
        let router = if cl.role == crate::config::Role::Edge {
            let id: crate::cluster::view::NodeId = if cl.node_id.is_empty() {
                Arc::from(format!("edge-{:016x}", rand::random::<u64>()))
            } else {
                Arc::from(cl.node_id.as_str())
            };
            let membership =
                crate::cluster::membership_for_edge(&config, id.clone(), stopped.clone());
            let edge = crate::cluster::edge::Edge::start(crate::cluster::edge::EdgeConfig {
                id,
                membership,
                heartbeat: cl.heartbeat_interval.get(),
                handover_timeout: cl.handover_timeout.get(),
                tls: cl
                    .tls
                    .as_ref()
                    .map(crate::cluster::tls::LinkTls::load)
                    .transpose()?,
                secret: cl.secret.clone(),
                link_queue_bytes: crate::cluster::LINK_QUEUE_BYTES,
                rooms_actors: config.worker_count(),
            });
            Router::Edge(edge)
        } else {
            let hooks = crate::webhook::Hooks::start(&config, overload.state_reader())
                .map_err(crate::tls::TlsError::Config)?;
            let taps = crate::worker::WebhookTaps {
                hooks: hooks.clone(),
                debounce: config.webhooks.debounce.get(),
                debounce_max: config.webhooks.debounce_max,
            };
            webhooks = Some(hooks);
            let policies = Arc::new(arc_swap::ArcSwap::from_pointee(crate::worker::policies_of(
                &config,
            )));
            let load = overload.state_reader();
            Router::Local(Arc::new(crate::worker::Pool::start(
                config.worker_count(),
                l.worker_mailbox,
                Some(taps),
                policies,
                Arc::from(load),
            )))
        };
        Ok(Arc::new(Shared {
            sessions: crate::admission::Admission::new(l.max_connections),
            handshakes: Arc::default(),
            accept: crate::admission::AcceptPermits::new(l.max_handshakes),
            fragments: Arc::new(crate::ratelimit::FragmentBudget::new(
                l.max_fragmented_bytes,
            )),
            overload,
            hooks: webhooks,
            quotas: Default::default(),
            replays: Default::default(),
            pipes: Default::default(),
            router,
            live: ArcSwap::from_pointee(Live::new(config)),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            stopped,
            worker: std::sync::OnceLock::new(),
            worker_status: Arc::default(),
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
        self.fragments.set_max(config.limits.max_fragmented_bytes);
        self.live.store(Arc::new(Live::new(config)));
    }
}

impl crate::overload::Sampled for Shared {
    fn overload(&self) -> &crate::overload::Overload {
        &self.overload
    }
    fn overload_config(&self) -> crate::config::OverloadConfig {
        self.live().config.overload.clone()
    }
    fn open_sessions(&self) -> usize {
        self.sessions.open()
    }
    fn max_sessions(&self) -> usize {
        self.sessions.max()
    }
    fn mailbox_depth(&self) -> usize {
        self.router.max_mailbox_depth()
    }
    fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }
}

impl Live {
    /// Websocket settings for a new socket.
    pub fn ws_config(&self) -> WebSocketConfig {
        let l = &self.config.limits;
        // herdgate reads and writes its own frames (session::websocket,
        // session::ws_reader): only the two limits are used.
        WebSocketConfig::default()
            .max_message_size(Some(l.max_message_bytes))
            .max_frame_size(Some(l.max_message_bytes))
    }
}
