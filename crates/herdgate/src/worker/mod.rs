//! Realtime workers: each owns a share of the rooms, placed by the ring.
//!
//! A worker is an actor: one task, one bounded mailbox, state that no other
//! task touches, so there is no lock shared across workers and no store on
//! the hot path. Everything a worker is asked arrives as a [`Command`]; a
//! remote worker (over a network link) accepts the same commands, which is
//! why subscribers are identified by [`ConnId`] and frames are already-encoded
//! bytes.

mod bans;
mod history;
mod ops;
mod parity;
mod pool;
mod room;
mod target;

pub use pool::{Item, Pool};

pub use room::Delivery;
pub use target::{RemoteEdge, Sent, Target};

use crate::op::{Answer, Ask, Join, Tell};
use crate::outbound::Outbound;
use crate::protocol::{self, Frame};
use crate::types::{ConnId, Member, Resume, RoomInfo, RoomKey, Shed};
use crate::webhook::{Debounce, Event, Hooks, Kind, Pending};
use room::{Joined, Room, To};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A socket, as the rooms know it: its id and its outbound queue.
#[derive(Clone)]
pub struct Subscriber {
    pub id: ConnId,
    pub to: Target,
}

impl Subscriber {
    /// A socket of this process.
    pub fn local(id: ConnId, out: Arc<Outbound>) -> Subscriber {
        Subscriber {
            id,
            to: Target::Local(out),
        }
    }
}

pub enum Command {
    /// A place a socket takes ([`Join`]), decided in [`Worker::joined`];
    /// `reply` is told whether it was taken (refused: the socket was sent
    /// why first), from the room's task, after what the room sent the socket.
    Join {
        join: Join,
        sub: Subscriber,
        reply: Option<Decided>,
    },
    /// What a socket let go of ([`Tell`]), handled in [`Worker::told`].
    Tell(Tell),
    /// With `coalesce`, only the latest frame per room is sent, once per
    /// interval. With `ack`, the edges it went to are told (they confirm
    /// receipt of `ack.0`); a coalesced publish is not acknowledged.
    Publish {
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        ack: Option<(u64, oneshot::Sender<Delivery>)>,
        /// A client event (sent by `exclude`): a `client_event` webhook;
        /// never cached.
        client: bool,
        /// An idempotency key: a publish whose key this room has seen
        /// within the window is not sent again (and counts as done).
        idem: Option<u64>,
    },
    /// A question ([`Ask`]), answered in [`Worker::answer`].
    Ask {
        ask: Ask,
        reply: oneshot::Sender<Answer>,
    },
    /// Drop every socket of an edge. Its link gone for good (`silent:
    /// false`): members held only by it are removed with member_removed to
    /// the rest. The edge reconnected (`silent: true`): it is about to
    /// register again what it still has here, so nothing is announced.
    PurgeEdge { edge: u64, silent: bool },
    /// Drop, silently, every room (and sign-in registry) `keep` says no to:
    /// rooms this worker no longer owns (a cluster view changed). Replies
    /// with the number dropped, after every earlier command.
    Retain {
        keep: Arc<dyn Fn(&RoomKey) -> bool + Send + Sync>,
        done: oneshot::Sender<usize>,
    },
    /// Send every webhook event waiting out its debounce now (shutdown).
    FlushWebhooks { done: oneshot::Sender<()> },
}

pub type Mailbox = mpsc::Sender<Command>;

/// A subscription's answer, called by the room's worker when it decides.
pub type Decided = Box<dyn FnOnce(bool) + Send>;

/// Webhooks as the workers see them: where to emit, and the debounce.
#[derive(Clone)]
pub struct WebhookTaps {
    pub hooks: Arc<Hooks>,
    pub debounce: Duration,
    pub debounce_max: usize,
}

/// Each app's features as the rooms apply them (swapped on reload).
pub type Policies = Arc<arc_swap::ArcSwap<HashMap<Arc<str>, Policy>>>;

/// What the rooms of one app apply: its features, and from which load
/// state history is shed (`overload.actions.shed_history`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub features: crate::apps::Features,
    pub shed_history: crate::config::ActionFrom,
}

/// The [`Policies`] of a config's apps.
pub fn policies_of(config: &crate::config::Config) -> HashMap<Arc<str>, Policy> {
    config
        .apps
        .iter()
        .map(|a| {
            (
                Arc::from(a.id.as_str()),
                Policy {
                    features: crate::apps::Features::from(a),
                    shed_history: config.overload.actions.shed_history,
                },
            )
        })
        .collect()
}

/// The node's load state, as the workers read it (to shed history).
pub type LoadProbe = Arc<dyn Fn() -> crate::config::LoadState + Send + Sync>;

/// The conflation rule of `features` that applies to this publish, if
/// any: its interval, the event's key and the rule's `max_keys`. `None`: no
/// rule, a client event the rule leaves alone, or no key (the data has no
/// such field, or the key is longer than an event name may be).
fn conflation(
    features: &crate::apps::Features,
    room: &RoomKey,
    frame: &Frame,
    client: bool,
) -> Option<(Duration, Arc<str>, usize)> {
    let rule = features.conflation_for(&room.channel)?;
    if client && !rule.client_events {
        return None;
    }
    let key = conflation_key(frame, rule.field.as_deref())?;
    (key.len() <= protocol::names::MAX_EVENT_NAME)
        .then(|| (rule.interval, Arc::from(key), rule.max_keys))
}

/// An event's conflation key: its name, or the `field` of its JSON data.
fn conflation_key(frame: &Frame, field: Option<&str>) -> Option<String> {
    let (event, value) = event_and_field(frame, field)?;
    match field {
        None => Some(event),
        Some(_) => value,
    }
}

/// A frame's event name and, if `field` is given, that top-level field of
/// its data: data sent as a JSON string (the HTTP API's) or as JSON (a
/// client event's). A string field is taken as it is, another value as its
/// JSON text.
fn event_and_field(frame: &Frame, field: Option<&str>) -> Option<(String, Option<String>)> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
        #[serde(default)]
        data: Option<serde_json::Value>,
    }
    let e: Event<'_> = serde_json::from_str(frame.as_str()).ok()?;
    let value = field.and_then(|f| {
        let data = match e.data? {
            serde_json::Value::String(s) => serde_json::from_str(&s).ok()?,
            other => other,
        };
        match data.get(f)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    });
    Some((e.event.into_owned(), value))
}

/// Start one worker; it runs until every sender is dropped.
fn spawn(
    index: usize,
    mailbox: usize,
    taps: Option<WebhookTaps>,
    policies: Policies,
    load: LoadProbe,
) -> Mailbox {
    let (tx, rx) = mpsc::channel(mailbox);
    let debounce = taps.as_ref().map_or(Debounce::new(Duration::ZERO, 1), |t| {
        Debounce::new(t.debounce, t.debounce_max)
    });
    let worker = Worker {
        index,
        rooms: HashMap::new(),
        users: HashMap::new(),
        coalesced: HashMap::new(),
        tallies: HashMap::new(),
        hooks: taps.map(|t| t.hooks),
        debounce,
        policies,
        cache: Default::default(),
        history: Default::default(),
        history_seen: None,
        load,
        idem: Default::default(),
        counts: Default::default(),
        watchers: HashMap::new(),
        bans: Default::default(),
        revoked: Default::default(),
        recent: Default::default(),
        presence_counts: HashMap::new(),
        direct: true,
        windows: crate::outbound::Windows::new(),
    };
    tokio::spawn(worker.run(rx));
    tx
}

/// A publish's answer, when it asked for one: its ack id and where to reply.
type Ack = Option<(u64, oneshot::Sender<Delivery>)>;

/// A room's tallies for the interval under way.
struct Tallying {
    due: Instant,
    interval: Duration,
    events: Vec<EventTally>,
}

/// One event's count in a room's interval.
struct EventTally {
    name: String,
    total: u64,
    /// The counts of up to the rule's `max_values` values.
    values: Vec<(String, u64)>,
    /// How many had another value.
    other: u64,
}

/// A frame waiting out its interval: when it goes, and to whom.
struct Waiting {
    due: Instant,
    frame: Frame,
    exclude: Option<ConnId>,
}

struct Worker {
    index: usize,
    rooms: HashMap<RoomKey, Room>,
    /// Signed-in sockets per user, keyed like the user's channel.
    users: HashMap<RoomKey, HashMap<ConnId, Target>>,
    /// Publishes waiting for their interval, latest wins: per room, per key
    /// (`None`: the whole room, the load state's coalescing; `Some`: an
    /// app's conflation key). Bounded: one entry per room for coalescing,
    /// at most the rule's `max_keys` per room for conflation.
    coalesced: HashMap<RoomKey, HashMap<Option<Arc<str>>, Waiting>>,
    /// Tallied events counted this interval, per room (`[[apps.tallies]]`).
    /// Bounded per room by the rules' events × `max_values`.
    tallies: HashMap<RoomKey, Tallying>,
    /// Where webhook events go (none: no webhooks in this process).
    hooks: Option<Arc<Hooks>>,
    /// vacated / removed webhook events waiting out their window.
    debounce: Debounce,
    policies: Policies,
    cache: parity::Cache,
    history: history::Histories,
    /// The policies the history last ran under: a change to what history
    /// any channel keeps starts a new epoch.
    history_seen: Option<Arc<HashMap<Arc<str>, Policy>>>,
    load: LoadProbe,
    idem: parity::Idem,
    counts: parity::Counts,
    /// Per user (keyed like `users`): the sockets watching them.
    watchers: HashMap<RoomKey, HashMap<ConnId, Target>>,
    /// A moderator's channel bans, bounded per app (`max_channel_bans`).
    bans: bans::Bans,
    /// Users whose grants `terminate_connections` revoked.
    revoked: bans::Revoked,
    /// Sockets a moderator removed lately (refused a silent re-registration).
    recent: bans::Recent,
    /// Big presence rooms whose membership changed since their last
    /// `herdgate:presence_count`, and when the next one is due
    /// (docs/PROTOCOL.md "Big presence rooms"). One entry per such room.
    presence_counts: HashMap<RoomKey, Instant>,
    /// Fan-outs may write idle sockets in place: no backlog in the mailbox
    /// (see [`crate::outbound::direct`]).
    direct: bool,
    /// The write windows this worker's fan-outs opened, flushed here when
    /// they end (see [`crate::outbound::window`]). Bounded by `Windows::MAX`.
    windows: crate::outbound::Windows,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        tracing::debug!(worker = self.index, "worker started");
        loop {
            let next_flush = self
                .coalesced
                .values()
                .flat_map(|keys| keys.values().map(|w| w.due))
                .chain(self.tallies.values().map(|t| t.due))
                .chain(self.counts.next_due())
                .chain(self.history.next_sweep())
                .chain(self.presence_counts.values().copied())
                .chain(self.windows.next_due())
                .min();
            let waiting = !self.debounce.is_empty();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        // With more work waiting, fan-outs queue rather than
                        // write in place: the sockets' own tasks then write
                        // batches, on every core, while this one moves on.
                        self.direct = rx.is_empty();
                        self.handle(cmd)
                    }
                    None => break,
                },
                _ = sleep_until_opt(next_flush) => {
                    self.direct = rx.is_empty();
                    let now = Instant::now();
                    if !self.windows.is_empty() {
                        // Windows are written in place unless commands
                        // pile up behind them (a few waiting is the normal
                        // state of a busy room: the flush, bounded by its
                        // budget, costs less than waking every socket).
                        let in_place = rx.len() < WINDOW_FLUSH_BACKLOG;
                        record_windows(self.windows.flush_due(now, in_place));
                    }
                    self.flush_coalesced(now);
                    self.flush_tallies(now);
                    for room in self.counts.due(now) {
                        self.send_count(&room, None);
                    }
                    self.send_presence_counts(now);
                    if self.history.next_sweep().is_some_and(|at| at <= now) {
                        let policies = self.policies.load();
                        self.history.sweep(&|k: &RoomKey| {
                            policies
                                .get(&k.app)
                                .and_then(|p| p.features.history.for_channel(&k.channel))
                                .map(|(_, ttl)| ttl)
                        });
                    }
                }
                p = self.debounce.next(), if waiting => {
                    self.direct = rx.is_empty();
                    self.send_pending(p)
                }
            }
        }
        tracing::debug!(worker = self.index, "worker stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join { join, sub, reply } => self.joined(join, sub, reply),
            Command::Tell(tell) => self.told(tell),
            Command::Publish {
                room,
                frame,
                exclude,
                coalesce: None,
                ack,
                client,
                idem,
            } => {
                if self.sent_by_outsider(&room, client, exclude) {
                    return;
                }
                if idem.is_some_and(|k| !self.idem.first(&room, k)) {
                    // Published before with this key: done, nothing sent.
                    metrics::counter!("herdgate_publish_duplicates_total").increment(1);
                    if let Some((_, reply)) = ack {
                        let _ = reply.send(Delivery::default());
                    }
                    return;
                }
                // The app's rules for this channel, read once per publish.
                let policies = self.policies.load_full();
                let features = policies.get(&room.app).map(|p| &p.features);
                // An app's tally rule: counted, not sent.
                if features.is_some_and(|f| self.tally(f, &room, &frame)) {
                    if let Some((_, reply)) = ack {
                        let _ = reply.send(Delivery::default());
                    }
                    return;
                }
                // An app's conflation rule: latest per key per interval.
                let conflated = features.and_then(|f| conflation(f, &room, &frame, client));
                let (room, frame, ack) = match conflated {
                    Some((every, key, max_keys)) => {
                        match self.wait_out(
                            room,
                            frame,
                            exclude,
                            every,
                            Some(key),
                            max_keys,
                            ack,
                            client,
                        ) {
                            Ok(()) => return,
                            Err(back) => back,
                        }
                    }
                    None => (room, frame, ack),
                };
                let mut serial = None;
                if client && self.rooms.contains_key(&room) {
                    self.client_event_hook(&room, &frame, exclude);
                } else if !client {
                    self.remember(&room, &frame);
                    serial = self.keep(&room, &frame);
                }
                let (ack_id, reply) = match ack {
                    Some((id, reply)) => (id, Some(reply)),
                    None => (0, None),
                };
                let d = match self.rooms.get(&room) {
                    Some(r) => r.fan_out(
                        &room,
                        &frame,
                        To {
                            exclude,
                            ack_id,
                            serial,
                            direct: self.direct,
                            windows: Some(&self.windows),
                            ..To::default()
                        },
                    ),
                    None => Delivery::default(),
                };
                record(&d);
                if let Some(reply) = reply {
                    let _ = reply.send(d);
                }
            }
            Command::Publish {
                room,
                frame,
                exclude,
                coalesce: Some(every),
                ack,
                client,
                idem,
            } => {
                if self.sent_by_outsider(&room, client, exclude) {
                    return;
                }
                if idem.is_some_and(|k| !self.idem.first(&room, k)) {
                    if let Some((_, reply)) = ack {
                        let _ = reply.send(Delivery::default());
                    }
                    return;
                }
                crate::overload::shed("coalesced");
                // One key per room (`None`), beside whatever an app's
                // conflation holds there: never refused for room.
                let unbounded = usize::MAX;
                if let Err((room, frame, ack)) =
                    self.wait_out(room, frame, exclude, every, None, unbounded, ack, client)
                {
                    // Cannot happen (no bound); were it to, the publish is
                    // sent at once, as any that cannot wait.
                    self.handle(Command::Publish {
                        room,
                        frame,
                        exclude,
                        coalesce: None,
                        ack,
                        client,
                        idem: None,
                    });
                }
            }
            Command::Ask { ask, reply } => {
                let _ = reply.send(self.answer(ask));
            }
            Command::PurgeEdge { edge, silent } => self.purge_edge(edge, silent),
            Command::FlushWebhooks { done } => {
                for p in self.debounce.take(|_| true) {
                    self.send_pending(p);
                }
                let _ = done.send(());
            }
            Command::Retain { keep, done } => {
                let before = self.rooms.len() + self.users.len();
                let moved: Vec<RoomKey> = self.rooms.keys().filter(|k| !keep(k)).cloned().collect();
                self.history.retain(&*keep, &moved);
                let mut dropped_subs = 0usize;
                self.rooms.retain(|k, r| {
                    let kept = keep(k);
                    if !kept {
                        dropped_subs += r.subscription_count();
                    }
                    kept
                });
                self.users.retain(|k, _| keep(k));
                self.watchers.retain(|k, _| keep(k));
                self.coalesced.retain(|k, _| keep(k));
                self.tallies.retain(|k, _| keep(k));
                self.presence_counts.retain(|k, _| keep(k));
                self.cache.retain(&*keep);
                self.bans.retain(&*keep);
                // Rooms that moved away take no debounce with them: what
                // waits for them is sent now, before their new owner can
                // emit anything for them.
                for p in self.debounce.take(|k| !keep(k)) {
                    self.send_pending(p);
                }
                let dropped = before - self.rooms.len() - self.users.len();
                metrics::gauge!("herdgate_subscriptions").decrement(dropped_subs as f64);
                let _ = done.send(dropped);
            }
        }
    }

    /// Hold `frame` until `every` has passed, replacing what waits under
    /// the same `key` in the room (the first frame's time is kept). The
    /// publish is answered now: it is sent later, latest wins, so there is
    /// no per-event receipt to wait for. Gives the publish back when the
    /// room already holds `max_keys` other keys: it is sent at once.
    #[allow(clippy::too_many_arguments)]
    fn wait_out(
        &mut self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        every: Duration,
        key: Option<Arc<str>>,
        max_keys: usize,
        ack: Ack,
        client: bool,
    ) -> Result<(), (RoomKey, Frame, Ack)> {
        let keys = self.coalesced.get(&room);
        if keys.is_some_and(|k| k.len() >= max_keys && !k.contains_key(&key)) {
            metrics::counter!("herdgate_conflation_overflow_total").increment(1);
            return Err((room, frame, ack));
        }
        if !client {
            self.remember(&room, &frame);
        } else if self.rooms.contains_key(&room) {
            // Its webhook goes now: the event was sent, if conflated.
            self.client_event_hook(&room, &frame, exclude);
        }
        if let Some((_, reply)) = ack {
            let _ = reply.send(Delivery::default());
        }
        if !self.rooms.contains_key(&room) {
            if !client {
                self.keep(&room, &frame); // nobody to wait for
            }
            return Ok(());
        }
        let due = Instant::now() + every;
        let waiting = self.coalesced.entry(room).or_default();
        match waiting.get_mut(&key) {
            // Keep the flush time of the first waiting frame; replace the frame.
            Some(w) => (w.frame, w.exclude) = (frame, exclude),
            None => {
                waiting.insert(
                    key,
                    Waiting {
                        due,
                        frame,
                        exclude,
                    },
                );
            }
        }
        Ok(())
    }

    /// Count `frame` if a tally rule names its channel and event; `true`
    /// when it was counted (and is then sent to nobody).
    fn tally(&mut self, features: &crate::apps::Features, room: &RoomKey, frame: &Frame) -> bool {
        if !features.tallies_channel(&room.channel) {
            return false;
        }
        // The rules of one channel count by one field at most in practice;
        // the frame is read once, for its name and the first rule's field.
        let field = features
            .tallies
            .iter()
            .find(|t| room.channel.starts_with(t.prefix.as_str()))
            .and_then(|t| t.field.as_deref());
        let Some((event, first_value)) = event_and_field(frame, field) else {
            return false;
        };
        let Some(rule) = features.tally_for(&room.channel, &event) else {
            return false;
        };
        let value = match rule.field.as_deref() {
            f if f == field => first_value,
            Some(f) => event_and_field(frame, Some(f)).and_then(|(_, v)| v),
            None => None,
        };
        if !self.rooms.contains_key(room) {
            return true; // nobody to tell
        }
        let now = Instant::now();
        let t = self
            .tallies
            .entry(room.clone())
            .or_insert_with(|| Tallying {
                due: now + rule.interval,
                interval: rule.interval,
                events: Vec::new(),
            });
        let i = match t.events.iter().position(|e| e.name == event) {
            Some(i) => i,
            None => {
                t.events.push(EventTally {
                    name: event,
                    total: 0,
                    values: Vec::new(),
                    other: 0,
                });
                t.events.len() - 1
            }
        };
        let e = &mut t.events[i];
        e.total += 1;
        if let Some(v) = value {
            if let Some(slot) = e.values.iter().position(|(name, _)| *name == v) {
                e.values[slot].1 += 1;
            } else if e.values.len() < rule.max_values && v.len() <= 64 {
                e.values.push((v, 1));
            } else {
                e.other += 1;
            }
        }
        true
    }

    /// Send each room's tally summary whose interval has ended:
    /// `herdgate:tally` `{"interval_ms":…,"tallies":{event:{"total":n,"values":{v:n},"other":n}}}`.
    fn flush_tallies(&mut self, now: Instant) {
        let due: Vec<RoomKey> = self
            .tallies
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(t) = self.tallies.remove(&key) else {
                continue;
            };
            let tallies: serde_json::Map<String, serde_json::Value> = t
                .events
                .into_iter()
                .map(|e| {
                    let values: serde_json::Map<String, serde_json::Value> =
                        e.values.into_iter().map(|(v, n)| (v, n.into())).collect();
                    let summary =
                        serde_json::json!({"total": e.total, "values": values, "other": e.other});
                    (e.name, summary)
                })
                .collect();
            let data = serde_json::json!({
                "interval_ms": t.interval.as_millis() as u64,
                "tallies": tallies,
            });
            let frame = protocol::event("herdgate:tally", Some(&key.channel), &data.to_string());
            if self.wants(&key, Kind::Tally).is_some() {
                self.emit(&key, Event::tally(&key.channel, &data));
            }
            let serial = self.keep(&key, &frame);
            if let Some(room) = self.rooms.get(&key) {
                record(&room.fan_out(
                    &key,
                    &frame,
                    To {
                        serial,
                        direct: self.direct,
                        windows: Some(&self.windows),
                        ..To::default()
                    },
                ));
            }
        }
    }

    /// Send what has waited out its interval, in the order it first arrived.
    fn flush_coalesced(&mut self, now: Instant) {
        let mut due: Vec<(Instant, RoomKey, Option<Arc<str>>)> = Vec::new();
        for (room, keys) in &self.coalesced {
            for (key, w) in keys {
                if w.due <= now {
                    due.push((w.due, room.clone(), key.clone()));
                }
            }
        }
        due.sort_by_key(|(at, _, _)| *at);
        for (_, room_key, key) in due {
            let Some(keys) = self.coalesced.get_mut(&room_key) else {
                continue;
            };
            let Some(w) = keys.remove(&key) else {
                continue;
            };
            if keys.is_empty() {
                self.coalesced.remove(&room_key);
            }
            // History keeps what was sent: the latest of the interval.
            let serial = self.keep(&room_key, &w.frame);
            if let Some(room) = self.rooms.get(&room_key) {
                record(&room.fan_out(
                    &room_key,
                    &w.frame,
                    To {
                        exclude: w.exclude,
                        serial,
                        direct: self.direct,
                        windows: Some(&self.windows),
                        ..To::default()
                    },
                ));
            }
        }
    }

    /// A big presence room's membership changed: its count goes out at most
    /// every `presence_count_interval`, the first one interval after the
    /// change.
    fn presence_changed(&mut self, key: &RoomKey) {
        let every = self
            .policies
            .load()
            .get(&key.app)
            .map_or(Duration::from_secs(5), |p| p.features.presence_count_every);
        self.presence_counts
            .entry(key.clone())
            .or_insert_with(|| Instant::now() + every);
    }

    /// The big rooms' counts that are due, each to the whole room. Sent
    /// whenever a change armed it, even when the count is back where the
    /// last one left it: members' own counts moved meanwhile (pusher-js
    /// counts the featured members' joins and leaves itself).
    fn send_presence_counts(&mut self, now: Instant) {
        let due: Vec<RoomKey> = self
            .presence_counts
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &due {
            self.presence_counts.remove(key);
            let Some(room) = self.rooms.get(key) else {
                continue;
            };
            let count = room.user_count();
            record(&room.fan_out(
                key,
                &protocol::presence_count(&key.channel, count),
                To::room(self.direct, &self.windows),
            ));
        }
    }

    /// A client event (`client`, sent by `exclude`) from a socket the room
    /// does not hold: a moderator took it out, and its session had not yet
    /// read the notice. Dropped.
    fn sent_by_outsider(&self, room: &RoomKey, client: bool, exclude: Option<ConnId>) -> bool {
        let outsider = match (client, exclude) {
            (true, Some(sender)) => !self.rooms.get(room).is_some_and(|r| r.holds(sender)),
            _ => false,
        };
        if outsider {
            metrics::counter!("herdgate_client_events_dropped_total", "reason" => "not_subscribed")
                .increment(1);
        }
        outsider
    }

    /// Whether the socket is subscribed afterwards. `signed_in`: the user
    /// the socket is signed in as (outside presence channels, whom a ban
    /// names); `granted`: taken by a grant the app's line authorized then.
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        key: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        signed_in: Option<Arc<str>>,
        granted: Option<u64>,
        max_members: usize,
        shed: Shed,
        resume: Option<Resume>,
    ) -> bool {
        let id = sub.id;
        let to = sub.to.clone();
        let user = member.as_ref().map(|m| m.user_id.clone());
        // A moderator's ban holds whatever authorized the join (the app's
        // signature, a grant) and on every edge: refused here, told why.
        // A re-homed socket (silent) still held the room elsewhere: it is
        // told it was removed, so its edge and session forget it too.
        let now = Instant::now();
        // A re-registration of a socket a moderator removed here lately (its
        // edge had not heard of it yet): told again, not taken back.
        if shed.silent && self.recent.contains(&key, id, now) {
            to.remove(&key, id, &protocol::removed(&key.channel, 0));
            return false;
        }
        let named = user.as_deref().or(signed_in.as_deref());
        if let Some(left) = named.and_then(|u| self.bans.banned(&key, u, now)) {
            metrics::counter!("herdgate_moderation_total", "action" => "refused").increment(1);
            let secs = u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX);
            if shed.silent {
                to.remove(&key, id, &protocol::removed(&key.channel, secs));
            } else {
                to.push_one(
                    &key,
                    id,
                    &protocol::banned(&key.channel, left.as_secs().max(1)),
                );
            }
            return false;
        }
        // A grant of a user whose grants were revoked (terminate_connections)
        // since the app authorized its line: refused as a grant, so the
        // client asks the app's endpoint, which decides.
        let users = [user.as_deref(), signed_in.as_deref()];
        if granted.is_some_and(|t| self.revoked.voids(&key.app, users, t)) {
            metrics::counter!("herdgate_auth_grants_total", "result" => "revoked").increment(1);
            to.push_one(
                &key,
                id,
                &protocol::subscription_error(
                    &key.channel,
                    "GrantRefused",
                    "grant refused: revoked; ask the app's endpoint",
                    401,
                ),
            );
            return false;
        }
        let is_new_room = !self.rooms.contains_key(&key);
        // The socket's position: every event of the room up to now is
        // behind it (serials are the worker's, so this is its newest one).
        // A channel without history hands out none.
        self.check_history_policy();
        let keeps = self.history_bounds(&key).is_some();
        let position = self.history.serial();
        let epoch = self.history.epoch().clone();
        let answer = |frame: Frame| match &resume {
            Some(_) if keeps => protocol::with_position(&frame, &epoch, position),
            _ => frame,
        };
        // Re-homed (its room moved here, or its edge's link came back): what
        // it missed on the way is not known here, so a socket that opted in
        // to resume is told so, with its position from now on.
        let rehomed = (shed.silent && resume.is_some())
            .then(|| protocol::resumed(&key.channel, false, &epoch, position));
        let room = self.rooms.entry(key.clone()).or_default();
        match room.join(sub, member, signed_in, max_members, resume.is_some()) {
            Joined::AlreadySubscribed => {
                if let Some(f) = &rehomed {
                    room.push_to(&key, id, f);
                }
                true
            }
            Joined::PresenceFull => {
                to.push_one(
                    &key,
                    id,
                    &protocol::subscription_error(
                        &key.channel,
                        "LimitReached",
                        "presence channel has reached its member limit",
                        403,
                    ),
                );
                if is_new_room {
                    self.rooms.remove(&key);
                }
                false
            }
            Joined::Ok { new_member } => {
                if is_new_room {
                    metrics::gauge!("herdgate_channels").increment(1.0);
                }
                metrics::gauge!("herdgate_subscriptions").increment(1.0);
                // A moved room arrives silently: it was occupied (and its
                // members added) at its previous owner already.
                let announced = !shed.silent || shed.announce;
                if is_new_room && announced {
                    self.occupied(&key);
                }
                if let (true, true, Some(user)) = (new_member, announced, &user) {
                    self.member_added(&key, user);
                }
                // Read only for presence joins: the app's big-room threshold.
                let full = user.as_ref().map_or(usize::MAX, |_| {
                    self.policies
                        .load()
                        .get(&key.app)
                        .map_or(usize::MAX, |p| p.features.presence_full_members)
                });
                let room = self.rooms.get_mut(&key).expect("just joined");
                match user {
                    Some(user) => {
                        let big = room.grow(full);
                        if !shed.silent {
                            let frame = room.presence_frame(&key.channel, &user, full);
                            room.push_to(&key, id, &answer(frame));
                        }
                        // A big room tells its members only of featured
                        // ones joining; the count follows (presence_changed).
                        if new_member
                            && (!shed.silent || shed.announce)
                            && room.announces(room.is_featured(&user))
                            && member_events_allowed(room, shed)
                        {
                            let added = protocol::member_added(
                                &key.channel,
                                &user,
                                room.member_info(&user),
                            );
                            record(&room.fan_out(
                                &key,
                                &added,
                                To {
                                    except_user: Some(&user),
                                    direct: self.direct,
                                    windows: Some(&self.windows),
                                    ..To::default()
                                },
                            ));
                        }
                        if new_member && big {
                            self.presence_changed(&key);
                        }
                    }
                    None => {
                        if !shed.silent {
                            let ok = answer(protocol::subscription_succeeded(&key.channel));
                            room.push_to(&key, id, &ok);
                        }
                    }
                }
                if let Some(f) = &rehomed {
                    to.push_one(&key, id, f);
                }
                if !shed.silent {
                    // After subscription_succeeded: what the socket missed,
                    // then whether that was all of it.
                    let recovered = match resume.as_ref().filter(|r| r.since.is_some()) {
                        Some(r) => self.replay(&key, id, r),
                        None => false,
                    };
                    // The cached event, or a miss (unless the replay brought it).
                    if protocol::names::is_cache(&key.channel) && !recovered {
                        self.send_cached(&key, id);
                    }
                    self.count_changed(&key, Some(id));
                }
                true
            }
        }
    }

    fn unsubscribe(&mut self, key: RoomKey, id: ConnId, shed: Shed) {
        let Some(room) = self.rooms.get_mut(&key) else {
            return;
        };
        let before = room.subscription_count();
        // The room's size as the member leaves (counting them) decides, as on joining.
        let announce =
            !shed.silent && room.user_count() <= shed.member_events_max.unwrap_or(usize::MAX);
        let gone = room.leave_member(id);
        if room.subscription_count() < before {
            metrics::gauge!("herdgate_subscriptions").decrement(1.0);
        }
        let big = gone.is_some() && room.is_big();
        // A big room tells its members only of featured ones leaving.
        let heard = gone.as_ref().is_some_and(|(_, f)| room.announces(*f));
        let gone_user = gone.map(|(u, _)| u);
        if let (Some(user), true) = (&gone_user, heard) {
            if announce {
                record(&room.fan_out(
                    &key,
                    &protocol::member_removed(&key.channel, user),
                    To::room(self.direct, &self.windows),
                ));
            } else {
                crate::overload::shed("presence_member_event");
            }
        }
        let emptied = room.is_empty();
        if emptied {
            self.rooms.remove(&key);
            self.coalesced.remove(&key);
            self.tallies.remove(&key);
            self.counts.forget(&key);
            self.presence_counts.remove(&key);
            metrics::gauge!("herdgate_channels").decrement(1.0);
        } else {
            if !shed.silent {
                self.count_changed(&key, None);
            }
            if big {
                self.presence_changed(&key);
            }
        }
        if !shed.silent {
            if let Some(user) = gone_user {
                self.member_removed(&key, user);
            }
            if emptied {
                self.vacated(&key);
            }
        }
    }
}

impl Worker {
    fn purge_edge(&mut self, edge: u64, silent: bool) {
        let mut emptied = Vec::new();
        let mut removed = Vec::new();
        let mut touched = Vec::new();
        let mut big_changed = Vec::new();
        for (key, room) in self.rooms.iter_mut() {
            let before = room.subscription_count();
            let gone = room.purge_edge(edge);
            if !gone.is_empty() && room.is_big() {
                big_changed.push(key.clone());
            }
            for (user, featured) in gone.into_iter().filter(|_| !silent) {
                if room.announces(featured) {
                    record(&room.fan_out(
                        key,
                        &protocol::member_removed(&key.channel, &user),
                        To::room(self.direct, &self.windows),
                    ));
                }
                removed.push((key.clone(), user));
            }
            metrics::gauge!("herdgate_subscriptions")
                .decrement((before - room.subscription_count()) as f64);
            if room.is_empty() {
                emptied.push(key.clone());
            } else if room.subscription_count() < before {
                touched.push(key.clone());
            }
        }
        for (key, user) in removed {
            self.member_removed(&key, user);
        }
        for key in big_changed {
            self.presence_changed(&key);
        }
        if !silent {
            for key in touched {
                self.count_changed(&key, None);
            }
        }
        for key in emptied {
            self.rooms.remove(&key);
            self.coalesced.remove(&key);
            self.tallies.remove(&key);
            self.counts.forget(&key);
            self.presence_counts.remove(&key);
            metrics::gauge!("herdgate_channels").decrement(1.0);
            if !silent {
                self.vacated(&key);
            }
        }
        let mut offline = Vec::new();
        self.users.retain(|k, socks| {
            socks.retain(|_, to| to.edge_id() != Some(edge));
            if socks.is_empty() {
                offline.push(k.clone());
            }
            !socks.is_empty()
        });
        self.watchers.retain(|_, w| {
            w.retain(|_, to| to.edge_id() != Some(edge));
            !w.is_empty()
        });
        if !silent {
            for k in offline {
                self.user_transition(&k, false);
            }
        } else {
            // The edge is back within its lease and registers its sign-ins
            // again (not silently): hold each emptied user's `user_offline`,
            // so the re-registration cancels it (no second `user_online`)
            // and a user who does not come back is still reported.
            for k in offline {
                let wanted = self.wants(&k, Kind::UserOffline).is_some()
                    || self.wants(&k, Kind::UserOnline).is_some();
                if wanted && !self.debounce.hold(Pending::Offline(k.clone())) {
                    self.emit(&k, Event::user(Kind::UserOffline, k.user_id()));
                }
            }
        }
    }
}

/// Cache channels, subscription counts and watchlists (see [`parity`]).
impl Worker {
    fn policy(&self, app: &str) -> Option<crate::apps::Features> {
        self.policies.load().get(app).map(|p| p.features.clone())
    }

    /// The bounds of `room`'s history, if its channel keeps one.
    fn history_bounds(&self, room: &RoomKey) -> Option<history::Bounds> {
        let policies = self.policies.load();
        let f = &policies.get(&room.app)?.features.history;
        f.for_channel(&room.channel)
            .map(|(max_events, ttl)| history::Bounds {
                max_events,
                ttl,
                app_bytes: f.max_bytes,
            })
    }

    /// A reload changed what history some channel keeps: events published
    /// while a channel kept none are nowhere, so no position handed out
    /// before may claim a complete recovery (a new epoch).
    fn check_history_policy(&mut self) {
        let now = self.policies.load();
        if self
            .history_seen
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &now))
        {
            return;
        }
        let changed = self.history_seen.as_ref().is_some_and(|seen| {
            seen.len() != now.len()
                || now.iter().any(|(app, p)| {
                    seen.get(app).map(|s| &s.features.history) != Some(&p.features.history)
                })
        });
        if changed {
            tracing::info!(worker = self.index, "history settings changed: new epoch");
            self.history.new_epoch();
        }
        self.history_seen = Some(Arc::clone(&now));
    }

    /// Keep a server event in its room's history; its serial, if kept.
    fn keep(&mut self, room: &RoomKey, frame: &Frame) -> Option<u64> {
        self.check_history_policy();
        let bounds = self.history_bounds(room);
        let shed = bounds.is_some()
            && self
                .policies
                .load()
                .get(&room.app)
                .is_some_and(|p| p.shed_history.applies((self.load)()));
        self.history.record(room, frame, bounds, shed)
    }

    /// Send a resuming socket what followed its position, each event with
    /// its serial, then `herdgate:resumed`: recovered only if nothing is
    /// missing and all of it fits the socket's queue. Otherwise nothing is
    /// replayed (the app reloads). Whether it recovered.
    fn replay(&mut self, key: &RoomKey, id: ConnId, r: &Resume) -> bool {
        let Some(p) = r.since.as_ref() else {
            return false;
        };
        let bounds = self.history_bounds(key);
        let limit = bounds.map_or(0, |b| b.max_events).min(r.max_events);
        // Each replayed frame grows by its `"serial":N` (at most 30 bytes).
        let page = self
            .history
            .since(key, p.serial, Some(&p.epoch), limit, r.max_bytes, 30);
        let recovered = bounds.is_some() && page.complete && !page.more;
        let Some(room) = self.rooms.get(key) else {
            return false;
        };
        if recovered {
            for (serial, frame) in &page.events {
                room.push_to(key, id, &protocol::with_serial(frame, *serial));
            }
            metrics::counter!("herdgate_resumes_total", "recovered" => "true").increment(1);
            metrics::counter!("herdgate_resume_replayed_total").increment(page.events.len() as u64);
        } else {
            metrics::counter!("herdgate_resumes_total", "recovered" => "false").increment(1);
        }
        let serial = self.history.serial();
        let done = protocol::resumed(&key.channel, recovered, self.history.epoch(), serial);
        room.push_to(key, id, &done);
        recovered
    }

    /// A server-triggered event to a cache channel becomes its cached one.
    fn remember(&mut self, room: &RoomKey, frame: &Frame) {
        if !protocol::names::is_cache(&room.channel) {
            return;
        }
        let f = self.policy(&room.app).unwrap_or_default();
        self.cache
            .put(room, frame.clone(), f.cache_ttl, f.cache_max_bytes);
    }

    fn send_cached(&mut self, room: &RoomKey, id: ConnId) {
        let frame = match self.cache.get(room) {
            Some((frame, _)) => frame,
            None => {
                if self.wants(room, Kind::CacheMiss).is_some() && self.cache.miss_webhook_due(room)
                {
                    self.emit(room, Event::cache_miss(&room.channel));
                }
                protocol::cache_miss(&room.channel)
            }
        };
        if let Some(r) = self.rooms.get(room) {
            r.push_to(room, id, &frame);
        }
    }

    /// A non-presence room's subscription count changed (`joined`: by this
    /// socket's subscription).
    fn count_changed(&mut self, room: &RoomKey, joined: Option<ConnId>) {
        if protocol::names::ChannelKind::of(&room.channel) == protocol::names::ChannelKind::Presence
            || !self
                .policy(&room.app)
                .is_some_and(|f| f.subscription_count_events)
        {
            return;
        }
        let Some(n) = self.rooms.get(room).map(Room::subscription_count) else {
            return;
        };
        if self.counts.changed(room, n) {
            self.send_count(room, joined);
        }
    }

    /// Tell the room its count. The socket that just joined gets it
    /// addressed to it: at a cluster edge its registration is confirmed
    /// only after this, and a broadcast reaches confirmed sockets only.
    fn send_count(&mut self, room: &RoomKey, joined: Option<ConnId>) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let n = r.subscription_count();
        metrics::counter!("herdgate_subscription_count_events_total").increment(1);
        let frame = protocol::subscription_count(&room.channel, n);
        if let Some(id) = joined {
            r.push_to(room, id, &frame);
        }
        record(&r.fan_out(
            room,
            &frame,
            To {
                exclude: joined,
                direct: self.direct,
                windows: Some(&self.windows),
                ..To::default()
            },
        ));
        if self.wants(room, Kind::SubscriptionCount).is_some() {
            self.emit(room, Event::subscription_count(&room.channel, n));
        }
    }

    /// The user of `room` (their `#server-to-user-{id}`, owned here) came
    /// online (first signed-in socket anywhere) or went offline (last one
    /// gone): their watchers, and the app's `user_online`/`user_offline`
    /// webhooks. Moves are silent, so each transition happens once per
    /// cluster, on the owner.
    fn user_transition(&mut self, room: &RoomKey, online: bool) {
        self.watchlist_transition(room, online);
        if online {
            if self.debounce.cancel(&Pending::Offline(room.clone())) {
                // Back within the window: neither offline nor online.
                metrics::counter!("herdgate_webhook_debounced_total", "type" => "user_offline")
                    .increment(1);
            } else if self.wants(room, Kind::UserOnline).is_some() {
                self.emit(room, Event::user(Kind::UserOnline, room.user_id()));
            }
        } else if self.wants(room, Kind::UserOffline).is_some()
            && !self.debounce.hold(Pending::Offline(room.clone()))
        {
            self.emit(room, Event::user(Kind::UserOffline, room.user_id()));
        }
    }

    /// The user of `room` came online (first signed-in socket) or went
    /// offline (last one left): tell everyone watching them.
    fn watchlist_transition(&self, room: &RoomKey, online: bool) {
        let Some(watchers) = self.watchers.get(room) else {
            return;
        };
        let user = room.user_id();
        let frame = if online {
            protocol::watchlist_events(&[user], &[])
        } else {
            protocol::watchlist_events(&[], &[user])
        };
        metrics::counter!("herdgate_watchlist_events_total").increment(watchers.len() as u64);
        for (id, to) in watchers {
            to.push_one(room, *id, &frame);
        }
    }
}

/// Webhook events of the rooms this worker owns.
impl Worker {
    fn wants(&self, key: &RoomKey, kind: Kind) -> Option<&Arc<Hooks>> {
        self.hooks
            .as_ref()
            .filter(|h| h.wants(&key.app, kind, &key.channel))
    }

    fn emit(&self, key: &RoomKey, event: Event) {
        if let Some(h) = &self.hooks {
            h.emit(&key.app, &key.channel, event);
        }
    }

    fn occupied(&mut self, key: &RoomKey) {
        if self.debounce.cancel(&Pending::Vacated(key.clone())) {
            // Back within the window: neither vacated nor occupied.
            metrics::counter!("herdgate_webhook_debounced_total", "type" => "channel_vacated")
                .increment(1);
        } else if self.wants(key, Kind::ChannelOccupied).is_some() {
            self.emit(key, Event::occupied(&key.channel));
        }
    }

    fn vacated(&mut self, key: &RoomKey) {
        if self.wants(key, Kind::ChannelVacated).is_some()
            && !self.debounce.hold(Pending::Vacated(key.clone()))
        {
            self.emit(key, Event::vacated(&key.channel));
        }
    }

    fn member_added(&mut self, key: &RoomKey, user: &Arc<str>) {
        if self
            .debounce
            .cancel(&Pending::Removed(key.clone(), user.clone()))
        {
            metrics::counter!("herdgate_webhook_debounced_total", "type" => "member_removed")
                .increment(1);
        } else if self.wants(key, Kind::MemberAdded).is_some() {
            self.emit(key, Event::member(Kind::MemberAdded, &key.channel, user));
        }
    }

    fn member_removed(&mut self, key: &RoomKey, user: Arc<str>) {
        if self.wants(key, Kind::MemberRemoved).is_some()
            && !self
                .debounce
                .hold(Pending::Removed(key.clone(), user.clone()))
        {
            self.emit(key, Event::member(Kind::MemberRemoved, &key.channel, &user));
        }
    }

    /// A debounced event whose window ended (or that must go now).
    fn send_pending(&mut self, p: Pending) {
        match p {
            Pending::Vacated(key) => {
                let e = Event::vacated(&key.channel);
                self.emit(&key, e);
            }
            Pending::Removed(key, user) => {
                let e = Event::member(Kind::MemberRemoved, &key.channel, &user);
                self.emit(&key, e);
            }
            Pending::Offline(key) => {
                let e = Event::user(Kind::UserOffline, key.user_id());
                self.emit(&key, e);
            }
        }
    }

    fn client_event_hook(&self, key: &RoomKey, frame: &Frame, sender: Option<ConnId>) {
        let (Some(_), Some(sender)) = (self.wants(key, Kind::ClientEvent), sender) else {
            return;
        };
        if let Some(e) = Event::from_client_frame(frame.as_str(), &sender.socket_id()) {
            self.emit(key, e);
        }
    }
}

fn member_events_allowed(room: &Room, shed: Shed) -> bool {
    match shed.member_events_max {
        Some(max) if room.user_count() > max => {
            crate::overload::shed("presence_member_event");
            false
        }
        _ => true,
    }
}

/// Commands waiting in a worker's mailbox past which window flushes hand
/// their sockets to the sockets' own tasks rather than write them here.
const WINDOW_FLUSH_BACKLOG: usize = 64;

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn info(r: &Room) -> RoomInfo {
    RoomInfo {
        subscription_count: r.subscription_count(),
        user_count: r.user_count(),
    }
}

/// `herdgate_write_window_flushes_total{how}`: sockets whose write window
/// a worker flushed, written in place or handed to their writer; and the
/// frames it wrote in place.
fn record_windows(f: crate::outbound::window::Flush) {
    if f.in_place > 0 {
        metrics::counter!("herdgate_write_window_flushes_total", "how" => "in_place")
            .increment(f.in_place);
    }
    if f.handed > 0 {
        metrics::counter!("herdgate_write_window_flushes_total", "how" => "writer")
            .increment(f.handed);
    }
    if f.frames > 0 {
        metrics::counter!("herdgate_messages_written_in_place_total").increment(f.frames);
    }
}

fn record(d: &Delivery) {
    if d.queued > 0 {
        metrics::counter!("herdgate_messages_delivered_total").increment(d.queued);
    }
    if d.written > 0 {
        metrics::counter!("herdgate_messages_written_in_place_total").increment(d.written);
    }
    if d.overflowed > 0 {
        metrics::counter!("herdgate_outbound_overflows_total").increment(d.overflowed);
    }
}
