//! herdgate: a Pusher Channels (protocol 7) edge for realtime traffic.
//!
//! The modules follow the data: [`listener`] accepts (and admits) TCP
//! connections → [`http`] serves the HTTP API and upgrades websockets →
//! [`session`] speaks the protocol on one socket → [`router`] finds the
//! room's owner on the [`ring`] → [`worker`] holds rooms and fans out — in
//! this process, or across the [`cluster`] link on another host.
//!
//! [`start`] is the entry point tests use: bind listeners on `127.0.0.1:0`,
//! start, talk to it, shut it down.
//!
//! No `unsafe` outside three modules, each of which says why in its docs:
//! [`sys`] (every libc call, one safe wrapper each), [`activation`] (claiming
//! the descriptors systemd passed) and [`outbound::direct`] (borrowing back
//! a socket's cached descriptor on the fan-out path).
#![deny(unsafe_code)]

pub mod accept;
pub mod activation;
pub mod admission;
pub mod apps;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod fnv;
pub mod http;
pub mod listener;
pub mod live;
pub mod notify;
pub mod op;
pub mod outbound;
pub mod overload;
pub mod pipe;
pub mod protocol;
pub mod ratelimit;
pub mod realaddr;
pub mod reload;
pub mod replays;
pub mod ring;
pub mod router;
pub mod session;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod webhook;
pub mod worker;

use config::Config;
use state::{Front, Node};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Parse and validate a config, including the files it names (the TLS
/// certificates and keys are loaded and checked): what `check-config` and a
/// reload use.
pub fn parse_config(text: &str) -> Result<Config, config::LoadError> {
    Config::from_toml_str_with(text, check_files)
}

/// [`parse_config`] on a file.
pub fn load_config(path: &std::path::Path) -> Result<Config, config::LoadError> {
    Config::from_file_with(path, check_files)
}

/// The second half of validation: what the values point at.
fn check_files(c: &Config) -> Vec<config::ConfigError> {
    let mut errs = Vec::new();
    if let Some(t) = &c.tls {
        if let Err(e) = tls::load_certified_key(t.cert.as_ref(), t.key.as_ref()) {
            let key = match e {
                tls::TlsError::Key { .. }
                | tls::TlsError::KeyType { .. }
                | tls::TlsError::Mismatch { .. } => "tls.key",
                _ => "tls.cert",
            };
            errs.push(config::ConfigError::new(key, e.to_string()));
        }
        if t.session_tickets && !t.ticket_keys.is_empty() {
            if let Err(e) = tls::tickets::load(std::path::Path::new(&t.ticket_keys)) {
                errs.push(config::ConfigError::new("tls.ticket_keys", e.to_string()));
            }
        }
    }
    if let Some(t) = &c.cluster.tls {
        if let Err(e) = cluster::tls::LinkTls::load(t) {
            errs.push(config::ConfigError::new("cluster.tls", e.to_string()));
        }
    }
    if !c.webhooks.ca.is_empty() {
        if let Err(e) = webhook::tls_check(&c.webhooks.ca) {
            errs.push(config::ConfigError::new("webhooks.ca", e));
        }
    }
    errs
}

/// A started server: the parts its role built.
pub struct Running {
    pub node: Arc<Node>,
    /// The client-facing side (standalone, edge); a worker has none.
    pub front: Option<Arc<Front>>,
    /// A cluster worker's ring handle (etcd), for the drain on shutdown.
    scale: Option<cluster::worker_node::scale::Scale>,
}

/// Start serving on already-bound listeners. Must be called inside a tokio
/// runtime. `listener` is the public listener of a standalone node or an
/// edge, and a worker's link listener. The roles are composed here and only
/// here: each builds the parts it uses ([`state`]).
pub fn start(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
) -> Result<Running, tls::TlsError> {
    telemetry::init_metrics();
    let (node, front, scale, worker_status) = match config.cluster.role {
        config::Role::Worker => {
            let (node, pool) = Node::local(config)?;
            let (scale, status) = start_worker(listener, &node, pool);
            overload::spawn_monitor(node.clone());
            (node, None, scale, Some(status))
        }
        config::Role::Edge => {
            let node = Node::edge(config)?;
            let front = start_front(listener, &node)?;
            (node, Some(front), None, None)
        }
        _ => {
            let (node, _) = Node::local(config)?;
            let front = start_front(listener, &node)?;
            (node, Some(front), None, None)
        }
    };
    if let Some(admin) = admin {
        let view = http::admin::Admin {
            node: node.clone(),
            front: front.clone(),
            worker_status,
        };
        tokio::spawn(http::admin::serve(admin, Arc::new(view)));
    }
    Ok(Running { node, front, scale })
}

/// A standalone node's or an edge's client-facing side, on the public listener.
fn start_front(listener: TcpListener, node: &Arc<Node>) -> Result<Arc<Front>, tls::TlsError> {
    let front = Front::new(node.clone())?;
    node.life
        .tasks
        .spawn(listener::accept_loop(listener, front.clone()));
    overload::spawn_monitor(front.clone());
    Ok(front)
}

/// A cluster worker: it serves edges on its link listener, not clients.
fn start_worker(
    listener: TcpListener,
    node: &Arc<Node>,
    pool: Arc<worker::Pool>,
) -> (
    Option<cluster::worker_node::scale::Scale>,
    Arc<std::sync::OnceLock<cluster::worker_node::StatusFn>>,
) {
    let config = node.live().config.clone();
    let c = &config.cluster;
    let id: cluster::view::NodeId = Arc::from(if c.node_id.is_empty() {
        c.advertised()
    } else {
        c.node_id.as_str()
    });
    // Edges dial `advertise`, else the address actually bound (port 0 resolved).
    let advertised = if c.advertise.is_empty() {
        listener
            .local_addr()
            .map_or_else(|_| c.link_listen.clone(), |a| a.to_string())
    } else {
        c.advertise.clone()
    };
    let membership =
        cluster::membership_for_worker(&config, id.clone(), advertised, node.life.stopped.clone());
    let linked = cluster::worker_node::scale::Linked::default();
    let scale = membership.control.clone().map(|control| {
        let scale = cluster::worker_node::scale::Scale {
            control,
            incarnation: membership.incarnation.clone(),
            target: c.weight,
            steps: c.scale.ramp_steps,
            interval: c.scale.ramp_interval.get(),
            linked: linked.clone(),
            link_wait: c.handover_timeout.get(),
        };
        tokio::spawn(scale.clone().join());
        scale
    });
    let status = Arc::default();
    let worker = cluster::worker_node::WorkerNode {
        id,
        pool,
        heartbeat: c.heartbeat_interval.get(),
        edge_lease: c.edge_lease.get(),
        handover_timeout: c.handover_timeout.get(),
        tls: c.tls.clone(),
        secret: c.secret.clone(),
        membership,
        link_queue_bytes: cluster::LINK_QUEUE_BYTES,
        closing: node.life.closing.clone(),
        status: Arc::clone(&status),
        linked,
    };
    node.life
        .tasks
        .spawn(cluster::worker_node::serve(listener, worker));
    (scale, status)
}

impl Running {
    /// Re-read the config file (SIGHUP): validated as a whole, applied live
    /// where it can be, the rest reported as needing a restart. An invalid
    /// file changes nothing.
    pub fn reload_from(
        &self,
        path: &std::path::Path,
    ) -> Result<Vec<&'static str>, config::LoadError> {
        match load_config(path) {
            Ok(new) => Ok(self.reload(new)),
            Err(e) => {
                metrics::counter!("herdgate_config_reloads_total", "result" => "invalid")
                    .increment(1);
                tracing::error!("config reload rejected, the running config stays: {e}");
                Err(e)
            }
        }
    }

    /// Apply an already-validated config (see [`Running::reload_from`]).
    pub fn reload(&self, new: Config) -> Vec<&'static str> {
        reload::apply(&self.node, self.front.as_deref(), new)
    }

    /// Open sessions (none on a worker).
    pub fn open_sessions(&self) -> usize {
        self.front.as_ref().map_or(0, |f| f.gate.sessions.open())
    }

    /// Graceful drain: `/readyz` turns 503 at once; the listener keeps
    /// accepting for `deregister_delay`, then closes; open sockets close
    /// (4200) each at a random moment within `drain_period`; HTTP requests in
    /// flight finish. Returns when every task has ended, or after the drain
    /// period plus `grace`.
    pub async fn shutdown(self) {
        let node = &self.node;
        let s = node.live().config.shutdown.clone();
        tracing::info!(
            deregister_delay = ?s.deregister_delay.get(),
            drain_period = ?s.drain_period.get(),
            sessions = self.open_sessions(),
            "draining"
        );
        node.life.draining.cancel();
        if let Some(scale) = &self.scale {
            // An etcd worker hands its rooms over before it goes.
            let deadline = node.live().config.cluster.scale.drain_timeout.get();
            tracing::info!("draining: handing rooms over");
            scale.clone().leave(deadline).await;
        }
        tokio::time::sleep(s.deregister_delay.get()).await;
        node.life.closing.cancel();
        node.overload.begin_closing();
        node.life.tasks.close();
        let deadline = s.drain_period.get() + s.grace.get();
        if tokio::time::timeout(deadline, node.life.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = node.life.tasks.len(),
                "drain deadline passed with tasks still running"
            );
        }
        if let router::Router::Edge(edge) = &node.router {
            // Its sockets are closed: out of the view now, not when its
            // lease runs out (a worker draining meanwhile waits for every
            // edge in the view at its handover barriers).
            edge.leave(std::time::Duration::from_secs(2)).await;
        }
        if let (Some(hooks), router::Router::Local(pool)) = (&node.hooks, &node.router) {
            // The drained rooms' vacated / member_removed go now rather
            // than after their debounce, and the queues get one timeout's
            // worth of time to empty.
            pool.flush_webhooks().await;
            let within = node.live().config.webhooks.timeout.get();
            hooks.flush(within).await;
            if hooks.depth() > 0 {
                tracing::warn!(
                    events = hooks.depth(),
                    "stopping with webhook events not sent"
                );
            }
        }
        node.life.stopped.cancel();
    }
}

/// Serve until `signal` resolves, then drain and stop.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    signal: impl Future<Output = ()>,
) -> Result<(), tls::TlsError> {
    let running = start(listener, admin, config)?;
    signal.await;
    running.shutdown().await;
    Ok(())
}
