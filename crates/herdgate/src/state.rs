//! A node's parts, built per role: each role builds only what it uses.
//!
//! - [`Node`] — every role: the live config, the load state, the lifecycle
//!   and the rooms' owner (this process's workers, or the cluster edge).
//! - [`Front`] — the client-facing side of a standalone node or an edge:
//!   admission, TLS, and the state of the HTTP API and its fallback. A
//!   cluster worker serves edges on its link and builds none of it.
//! - [`SessionContext`] — the one part of them a session reads.
//!
//! The roles are composed in [`crate::start`] (like linkerd's `app`, the one
//! place that branches on the role); the modules below take the part they need.

use crate::config::Config;
pub use crate::live::Live;
use crate::live::LiveCell;
use crate::router::Router;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every role shares.
pub struct Node {
    live: LiveCell,
    pub overload: crate::overload::Overload,
    pub life: Lifecycle,
    /// Where rooms live: this process's workers, or remote ones.
    pub router: Router,
    /// Webhooks, where this node owns rooms (standalone, worker); edges emit none.
    pub hooks: Option<Arc<crate::webhook::Hooks>>,
}

/// The stages of a graceful stop, and the tasks it waits for.
#[derive(Default)]
pub struct Lifecycle {
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
}

/// The client-facing side: a standalone node's or an edge's.
pub struct Front {
    pub node: Arc<Node>,
    /// What every session of this node reads (one pointer in each session).
    pub session: Arc<SessionContext>,
    /// Who may connect, and how many at once.
    pub gate: crate::admission::Gate,
    /// Bytes of unfinished fragmented messages, node-wide (`limits.max_fragmented_bytes`).
    pub fragments: Arc<crate::ratelimit::FragmentBudget>,
    pub tls: Option<Tls>,
    /// First answers to keyed (idempotent) HTTP API publishes.
    pub replays: crate::replays::Replays,
    /// Open HTTP fallback sessions (`xhr_streaming`, `xhr_polling`).
    pub pipes: crate::pipe::Pipes,
}

/// What a session reads of its node, and nothing else: the live config,
/// the load state and the rooms' owner (all in [`Node`]), and the per-app
/// quotas. One per node, shared by every session through one pointer.
pub struct SessionContext {
    pub node: Arc<Node>,
    /// Per-app quota state on this node (limits from the live app config).
    pub quotas: crate::apps::Quotas,
    /// Auth grant signature checks, node-wide
    /// (`limits.auth_grant_checks_per_second`, burst twice that).
    grant_checks: std::sync::Mutex<Option<(u32, crate::ratelimit::TokenBucket)>>,
}

impl SessionContext {
    pub fn new(node: Arc<Node>) -> Arc<SessionContext> {
        Arc::new(SessionContext {
            node,
            quotas: Default::default(),
            grant_checks: Default::default(),
        })
    }

    /// One auth grant signature check, if the node's budget has one.
    pub fn grant_checks(&self) -> bool {
        let rate = self.node.live().config.limits.auth_grant_checks_per_second;
        let now = crate::clock::Instant::now();
        let mut b = self.grant_checks.lock().unwrap_or_else(|p| p.into_inner());
        // A reload that changes the rate starts a bucket at the new one.
        if b.as_ref().is_none_or(|(r, _)| *r != rate) {
            let bucket = crate::ratelimit::TokenBucket::new(rate, rate.saturating_mul(2), now);
            *b = Some((rate, bucket));
        }
        b.as_mut().is_some_and(|(_, bucket)| bucket.try_take(now))
    }
}

/// TLS termination: the swappable certificate and the config over it.
pub struct Tls {
    pub store: Arc<crate::tls::CertStore>,
    pub config: Arc<rustls::ServerConfig>,
    /// Session tickets under the keys of `tls.ticket_keys`, rotated on reload.
    pub tickets: Option<Arc<crate::tls::tickets::SharedTickets>>,
}

impl Node {
    /// A node whose rooms are on this process's workers (standalone,
    /// worker), with their webhooks; and the workers, for a worker's link.
    pub fn local(
        config: Config,
    ) -> Result<(Arc<Node>, Arc<crate::worker::Pool>), crate::tls::TlsError> {
        let overload = crate::overload::Overload::default();
        let (pool, hooks) = local_pool(&config, &overload)?;
        let router = Router::Local(pool.clone());
        let node = Node::with(config, overload, Lifecycle::default(), router, Some(hooks));
        Ok((node, pool))
    }

    /// A cluster edge's node: its rooms are on the cluster's workers.
    pub fn edge(config: Config) -> Result<Arc<Node>, crate::tls::TlsError> {
        let life = Lifecycle::default();
        let router = edge_router(&config, life.stopped.clone())?;
        let overload = crate::overload::Overload::default();
        Ok(Node::with(config, overload, life, router, None))
    }

    fn with(
        config: Config,
        overload: crate::overload::Overload,
        life: Lifecycle,
        router: Router,
        hooks: Option<Arc<crate::webhook::Hooks>>,
    ) -> Arc<Node> {
        Arc::new(Node {
            live: LiveCell::new(config),
            overload,
            life,
            router,
            hooks,
        })
    }

    /// The configuration in force now. Cheap: an atomic load and a refcount.
    pub fn live(&self) -> Arc<Live> {
        self.live.load()
    }

    /// Put a new (validated) configuration in force for everything that
    /// reads it from now on (the front's limits: [`Front::swap_limits`]).
    pub fn swap_live(&self, config: Config) {
        self.live.store(config);
    }
}

/// A standalone node's or a worker's rooms: this process's workers, with
/// their webhooks.
fn local_pool(
    config: &Config,
    overload: &crate::overload::Overload,
) -> Result<(Arc<crate::worker::Pool>, Arc<crate::webhook::Hooks>), crate::tls::TlsError> {
    let hooks = crate::webhook::Hooks::start(config, overload.state_reader())
        .map_err(crate::tls::TlsError::Config)?;
    let taps = crate::worker::WebhookTaps {
        hooks: hooks.clone(),
        debounce: config.webhooks.debounce.get(),
        debounce_max: config.webhooks.debounce_max,
    };
    let policies = Arc::new(arc_swap::ArcSwap::from_pointee(crate::worker::policies_of(
        config,
    )));
    let pool = crate::worker::Pool::start(
        config.worker_count(),
        config.limits.worker_mailbox,
        Some(taps),
        policies,
        Arc::from(overload.state_reader()),
    );
    Ok((Arc::new(pool), hooks))
}

/// An edge's rooms: on the cluster's workers, through its links.
fn edge_router(
    config: &Config,
    stopped: CancellationToken,
) -> Result<Router, crate::tls::TlsError> {
    let cl = &config.cluster;
    let id: crate::cluster::view::NodeId = if cl.node_id.is_empty() {
        Arc::from(format!("edge-{:016x}", rand::random::<u64>()))
    } else {
        Arc::from(cl.node_id.as_str())
    };
    let membership = crate::cluster::membership_for_edge(config, id.clone(), stopped);
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
    Ok(Router::Edge(edge))
}

impl Front {
    /// The client-facing side over `node`, sized by its config.
    pub fn new(node: Arc<Node>) -> Result<Arc<Front>, crate::tls::TlsError> {
        let live = node.live();
        let tls = match &live.config.tls {
            Some(t) => {
                let store = Arc::new(crate::tls::CertStore::load(
                    t.cert.as_ref(),
                    t.key.as_ref(),
                )?);
                let (config, tickets) = crate::tls::server_config_for(store.clone(), t)?;
                #[cfg(feature = "etcd")]
                if let Some(shared) = tickets.as_ref().filter(|_| t.ticket_keys_in_etcd) {
                    crate::cluster::membership::ticket_keys::spawn(
                        &live.config.cluster.etcd,
                        &live.config.cluster.secret,
                        shared.clone(),
                        t.ticket_lifetime.get(),
                        node.life.stopped.clone(),
                    );
                }
                Some(Tls {
                    store,
                    config,
                    tickets,
                })
            }
            None => None,
        };
        let l = &live.config.limits;
        Ok(Arc::new(Front {
            session: SessionContext::new(node.clone()),
            gate: crate::admission::Gate::new(l.max_connections, l.max_handshakes),
            fragments: Arc::new(crate::ratelimit::FragmentBudget::new(
                l.max_fragmented_bytes,
            )),
            tls,
            replays: Default::default(),
            pipes: Default::default(),
            node,
        }))
    }

    /// The configuration in force now.
    pub fn live(&self) -> Arc<Live> {
        self.node.live()
    }

    /// Per-app quota state on this node (limits from the live app config).
    pub fn quotas(&self) -> &crate::apps::Quotas {
        &self.session.quotas
    }

    /// Resize the front's node-wide caps to a reloaded config.
    pub fn swap_limits(&self, config: &Config) {
        self.gate.sessions.set_max(config.limits.max_connections);
        self.fragments.set_max(config.limits.max_fragmented_bytes);
    }
}

/// The overload monitor's view of a node with a front: its sessions count.
impl crate::overload::Sampled for Front {
    fn overload(&self) -> &crate::overload::Overload {
        &self.node.overload
    }
    fn overload_config(&self) -> crate::config::OverloadConfig {
        self.node.live().config.overload.clone()
    }
    fn open_sessions(&self) -> usize {
        self.gate.sessions.open()
    }
    fn max_sessions(&self) -> usize {
        self.gate.sessions.max()
    }
    fn mailbox_depth(&self) -> usize {
        self.node.router.max_mailbox_depth()
    }
    fn stopped(&self) -> &CancellationToken {
        &self.node.life.stopped
    }
}

/// A cluster worker's: no sessions, its rooms' mailboxes.
impl crate::overload::Sampled for Node {
    fn overload(&self) -> &crate::overload::Overload {
        &self.overload
    }
    fn overload_config(&self) -> crate::config::OverloadConfig {
        self.live().config.overload.clone()
    }
    fn open_sessions(&self) -> usize {
        0
    }
    fn max_sessions(&self) -> usize {
        0
    }
    fn mailbox_depth(&self) -> usize {
        self.router.max_mailbox_depth()
    }
    fn stopped(&self) -> &CancellationToken {
        &self.life.stopped
    }
}
