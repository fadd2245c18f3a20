//! `[webhooks]` (how webhooks are sent) and `[[apps.webhooks]]` (where, and
//! which events): see docs/WEBHOOKS.md.

use super::HumanDuration;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The event types a webhook may ask for (Pusher's names).
pub const EVENT_TYPES: [&str; 10] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
    "user_online",
    "user_offline",
    "tally",
];

/// `[webhooks]`: sending, for every app's webhooks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Each POST must be answered 2xx within this, else it is retried.
    pub timeout: HumanDuration,
    /// A batch is retried (exponential backoff with jitter) for this long
    /// after its first attempt, then dropped and counted.
    pub retry_window: HumanDuration,
    /// Events per POST at most.
    pub batch_max_events: usize,
    /// How long the first event of a batch waits for others.
    pub batch_wait: HumanDuration,
    /// `channel_vacated` and `member_removed` wait this long and are
    /// dropped if the channel or the user is back meanwhile.
    pub debounce: HumanDuration,
    /// Per webhook: events waiting to be sent at most; newer events beyond
    /// it (or beyond `queue_bytes`) are dropped and counted.
    pub queue_events: usize,
    pub queue_bytes: usize,
    /// Per realtime worker: vacated / removed events waiting out the
    /// debounce at most; beyond it they are sent at once.
    pub debounce_max: usize,
    /// PEM file of CA certificates trusted for https webhooks, instead of
    /// the system's roots. Empty: the system's.
    pub ca: String,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout: HumanDuration::secs(4),
            retry_window: HumanDuration::secs(300),
            batch_max_events: 20,
            batch_wait: HumanDuration::millis(250),
            debounce: HumanDuration::secs(3),
            queue_events: 10_000,
            queue_bytes: 4 * 1024 * 1024,
            debounce_max: 100_000,
            ca: String::new(),
        }
    }
}

/// `[[apps.webhooks]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// Which events (see [`EVENT_TYPES`]).
    pub event_types: Vec<String>,
    #[serde(default)]
    pub filter: WebhookFilter,
    /// Extra request headers, e.g. `{ "X-Env" = "prod" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct WebhookFilter {
    /// Only channels whose names start with this.
    #[serde(default)]
    pub channel_prefix: String,
}
