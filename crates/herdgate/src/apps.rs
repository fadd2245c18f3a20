//! The configured apps, looked up by key (websockets) and by id (HTTP API).

use crate::config::AppConfig;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct App {
    pub id: Arc<str>,
    pub key: String,
    pub secret: String,
    pub enable_client_events: bool,
    pub enabled: bool,
    pub allowed_origins: Vec<String>,
    pub features: Features,
}

/// What an app turned on, and its quotas (the `[[apps]]` keys of the same
/// names; docs/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub subscription_count_events: bool,
    pub require_user_authentication: bool,
    pub user_authentication_timeout: std::time::Duration,
    pub max_connections_per_user: usize,
    pub cache_ttl: std::time::Duration,
    pub cache_max_bytes: usize,
    pub history: History,
    pub max_user_info_bytes: usize,
    pub max_watchlist: usize,
    /// Channel bans the app may hold at each owner (0: none).
    pub max_channel_bans: usize,
    pub max_connections: usize,
    pub max_backend_events_per_second: u32,
    pub max_client_events_per_second: u32,
    pub max_read_requests_per_second: u32,
    /// Auth grants, when the app hands them out (`auth_grants`).
    pub auth_grants: Option<GrantSettings>,
    /// `[[apps.conflation]]`, in config order: the first matching prefix wins.
    pub conflation: Vec<Conflation>,
    /// `[[apps.tallies]]`, in config order: the first rule naming the
    /// channel's prefix and the event wins.
    pub tallies: Vec<Tally>,
    /// `write_delay`: how long a socket's room events may wait to go out
    /// together (zero: not at all).
    pub write_delay: std::time::Duration,
    /// `presence_full_members` / `presence_count_interval`: big presence
    /// rooms (docs/PROTOCOL.md "Big presence rooms").
    pub presence_full_members: usize,
    pub presence_count_every: std::time::Duration,
}

/// One `[[apps.tallies]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub prefix: String,
    pub events: Vec<String>,
    pub field: Option<String>,
    pub max_values: usize,
    pub interval: std::time::Duration,
}

/// One `[[apps.conflation]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflation {
    pub prefix: String,
    /// `None`: the event's name; `Some(field)`: that field of its data.
    pub field: Option<String>,
    pub interval: std::time::Duration,
    pub max_keys: usize,
    pub client_events: bool,
}

impl Features {
    /// Whether any tally rule names `channel` (cheap: before the event's
    /// name is read).
    pub fn tallies_channel(&self, channel: &str) -> bool {
        self.tallies
            .iter()
            .any(|t| channel.starts_with(t.prefix.as_str()))
    }

    /// The tally rule for `event` on `channel`, if any.
    pub fn tally_for(&self, channel: &str, event: &str) -> Option<&Tally> {
        self.tallies
            .iter()
            .find(|t| channel.starts_with(t.prefix.as_str()) && t.events.iter().any(|e| e == event))
    }

    /// The conflation rule for events to `channel`, if any.
    pub fn conflation_for(&self, channel: &str) -> Option<&Conflation> {
        self.conflation
            .iter()
            .find(|c| channel.starts_with(c.prefix.as_str()))
    }
}

/// An app's auth grant settings (docs/PROTOCOL.md "Auth grants").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantSettings {
    /// `auth_grant_ttl`: how long one grant may be presented.
    pub ttl: std::time::Duration,
    /// `auth_grant_max_age`: how long after the app's endpoint authorized
    /// a channel its renewed grants may still be presented.
    pub max_age: std::time::Duration,
}

impl Default for Features {
    fn default() -> Self {
        Features::from(&AppConfig::default())
    }
}

impl From<&AppConfig> for Features {
    fn from(c: &AppConfig) -> Features {
        Features {
            subscription_count_events: c.subscription_count_events,
            require_user_authentication: c.require_user_authentication,
            user_authentication_timeout: c.user_authentication_timeout.get(),
            max_connections_per_user: c.max_connections_per_user,
            cache_ttl: c.cache_ttl.get(),
            cache_max_bytes: c.cache_max_bytes,
            history: History {
                max_events: c.history_max_events,
                ttl: c.history_ttl.get(),
                max_bytes: c.history_max_bytes,
                rules: c
                    .history_channels
                    .iter()
                    .map(|r| {
                        (
                            r.prefix.clone(),
                            r.max_events,
                            r.ttl.map_or(c.history_ttl.get(), |t| t.get()),
                        )
                    })
                    .collect(),
            },
            max_user_info_bytes: c.max_user_info_bytes,
            max_watchlist: c.max_watchlist,
            max_channel_bans: c.max_channel_bans,
            tallies: c
                .tallies
                .iter()
                .map(|r| Tally {
                    prefix: r.prefix.clone(),
                    events: r.events.clone(),
                    field: r.field.clone(),
                    max_values: r.max_values,
                    interval: r.interval.get(),
                })
                .collect(),
            conflation: c
                .conflation
                .iter()
                .map(|r| Conflation {
                    prefix: r.prefix.clone(),
                    field: r.key.strip_prefix("data.").map(str::to_string),
                    interval: r.interval.get(),
                    max_keys: r.max_keys,
                    client_events: r.client_events,
                })
                .collect(),
            auth_grants: c.auth_grants.then(|| GrantSettings {
                ttl: c.auth_grant_ttl.get(),
                max_age: c.auth_grant_max_age.get(),
            }),
            max_connections: c.max_connections,
            max_backend_events_per_second: c.max_backend_events_per_second,
            max_client_events_per_second: c.max_client_events_per_second,
            max_read_requests_per_second: c.max_read_requests_per_second,
            write_delay: c.write_delay.get(),
            presence_full_members: c.presence_full_members,
            presence_count_every: c.presence_count_interval.get(),
        }
    }
}

/// An app's history bounds (`history_*` keys), applied by each room's owner.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub max_events: usize,
    pub ttl: std::time::Duration,
    /// Per realtime worker.
    pub max_bytes: usize,
    /// `(prefix, max_events, ttl)`: the longest matching prefix wins.
    pub rules: Vec<(String, usize, std::time::Duration)>,
}

impl History {
    /// How many events `channel` keeps, and for how long; `None`: no history.
    pub fn for_channel(&self, channel: &str) -> Option<(usize, std::time::Duration)> {
        let (events, ttl) = self
            .rules
            .iter()
            .filter(|(p, _, _)| channel.starts_with(p.as_str()))
            .max_by_key(|(p, _, _)| p.len())
            .map_or((self.max_events, self.ttl), |(_, n, t)| (*n, *t));
        (events > 0).then_some((events, ttl))
    }
}

impl App {
    /// Whether a websocket from `origin` may connect (any, when no list is configured).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        let Some(origin) = origin else { return false };
        self.allowed_origins
            .iter()
            .any(|allowed| match allowed.split_once("://*.") {
                Some((scheme, domain)) => origin
                    .strip_prefix(scheme)
                    .and_then(|o| o.strip_prefix("://"))
                    .is_some_and(|host| host.ends_with(&format!(".{domain}"))),
                None => origin.eq_ignore_ascii_case(allowed),
            })
    }
}

#[derive(Debug, Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
}

impl Apps {
    pub fn new(configs: &[AppConfig]) -> Apps {
        let mut apps = Apps::default();
        for c in configs {
            let app = Arc::new(App {
                id: Arc::from(c.id.as_str()),
                key: c.key.clone(),
                secret: c.secret.clone(),
                enable_client_events: c.enable_client_events,
                enabled: c.enabled,
                allowed_origins: c.allowed_origins.clone(),
                features: Features::from(c),
            });
            apps.by_key.insert(c.key.clone(), app.clone());
            apps.by_id.insert(c.id.clone(), app);
        }
        apps
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }
}

/// Per-app quota state on this node, kept across reloads (the limits come
/// from the app's live [`Features`]; 0 = no limit). Bounded: one entry per
/// configured app id ever seen.
#[derive(Default)]
pub struct Quotas {
    by_app: std::sync::Mutex<HashMap<Arc<str>, Arc<Quota>>>,
}

#[derive(Default)]
pub struct Quota {
    connections: std::sync::atomic::AtomicUsize,
    client_events: std::sync::Mutex<Option<(u32, crate::ratelimit::TokenBucket)>>,
    backend_events: std::sync::Mutex<Option<(u32, crate::ratelimit::TokenBucket)>>,
    reads: std::sync::Mutex<Option<(u32, crate::ratelimit::TokenBucket)>>,
}

/// An open socket counted against its app's `max_connections`.
pub struct ConnectionSlot(Arc<Quota>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Take `n` tokens from a per-app bucket of `rate`/s (burst one second's
/// worth), rebuilt when the configured rate changes.
fn take(
    slot: &std::sync::Mutex<Option<(u32, crate::ratelimit::TokenBucket)>>,
    rate: u32,
    n: u32,
) -> bool {
    if rate == 0 {
        return true;
    }
    let now = tokio::time::Instant::now();
    let mut b = slot.lock().unwrap_or_else(|p| p.into_inner());
    if b.as_ref().is_none_or(|(r, _)| *r != rate) {
        *b = Some((rate, crate::ratelimit::TokenBucket::new(rate, rate, now)));
    }
    b.as_mut().expect("just set").1.try_take_n(now, n)
}

impl Quotas {
    pub fn of(&self, app: &Arc<str>) -> Arc<Quota> {
        self.by_app
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(app.clone())
            .or_default()
            .clone()
    }
}

impl Quota {
    /// A slot for one more socket, unless `max` (> 0) are open.
    pub fn connect(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        let n = self.connections.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(self.clone());
        (max == 0 || n < max).then_some(slot)
    }

    pub fn client_event(&self, rate: u32) -> bool {
        take(&self.client_events, rate, 1)
    }

    /// `events` HTTP API events at once (a batch costs one per event).
    pub fn backend_events(&self, rate: u32, events: u32) -> bool {
        // A request bigger than a whole second's budget spends all of it
        // (else it could never pass).
        take(&self.backend_events, rate, events.min(rate))
    }

    pub fn read(&self, rate: u32) -> bool {
        take(&self.reads, rate, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let app = |list: &[&str]| App {
            id: "1".into(),
            key: "k".into(),
            secret: "s".into(),
            enable_client_events: true,
            enabled: true,
            allowed_origins: list.iter().map(|s| s.to_string()).collect(),
            features: Features::default(),
        };
        assert!(app(&[]).origin_allowed(None));
        let a = app(&["https://events.example.com", "https://*.example.org"]);
        assert!(a.origin_allowed(Some("https://events.example.com")));
        assert!(a.origin_allowed(Some("https://a.b.example.org")));
        assert!(!a.origin_allowed(Some("https://example.org")));
        assert!(!a.origin_allowed(Some("http://events.example.com")));
        assert!(!a.origin_allowed(Some("https://events.example.com.evil.net")));
        assert!(!a.origin_allowed(Some("https://evilexample.org")));
        assert!(!a.origin_allowed(None));
    }

    #[tokio::test(start_paused = true)]
    async fn quotas_count_sockets_and_rate_events_per_app() {
        let q = Quotas::default();
        let a = q.of(&Arc::from("a"));
        let s1 = a.connect(2).unwrap();
        let _s2 = a.connect(2).unwrap();
        assert!(a.connect(2).is_none(), "a third over a cap of two");
        drop(s1);
        assert!(a.connect(2).is_some(), "a slot freed");
        assert!(q.of(&Arc::from("b")).connect(1).is_some(), "per app");
        assert!(a.connect(0).is_some(), "0: no cap");
        assert!(a.backend_events(10, 10));
        assert!(!a.backend_events(10, 1), "a second's worth used");
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert!(a.backend_events(10, 2) && !a.backend_events(10, 1));
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        assert!(
            a.backend_events(10, 11),
            "a request over a whole second's budget passes on a full one..."
        );
        assert!(!a.backend_events(10, 1), "...and spends all of it");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert!(!a.backend_events(10, 11), "half a second: not yet");
        assert!(a.backend_events(10, 5), "what is refused takes nothing");
        assert!((0..1000).all(|_| a.read(0)), "0: no limit");
    }
}
