//! `[overload]`: how herdgate rates its own load, and what it sheds in each state.

use super::HumanDuration;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// `false`: the node always rates itself normal and sheds nothing (the
    /// hard limits in `[limits]` still apply).
    pub enabled: bool,
    /// How often the signals are sampled.
    pub sample_interval: HumanDuration,
    /// A state is left (one step) only after all signals stayed below their exit level this long.
    pub cooldown: HumanDuration,
    /// Admission (`actions.refuse_connections`) is rated on its own: it
    /// reopens this long after the signals that closed it fell below their
    /// exit levels, in one step, while shed features keep `cooldown`.
    pub admission_cooldown: HumanDuration,
    /// Exit level = threshold × (1 − hysteresis).
    pub hysteresis: f64,
    /// Thresholds [pressured, degraded, critical] for each signal.
    /// Open sessions ÷ limits.max_connections.
    pub connections: [f64; 3],
    /// New websocket sessions per second.
    pub accept_rate: [f64; 3],
    /// Process RSS ÷ memory limit.
    pub memory: [f64; 3],
    /// Memory limit in bytes; 0 = the cgroup's memory.max if set, else physical RAM.
    pub memory_limit_bytes: u64,
    /// How late the runtime runs a periodic tick, in milliseconds.
    pub scheduling_lag_ms: [f64; 3],
    /// Bytes waiting in all sockets' outbound queues.
    pub outbound_bytes: [f64; 3],
    /// Commands waiting in the fullest worker mailbox.
    pub mailbox_depth: [f64; 3],
    pub actions: ActionsConfig,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            enabled: true,
            sample_interval: HumanDuration::millis(500),
            cooldown: HumanDuration::secs(10),
            admission_cooldown: HumanDuration::secs(2),
            hysteresis: 0.1,
            connections: [0.70, 0.85, 0.95],
            accept_rate: [5_000.0, 15_000.0, 30_000.0],
            memory: [0.70, 0.80, 0.90],
            memory_limit_bytes: 0,
            scheduling_lag_ms: [50.0, 200.0, 1_000.0],
            outbound_bytes: [64.0 * MIB, 256.0 * MIB, 1024.0 * MIB],
            mailbox_depth: [1_000.0, 10_000.0, 50_000.0],
            actions: ActionsConfig::default(),
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// How loaded a node rates itself; `[overload.actions]` name the state each action starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    Normal = 0,
    Pressured = 1,
    Degraded = 2,
    Critical = 3,
}

impl LoadState {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadState::Normal => "normal",
            LoadState::Pressured => "pressured",
            LoadState::Degraded => "degraded",
            LoadState::Critical => "critical",
        }
    }

    pub fn from_u8(v: u8) -> LoadState {
        match v {
            0 => LoadState::Normal,
            1 => LoadState::Pressured,
            2 => LoadState::Degraded,
            _ => LoadState::Critical,
        }
    }
}

/// A state from which an action applies, or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum From {
    Pressured,
    Degraded,
    Critical,
    Never,
}

impl From {
    pub fn applies(self, state: LoadState) -> bool {
        match self {
            From::Pressured => state >= LoadState::Pressured,
            From::Degraded => state >= LoadState::Degraded,
            From::Critical => state >= LoadState::Critical,
            From::Never => false,
        }
    }
}

/// Load shedding, in priority order: each action names the first state in which it applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsConfig {
    /// Client events at half the per-socket rate.
    pub limit_client_events: From,
    /// Client events refused (`pusher:error` 4301).
    pub drop_client_events: From,
    /// No member_added / member_removed on presence rooms above `presence_events_max_members`.
    pub stop_presence_events: From,
    pub presence_events_max_members: usize,
    /// HTTP API events to `coalesce_prefixes` channels: only the latest per room and interval is sent.
    pub coalesce: From,
    pub coalesce_prefixes: Vec<String>,
    pub coalesce_interval: HumanDuration,
    /// New subscriptions to `nonessential_prefixes` channels refused (subscription_error, status 503).
    pub refuse_subscriptions: From,
    pub nonessential_prefixes: Vec<String>,
    /// New websockets refused with 503 + Retry-After, and /readyz answers 503.
    pub refuse_connections: From,
    /// Never coalesced, never refused: live session updates, announcements.
    pub essential_prefixes: Vec<String>,
    /// Webhook events but channel_occupied / channel_vacated (member_added,
    /// member_removed, client_event, ...) are shed, counted in `herdgate_shed_total`.
    pub shed_webhook_events: From,
    /// Channel history (resume, the history API) is not kept: what a room
    /// holds is dropped at its next event, and resumes answer `recovered: false`.
    pub shed_history: From,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig {
            limit_client_events: From::Pressured,
            drop_client_events: From::Degraded,
            stop_presence_events: From::Degraded,
            presence_events_max_members: 50,
            coalesce: From::Degraded,
            coalesce_prefixes: Vec::new(),
            coalesce_interval: HumanDuration::secs(1),
            refuse_subscriptions: From::Degraded,
            nonessential_prefixes: Vec::new(),
            refuse_connections: From::Critical,
            essential_prefixes: Vec::new(),
            shed_webhook_events: From::Degraded,
            shed_history: From::Degraded,
        }
    }
}

impl ActionsConfig {
    fn essential(&self, channel: &str) -> bool {
        self.essential_prefixes
            .iter()
            .any(|p| channel.starts_with(p.as_str()))
    }

    /// Coalescing interval for a publish to `channel` in `state`, if it is coalesced.
    pub fn coalesce_for(&self, channel: &str, state: LoadState) -> Option<std::time::Duration> {
        (self.coalesce.applies(state)
            && !self.essential(channel)
            && self
                .coalesce_prefixes
                .iter()
                .any(|p| channel.starts_with(p.as_str())))
        .then(|| self.coalesce_interval.get())
    }

    pub fn refuses_subscription(&self, channel: &str, state: LoadState) -> bool {
        self.refuse_subscriptions.applies(state)
            && !self.essential(channel)
            && self
                .nonessential_prefixes
                .iter()
                .any(|p| channel.starts_with(p.as_str()))
    }

    /// The largest presence room that still gets member events in `state`.
    pub fn member_events_max(&self, state: LoadState) -> Option<usize> {
        self.stop_presence_events
            .applies(state)
            .then_some(self.presence_events_max_members)
    }

    /// The features limited in `state` (new connections: in `admission`),
    /// as told to clients in `herdgate:status`.
    pub fn limited(&self, state: LoadState, admission: LoadState) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.drop_client_events.applies(state) {
            v.push("client_events");
        } else if self.limit_client_events.applies(state) {
            v.push("client_events_rate");
        }
        if self.stop_presence_events.applies(state) {
            v.push("presence_member_events");
        }
        if self.coalesce.applies(state) && !self.coalesce_prefixes.is_empty() {
            v.push("coalesced_channels");
        }
        if self.refuse_subscriptions.applies(state) && !self.nonessential_prefixes.is_empty() {
            v.push("nonessential_subscriptions");
        }
        if self.shed_history.applies(state) {
            v.push("history");
        }
        if self.refuse_connections.applies(admission) {
            v.push("new_connections");
        }
        v
    }
}
