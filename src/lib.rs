//! herdgate: a Pusher Channels (protocol 7) edge for realtime traffic.
//!
//! The modules follow the data: [`listener`] accepts (and admits) TCP
//! connections → [`http`] serves the HTTP API and upgrades websockets →
//! [`session`] speaks the protocol on one socket → [`router`] finds the
//! room's owner on the [`ring`] → [`worker`] holds rooms and fans out.
//!
//! [`start`] is the entry point tests use: bind listeners on `127.0.0.1:0`,
//! start, talk to it, shut it down.

pub mod apps;
pub mod auth;
pub mod config;
pub mod http;
pub mod listener;
pub mod notify;
pub mod protocol;
pub mod ring;
pub mod router;
pub mod session;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod worker;

use config::Config;
use state::Shared;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

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
    let shared = Shared::new(config)?;
    shared
        .tasks
        .spawn(listener::accept_loop(listener, shared.clone()));
    if let Some(admin) = admin {
        tokio::spawn(http::admin::serve(admin, shared.clone()));
    }
    Ok(Running { shared })
}

impl Running {
    /// Re-read what can change while serving (SIGHUP). For now: the TLS
    /// certificate; a failed reload keeps the old one and is logged.
    pub fn reload(&self) {
        if let Some(tls) = &self.shared.tls {
            match tls.store.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; still serving the previous one")
                }
            }
        }
    }

    /// Stop accepting, ask every session to close (4200, reconnect), let the
    /// HTTP API finish in-flight requests, and wait up to `deadline` for all
    /// tasks to end.
    pub async fn shutdown(self, deadline: Duration) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(deadline, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.shared.tasks.len(),
                "shutdown deadline passed with tasks still running"
            );
        }
        self.shared.stopped.cancel();
    }
}

/// Serve until `signal` resolves, then shut down gracefully.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    signal: impl Future<Output = ()>,
) -> Result<(), tls::TlsError> {
    let running = start(listener, admin, config)?;
    signal.await;
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
