//! The status page on the admin listener (`GET /`) and the one JSON document
//! it reads (`GET /status/live`), which scripts can use too.
//!
//! Why it exists: in an incident an operator needs one glance that says
//! whether the node is degraded, why, and what it is shedding — not a
//! Prometheus query. Why it is built like this:
//!
//! - **Offline.** The page is one static file compiled into the binary
//!   (inline CSS and script, system fonts, no CDN), served with a Content
//!   Security Policy that forbids loading anything from anywhere else: it
//!   works on a bastion host and during the outage that took the CDN down.
//! - **Nothing on the hot path.** Nothing here runs per message. Counters
//!   come from the metrics recorder the hot path already feeds (one render
//!   of its Prometheus text per request: tens of series); the load signals
//!   are the overload monitor's last sample; rates and delay percentiles are
//!   differences between samples taken *on request*, kept in a bounded ring;
//!   top rooms are one channel listing per app (what `GET /apps/{id}/channels`
//!   costs) at most every [`TOP_EVERY`], however many pages are open.
//! - **Polling, not a stream.** Admin connections are few
//!   (`limits.max_admin_connections`) and cut after 30 s, so the page asks
//!   once a second over keep-alive instead of holding a connection open.

use super::admin::Admin;
use super::Body;
use crate::config::{ActionFrom, ActionsConfig, LoadState};
use bytes::Bytes;
use http::{header, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const PAGE: &str = include_str!("status.html");
/// Everything the page needs is inline; nothing may come from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// Samples kept for rates and the page's charts: one per second at most.
const HISTORY: usize = 180;
const SAMPLE_SPACING: Duration = Duration::from_secs(1);
/// Rates need at least this much time between two samples.
const RATE_MIN: Duration = Duration::from_millis(200);
/// Delivery-delay percentiles are over (up to) this recent window.
const DELAY_WINDOW: Duration = Duration::from_secs(10);
/// Top rooms are listed at most this often, shared by every viewer.
const TOP_EVERY: Duration = Duration::from_secs(5);
const TOP_N: usize = 10;
/// Mailbox wait of each listing, and deadline of one whole sample.
const TOP_WAIT: Duration = Duration::from_secs(1);
const TOP_DEADLINE: Duration = Duration::from_secs(3);
/// Apps listed per sample, and rooms counted per owner (cluster edges).
const TOP_APPS: usize = 32;
const OWNER_COUNT_MAX: usize = 200_000;

/// `GET /`: the page itself.
pub fn page() -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .body(Body::full(Bytes::from_static(PAGE.as_bytes())))
        .expect("valid response")
}

/// One admin listener's samples: shared by every request it serves.
#[derive(Default)]
pub struct StatusPage {
    samples: Mutex<VecDeque<Sample>>,
    /// Held while a listing runs, so concurrent viewers never start a second one.
    top: tokio::sync::Mutex<Option<Arc<TopRooms>>>,
    /// The last finished listing, for requests that arrive during the next.
    top_shown: Mutex<Option<Arc<TopRooms>>>,
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    unix_ms: u64,
    open: usize,
    state: LoadState,
    c: Counters,
}

/// The counters of interest, read from the Prometheus text.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counters {
    accepted: f64,
    refused: BTreeMap<String, f64>,
    closed: BTreeMap<String, f64>,
    published: f64,
    delivered: f64,
    client_events: f64,
    client_events_dropped: BTreeMap<String, f64>,
    shed: BTreeMap<String, f64>,
    /// Cumulative delivery-delay buckets: (upper bound in seconds, count).
    delay: Vec<(f64, f64)>,
    channels: Option<f64>,
    subscriptions: Option<f64>,
}

impl Counters {
    fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
                None => (series, ""),
            };
            let label = |key: &str| label_value(labels, key).unwrap_or_default();
            match name {
                "herdgate_connections_accepted_total" => c.accepted = v,
                "herdgate_connections_refused_total" => add(&mut c.refused, label("reason"), v),
                "herdgate_connections_closed_total" => add(&mut c.closed, label("reason"), v),
                "herdgate_messages_published_total" => c.published = v,
                "herdgate_messages_delivered_total" => c.delivered = v,
                "herdgate_client_events_total" => c.client_events = v,
                "herdgate_client_events_dropped_total" => {
                    add(&mut c.client_events_dropped, label("reason"), v)
                }
                "herdgate_shed_total" => add(&mut c.shed, label("action"), v),
                "herdgate_channels" => c.channels = Some(v),
                "herdgate_subscriptions" => c.subscriptions = Some(v),
                "herdgate_delivery_delay_seconds_bucket" => {
                    if let Some(le) = label_value(labels, "le").and_then(parse_bound) {
                        c.delay.push((le, v));
                    }
                }
                _ => {}
            }
        }
        c.delay.sort_by(|a, b| a.0.total_cmp(&b.0));
        c
    }
}

fn add(map: &mut BTreeMap<String, f64>, key: String, v: f64) {
    *map.entry(key).or_default() += v;
}

/// `key="value"` in a Prometheus label set (herdgate's values never hold
/// quotes or commas: they are fixed words).
fn label_value(labels: &str, key: &str) -> Option<String> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn parse_bound(le: String) -> Option<f64> {
    match le.as_str() {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        s => s.parse().ok(),
    }
}

/// The `q` quantile (0..1) of bucketed observations, interpolated linearly
/// inside its bucket; `None` without observations. Observations above the
/// last finite bound report that bound.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank && cum > below {
            if le.is_infinite() {
                return Some(lo);
            }
            return Some(lo + (le - lo) * ((rank - below) / (cum - below)).clamp(0.0, 1.0));
        }
        (lo, below) = (le, cum);
    }
    Some(lo)
}

/// Observations between two cumulative bucket sets (missing = none yet).
fn bucket_delta(now: &[(f64, f64)], then: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, n)| {
            let before = then.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (le, (n - before).max(0.0))
        })
        .collect()
}

fn per_second(now: f64, then: f64, secs: f64) -> f64 {
    (now - then).max(0.0) / secs
}

fn rates(now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>, secs: f64) -> Value {
    now.iter()
        .map(|(k, v)| {
            let r = per_second(*v, then.get(k).copied().unwrap_or(0.0), secs);
            (k.clone(), json!(round(r)))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn unix_ms() -> u64 {
    crate::clock::unix_now().as_millis() as u64
}

/// One listing of the busiest rooms.
#[derive(Debug)]
struct TopRooms {
    at: Instant,
    unix_ms: u64,
    /// Occupied channels seen, all apps.
    channels: usize,
    rooms: Vec<Value>,
    /// Cluster edge: occupied channels per owning worker in its view.
    per_owner: Option<BTreeMap<String, usize>>,
    error: Option<String>,
}

impl StatusPage {
    /// `GET /status/live`: `base` (the `/status` document) plus rates,
    /// admission and shedding counts, deliveries, top rooms and history.
    pub async fn live(&self, admin: &Admin, base: Value) -> Value {
        let now = self.sample(admin);
        let top = self.top_rooms(admin).await;
        let live = admin.node.live();
        let actions = &live.config.overload.actions;
        let (state, admission) = (
            admin.node.overload.state(),
            admin.node.overload.admission_state(),
        );
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let rate_ref = samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= SAMPLE_SPACING)
            .or_else(|| samples.front())
            .filter(|s| now.at.duration_since(s.at) >= RATE_MIN)
            .cloned();
        let delay_ref = samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= DELAY_WINDOW)
            .or_else(|| samples.front())
            .filter(|s| now.at.duration_since(s.at) >= RATE_MIN)
            .cloned();
        let history = history(&samples);
        drop(samples);

        let mut doc = base;
        let obj = doc.as_object_mut().expect("status is an object");
        obj.insert("at".into(), json!(now.unix_ms));
        obj.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        let draining = admin.node.life.draining.is_cancelled();
        let said = summary(state, admission, &doc_reasons(obj), actions, draining);
        obj.insert("summary".into(), json!(said));
        obj.insert("degraded".into(), json!(state >= LoadState::Degraded));
        let signals = obj.get("signals").cloned().unwrap_or_default();
        obj.insert("signals".into(), with_levels(signals));
        obj.insert(
            "actions".into(),
            actions_in_force(actions, state, admission, &now.c),
        );
        obj.insert("rates".into(), rates_doc(&now, rate_ref.as_ref()));
        obj.insert(
            "admitted_refused".into(),
            admission_doc(&now, rate_ref.as_ref()),
        );
        obj.insert(
            "deliveries".into(),
            deliveries_doc(&now, rate_ref.as_ref(), delay_ref.as_ref()),
        );
        obj.insert("rooms".into(), rooms_doc(&now.c, top.as_deref()));
        obj.insert("history".into(), history);
        doc
    }

    /// Take a sample now; keep it if the last kept one is a second old.
    fn sample(&self, admin: &Admin) -> Sample {
        let c = Counters::parse(&crate::telemetry::render_metrics());
        let s = Sample {
            at: Instant::now(),
            unix_ms: unix_ms(),
            open: admin.open_sessions(),
            state: admin.node.overload.state(),
            c,
        };
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples
            .back()
            .is_none_or(|b| s.at.duration_since(b.at) >= SAMPLE_SPACING)
        {
            if samples.len() == HISTORY {
                samples.pop_front();
            }
            samples.push_back(s.clone());
        }
        s
    }

    /// The last listing if it is recent, else a new one; a request arriving
    /// while another lists gets the previous listing instead of waiting.
    async fn top_rooms(&self, admin: &Admin) -> Option<Arc<TopRooms>> {
        let Ok(mut slot) = self.top.try_lock() else {
            return self
                .top_shown
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        };
        if let Some(t) = slot.as_ref().filter(|t| t.at.elapsed() < TOP_EVERY) {
            return Some(t.clone());
        }
        let fresh = Arc::new(list_top_rooms(admin).await);
        *slot = Some(fresh.clone());
        *self.top_shown.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Some(fresh)
    }
}

/// The `reasons` already in the `/status` document.
fn doc_reasons(obj: &serde_json::Map<String, Value>) -> Vec<String> {
    obj.get("reasons")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

async fn list_top_rooms(admin: &Admin) -> TopRooms {
    let apps: Vec<Arc<str>> = admin
        .node
        .live()
        .config
        .apps
        .iter()
        .take(TOP_APPS)
        .map(|a| Arc::from(a.id.as_str()))
        .collect();
    let mut all: Vec<(Arc<str>, String, crate::types::RoomInfo)> = Vec::new();
    let mut error = None;
    for app in &apps {
        let ask = crate::op::Ask::Rooms {
            app: app.clone(),
            prefix: String::new(),
        };
        let listed = tokio::time::timeout(TOP_DEADLINE, async {
            let answer = admin.node.router.ask(ask, TOP_WAIT).await;
            answer.and_then(crate::op::Answer::rooms)
        })
        .await;
        match listed {
            Ok(Ok(rooms)) => {
                all.extend(rooms.into_iter().map(|(ch, info)| (app.clone(), ch, info)))
            }
            Ok(Err(e)) => error = Some(e.to_string()),
            Err(_) => error = Some("listing the rooms took too long".into()),
        }
    }
    let view = admin.node.router.cluster_edge().map(|e| e.view());
    let per_owner = view
        .as_ref()
        .filter(|_| all.len() <= OWNER_COUNT_MAX)
        .map(|v| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for (app, ch, _) in &all {
                let owner = v.owner_of(app, ch).map_or("none", |o| &**o);
                *counts.entry(owner.to_string()).or_default() += 1;
            }
            counts
        });
    let channels = all.len();
    let by_subscribers = |a: &(Arc<str>, String, crate::types::RoomInfo),
                          b: &(Arc<str>, String, crate::types::RoomInfo)| {
        b.2.subscription_count
            .cmp(&a.2.subscription_count)
            .then_with(|| a.1.cmp(&b.1))
    };
    if all.len() > TOP_N {
        all.select_nth_unstable_by(TOP_N, by_subscribers);
        all.truncate(TOP_N);
    }
    all.sort_by(by_subscribers);
    let rooms = all
        .iter()
        .map(|(app, ch, info)| {
            let mut r = json!({
                "app": &**app,
                "channel": ch,
                "subscribers": info.subscription_count,
            });
            if ch.starts_with("presence-") {
                r["users"] = json!(info.user_count);
            }
            if let Some(owner) = view.as_ref().and_then(|v| v.owner_of(app, ch)) {
                r["owner"] = json!(&**owner);
            }
            r
        })
        .collect();
    TopRooms {
        at: Instant::now(),
        unix_ms: unix_ms(),
        channels,
        rooms,
        per_owner,
        error,
    }
}

/// Each signal with the state its value reaches, for colouring.
fn with_levels(signals: Value) -> Value {
    let Value::Array(list) = signals else {
        return signals;
    };
    list.into_iter()
        .map(|mut s| {
            let value = s["value"].as_f64().unwrap_or(0.0);
            let reached = s["thresholds"].as_array().map_or(0, |t| {
                t.iter()
                    .filter(|t| t.as_f64().is_some_and(|t| value >= t))
                    .count()
            });
            s["level"] = json!(LoadState::from_u8(reached as u8).as_str());
            s
        })
        .collect()
}

/// One sentence that says plainly how the node is and what it sheds.
fn summary(
    state: LoadState,
    admission: LoadState,
    reasons: &[String],
    a: &ActionsConfig,
    draining: bool,
) -> String {
    if draining {
        return "Draining: this node is shutting down; sockets close over the drain period and reconnect elsewhere.".into();
    }
    let shedding: Vec<&str> = shed_now(a, state, admission)
        .into_iter()
        .map(|(_, effect)| effect)
        .collect();
    let why = if reasons.is_empty() {
        if state == LoadState::Normal {
            String::new()
        } else {
            " Signals are calm again; it steps down after the cooldown.".into()
        }
    } else {
        format!(" Because: {}.", reasons.join("; "))
    };
    match (state, shedding.is_empty()) {
        (LoadState::Normal, true) => "Normal: everything is served.".into(),
        (_, true) => format!("{}: nothing is shed yet.{why}", title(state)),
        (_, false) => format!("{}: shedding {}.{why}", title(state), shedding.join("; ")),
    }
}

fn title(state: LoadState) -> &'static str {
    match state {
        LoadState::Normal => "Normal",
        LoadState::Pressured => "Pressured",
        LoadState::Degraded => "DEGRADED",
        LoadState::Critical => "CRITICAL",
    }
}

fn from_word(f: ActionFrom) -> &'static str {
    match f {
        ActionFrom::Pressured => "pressured",
        ActionFrom::Degraded => "degraded",
        ActionFrom::Critical => "critical",
        ActionFrom::Never => "never",
    }
}

/// Every shedding action: (name, first state, in force now, what it does,
/// how the work it sheds is counted).
fn actions_table(a: &ActionsConfig, state: LoadState, admission: LoadState) -> Vec<Action> {
    let max = a.presence_events_max_members;
    let prefixes = |p: &[String]| {
        if p.is_empty() {
            "none configured".to_string()
        } else {
            p.join(", ")
        }
    };
    let coalesce_on = !a.coalesce_prefixes.is_empty();
    let refuse_on = !a.nonessential_prefixes.is_empty();
    vec![
        Action::new(
            "limit_client_events",
            a.limit_client_events,
            state,
            "client events (chat, typing) at half rate".into(),
            Count::Dropped("rate_limit"),
        )
        .unless(a.drop_client_events.applies(state)),
        Action::new(
            "drop_client_events",
            a.drop_client_events,
            state,
            "client events (chat, typing) refused with pusher:error 4301".into(),
            Count::Shed("client_event_dropped"),
        ),
        Action::new(
            "stop_presence_events",
            a.stop_presence_events,
            state,
            format!("member_added/removed in presence rooms above {max} members"),
            Count::Shed("presence_member_event"),
        ),
        Action::new(
            "coalesce",
            a.coalesce,
            state,
            format!(
                "API events to {} sent as the latest per {}",
                prefixes(&a.coalesce_prefixes),
                humantime::format_duration(a.coalesce_interval.get())
            ),
            Count::Shed("coalesced"),
        )
        .unless(!coalesce_on),
        Action::new(
            "refuse_subscriptions",
            a.refuse_subscriptions,
            state,
            format!(
                "new subscriptions to {} refused (503)",
                prefixes(&a.nonessential_prefixes)
            ),
            Count::Shed("subscription_refused"),
        )
        .unless(!refuse_on),
        Action::new(
            "shed_webhook_events",
            a.shed_webhook_events,
            state,
            "webhook events but channel_occupied/vacated dropped".into(),
            Count::Shed("webhook_event"),
        ),
        Action::new(
            "shed_history",
            a.shed_history,
            state,
            "channel history not kept; resumes answer recovered: false".into(),
            Count::Shed("history"),
        ),
        Action::new(
            "refuse_connections",
            a.refuse_connections,
            admission,
            "new connections refused (503 + Retry-After), /readyz 503".into(),
            Count::Refused("overloaded"),
        ),
    ]
}

struct Action {
    name: &'static str,
    from: ActionFrom,
    active: bool,
    effect: String,
    count: Count,
}

/// Where an action's shed work is counted.
enum Count {
    Shed(&'static str),
    Dropped(&'static str),
    Refused(&'static str),
}

impl Action {
    fn new(
        name: &'static str,
        from: ActionFrom,
        state: LoadState,
        effect: String,
        count: Count,
    ) -> Action {
        Action {
            name,
            active: from.applies(state),
            from,
            effect,
            count,
        }
    }

    /// Not in force whatever the state says (superseded, or nothing to act on).
    fn unless(mut self, off: bool) -> Action {
        self.active &= !off;
        self
    }
}

fn shed_now(
    a: &ActionsConfig,
    state: LoadState,
    admission: LoadState,
) -> Vec<(&'static str, &'static str)> {
    actions_table(a, state, admission)
        .into_iter()
        .filter(|x| x.active)
        .map(|x| (x.name, short_effect(x.name)))
        .collect()
}

/// The plain words for the summary line.
fn short_effect(action: &str) -> &'static str {
    match action {
        "limit_client_events" => "client events slowed to half rate",
        "drop_client_events" => "client events (chat, typing) refused",
        "stop_presence_events" => "presence join/leave events in large rooms",
        "coalesce" => "coalesced feeds (latest event only)",
        "refuse_subscriptions" => "non-essential subscriptions",
        "shed_webhook_events" => "webhook member/client events",
        "shed_history" => "missed-message history",
        "refuse_connections" => "NEW CONNECTIONS REFUSED",
        _ => "other work",
    }
}

fn actions_in_force(
    a: &ActionsConfig,
    state: LoadState,
    admission: LoadState,
    c: &Counters,
) -> Value {
    actions_table(a, state, admission)
        .into_iter()
        .map(|x| {
            let total = match x.count {
                Count::Shed(k) => c.shed.get(k),
                Count::Dropped(k) => c.client_events_dropped.get(k),
                Count::Refused(k) => c.refused.get(k),
            };
            json!({
                "action": x.name,
                "from": from_word(x.from),
                "active": x.active,
                "effect": x.effect,
                "total": total.copied().unwrap_or(0.0),
            })
        })
        .collect()
}

fn secs_between(now: &Sample, then: &Sample) -> f64 {
    now.at.duration_since(then.at).as_secs_f64().max(1e-3)
}

fn rates_doc(now: &Sample, then: Option<&Sample>) -> Value {
    let Some(then) = then else {
        return json!({ "window_s": null });
    };
    let secs = secs_between(now, then);
    let closed = |c: &Counters| c.closed.values().sum::<f64>();
    json!({
        "window_s": round(secs),
        "accepted_per_s": round(per_second(now.c.accepted, then.c.accepted, secs)),
        "closed_per_s": round(per_second(closed(&now.c), closed(&then.c), secs)),
        "refused_per_s": round(per_second(now.c.refused.values().sum(), then.c.refused.values().sum(), secs)),
        "open_change_per_s": round((now.open as f64 - then.open as f64) / secs),
    })
}

fn admission_doc(now: &Sample, then: Option<&Sample>) -> Value {
    let c = &now.c;
    let mut doc = json!({
        "admitted_total": c.accepted,
        "refused_total": c.refused.values().sum::<f64>(),
        "refused": c.refused,
        "closed": c.closed,
    });
    if let Some(then) = then {
        let secs = secs_between(now, then);
        doc["admitted_per_s"] = json!(round(per_second(c.accepted, then.c.accepted, secs)));
        doc["refused_per_s"] = rates(&c.refused, &then.c.refused, secs);
        doc["closed_per_s"] = rates(&c.closed, &then.c.closed, secs);
    }
    doc
}

fn deliveries_doc(now: &Sample, rate_ref: Option<&Sample>, delay_ref: Option<&Sample>) -> Value {
    let c = &now.c;
    let ms = |b: &[(f64, f64)], q| quantile(b, q).map(|s| round(s * 1000.0));
    let all = &c.delay;
    let mut doc = json!({
        "delivered_total": c.delivered,
        "published_total": c.published,
        "client_events_total": c.client_events,
        "delay_ms_since_start": { "p50": ms(all, 0.5), "p90": ms(all, 0.9), "p99": ms(all, 0.99) },
    });
    if let Some(then) = rate_ref {
        let secs = secs_between(now, then);
        doc["delivered_per_s"] = json!(round(per_second(c.delivered, then.c.delivered, secs)));
        doc["published_per_s"] = json!(round(per_second(c.published, then.c.published, secs)));
        doc["client_events_per_s"] = json!(round(per_second(
            c.client_events,
            then.c.client_events,
            secs
        )));
    }
    if let Some(then) = delay_ref {
        let recent = bucket_delta(all, &then.c.delay);
        doc["delay_ms"] = json!({
            "window_s": round(secs_between(now, then)),
            "samples": recent.last().map_or(0.0, |l| l.1),
            "p50": ms(&recent, 0.5), "p90": ms(&recent, 0.9), "p99": ms(&recent, 0.99),
        });
    }
    doc
}

fn rooms_doc(c: &Counters, top: Option<&TopRooms>) -> Value {
    let mut doc = json!({
        "channels": c.channels,
        "subscriptions": c.subscriptions,
        "top": [],
    });
    if let Some(t) = top {
        doc["top"] = json!(t.rooms);
        doc["listed_channels"] = json!(t.channels);
        doc["sampled_at"] = json!(t.unix_ms);
        doc["sample_every_s"] = json!(TOP_EVERY.as_secs());
        if let Some(p) = &t.per_owner {
            doc["per_owner"] = json!(p);
        }
        if let Some(e) = &t.error {
            doc["error"] = json!(e);
        }
    }
    doc
}

/// The kept samples as a series for the page's charts: open connections
/// and per-second rates between consecutive samples.
fn history(samples: &VecDeque<Sample>) -> Value {
    let mut out = Vec::with_capacity(samples.len());
    let mut prev: Option<&Sample> = None;
    for s in samples {
        let mut point = json!({
            "t": s.unix_ms,
            "open": s.open,
            "state": s.state.as_str(),
        });
        if let Some(p) = prev {
            let secs = secs_between(s, p);
            point["accepted_per_s"] = json!(round(per_second(s.c.accepted, p.c.accepted, secs)));
            point["refused_per_s"] = json!(round(per_second(
                s.c.refused.values().sum(),
                p.c.refused.values().sum(),
                secs
            )));
            point["delivered_per_s"] = json!(round(per_second(s.c.delivered, p.c.delivered, secs)));
        }
        out.push(point);
        prev = Some(s);
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP herdgate_connections_refused_total Websocket upgrades refused
# TYPE herdgate_connections_refused_total counter
herdgate_connections_refused_total{reason=\"max_connections\"} 7
herdgate_connections_refused_total{reason=\"rate\"} 2
herdgate_connections_accepted_total 40
herdgate_shed_total{action=\"client_event_dropped\"} 3
herdgate_channels 5
herdgate_delivery_delay_seconds_bucket{le=\"0.001\"} 50
herdgate_delivery_delay_seconds_bucket{le=\"0.01\"} 90
herdgate_delivery_delay_seconds_bucket{le=\"0.1\"} 100
herdgate_delivery_delay_seconds_bucket{le=\"+Inf\"} 100
herdgate_delivery_delay_seconds_sum 0.4
herdgate_delivery_delay_seconds_count 100
";

    #[test]
    fn reads_counters_and_labels_from_the_prometheus_text() {
        let c = Counters::parse(TEXT);
        assert_eq!(c.accepted, 40.0);
        assert_eq!(c.refused["max_connections"], 7.0);
        assert_eq!(c.refused["rate"], 2.0);
        assert_eq!(c.shed["client_event_dropped"], 3.0);
        assert_eq!(c.channels, Some(5.0));
        assert_eq!(c.subscriptions, None);
        assert_eq!(c.delay.len(), 4);
        assert!(c.delay[3].0.is_infinite());
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let b = Counters::parse(TEXT).delay;
        // Half of the observations are at or below 1 ms.
        assert!((quantile(&b, 0.5).unwrap() - 0.001).abs() < 1e-9);
        // The 70th observation: halfway through the 1–10 ms bucket.
        assert!((quantile(&b, 0.7).unwrap() - 0.0055).abs() < 1e-9);
        assert!((quantile(&b, 0.99).unwrap() - 0.091).abs() < 1e-9);
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        // Everything above the last finite bound reports that bound.
        assert_eq!(
            quantile(&[(0.1, 0.0), (f64::INFINITY, 4.0)], 0.5),
            Some(0.1)
        );
    }

    #[test]
    fn recent_percentiles_come_from_bucket_differences() {
        let then = vec![(0.001, 50.0), (0.01, 50.0), (f64::INFINITY, 50.0)];
        let now = vec![(0.001, 50.0), (0.01, 60.0), (f64::INFINITY, 60.0)];
        let d = bucket_delta(&now, &then);
        assert_eq!(d, vec![(0.001, 0.0), (0.01, 10.0), (f64::INFINITY, 10.0)]);
        // All ten recent deliveries took 1–10 ms: the median is inside that bucket.
        let p50 = quantile(&d, 0.5).unwrap();
        assert!(p50 > 0.001 && p50 < 0.01, "{p50}");
        // Before the histogram exists everything counts as new.
        assert_eq!(bucket_delta(&now, &[]), now);
    }

    #[test]
    fn actions_say_what_is_in_force() {
        let a = ActionsConfig {
            nonessential_prefixes: vec!["roulette-".into()],
            ..ActionsConfig::default()
        };
        let names =
            |s, adm| -> Vec<&str> { shed_now(&a, s, adm).into_iter().map(|x| x.0).collect() };
        assert!(names(LoadState::Normal, LoadState::Normal).is_empty());
        assert_eq!(
            names(LoadState::Pressured, LoadState::Normal),
            ["limit_client_events"]
        );
        // Degraded: refusing client events supersedes halving them; no
        // coalescing without prefixes; the door stays open.
        assert_eq!(
            names(LoadState::Degraded, LoadState::Normal),
            [
                "drop_client_events",
                "stop_presence_events",
                "refuse_subscriptions",
                "shed_webhook_events",
                "shed_history"
            ]
        );
        assert!(names(LoadState::Degraded, LoadState::Critical).contains(&"refuse_connections"));
    }

    #[test]
    fn signal_levels_count_reached_thresholds() {
        let s = with_levels(json!([
            {"name": "connections", "value": 0.9, "thresholds": [0.7, 0.85, 0.95]},
            {"name": "memory", "value": 0.1, "thresholds": [0.7, 0.8, 0.9]},
        ]));
        assert_eq!(s[0]["level"], "degraded");
        assert_eq!(s[1]["level"], "normal");
    }
}
