//! TOML configuration.
//!
//! Loading is two passes, as in rathole and Vector: serde with
//! `deny_unknown_fields` turns the text into typed structs (a typo in a key is
//! an error with its line and column, not a silently ignored option), then
//! [`validate`] checks the values and reports *every* problem with its dotted
//! key, so an operator fixes a file in one round instead of one error per try.

mod duration;
mod env;
mod net;
#[macro_use]
mod words;
mod overload;
mod validate;
mod webhooks;

pub use duration::HumanDuration;
pub use net::Cidr;
pub use overload::{ActionsConfig, From as ActionFrom, LoadState, OverloadConfig};
pub use validate::{presence_snapshot_bytes, webhook_url, ConfigError};
pub use webhooks::{WebhookConfig, WebhookFilter, WebhooksConfig, EVENT_TYPES};

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// Longest user id (presence `user_id`, sign-in `id`), in bytes.
pub const MAX_USER_ID: usize = 200;

/// Largest `compression.min_bytes`: the socket's deflate settings pack it
/// into 24 bits (`protocol::deflate::Deflate`).
pub const MAX_COMPRESSION_MIN_BYTES: u32 = (1 << 24) - 1;

/// A `log.level` (or `RUST_LOG`) filter. Field values are matched as
/// plain text, never compiled as regular expressions: a filter such as
/// `x[{f="(a+)+…"}]` would otherwise build an automaton exponential in its
/// length (found by the config fuzz target: gigabytes at start).
pub fn log_filter(
    filter: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
}

/// The shipped, commented configuration. It is also the embedded default that
/// `herdgate` runs with when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../../config/herdgate.toml");

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub overload: OverloadConfig,
    pub cluster: ClusterConfig,
    pub webhooks: WebhooksConfig,
    pub admin: AdminConfig,
    pub compression: CompressionConfig,
    /// Present: `listen` serves TLS (wss://, https://). Absent: plain.
    pub tls: Option<TlsConfig>,
    pub apps: Vec<AppConfig>,
}

/// `[admin]`: who may read the admin listener (`server.admin_listen`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Set: every path but `/livez` and `/readyz` needs
    /// `Authorization: Bearer <token>` (or `?token=<token>`, which the
    /// status page passes on); 401 otherwise. Empty: no token.
    pub token: String,
    /// Host names (besides IP literals and `localhost`) the admin listener
    /// answers to; any other `Host` gets 421, so a web page cannot read it
    /// through DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

/// `[compression]`: permessage-deflate (RFC 7692) for websocket clients
/// that offer it (every browser does). Each broadcast is compressed once
/// and the bytes shared (`protocol::deflate`); no window is kept per socket.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Accept a client's offer of permessage-deflate. New sockets only: a
    /// reload does not change what open sockets negotiated.
    pub enabled: bool,
    /// Messages shorter than this go uncompressed (deflate gains little
    /// on them and costs a compression each).
    pub min_bytes: u32,
    /// Deflate level, 1 (fastest) to 9 (smallest).
    pub level: u8,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            min_bytes: 256,
            level: 6,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1; ECDSA, Ed25519 or RSA).
    pub key: String,
    /// Deadline for a client to complete the TLS handshake.
    #[serde(default = "tls_handshake_timeout")]
    pub handshake_timeout: HumanDuration,
    /// Stateless session tickets, so a reconnecting client resumes its TLS
    /// session (an abbreviated handshake) rather than paying a full one.
    #[serde(default = "yes")]
    pub session_tickets: bool,
    /// A file of ticket keys shared by every edge of the deployment (one
    /// 64-hex-digit key per line; the first seals, all open): a client
    /// resumes on any edge. Empty: per-process random keys (rustls's),
    /// resumption on the same process only. See `tls::tickets`.
    #[serde(default)]
    pub ticket_keys: String,
    /// Edges of a cluster on etcd keep their ticket keys there instead:
    /// made and rotated (every `ticket_lifetime`) by the edges, no file.
    /// See `cluster::membership::ticket_keys`.
    #[serde(default)]
    pub ticket_keys_in_etcd: bool,
    /// How long a ticket resumes a session (also the hint sent to clients).
    /// Keep a rotated-out key in `ticket_keys` this long.
    #[serde(default = "tls_ticket_lifetime")]
    pub ticket_lifetime: HumanDuration,
}

fn tls_handshake_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

fn tls_ticket_lifetime() -> HumanDuration {
    HumanDuration::secs(6 * 3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client websockets and the HTTP API.
    pub listen: String,
    /// Health and metrics. Empty string disables the admin listener.
    pub admin_listen: String,
    /// Accept backlog of the public listener (capped by net.core.somaxconn).
    pub backlog: u32,
    /// `SO_REUSEPORT` on the public listener: several herdgate processes
    /// (the edges of one host, each within its own open-files limit) share
    /// `listen`, and the kernel spreads new connections over them.
    pub reuse_port: bool,
    /// Realtime workers (room owners), and the runtime's threads. 0 = one
    /// per core.
    pub workers: usize,
    /// Sent to clients in `pusher:connection_established` (pusher-js pings
    /// after that much silence from the server).
    pub activity_timeout: HumanDuration,
    /// The server pings a socket that was silent this long (at most
    /// `activity_timeout`): a peer that vanished is closed — its members
    /// removed — within `ping_interval + pong_timeout` (75 s by default).
    pub ping_interval: HumanDuration,
    /// How long a pinged socket has to answer before it is closed with 4201.
    pub pong_timeout: HumanDuration,
    /// One deadline from accept to upgrade: PROXY header, TLS handshake and
    /// the complete HTTP request head, in all.
    pub handshake_timeout: HumanDuration,
    /// Every connection to `listen` starts with a PROXY protocol v1 or v2
    /// header from the load balancer; connections without one are dropped.
    pub proxy_protocol: bool,
    /// Peers (CIDR blocks) whose `X-Forwarded-For` names the real client.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:6001".into(),
            admin_listen: "127.0.0.1:9601".into(),
            backlog: 4096,
            reuse_port: false,
            workers: 0,
            activity_timeout: HumanDuration::secs(120),
            ping_interval: HumanDuration::secs(45),
            pong_timeout: HumanDuration::secs(30),
            handshake_timeout: HumanDuration::secs(10),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open websocket sessions on this node; upgrades beyond it get 503.
    pub max_connections: usize,
    /// TCP connections not (yet) upgraded: handshakes in progress and HTTP API
    /// keep-alives. The accept loop waits for one to end beyond it.
    pub max_handshakes: usize,
    /// Of those, per client IP; beyond it a new connection is closed at once. 0 = off.
    pub max_handshakes_per_ip: usize,
    /// Admin listener connections at once; beyond it its accept loop waits.
    pub max_admin_connections: usize,
    /// Channels one socket may be subscribed to at once.
    pub max_channels_per_connection: usize,
    /// Largest event `data` accepted from the HTTP API or a client event.
    pub max_payload_bytes: usize,
    /// Largest websocket message a client may send (close 1009 beyond it).
    pub max_message_bytes: usize,
    /// Client events per second per socket (burst of the same size).
    pub client_events_per_second: u32,
    /// Distinct users in one presence channel.
    pub max_presence_members: usize,
    /// Frames waiting to be written to one socket before it counts as a slow consumer.
    pub outbound_queue_messages: usize,
    /// Bytes waiting to be written to one socket before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Commands waiting in one worker's mailbox.
    pub worker_mailbox: usize,
    /// Largest HTTP API request body (413 beyond it).
    pub max_request_body_bytes: usize,
    /// New websocket sessions per second, node-wide (token bucket); 503 beyond it.
    pub new_connections_per_second: u32,
    /// Burst of the new-connection token bucket.
    pub new_connections_burst: u32,
    /// Open sessions per client IP; 503 beyond it. 0 = no per-IP limit.
    pub max_connections_per_ip: usize,
    /// Largest HTTP request head (431 beyond it).
    pub max_request_header_bytes: usize,
    /// A socket whose peer does not take a queued write within this time is closed.
    pub write_timeout: HumanDuration,
    /// `TCP_NOTSENT_LOWAT` on client sockets (bytes); 0 = kernel default.
    pub tcp_notsent_lowat: u32,
    /// A new socket that has neither subscribed nor signed in by then is
    /// closed with 4202. "0s" disables the check.
    pub subscribe_deadline: HumanDuration,
    /// Open HTTP fallback sessions (`xhr_streaming`, `xhr_polling`) on this
    /// node (at most half of `max_handshakes`: its requests hold HTTP
    /// connections, which count as handshakes); a new one beyond it gets
    /// 503. Each also counts against `max_connections`.
    pub max_http_sessions: usize,
    /// Of those, per client IP (an IPv6 client by its /64); 503 beyond it.
    pub max_http_sessions_per_ip: usize,
    /// `pusher:subscribe` and `pusher:signin` per second per socket (token
    /// bucket; leaving a presence channel spends one too, but is always
    /// done). Beyond it a subscribe gets `pusher:subscription_error` 429
    /// and a sign-in `pusher:error` 4301. Caps the member, watchlist and
    /// occupied/vacated events one socket can cause.
    pub channel_ops_per_second: u32,
    /// Burst of that bucket. A reconnecting client subscribes to all its
    /// channels at once, signs in and subscribes to its user channel: the
    /// burst in force is at least `max_channels_per_connection` + 2.
    pub channel_ops_burst: u32,
    /// Auth grant signature checks (an ECDSA verification each) per second
    /// on this node, burst twice that: beyond it a presented grant is
    /// refused unchecked and the client asks the app's endpoint.
    pub auth_grant_checks_per_second: u32,
    /// Bytes of unfinished fragmented websocket messages on the whole node
    /// (each socket's is bounded by `max_message_bytes`); a fragment past
    /// it closes its socket with 1009.
    pub max_fragmented_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_handshakes: 4096,
            max_handshakes_per_ip: 128,
            max_admin_connections: 64,
            max_channels_per_connection: 100,
            max_payload_bytes: 10_240,
            max_message_bytes: 32_768,
            client_events_per_second: 10,
            max_presence_members: 100,
            outbound_queue_messages: 256,
            outbound_queue_bytes: 512 * 1024,
            worker_mailbox: 65_536,
            max_request_body_bytes: 256 * 1024,
            max_request_header_bytes: 16 * 1024,
            new_connections_per_second: 5_000,
            new_connections_burst: 10_000,
            max_connections_per_ip: 5_000,
            write_timeout: HumanDuration::secs(10),
            tcp_notsent_lowat: 16 * 1024,
            subscribe_deadline: HumanDuration::secs(60),
            max_http_sessions: 1024,
            max_http_sessions_per_ip: 64,
            channel_ops_per_second: 10,
            channel_ops_burst: 100,
            auth_grant_checks_per_second: 2_000,
            max_fragmented_bytes: 64 * 1024 * 1024,
        }
    }
}

words::words! {
    /// `cluster.role`: what this node does.
    pub enum Role {
        /// Sockets, the HTTP API and in-process workers: one node holds everything.
        Standalone = "standalone",
        /// Sockets and the HTTP API; rooms live on remote workers.
        Edge = "edge",
        /// Rooms only, for edges that connect on `cluster.link_listen`.
        Worker = "worker",
    }
}

words::words! {
    /// `log.format`.
    pub enum LogFormat {
        Human = "human",
        Json = "json",
    }
}

words::words! {
    /// `cluster.membership`: where the worker set comes from.
    pub enum Membership {
        /// `cluster.workers`, the same list on every node; no failover: a
        /// dead worker's rooms answer 503 until it returns, so two owners
        /// are impossible.
        Static = "static",
        /// Workers and edges register in etcd under leases; every node
        /// applies the same revision-ordered view.
        Etcd = "etcd",
    }
}

/// Longest wait between an edge's reconnect attempts to a worker (before
/// jitter of ×0.5–1.5).
pub const LINK_RECONNECT_CAP: std::time::Duration = std::time::Duration::from_millis(400);

/// `[cluster]`: one node holding everything, or edges and workers on many hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub role: Role,
    pub membership: Membership,
    /// This node's identity, unique in the cluster (required for etcd; a
    /// worker restarted with the same id gets its old ring position back).
    /// Empty: edges pick a random one; static workers are named by address.
    #[serde(deserialize_with = "node_id")]
    pub node_id: String,
    /// Worker: where edges connect.
    pub link_listen: String,
    /// Worker: the address edges dial (default `link_listen`).
    pub advertise: String,
    /// Static membership: the workers, the same list on every node.
    pub workers: Vec<String>,
    /// Worker: its share of the ring (virtual nodes), for unequal hosts.
    pub weight: u32,
    /// Liveness of each link (negotiated: both ends use the larger); three
    /// missed ones and the peer is gone. Never moves rooms.
    pub heartbeat_interval: HumanDuration,
    /// Worker: how long a lost edge's sockets are kept before they are dropped.
    pub edge_lease: HumanDuration,
    /// Longest wait for the handover barrier (every edge registered a moved
    /// room) before the new owner opens it without the edges that did not answer.
    pub handover_timeout: HumanDuration,
    /// Shared secret authenticating the link when `[cluster.tls]` is absent.
    pub secret: String,
    /// A file holding `secret` instead (read at start and on every reload).
    pub secret_file: Option<String>,
    /// Removed (use `handover_timeout`): kept only to say so.
    pub settle: Option<toml::Value>,
    /// Present: the link is mutually authenticated TLS.
    pub tls: Option<LinkTlsConfig>,
    pub etcd: EtcdConfig,
    pub scale: ScaleConfig,
}

/// `[cluster.etcd]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. `["http://10.0.0.2:2379"]`.
    pub endpoints: Vec<String>,
    /// Every key of this cluster lives under it.
    pub prefix: String,
    /// Lease of each node's key: whole seconds, at least 2s.
    pub lease_ttl: HumanDuration,
    /// How often a node renews its lease (at most lease_ttl / 4).
    pub keepalive_interval: HumanDuration,
    /// A worker stops serving this long before its lease could have expired.
    pub fence_margin: HumanDuration,
    /// Deadline of each etcd request.
    pub request_timeout: HumanDuration,
}

/// `[cluster.scale]`: how a worker joins and leaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleConfig {
    /// A joining (or leaving) worker changes its weight in this many steps.
    pub ramp_steps: u32,
    /// Time between steps.
    pub ramp_interval: HumanDuration,
    /// SIGTERM on a worker: hand its rooms over within this, then leave anyway.
    pub drain_timeout: HumanDuration,
}

fn node_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(0) => String::new(),
        Id::N(n) => n.to_string(),
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTlsConfig {
    /// This node's certificate chain (PEM), signed by `ca`.
    pub cert: String,
    /// Its private key (PEM).
    pub key: String,
    /// The cluster CA (PEM): peers must present a certificate it signed.
    pub ca: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            role: Role::Standalone,
            membership: Membership::Static,
            node_id: String::new(),
            link_listen: String::new(),
            advertise: String::new(),
            workers: Vec::new(),
            weight: 64,
            heartbeat_interval: HumanDuration::millis(500),
            edge_lease: HumanDuration::secs(3),
            handover_timeout: HumanDuration::secs(2),
            secret: String::new(),
            secret_file: None,
            settle: None,
            tls: None,
            etcd: EtcdConfig::default(),
            scale: ScaleConfig::default(),
        }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/herdgate".into(),
            lease_ttl: HumanDuration::secs(3),
            keepalive_interval: HumanDuration::millis(500),
            fence_margin: HumanDuration::millis(500),
            request_timeout: HumanDuration::secs(2),
        }
    }
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            ramp_steps: 4,
            ramp_interval: HumanDuration::secs(5),
            drain_timeout: HumanDuration::secs(60),
        }
    }
}

impl ClusterConfig {
    /// The address edges dial for this worker.
    pub fn advertised(&self) -> &str {
        if self.advertise.is_empty() {
            &self.link_listen
        } else {
            &self.advertise
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM `/readyz` answers 503 at once, but the listener keeps
    /// accepting for this long so the load balancer can deregister the node.
    pub deregister_delay: HumanDuration,
    /// Then the listener closes and open sockets are closed (4200, reconnect)
    /// each at a random moment within this period.
    pub drain_period: HumanDuration,
    /// Extra time after the drain period for the last sessions and HTTP
    /// requests to finish before the process exits anyway.
    pub grace: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deregister_delay: HumanDuration::secs(5),
            drain_period: HumanDuration::secs(30),
            grace: HumanDuration::secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `herdgate=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    pub key: String,
    /// Signs the app's HTTP API calls and channel authorizations. Or:
    #[serde(default)]
    pub secret: String,
    /// A file holding the secret (one line; read at start and on every
    /// reload), so it need not sit in the config or the environment.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Whether sockets may send `client-*` events.
    #[serde(default = "yes")]
    pub enable_client_events: bool,
    /// A disabled app refuses websockets (4003) and API calls (403).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Websocket upgrades must carry one of these `Origin`s (403 otherwise),
    /// e.g. "https://events.example.com" or "https://*.example.com". Empty: any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Where the app's webhooks go (docs/WEBHOOKS.md).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Non-presence channels' subscribers get `pusher_internal:subscription_count`
    /// when the count changes (at once up to 100 subscribers, then every 5 s).
    #[serde(default)]
    pub subscription_count_events: bool,
    /// Sockets must sign in (or subscribe to a private or presence channel)
    /// within `user_authentication_timeout`, or are closed with 4009.
    #[serde(default)]
    pub require_user_authentication: bool,
    #[serde(default = "user_authentication_timeout")]
    pub user_authentication_timeout: HumanDuration,
    /// Signed-in sockets per user, cluster-wide (a sign-in beyond it is
    /// closed with 4004). 0 = no limit.
    #[serde(default)]
    pub max_connections_per_user: usize,
    /// How long a cache channel keeps its last event.
    #[serde(default = "cache_ttl")]
    pub cache_ttl: HumanDuration,
    /// Bytes of cached events per realtime worker; beyond it the oldest
    /// cached channel is forgotten.
    #[serde(default = "cache_max_bytes")]
    pub cache_max_bytes: usize,
    /// Events kept per channel for resume and the history API (docs/PROTOCOL.md
    /// "History and resume"); 0 turns history off for the app.
    #[serde(default = "history_max_events")]
    pub history_max_events: usize,
    /// How long a channel's events are kept.
    #[serde(default = "history_ttl")]
    pub history_ttl: HumanDuration,
    /// Bytes of kept events of the app per realtime worker; beyond it the
    /// oldest events of the app are forgotten first.
    #[serde(default = "history_max_bytes")]
    pub history_max_bytes: usize,
    /// Per channel prefix (the longest matching prefix wins): other bounds,
    /// or `max_events = 0` for none (typing indicators, cursors).
    #[serde(default)]
    pub history_channels: Vec<HistoryRule>,
    /// Largest presence `user_info` (JSON text), in bytes.
    #[serde(default = "max_user_info_bytes")]
    pub max_user_info_bytes: usize,
    /// Most user ids a sign-in's `watchlist` may name; 0 turns watchlists off.
    #[serde(default = "max_watchlist")]
    pub max_watchlist: usize,
    /// Most channel bans (a moderator's, docs/PROTOCOL.md "Moderation") the
    /// app holds at each room owner; 0 turns bans off (removals still work).
    #[serde(default = "max_channel_bans")]
    pub max_channel_bans: usize,
    /// Quotas (0 = none): open sockets of the app on this node (4004
    /// beyond it), HTTP API events per second (429), client events per
    /// second across the app's sockets (pusher:error 4301), HTTP API reads
    /// per second (429).
    #[serde(default)]
    pub max_connections: usize,
    #[serde(default)]
    pub max_backend_events_per_second: u32,
    #[serde(default)]
    pub max_client_events_per_second: u32,
    #[serde(default)]
    pub max_read_requests_per_second: u32,
    /// Hand authorized sockets grants to take their private and presence
    /// channels again on a later connection without the auth endpoint
    /// (docs/PROTOCOL.md "Auth grants"). Off unless set.
    #[serde(default)]
    pub auth_grants: bool,
    /// How long a grant may be used (10s..1h); a live socket renews it.
    #[serde(default = "auth_grant_ttl")]
    pub auth_grant_ttl: HumanDuration,
    /// How long after the app's endpoint authorized a channel its renewed
    /// grants still work (auth_grant_ttl..24h): then the app is asked again.
    #[serde(default = "auth_grant_max_age")]
    pub auth_grant_max_age: HumanDuration,
    /// Channels whose events only need their latest value (scores, counts,
    /// positions): per key, the latest event per interval is sent.
    #[serde(default)]
    pub conflation: Vec<ConflationRule>,
    /// Events counted rather than fanned out (reactions): one summary per
    /// channel per interval.
    #[serde(default)]
    pub tallies: Vec<TallyRule>,
    /// 0: every room event is written as soon as possible. Set (≤ 1s): a
    /// socket's room events wait up to this long after the first of them,
    /// then go out in one write (fewer writes per delivery, for latency);
    /// the socket's own answers are never held. Open sockets follow a
    /// reload, except that rooms write in place only to sockets that
    /// connected while it was 0.
    #[serde(default = "no_delay")]
    pub write_delay: HumanDuration,
    /// Presence rooms with more members than this switch to big mode
    /// (docs/PROTOCOL.md "Big presence rooms"): the true count, featured
    /// members only in the list and in member events, and the count every
    /// `presence_count_interval` when it changed.
    #[serde(default = "presence_full_members")]
    pub presence_full_members: usize,
    #[serde(default = "presence_count_interval")]
    pub presence_count_interval: HumanDuration,
}

/// `[[apps.tallies]]`: events named in `events` to channels starting with
/// `prefix` are counted at the room's owner, by event and by the value of
/// `field`, and one `herdgate:tally` summary goes to the channel per
/// `interval`; the events themselves reach nobody.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TallyRule {
    pub prefix: String,
    pub events: Vec<String>,
    /// A top-level field of the event's JSON data to count by (e.g. the emoji).
    #[serde(default)]
    pub field: Option<String>,
    /// Distinct values counted per event per interval; the rest are counted
    /// as `other`.
    #[serde(default = "tally_max_values")]
    pub max_values: usize,
    #[serde(default = "tally_interval")]
    pub interval: HumanDuration,
}

fn tally_max_values() -> usize {
    16
}
fn tally_interval() -> HumanDuration {
    HumanDuration::millis(1000)
}

/// `[[apps.conflation]]`: events to channels starting with `prefix` are
/// conflated: per `key`, only the latest of each `interval` is sent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflationRule {
    pub prefix: String,
    /// `"event"` (the event's name) or `"data.FIELD"` (a top-level field of
    /// the event's JSON data; an event without it is its own key: sent
    /// at once).
    #[serde(default = "conflation_key")]
    pub key: String,
    #[serde(default = "conflation_interval")]
    pub interval: HumanDuration,
    /// Keys waiting per channel; an event with a new key beyond it is sent
    /// at once, not conflated.
    #[serde(default = "conflation_max_keys")]
    pub max_keys: usize,
    /// Client events too (never, unless set).
    #[serde(default)]
    pub client_events: bool,
}

fn conflation_key() -> String {
    "event".into()
}
fn conflation_interval() -> HumanDuration {
    HumanDuration::millis(1000)
}
fn conflation_max_keys() -> usize {
    64
}

fn auth_grant_max_age() -> HumanDuration {
    HumanDuration::secs(3600)
}

fn auth_grant_ttl() -> HumanDuration {
    HumanDuration::secs(300)
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            id: String::new(),
            key: String::new(),
            secret: String::new(),
            secret_file: None,
            enable_client_events: true,
            enabled: true,
            allowed_origins: Vec::new(),
            webhooks: Vec::new(),
            subscription_count_events: false,
            require_user_authentication: false,
            user_authentication_timeout: user_authentication_timeout(),
            max_connections_per_user: 0,
            cache_ttl: cache_ttl(),
            cache_max_bytes: cache_max_bytes(),
            history_max_events: history_max_events(),
            history_ttl: history_ttl(),
            history_max_bytes: history_max_bytes(),
            history_channels: Vec::new(),
            max_user_info_bytes: max_user_info_bytes(),
            max_watchlist: max_watchlist(),
            max_channel_bans: max_channel_bans(),
            max_connections: 0,
            max_backend_events_per_second: 0,
            max_client_events_per_second: 0,
            max_read_requests_per_second: 0,
            auth_grants: false,
            auth_grant_ttl: auth_grant_ttl(),
            auth_grant_max_age: auth_grant_max_age(),
            conflation: Vec::new(),
            tallies: Vec::new(),
            write_delay: no_delay(),
            presence_full_members: presence_full_members(),
            presence_count_interval: presence_count_interval(),
        }
    }
}

fn no_delay() -> HumanDuration {
    HumanDuration::millis(0)
}

fn user_authentication_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}
fn cache_ttl() -> HumanDuration {
    HumanDuration::secs(3600)
}
fn cache_max_bytes() -> usize {
    8 * 1024 * 1024
}
fn history_max_events() -> usize {
    100
}
fn history_ttl() -> HumanDuration {
    HumanDuration::secs(120)
}
fn presence_full_members() -> usize {
    100
}
fn presence_count_interval() -> HumanDuration {
    HumanDuration::secs(5)
}
fn history_max_bytes() -> usize {
    8 * 1024 * 1024
}

/// `[[apps.history_channels]]`: the history of channels starting with `prefix`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    pub prefix: String,
    /// 0: these channels keep no history (and their events carry no serial).
    pub max_events: usize,
    /// Defaults to the app's `history_ttl`.
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
}

fn max_user_info_bytes() -> usize {
    1024
}
fn max_watchlist() -> usize {
    100
}
fn max_channel_bans() -> usize {
    10_000
}
/// The largest `max_channel_bans` (a ban costs ~150 bytes at its owner,
/// and the bound holds per realtime worker: 15 MiB a worker at most).
pub const MAX_CHANNEL_BANS: usize = 100_000;

fn yes() -> bool {
    true
}

/// Everything that can go wrong loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", validate::render(.0))]
    Invalid(Vec<ConfigError>),
}

impl Config {
    /// The channel-operation burst in force (see `limits.channel_ops_burst`).
    pub fn channel_ops_burst(&self) -> u32 {
        let l = &self.limits;
        let floor =
            u32::try_from(l.max_channels_per_connection.saturating_add(2)).unwrap_or(u32::MAX);
        l.channel_ops_burst.max(floor)
    }

    /// Parse and validate the values; every problem is reported at once.
    /// Files the config names (certificates) are not read here: see
    /// [`Config::from_toml_str_with`].
    pub fn from_toml_str(text: &str) -> Result<Config, LoadError> {
        Config::from_toml_str_with(text, |_| Vec::new())
    }

    /// Parse, validate, then run `check` (the caller's checks of what the
    /// values point at, such as certificate files) and report every problem
    /// of both passes at once.
    pub fn from_toml_str_with(
        text: &str,
        check: impl FnOnce(&Config) -> Vec<ConfigError>,
    ) -> Result<Config, LoadError> {
        // `${VAR}` in double-quoted strings (docs/OPERATIONS.md "Values
        // from the environment"); lines stay where they were.
        let text = env::interpolate(text, |k| std::env::var(k).ok()).map_err(LoadError::Invalid)?;
        let text = text.as_str();
        let de = toml::Deserializer::parse(text)
            .map_err(|e| LoadError::Invalid(vec![ConfigError::from_toml(text, "", &e)]))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            LoadError::Invalid(vec![ConfigError::from_toml(text, &path, e.inner())])
        })?;
        let mut errors = env::resolve_files(&mut config);
        if errors.is_empty() {
            errors = validate::validate(&config);
        }
        if errors.is_empty() {
            errors = check(&config);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(LoadError::Invalid(errors))
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, LoadError> {
        Config::from_file_with(path, |_| Vec::new())
    }

    /// [`Config::from_file`] with the caller's checks (see [`Config::from_toml_str_with`]).
    pub fn from_file_with(
        path: &Path,
        check: impl FnOnce(&Config) -> Vec<ConfigError>,
    ) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str_with(&text, check)
    }

    pub fn embedded_default() -> Config {
        Config::from_toml_str(EMBEDDED_DEFAULT).expect("embedded default config is valid")
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        (!self.server.admin_listen.is_empty())
            .then(|| self.server.admin_listen.parse().expect("validated"))
    }

    pub fn worker_count(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}
