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
    validate_server(c, &mut err);
    validate_limits(&c.limits, &mut err);
    validate_overload(&c.overload, &mut err);
    validate_cluster(&c.cluster, &mut err);
    validate_log(c, &mut err);
    validate_compression(&c.compression, &mut err);
    validate_apps(c, &mut err);
    validate_webhooks(&c.webhooks, &mut err);
    errs
}

/// `[server]` and `[tls]`: addresses, sizes, timeouts.
fn validate_server(c: &Config, err: &mut impl FnMut(&str, String)) {
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
        ("server.ping_interval", c.server.ping_interval),
        ("server.pong_timeout", c.server.pong_timeout),
        ("server.handshake_timeout", c.server.handshake_timeout),
        ("limits.write_timeout", c.limits.write_timeout),
    ] {
        if d.get().is_zero() {
            err(key, "must be greater than zero".into());
        }
    }
    if let Some(tls) = &c.tls {
        let lifetime = tls.ticket_lifetime.get();
        if lifetime < std::time::Duration::from_secs(60)
            || lifetime > std::time::Duration::from_secs(7 * 24 * 3600)
        {
            err(
                "tls.ticket_lifetime",
                "must be between 1m and 7d (TLS 1.3 allows at most 7 days)".into(),
            );
        }
        if !tls.session_tickets && !tls.ticket_keys.is_empty() {
            err(
                "tls.ticket_keys",
                "set while tls.session_tickets is false: remove one of them".into(),
            );
        }
        if tls.ticket_keys_in_etcd {
            if !tls.session_tickets || !tls.ticket_keys.is_empty() {
                err(
                    "tls.ticket_keys_in_etcd",
                    "set with tls.ticket_keys or with tls.session_tickets = false: keep one of them".into(),
                );
            }
            if c.cluster.membership != super::Membership::Etcd {
                err(
                    "tls.ticket_keys_in_etcd",
                    "needs a cluster on etcd (cluster.membership = \"etcd\")".into(),
                );
            }
            if c.cluster.secret.len() < 16 {
                err(
                    "tls.ticket_keys_in_etcd",
                    "needs cluster.secret (at least 16 characters): the keys are sealed with it in etcd".into(),
                );
            }
        }
        if tls.handshake_timeout.get().is_zero() {
            err("tls.handshake_timeout", "must be greater than zero".into());
        }
    }
}

/// `[limits]`: every bound is positive, and the ones that must hold one
/// another do.
fn validate_limits(l: &super::LimitsConfig, err: &mut impl FnMut(&str, String)) {
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
        (
            "limits.channel_ops_per_second",
            l.channel_ops_per_second as usize,
        ),
        (
            "limits.auth_grant_checks_per_second",
            l.auth_grant_checks_per_second as usize,
        ),
        (
            "limits.max_http_sessions_per_ip",
            l.max_http_sessions_per_ip,
        ),
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
}

/// `[overload]`: thresholds ascend, and no shedding rule touches an
/// essential channel.
fn validate_overload(o: &super::OverloadConfig, err: &mut impl FnMut(&str, String)) {
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
}

fn validate_log(c: &Config, err: &mut impl FnMut(&str, String)) {
    if super::log_filter(&c.log.level).is_err() {
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
}

/// `[compression]`: a deflate level there is.
fn validate_compression(c: &super::CompressionConfig, err: &mut impl FnMut(&str, String)) {
    let max = super::MAX_COMPRESSION_MIN_BYTES;
    if c.min_bytes > max {
        err(
            "compression.min_bytes",
            format!("{} is over {max}", c.min_bytes),
        );
    }
    if !(1..=9).contains(&c.level) {
        err(
            "compression.level",
            format!("{} is not a deflate level from 1 to 9", c.level),
        );
    }
}

/// `[[apps]]`: unique ids and keys, and per-app limits that fit the node's.
fn validate_apps(c: &Config, err: &mut impl FnMut(&str, String)) {
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
        if app.require_user_authentication && app.user_authentication_timeout.get().is_zero() {
            err(
                &k("user_authentication_timeout"),
                "must be greater than zero".into(),
            );
        }
        if app.cache_ttl.get().is_zero() {
            err(&k("cache_ttl"), "must be greater than zero".into());
        }
        if app.cache_max_bytes < 1024 {
            err(&k("cache_max_bytes"), "must be at least 1024".into());
        }
        if !(1..=10_000).contains(&app.presence_full_members) {
            err(
                &k("presence_full_members"),
                "must be between 1 and 10000".into(),
            );
        }
        let every = app.presence_count_interval.get();
        if every < std::time::Duration::from_secs(1) || every > std::time::Duration::from_secs(60) {
            err(
                &k("presence_count_interval"),
                "must be between 1s and 60s".into(),
            );
        }
        if app.write_delay.get() > std::time::Duration::from_secs(1) {
            err(
                &k("write_delay"),
                "must be at most 1s (it is added to every delivery's latency)".into(),
            );
        }
        let ttl = app.auth_grant_ttl.get().as_secs();
        // A grant is a shortcut past the app's endpoint: minutes, not days.
        if !(10..=3600).contains(&ttl) {
            err(&k("auth_grant_ttl"), "must be between 10s and 1h".into());
        }
        let max_age = app.auth_grant_max_age.get().as_secs();
        if max_age < ttl || max_age > 24 * 3600 {
            err(
                &k("auth_grant_max_age"),
                "must be at least auth_grant_ttl and at most 24h".into(),
            );
        }
        // `auth` beginning with this is a grant presentation, never the
        // app's `KEY:SIGNATURE`.
        if app.key == "hg-grant.v1" {
            err(
                &k("key"),
                "\"hg-grant.v1\" is reserved (auth grants)".into(),
            );
        }
        if !(1..=65_536).contains(&app.max_user_info_bytes) {
            err(
                &k("max_user_info_bytes"),
                "must be between 1 and 65536".into(),
            );
        }
        // A replay goes into the socket's queue in one go: it must fit
        // beside what the socket is already sent.
        let replay_max = c.limits.outbound_queue_messages.saturating_sub(16);
        if app.history_max_events > replay_max {
            err(
                &k("history_max_events"),
                format!("must be at most limits.outbound_queue_messages - 16 ({replay_max}): a resume replays up to this many events into the socket's queue"),
            );
        }
        if app.history_ttl.get().is_zero() {
            err(&k("history_ttl"), "must be greater than zero".into());
        }
        if app.history_max_events > 0 && app.history_max_bytes < 1024 {
            err(&k("history_max_bytes"), "must be at least 1024".into());
        }
        for (j, rule) in app.history_channels.iter().enumerate() {
            let rk = |f: &str| k(&format!("history_channels[{j}].{f}"));
            if rule.prefix.is_empty() {
                err(
                    &rk("prefix"),
                    "must not be empty (set the app's history_max_events instead)".into(),
                );
            }
            if rule.max_events > replay_max {
                err(
                    &rk("max_events"),
                    format!("must be at most limits.outbound_queue_messages - 16 ({replay_max})"),
                );
            }
            if rule.ttl.is_some_and(|t| t.get().is_zero()) {
                err(&rk("ttl"), "must be greater than zero".into());
            }
        }
        for (j, rule) in app.conflation.iter().enumerate() {
            let rk = |f: &str| k(&format!("conflation[{j}].{f}"));
            if rule.prefix.is_empty() {
                err(&rk("prefix"), "must not be empty".into());
            }
            let field_ok = rule
                .key
                .strip_prefix("data.")
                .is_some_and(|f| !f.is_empty() && !f.contains('.'));
            if rule.key != "event" && !field_ok {
                err(
                    &rk("key"),
                    format!(
                        "{:?}: \"event\" or \"data.FIELD\" (a top-level field)",
                        rule.key
                    ),
                );
            }
            let ms = rule.interval.get().as_millis();
            if !(10..=60_000).contains(&ms) {
                err(&rk("interval"), "must be between 10ms and 60s".into());
            }
            if !(1..=10_000).contains(&rule.max_keys) {
                err(&rk("max_keys"), "must be between 1 and 10000".into());
            }
        }
        for (j, rule) in app.tallies.iter().enumerate() {
            let rk = |f: &str| k(&format!("tallies[{j}].{f}"));
            if rule.prefix.is_empty() {
                err(&rk("prefix"), "must not be empty".into());
            }
            if rule.events.is_empty() || rule.events.len() > 16 {
                err(&rk("events"), "must name 1 to 16 events".into());
            }
            for e in &rule.events {
                if e.is_empty() || e.len() > 200 || e.starts_with("herdgate:") {
                    err(
                        &rk("events"),
                        format!("{e:?} is not an event name that can be tallied"),
                    );
                }
            }
            if rule
                .field
                .as_ref()
                .is_some_and(|f| f.is_empty() || f.contains('.'))
            {
                err(&rk("field"), "a top-level field of the event's data".into());
            }
            if !(1..=256).contains(&rule.max_values) {
                err(&rk("max_values"), "must be between 1 and 256".into());
            }
            let ms = rule.interval.get().as_millis();
            if !(100..=60_000).contains(&ms) {
                err(&rk("interval"), "must be between 100ms and 60s".into());
            }
        }
        if app.max_watchlist > 1000 {
            err(&k("max_watchlist"), "must be at most 1000".into());
        }
        if app.max_channel_bans > super::MAX_CHANNEL_BANS {
            err(
                &k("max_channel_bans"),
                format!("must be at most {}", super::MAX_CHANNEL_BANS),
            );
        }
        // A presence snapshot at the member cap must fit a socket's queue
        // with room to spare, or every joiner would be closed as a slow
        // consumer (4100) and reconnect, forever.
        // Above `presence_full_members` a room is big: its snapshot lists
        // the featured members (at most that many) and the joiner.
        let listed = c
            .limits
            .max_presence_members
            .min(app.presence_full_members.saturating_add(1));
        let snapshot = presence_snapshot_bytes(listed, app.max_user_info_bytes);
        if c.limits.outbound_queue_bytes < snapshot + 64 * 1024 {
            err(
                &k("max_user_info_bytes"),
                format!(
                    "a presence snapshot of {} members (limits.max_presence_members, or presence_full_members + 1 in a big room) with {} bytes of user_info each can take {snapshot} bytes: limits.outbound_queue_bytes ({}) must be at least {}",
                    listed,
                    app.max_user_info_bytes,
                    c.limits.outbound_queue_bytes,
                    snapshot + 64 * 1024
                ),
            );
        }
        for (j, hook) in app.webhooks.iter().enumerate() {
            validate_webhook(hook, &format!("apps[{i}].webhooks[{j}]"), err);
        }
    }
}

/// The largest `pusher_internal:subscription_succeeded` of a presence
/// channel: per member its id twice (list and hash key) and its user_info,
/// each escaped into the data string (at most doubled), plus punctuation.
pub fn presence_snapshot_bytes(members: usize, user_info: usize) -> usize {
    let id = super::MAX_USER_ID;
    members * (2 * user_info + 4 * id + 32) + 256
}

/// Headers herdgate sets itself on every webhook request.
const OWN_HEADERS: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "x-pusher-key",
    "x-pusher-signature",
];

fn validate_webhook(hook: &super::WebhookConfig, at: &str, err: &mut impl FnMut(&str, String)) {
    if let Err(e) = webhook_url(&hook.url) {
        err(&format!("{at}.url"), format!("{:?}: {e}", hook.url));
    }
    if hook.event_types.is_empty() {
        err(
            &format!("{at}.event_types"),
            format!("must name at least one of {:?}", super::EVENT_TYPES),
        );
    }
    let mut seen = HashSet::new();
    for (n, t) in hook.event_types.iter().enumerate() {
        if !super::EVENT_TYPES.contains(&t.as_str()) {
            err(
                &format!("{at}.event_types[{n}]"),
                format!(
                    "{t:?} is not a webhook event type; one of {:?}",
                    super::EVENT_TYPES
                ),
            );
        } else if !seen.insert(t) {
            err(
                &format!("{at}.event_types[{n}]"),
                format!("{t:?} is listed twice"),
            );
        }
    }
    for (name, value) in &hook.headers {
        let key = format!("{at}.headers.{name}");
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => err(&key, "is not a valid HTTP header name".into()),
            Ok(h) if OWN_HEADERS.contains(&h.as_str()) => {
                err(&key, "is set by herdgate itself".into())
            }
            Ok(_) => {}
        }
        if http::HeaderValue::from_str(value).is_err() {
            err(&key, "is not a valid HTTP header value".into());
        }
    }
}

/// A webhook URL: `http` or `https`, a host, an optional port and path.
pub fn webhook_url(url: &str) -> Result<http::Uri, &'static str> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "not a URL like \"https://backend.example/pusher/webhooks\"")?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => {}
        _ => return Err("has no host"),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not carry credentials (use headers)");
    }
    Ok(uri)
}

fn validate_webhooks(w: &super::WebhooksConfig, err: &mut impl FnMut(&str, String)) {
    if w.timeout.get().is_zero() {
        err("webhooks.timeout", "must be greater than zero".into());
    }
    if w.retry_window.get() < w.timeout.get() {
        err(
            "webhooks.retry_window",
            "must be at least webhooks.timeout".into(),
        );
    }
    if !(1..=1000).contains(&w.batch_max_events) {
        err(
            "webhooks.batch_max_events",
            "must be between 1 and 1000".into(),
        );
    }
    if w.queue_events < w.batch_max_events {
        err(
            "webhooks.queue_events",
            "must be at least webhooks.batch_max_events".into(),
        );
    }
    if w.queue_bytes < 64 * 1024 {
        err("webhooks.queue_bytes", "must be at least 65536".into());
    }
    if w.debounce_max == 0 {
        err("webhooks.debounce_max", "must be greater than zero".into());
    }
}

fn validate_cluster(cl: &super::ClusterConfig, err: &mut impl FnMut(&str, String)) {
    use super::Membership;
    use std::time::Duration;
    if cl.settle.is_some() {
        err(
            "cluster.settle",
            "was removed: rooms now move through a handover barrier; set cluster.handover_timeout instead".into(),
        );
    }
    if let Some(p) = cl.membership.problem() {
        err("cluster.membership", p);
    }
    if let Role::Invalid(_) = cl.role {
        err("cluster.role", cl.role.problem().unwrap_or_default());
    }
    let clustered = matches!(cl.role, Role::Edge | Role::Worker);
    let addr_ok = |a: &str| a.parse::<SocketAddr>().is_ok();
    if cl.role == Role::Worker && !addr_ok(&cl.link_listen) {
        err(
            "cluster.link_listen",
            format!(
                "{:?}: a worker needs an address like \"0.0.0.0:7001\"",
                cl.link_listen
            ),
        );
    }
    if cl.role == Role::Worker
        && !cl.advertise.is_empty()
        && cl.advertise.rsplit_once(':').is_none()
    {
        err(
            "cluster.advertise",
            format!("{:?} is not a host:port edges can dial", cl.advertise),
        );
    }
    if cl.role == Role::Worker
        && cl.membership == Membership::Etcd
        && cl.advertise.is_empty()
        && cl
            .link_listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_unspecified())
    {
        err(
            "cluster.advertise",
            "link_listen is a wildcard address: set the address edges dial".into(),
        );
    }
    match cl.membership {
        Membership::Static => {
            if cl.role == Role::Edge && cl.workers.is_empty() {
                err(
                    "cluster.workers",
                    "an edge with static membership needs at least one worker".into(),
                );
            }
            for (i, w) in cl.workers.iter().enumerate() {
                if !addr_ok(w) {
                    err(
                        &format!("cluster.workers[{i}]"),
                        format!("{w:?} is not an address like \"10.0.0.5:7001\""),
                    );
                }
            }
        }
        Membership::Etcd => {
            if !cfg!(feature = "etcd") {
                err(
                    "cluster.membership",
                    "this herdgate was built without etcd support: build it with `--features etcd`"
                        .into(),
                );
            }
            if clustered && cl.node_id.is_empty() {
                err(
                    "cluster.node_id",
                    "required with membership = \"etcd\": a name unique in the cluster, e.g. \"w1\"".into(),
                );
            }
            if !cl.workers.is_empty() {
                err(
                    "cluster.workers",
                    "only for membership = \"static\": with etcd, workers register themselves"
                        .into(),
                );
            }
            let e = &cl.etcd;
            if clustered && e.endpoints.is_empty() {
                err(
                    "cluster.etcd.endpoints",
                    "at least one etcd client URL is required".into(),
                );
            }
            for (i, ep) in e.endpoints.iter().enumerate() {
                if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                    err(
                        &format!("cluster.etcd.endpoints[{i}]"),
                        format!("{ep:?} is not a URL like \"http://10.0.0.2:2379\""),
                    );
                }
            }
            if !e.prefix.starts_with('/') || e.prefix.ends_with('/') {
                err(
                    "cluster.etcd.prefix",
                    format!("{:?}: must start with '/' and not end with one", e.prefix),
                );
            }
            let ttl = e.lease_ttl.get();
            if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
                err(
                    "cluster.etcd.lease_ttl",
                    "must be whole seconds, at least 2s (etcd's minimum with its default election timeout)".into(),
                );
            }
            let ka = e.keepalive_interval.get();
            if ka.is_zero() || ka > ttl / 4 {
                err(
                    "cluster.etcd.keepalive_interval",
                    format!(
                        "must be greater than zero and at most lease_ttl / 4 ({:?})",
                        ttl / 4
                    ),
                );
            }
            if e.fence_margin.get() >= ttl.saturating_sub(ka * 2) {
                err(
                    "cluster.etcd.fence_margin",
                    "must be less than lease_ttl - 2 x keepalive_interval".into(),
                );
            } else {
                // The freeze (docs/CLUSTER.md "etcd lost"): peers say they
                // lost etcd after 2 keepalives, within a heartbeat, and it
                // must be decided before a lease renewed one keepalive
                // before the loss runs out.
                let needed = ka * 3 + e.fence_margin.get() + cl.heartbeat_interval.get() * 5 / 4;
                if needed >= ttl {
                    err(
                        "cluster.etcd.lease_ttl",
                        format!(
                            "must exceed 3 x keepalive_interval + fence_margin + 1.25 x cluster.heartbeat_interval ({needed:?}), so that the cluster can freeze its membership before leases run out when etcd is lost"
                        ),
                    );
                }
            }
            if e.request_timeout.get().is_zero() {
                err(
                    "cluster.etcd.request_timeout",
                    "must be greater than zero".into(),
                );
            }
        }
        Membership::Invalid(_) => {}
    }
    if cl.heartbeat_interval.get().is_zero() {
        err(
            "cluster.heartbeat_interval",
            "must be greater than zero".into(),
        );
    }
    if cl.handover_timeout.get() < cl.heartbeat_interval.get() * 3 {
        err(
            "cluster.handover_timeout",
            "must be at least 3 x cluster.heartbeat_interval".into(),
        );
    }
    if cl.weight == 0 || cl.weight > 1024 {
        err("cluster.weight", "must be between 1 and 1024".into());
    }
    if cl.role == Role::Edge && cl.tls.is_some() && cl.node_id.is_empty() {
        err(
            "cluster.node_id",
            "required for an edge with [cluster.tls]: workers accept an edge only if its certificate names this id (a DNS subject alternative name)".into(),
        );
    }
    if clustered && cl.tls.is_none() && cl.secret.len() < 16 {
        err(
            "cluster.secret",
            "the link must be authenticated: set [cluster.tls] or a secret of at least 16 characters".into(),
        );
    }
    if cl.scale.ramp_steps == 0 {
        err("cluster.scale.ramp_steps", "must be at least 1".into());
    }
}
