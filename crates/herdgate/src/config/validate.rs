//! The second pass: check values, and report every problem with its dotted key.

use super::{Config, Role};
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

/// One problem in a config file, located by dotted key (`apps[1].secret`)
/// and, for parse errors, by line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub line_col: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            "(top level)"
        } else {
            &self.key
        };
        match self.line_col {
            Some((l, c)) => write!(f, "{key} (line {l}, column {c}): {}", self.message),
            None => write!(f, "{key}: {}", self.message),
        }
    }
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            line_col: None,
            message: message.into(),
        }
    }

    pub(super) fn from_toml(text: &str, path: &str, err: &toml::de::Error) -> Self {
        let line_col = err.span().map(|span| line_col(text, span.start));
        ConfigError {
            key: path.to_string(),
            line_col,
            message: err.message().to_string(),
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

pub(super) fn render(errors: &[ConfigError]) -> String {
    let mut out = format!("{} configuration error(s):", errors.len());
    for e in errors {
        out.push_str("\n  - ");
        out.push_str(&e.to_string());
    }
    out
}

pub(super) fn validate(c: &Config) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let mut err = |k: &str, m: String| errs.push(ConfigError::new(k, m));

    if c.server.listen.parse::<SocketAddr>().is_err() {
        err(
            "server.listen",
            format!(
                "{:?} is not an address like \"0.0.0.0:6001\"",
                c.server.listen
            ),
        );
    }
    if !c.server.admin_listen.is_empty() && c.server.admin_listen.parse::<SocketAddr>().is_err() {
        err(
            "server.admin_listen",
            format!(
                "{:?} is not an address like \"127.0.0.1:9601\" (or \"\" to disable)",
                c.server.admin_listen
            ),
        );
    }
    for (i, p) in c.server.trusted_proxies.iter().enumerate() {
        if let Err(e) = p.parse::<super::Cidr>() {
            err(&format!("server.trusted_proxies[{i}]"), e);
        }
    }
    if !(1..=65535).contains(&c.server.backlog) {
        err("server.backlog", "must be between 1 and 65535".into());
    }
    if c.server.workers > 1024 {
        err(
            "server.workers",
            "must be at most 1024 (0 means one per core)".into(),
        );
    }
    let secs = c.server.activity_timeout.get().as_secs();
    if !(1..=3600).contains(&secs) {
        err(
            "server.activity_timeout",
            "must be between 1s and 1h".into(),
        );
    }
    for (key, d) in [
        ("server.pong_timeout", c.server.pong_timeout),
        ("server.handshake_timeout", c.server.handshake_timeout),
        ("limits.write_timeout", c.limits.write_timeout),
    ] {
        if d.get().is_zero() {
            err(key, "must be greater than zero".into());
        }
    }

    let l = &c.limits;
    for (key, v) in [
        ("limits.max_connections", l.max_connections),
        ("limits.max_handshakes", l.max_handshakes),
        ("limits.max_admin_connections", l.max_admin_connections),
        (
            "limits.max_channels_per_connection",
            l.max_channels_per_connection,
        ),
        ("limits.max_payload_bytes", l.max_payload_bytes),
        ("limits.max_message_bytes", l.max_message_bytes),
        (
            "limits.client_events_per_second",
            l.client_events_per_second as usize,
        ),
        ("limits.max_presence_members", l.max_presence_members),
        ("limits.outbound_queue_messages", l.outbound_queue_messages),
        ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
        ("limits.worker_mailbox", l.worker_mailbox),
        ("limits.max_request_body_bytes", l.max_request_body_bytes),
        (
            "limits.max_request_header_bytes",
            l.max_request_header_bytes,
        ),
    ] {
        if v == 0 {
            err(key, "must be greater than zero".into());
        }
    }
    if l.max_message_bytes < l.max_payload_bytes {
        err(
            "limits.max_message_bytes",
            format!(
                "must be at least limits.max_payload_bytes ({})",
                l.max_payload_bytes
            ),
        );
    }
    if l.max_request_header_bytes < 8192 {
        err(
            "limits.max_request_header_bytes",
            "must be at least 8192 (hyper's minimum buffer)".into(),
        );
    }
    if l.outbound_queue_bytes < l.max_payload_bytes {
        err(
            "limits.outbound_queue_bytes",
            format!(
                "must be at least limits.max_payload_bytes ({}) so one event always fits",
                l.max_payload_bytes
            ),
        );
    }

    if l.new_connections_per_second == 0 || l.new_connections_burst == 0 {
        err(
            "limits.new_connections_per_second",
            "rate and limits.new_connections_burst must be greater than zero".into(),
        );
    }
    let o = &c.overload;
    if o.sample_interval.get() < std::time::Duration::from_millis(10) {
        err("overload.sample_interval", "must be at least 10ms".into());
    }
    if !(0.0..=0.9).contains(&o.hysteresis) {
        err("overload.hysteresis", "must be between 0 and 0.9".into());
    }
    for (key, t) in [
        ("overload.connections", o.connections),
        ("overload.accept_rate", o.accept_rate),
        ("overload.memory", o.memory),
        ("overload.scheduling_lag_ms", o.scheduling_lag_ms),
        ("overload.outbound_bytes", o.outbound_bytes),
        ("overload.mailbox_depth", o.mailbox_depth),
    ] {
        if !(t[0] > 0.0 && t[0] <= t[1] && t[1] <= t[2]) {
            err(key, format!("thresholds [pressured, degraded, critical] must be positive and ascending, got {t:?}"));
        }
    }
    let a = &o.actions;
    for p in &a.essential_prefixes {
        for (key, list) in [
            ("overload.actions.coalesce_prefixes", &a.coalesce_prefixes),
            (
                "overload.actions.nonessential_prefixes",
                &a.nonessential_prefixes,
            ),
        ] {
            if list
                .iter()
                .any(|q| q.starts_with(p.as_str()) || p.starts_with(q.as_str()))
            {
                err(
                    key,
                    format!("overlaps essential prefix {p:?}: essential channels are never shed"),
                );
            }
        }
    }
    if a.coalesce_interval.get().is_zero() {
        err(
            "overload.actions.coalesce_interval",
            "must be greater than zero".into(),
        );
    }
    let cl = &c.cluster;
    match &cl.role {
        Role::Standalone => {}
        Role::Worker => {
            if cl.link_listen.parse::<SocketAddr>().is_err() {
                err(
                    "cluster.link_listen",
                    format!(
                        "{:?}: a worker needs an address like \"0.0.0.0:7001\"",
                        cl.link_listen
                    ),
                );
            }
        }
        Role::Edge => {
            if cl.workers.is_empty() {
                err(
                    "cluster.workers",
                    "an edge needs at least one worker".into(),
                );
            }
            for (i, w) in cl.workers.iter().enumerate() {
                if w.parse::<SocketAddr>().is_err() {
                    err(
                        &format!("cluster.workers[{i}]"),
                        format!("{w:?} is not an address like \"10.0.0.5:7001\""),
                    );
                }
            }
        }
        Role::Invalid(_) => err("cluster.role", cl.role.problem().unwrap_or_default()),
    }
    if cl.heartbeat_interval.get().is_zero() {
        err(
            "cluster.heartbeat_interval",
            "must be greater than zero".into(),
        );
    }
    // Every edge must notice a worker change within the settle period: a
    // silent failure takes three heartbeats, a return one reconnect attempt.
    let noticed = cl.heartbeat_interval.get() * 3 + super::LINK_RECONNECT_CAP.mul_f64(1.5);
    if cl.role == Role::Edge && cl.settle.get() < noticed {
        err(
            "cluster.settle",
            format!("must be at least 3 × cluster.heartbeat_interval + 600ms ({noticed:?}), so every edge re-registers before publishes resume"),
        );
    }
    if tracing_subscriber::EnvFilter::try_new(&c.log.level).is_err() {
        err(
            "log.level",
            format!(
                "{:?} is not a tracing filter such as \"info\" or \"herdgate=debug\"",
                c.log.level
            ),
        );
    }
    if let Some(problem) = c.log.format.problem() {
        err("log.format", problem);
    }

    if let Some(tls) = &c.tls {
        if tls.handshake_timeout.get().is_zero() {
            err("tls.handshake_timeout", "must be greater than zero".into());
        }
    }
    if c.apps.is_empty() {
        err("apps", "at least one [[apps]] entry is required".into());
    }
    let (mut ids, mut keys) = (HashSet::new(), HashSet::new());
    for (i, app) in c.apps.iter().enumerate() {
        let k = |f: &str| format!("apps[{i}].{f}");
        for (field, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
            if value.is_empty() {
                err(&k(field), "must not be empty".into());
            } else if !value
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                err(
                    &k(field),
                    "may contain only ASCII letters, digits, '-', '_' and '.'".into(),
                );
            }
        }
        if !app.id.is_empty() && !ids.insert(app.id.as_str()) {
            err(&k("id"), format!("duplicate app id {:?}", app.id));
        }
        if !app.key.is_empty() && !keys.insert(app.key.as_str()) {
            err(&k("key"), format!("duplicate app key {:?}", app.key));
        }
    }
    errs
}
