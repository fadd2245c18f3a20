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
use state::Shared;
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

/// A started server.
pub struct Running {
    pub shared: Arc<Shared>,
}

/// Start serving on already-bound listeners. Must be called inside a tokio runtime.
pub fn start(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
) -> Result<Running, tls::TlsError> {
    telemetry::init_metrics();
    let worker_role = config.cluster.role == config::Role::Worker;
    let shared = Shared::new(config)?;
    if let (true, router::Router::Local(pool)) = (worker_role, &shared.router) {
        // A worker serves edges on its link listener, not clients.
        let config = shared.live().config.clone();
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
            cluster::membership_for_worker(&config, id.clone(), advertised, shared.stopped.clone());
        let linked = cluster::worker_node::scale::Linked::default();
        if let Some(control) = membership.control.clone() {
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
            let _ = shared.worker.set(scale);
        }
        let node = cluster::worker_node::WorkerNode {
            id,
            pool: pool.clone(),
            heartbeat: c.heartbeat_interval.get(),
            edge_lease: c.edge_lease.get(),
            handover_timeout: c.handover_timeout.get(),
            tls: c.tls.clone(),
            secret: c.secret.clone(),
            membership,
            link_queue_bytes: cluster::LINK_QUEUE_BYTES,
            closing: shared.closing.clone(),
            status: shared.worker_status.clone(),
            linked,
        };
        shared
            .tasks
            .spawn(cluster::worker_node::serve(listener, node));
    } else {
        shared
            .tasks
            .spawn(listener::accept_loop(listener, shared.clone()));
    }
    overload::spawn_monitor(shared.clone());
    if let Some(admin) = admin {
        tokio::spawn(http::admin::serve(admin, shared.clone()));
    }
    Ok(Running { shared })
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
            Ok(new) => Ok(reload::apply(&self.shared, new)),
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
        reload::apply(&self.shared, new)
    }

    /// Graceful drain: `/readyz` turns 503 at once; the listener keeps
    /// accepting for `deregister_delay`, then closes; open sockets close
    /// (4200) each at a random moment within `drain_period`; HTTP requests in
    /// flight finish. Returns when every task has ended, or after the drain
    /// period plus `grace`.
    pub async fn shutdown(self) {
        let s = self.shared.live().config.shutdown.clone();
        tracing::info!(
            deregister_delay = ?s.deregister_delay.get(),
            drain_period = ?s.drain_period.get(),
            sessions = self.shared.sessions.open(),
            "draining"
        );
        self.shared.draining.cancel();
        if let Some(scale) = self.shared.worker.get() {
            // An etcd worker hands its rooms over before it goes.
            let deadline = self.shared.live().config.cluster.scale.drain_timeout.get();
            tracing::info!("draining: handing rooms over");
            scale.clone().leave(deadline).await;
        }
        tokio::time::sleep(s.deregister_delay.get()).await;
        self.shared.closing.cancel();
        self.shared.overload.begin_closing();
        self.shared.tasks.close();
        let deadline = s.drain_period.get() + s.grace.get();
        if tokio::time::timeout(deadline, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.shared.tasks.len(),
                "drain deadline passed with tasks still running"
            );
        }
        if let router::Router::Edge(edge) = &self.shared.router {
            // Its sockets are closed: out of the view now, not when its
            // lease runs out (a worker draining meanwhile waits for every
            // edge in the view at its handover barriers).
            edge.leave(std::time::Duration::from_secs(2)).await;
        }
        if let (Some(hooks), router::Router::Local(pool)) =
            (&self.shared.hooks, &self.shared.router)
        {
            // The drained rooms' vacated / member_removed go now rather
            // than after their debounce, and the queues get one timeout's
            // worth of time to empty.
            pool.flush_webhooks().await;
            let within = self.shared.live().config.webhooks.timeout.get();
            hooks.flush(within).await;
            if hooks.depth() > 0 {
                tracing::warn!(
                    events = hooks.depth(),
                    "stopping with webhook events not sent"
                );
            }
        }
        self.shared.stopped.cancel();
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
