//! Webhooks: Pusher's event set, signed, batched, retried, debounced, and
//! emitted once per cluster — by the room's owner.
//!
//! Why the owner: only the worker that owns a room sees every subscriber
//! across edges, so only it knows when a channel becomes occupied or
//! vacated and when a user's *last* socket leaves. Edges never emit. A room
//! that moves between workers is registered at its new owner silently (no
//! occupied, no member_added: the room was already occupied), so a move
//! neither repeats nor loses its state; [`debounce`] explains the wait.
//!
//! Shape: a worker calls [`Hooks::emit`], which encodes the event once and
//! appends it to each interested webhook's bounded queue ([`sender`]) —
//! never waiting; each webhook has one task that batches, signs and POSTs
//! in order, retrying with backoff. docs/WEBHOOKS.md is the operator's view.

mod client;
pub mod debounce;
mod sender;

pub use debounce::{Debounce, Pending};

use crate::config::{ActionFrom, Config, LoadState};
use arc_swap::ArcSwap;
use sender::{Spec, Target};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// A webhook event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
    CacheMiss,
    SubscriptionCount,
    /// A signed-in user's first socket anywhere in the cluster.
    UserOnline,
    /// Their last socket gone (debounced like `member_removed`).
    UserOffline,
    /// A channel's reaction tally for one interval (`[[apps.tallies]]`).
    Tally,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::ChannelOccupied,
        Kind::ChannelVacated,
        Kind::MemberAdded,
        Kind::MemberRemoved,
        Kind::ClientEvent,
        Kind::CacheMiss,
        Kind::SubscriptionCount,
        Kind::UserOnline,
        Kind::UserOffline,
        Kind::Tally,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ChannelOccupied => "channel_occupied",
            Kind::ChannelVacated => "channel_vacated",
            Kind::MemberAdded => "member_added",
            Kind::MemberRemoved => "member_removed",
            Kind::ClientEvent => "client_event",
            Kind::CacheMiss => "cache_miss",
            Kind::SubscriptionCount => "subscription_count",
            Kind::UserOnline => "user_online",
            Kind::UserOffline => "user_offline",
            Kind::Tally => "tally",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// Occupancy is never shed: a backend that missed a vacated would
    /// think a room full forever.
    fn essential(self) -> bool {
        matches!(self, Kind::ChannelOccupied | Kind::ChannelVacated)
    }
}

/// One event, encoded once as an element of Pusher's `events` array.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub json: Arc<str>,
}

impl Event {
    fn new(kind: Kind, value: serde_json::Value) -> Event {
        Event {
            kind,
            json: Arc::from(value.to_string()),
        }
    }

    pub fn occupied(channel: &str) -> Event {
        Event::new(
            Kind::ChannelOccupied,
            serde_json::json!({"name": "channel_occupied", "channel": channel}),
        )
    }

    pub fn vacated(channel: &str) -> Event {
        Event::new(
            Kind::ChannelVacated,
            serde_json::json!({"name": "channel_vacated", "channel": channel}),
        )
    }

    /// `member_added` or `member_removed`.
    pub fn member(kind: Kind, channel: &str, user_id: &str) -> Event {
        Event::new(
            kind,
            serde_json::json!({"name": kind.name(), "channel": channel, "user_id": user_id}),
        )
    }

    /// `user_online` or `user_offline`: `{"name", "user_id"}` (no channel;
    /// a webhook's `channel_prefix` filter is matched against the user's
    /// `#server-to-user-{id}` channel).
    pub fn user(kind: Kind, user_id: &str) -> Event {
        Event::new(
            kind,
            serde_json::json!({"name": kind.name(), "user_id": user_id}),
        )
    }

    /// `tally`: `{"name", "channel", "interval_ms", "tallies"}`, the same
    /// summary the channel's sockets get as `herdgate:tally`.
    pub fn tally(channel: &str, summary: &serde_json::Value) -> Event {
        let mut v = serde_json::json!({"name": "tally", "channel": channel});
        if let (Some(v), Some(s)) = (v.as_object_mut(), summary.as_object()) {
            v.extend(s.clone());
        }
        Event::new(Kind::Tally, v)
    }

    pub fn cache_miss(channel: &str) -> Event {
        Event::new(
            Kind::CacheMiss,
            serde_json::json!({"name": "cache_miss", "channel": channel}),
        )
    }

    pub fn subscription_count(channel: &str, count: usize) -> Event {
        Event::new(
            Kind::SubscriptionCount,
            serde_json::json!({"name": "subscription_count", "channel": channel, "subscription_count": count}),
        )
    }

    /// `data` is the client's data as a string, as Pusher sends it.
    pub fn client(
        channel: &str,
        event: &str,
        data: &str,
        socket_id: &str,
        user_id: Option<&str>,
    ) -> Event {
        let mut v = serde_json::json!({
            "name": "client_event", "channel": channel, "event": event,
            "data": data, "socket_id": socket_id,
        });
        if let Some(u) = user_id {
            v["user_id"] = serde_json::Value::from(u);
        }
        Event::new(Kind::ClientEvent, v)
    }

    /// The `client_event` webhook for a client event frame as the room
    /// fans it out (`{"event":…,"channel":…,"data":…,"user_id":…}`).
    pub fn from_client_frame(frame: &str, socket_id: &str) -> Option<Event> {
        #[derive(serde::Deserialize)]
        struct F<'a> {
            event: &'a str,
            channel: &'a str,
            #[serde(borrow)]
            data: Option<&'a serde_json::value::RawValue>,
            user_id: Option<&'a str>,
        }
        let f: F = serde_json::from_str(frame).ok()?;
        let data = match f.data {
            None => String::new(),
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(s) => s,                      // a string: as it is
                Err(_) => raw.get().to_string(), // any other JSON: its text
            },
        };
        Some(Event::client(
            f.channel, f.event, &data, socket_id, f.user_id,
        ))
    }
}

/// Whether `ca` (a PEM file) can serve as the webhooks' roots.
pub fn tls_check(ca: &str) -> Result<(), String> {
    client::tls_config(ca).map(|_| ())
}

/// The process's webhooks, per app; swapped whole on reload.
pub struct Hooks {
    by_app: ArcSwap<HashMap<Arc<str>, Vec<Arc<Target>>>>,
    tls: ArcSwap<rustls::ClientConfig>,
    /// `overload.actions.shed_webhook_events`, as a load state (u8; 255: never).
    shed_from: AtomicU8,
    load: Box<dyn Fn() -> LoadState + Send + Sync>,
}

fn shed_from(f: ActionFrom) -> u8 {
    match f {
        ActionFrom::Pressured => LoadState::Pressured as u8,
        ActionFrom::Degraded => LoadState::Degraded as u8,
        ActionFrom::Critical => LoadState::Critical as u8,
        ActionFrom::Never => u8::MAX,
    }
}

impl Hooks {
    /// Every app's webhooks of `config`, their senders started. `load`
    /// tells the node's load state (for shedding).
    pub fn start(
        config: &Config,
        load: Box<dyn Fn() -> LoadState + Send + Sync>,
    ) -> Result<Arc<Hooks>, String> {
        let tls = client::tls_config(&config.webhooks.ca)?;
        let hooks = Arc::new(Hooks {
            by_app: ArcSwap::from_pointee(HashMap::new()),
            tls: ArcSwap::new(tls),
            shed_from: AtomicU8::new(shed_from(config.overload.actions.shed_webhook_events)),
            load,
        });
        hooks.reload(config)?;
        Ok(hooks)
    }

    /// Apply a (validated) config: webhooks whose settings are unchanged
    /// keep their queue and connection; new ones start; removed ones stop
    /// (their queued events are dropped and counted).
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        self.tls.store(client::tls_config(&config.webhooks.ca)?);
        self.shed_from.store(
            shed_from(config.overload.actions.shed_webhook_events),
            Ordering::Relaxed,
        );
        let old = self.by_app.load_full();
        let mut kept: Vec<Arc<Target>> = old.values().flatten().cloned().collect();
        let mut next: HashMap<Arc<str>, Vec<Arc<Target>>> = HashMap::new();
        for app in &config.apps {
            for hook in &app.webhooks {
                let spec = Spec {
                    app: Arc::from(app.id.as_str()),
                    key: app.key.clone(),
                    secret: app.secret.clone(),
                    hook: hook.clone(),
                    settings: config.webhooks.clone(),
                };
                let target = match kept.iter().position(|t| t.spec == spec) {
                    Some(i) => kept.swap_remove(i),
                    None => {
                        let t = Arc::new(Target::new(spec)?);
                        tokio::spawn(t.clone().run(self.tls.load_full()));
                        t
                    }
                };
                next.entry(target.spec.app.clone())
                    .or_default()
                    .push(target);
            }
        }
        for gone in kept {
            gone.retired.cancel();
        }
        self.by_app.store(Arc::new(next));
        Ok(())
    }

    /// Whether some webhook of `app` wants `kind` for `channel` (checked
    /// before building an event).
    pub fn wants(&self, app: &str, kind: Kind, channel: &str) -> bool {
        self.by_app
            .load()
            .get(app)
            .is_some_and(|ts| ts.iter().any(|t| t.wants(kind, channel)))
    }

    /// Queue `event` (for `channel` of `app`) to every webhook that wants
    /// it. Never waits; sheds non-essential events under load.
    pub fn emit(&self, app: &str, channel: &str, event: Event) {
        let by_app = self.by_app.load();
        let Some(targets) = by_app.get(app) else {
            return;
        };
        let mut wanted = targets
            .iter()
            .filter(|t| t.wants(event.kind, channel))
            .peekable();
        if wanted.peek().is_none() {
            return;
        }
        if !event.kind.essential() && (self.load)() as u8 >= self.shed_from.load(Ordering::Relaxed)
        {
            crate::overload::shed("webhook_event");
            metrics::counter!("herdgate_webhook_dropped_total", "reason" => "shed").increment(1);
            return;
        }
        metrics::counter!("herdgate_webhook_events_total", "type" => event.kind.name())
            .increment(1);
        for t in wanted {
            t.push(&event);
        }
    }

    /// Events waiting in every queue (and in flight).
    pub fn depth(&self) -> usize {
        self.by_app
            .load()
            .values()
            .flatten()
            .map(|t| t.depth())
            .sum()
    }

    /// Wait (at most `within`) until every queue is empty: the end of a drain.
    pub async fn flush(&self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.depth() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(load_from: &str) -> Config {
        crate::config::Config::from_toml_str(&format!(
            "[overload.actions]\nshed_webhook_events = \"{load_from}\"\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n[[apps.webhooks]]\nurl = \"http://127.0.0.1:9/h\"\nevent_types = [\"channel_occupied\", \"member_added\"]\nfilter = {{ channel_prefix = \"presence-\" }}\n"
        ))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_nodes_shed_all_but_occupancy_and_filters_apply() {
        let state = Arc::new(AtomicU8::new(LoadState::Degraded as u8));
        let s = state.clone();
        let hooks = Hooks::start(
            &config("degraded"),
            Box::new(move || LoadState::from_u8(s.load(Ordering::Relaxed))),
        )
        .unwrap();
        assert!(hooks.wants("1", Kind::ChannelOccupied, "presence-a"));
        assert!(
            !hooks.wants("1", Kind::ChannelOccupied, "private-a"),
            "the prefix filter"
        );
        assert!(
            !hooks.wants("1", Kind::ChannelVacated, "presence-a"),
            "not asked for"
        );
        assert!(
            !hooks.wants("2", Kind::ChannelOccupied, "presence-a"),
            "another app"
        );
        hooks.emit("1", "presence-a", Event::occupied("presence-a"));
        hooks.emit(
            "1",
            "presence-a",
            Event::member(Kind::MemberAdded, "presence-a", "u"),
        );
        assert_eq!(hooks.depth(), 1, "member_added shed, occupancy kept");
        state.store(LoadState::Pressured as u8, Ordering::Relaxed);
        hooks.emit(
            "1",
            "presence-a",
            Event::member(Kind::MemberAdded, "presence-a", "u"),
        );
        assert_eq!(hooks.depth(), 2, "below the action's state: sent");
        // A reload that changes nothing keeps the queue; one that removes
        // the webhook drops it.
        hooks.reload(&config("degraded")).unwrap();
        assert_eq!(hooks.depth(), 2);
        let none = crate::config::Config::from_toml_str(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n",
        )
        .unwrap();
        hooks.reload(&none).unwrap();
        assert_eq!(hooks.depth(), 0);
    }

    #[test]
    fn events_have_pushers_fields() {
        let e: serde_json::Value =
            serde_json::from_str(&Event::member(Kind::MemberRemoved, "presence-x", "u").json)
                .unwrap();
        assert_eq!(
            e,
            serde_json::json!({"name":"member_removed","channel":"presence-x","user_id":"u"})
        );
        let c = Event::from_client_frame(
            r#"{"event":"client-typing","channel":"presence-x","data":{"t":1},"user_id":"u"}"#,
            "1.2",
        )
        .unwrap();
        let c: serde_json::Value = serde_json::from_str(&c.json).unwrap();
        assert_eq!(
            c,
            serde_json::json!({"name":"client_event","channel":"presence-x","event":"client-typing",
                "data":"{\"t\":1}","socket_id":"1.2","user_id":"u"})
        );
        let s = Event::from_client_frame(
            r#"{"event":"client-a","channel":"private-y","data":"hello"}"#,
            "3.4",
        )
        .unwrap();
        let s: serde_json::Value = serde_json::from_str(&s.json).unwrap();
        assert_eq!(s["data"], "hello");
        assert!(s.get("user_id").is_none(), "no user_id off presence");
        assert_eq!(Kind::from_name("cache_miss"), Some(Kind::CacheMiss));
        assert_eq!(
            Kind::ALL.map(Kind::name).to_vec(),
            crate::config::EVENT_TYPES.to_vec(),
            "config and code agree on the names"
        );
    }
}
