//! Live reconfiguration (SIGHUP).
//!
//! The new file has already passed validation as a whole. Everything that
//! sessions and the HTTP API read per use (apps and their secrets, limits,
//! timeouts for new sockets, drain settings) takes effect by swapping the live
//! config; the log level through the subscriber's reload handle; the TLS
//! certificate through its store. What is bound at start (listen addresses,
//! worker count and mailboxes, the handshake permits, TLS on/off, log format,
//! the cluster role, membership and worker list)
//! is reported as needing a restart and keeps its running value, so the live
//! config always describes what is really in force.

use crate::config::Config;
use crate::state::{Front, Node};
use std::sync::Arc;

/// Apply `new` to `node` and, where it has one, its client-facing side;
/// returns the dotted keys that changed but need a restart.
pub fn apply(node: &Node, front: Option<&Front>, mut new: Config) -> Vec<&'static str> {
    let old = node.live();
    let o = &old.config;
    let mut restart = Vec::new();
    macro_rules! fixed {
        ($($field:ident).+, $key:literal) => {
            if new.$($field).+ != o.$($field).+ {
                restart.push($key);
                new.$($field).+ = o.$($field).+.clone();
            }
        };
    }
    fixed!(server.listen, "server.listen");
    fixed!(server.admin_listen, "server.admin_listen");
    fixed!(server.backlog, "server.backlog");
    fixed!(server.workers, "server.workers");
    fixed!(limits.worker_mailbox, "limits.worker_mailbox");
    fixed!(limits.max_handshakes, "limits.max_handshakes");
    fixed!(limits.max_admin_connections, "limits.max_admin_connections");
    fixed!(log.format, "log.format");
    fixed!(cluster.role, "cluster.role");
    fixed!(cluster.link_listen, "cluster.link_listen");
    // A static worker list changes only with every edge restarted at once
    // (edges that disagreed during a rolling change would route rooms to two
    // owners); with etcd, workers join and leave without any config change.
    fixed!(cluster.workers, "cluster.workers");
    fixed!(cluster.membership, "cluster.membership");
    fixed!(cluster.node_id, "cluster.node_id");
    fixed!(cluster.advertise, "cluster.advertise");
    fixed!(cluster.secret, "cluster.secret");
    // Ticket keys rotate live (the file is re-read); turning tickets on or
    // off, to or from shared keys, and their lifetime are fixed at start.
    if let (Some(was), Some(t)) = (&o.tls, new.tls.as_mut()) {
        let keyed = |k: &str| !k.is_empty();
        if was.session_tickets != t.session_tickets
            || keyed(&was.ticket_keys) != keyed(&t.ticket_keys)
            || was.ticket_lifetime != t.ticket_lifetime
            || was.ticket_keys_in_etcd != t.ticket_keys_in_etcd
        {
            restart.push("tls.session_tickets");
            t.session_tickets = was.session_tickets;
            t.ticket_lifetime = was.ticket_lifetime;
            t.ticket_keys = was.ticket_keys.clone();
            t.ticket_keys_in_etcd = was.ticket_keys_in_etcd;
        }
    }
    match (&o.tls, &new.tls, front.and_then(|f| f.tls.as_ref())) {
        (Some(_), Some(t), Some(tls)) => {
            if let Err(e) = tls.store.reload_from(t.cert.as_ref(), t.key.as_ref()) {
                tracing::error!(error = %e, "TLS certificate reload failed; still serving the previous one");
            }
            // Keys from etcd follow etcd, not the config.
            if let Some(tickets) = tls.tickets.as_ref().filter(|_| !t.ticket_keys_in_etcd) {
                // Validated with the whole file: a failure here is a file
                // changed again since.
                match crate::tls::tickets::load(std::path::Path::new(&t.ticket_keys)) {
                    Ok(keys) => {
                        tickets.set_keys(&keys);
                        tracing::info!(keys = keys.len(), "TLS ticket keys reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS ticket keys not reloaded; the previous ones stay"
                    ),
                }
            }
        }
        // A worker terminates no client TLS: its `[tls]` is not in use.
        (Some(_), Some(_), None) | (None, None, _) => {}
        _ => {
            restart.push("tls");
            new.tls = o.tls.clone();
        }
    }
    if new.log.level != o.log.level {
        crate::telemetry::set_log_level(&new.log.level);
    }
    if let crate::router::Router::Local(pool) = &node.router {
        pool.policies
            .store(Arc::new(crate::worker::policies_of(&new)));
    }
    if let Some(hooks) = &node.hooks {
        if let Err(e) = hooks.reload(&new) {
            tracing::error!(error = %e, "webhooks not reloaded; the previous ones stay");
        }
    }
    drop(old);
    if let Some(front) = front {
        front.swap_limits(&new);
    }
    node.swap_live(new);
    // Open sessions check their app against it: a removed key, a disabled
    // app or a rotated secret closes them (docs/SECURITY.md "Config reload").
    node.overload.reloaded();
    metrics::counter!("herdgate_config_reloads_total", "result" => "ok").increment(1);
    if restart.is_empty() {
        tracing::info!("config reloaded");
    } else {
        tracing::warn!(needs_restart = ?restart, "config reloaded; some changes need a restart and were not applied");
    }
    restart
}
