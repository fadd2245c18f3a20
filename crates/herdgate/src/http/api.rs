//! The Pusher HTTP API: publish events, query channels and users, terminate
//! a user's connections. Every request is signed (see `sign`); every answer
//! is JSON.
//!
//! A publish — one event to many channels, or a batch — is **atomic**: it
//! is admitted to every room's owner or to none, within one deadline per
//! request, so a 503 means nothing was published and a retry duplicates
//! nothing. It is **idempotent** with a key (`X-Idempotency-Key` header, or
//! `idempotency_key` in the body, per event in a batch): a retry with the
//! same key and body gets the first answer again and publishes nothing; the
//! owners also skip a keyed publish they have already sent. Per-app quotas
//! answer 429 with `Retry-After`.

use super::error::jittered_retry_after;
use super::{json, sign, ApiError, Body};
use crate::apps::App;
use crate::op::{Answer, Ask};
use crate::protocol::{self, names, names::ChannelKind};
use crate::replays::MAX_IDEMPOTENCY_KEY;
use crate::state::Front;
use crate::types::{ConnId, RoomKey, RouteError};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_CHANNELS_PER_EVENT: usize = 100;
pub const MAX_BATCH: usize = 10;
/// One deadline per request, for everything it waits for.
const MAILBOX_WAIT: Duration = Duration::from_secs(1);
fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::BadRequest(format!(
            "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(())
}

/// FNV-1a ([`crate::fnv`]) of the parts, each ended by 0xff (a stable,
/// cheap key hash).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = crate::fnv::Fnv1a::new();
    for p in parts {
        h.field(p);
    }
    h.finish()
}

type ApiResult = Result<Value, ApiError>;

pub async fn handle(req: Request<hyper::body::Incoming>, front: &Arc<Front>) -> Response<Body> {
    match handle_inner(req, front).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => {
            tracing::debug!(error = %e, status = %e.status(), "api request refused");
            e.into_response()
        }
    }
}

async fn handle_inner(req: Request<hyper::body::Incoming>, front: &Arc<Front>) -> ApiResult {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let segments: Vec<String> = path["/apps/".len()..]
        .split('/')
        .map(sign::percent_decode)
        .collect();
    let live = front.live();
    let app = live
        .apps
        .by_id(&segments[0])
        .ok_or_else(|| ApiError::NotFound(format!("unknown app id {:?}", segments[0])))?
        .clone();

    // The signature covers method, path and query (`body_md5` too): it is
    // checked before the body is read, so an unsigned client cannot make
    // the node buffer a byte of it.
    let params = sign::parse_query(parts.uri.query().unwrap_or(""));
    let now = crate::clock::unix_now().as_secs() as i64;
    sign::verify_head(parts.method.as_str(), path, &params, &app, now)?;
    let limit = live.config.limits.max_request_body_bytes;
    // A body that stalls holds a connection permit: it gets the same
    // deadline as a request head.
    let deadline = live.config.server.handshake_timeout.get();
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::Timeout(format!("request body not received within {deadline:?}")))?;
    let body = collected.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            ApiError::TooLarge(format!("request body is larger than {limit} bytes"))
        } else {
            ApiError::BadRequest(format!("could not read the request body: {e}"))
        }
    })?;
    let body = body.to_bytes();
    sign::verify_body(&params, &body)?;
    if !app.enabled {
        return Err(ApiError::Forbidden("application is disabled".into()));
    }

    let quota = front.quotas().of(&app.id);
    let f = &app.features;
    if parts.method == Method::GET && !quota.read(f.max_read_requests_per_second) {
        metrics::counter!("herdgate_api_quota_refusals_total", "quota" => "reads").increment(1);
        return Err(ApiError::TooManyRequests(
            "the app is over its read request quota (max_read_requests_per_second)".into(),
            1,
        ));
    }
    let key = parts
        .headers
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let api = Api {
        front,
        live: &live,
        app: &app,
        params: &params,
        idempotency_key: key,
        deadline: tokio::time::Instant::now() + MAILBOX_WAIT,
    };
    let rest: Vec<&str> = segments[1..].iter().map(String::as_str).collect();
    match (&parts.method, rest.as_slice()) {
        (&Method::POST, ["events"]) => api.events(&body).await,
        (&Method::POST, ["batch_events"]) => api.batch(&body).await,
        (&Method::GET, ["channels"]) => api.channels().await,
        (&Method::GET, ["channels", name]) => api.channel(name).await,
        (&Method::GET, ["channels", name, "users"]) => api.users(name).await,
        (&Method::GET, ["channels", name, "history"]) => api.history(name).await,
        (&Method::POST, ["users", user, "terminate_connections"]) => api.terminate(user).await,
        (&Method::POST, ["channels", name, "users", user, "remove"]) => {
            api.remove(name, user, &body).await
        }
        (&Method::POST, ["channels", name, "users", user, "unban"]) => api.unban(name, user).await,
        _ => Err(ApiError::NotFound(format!(
            "no endpoint {} {}",
            parts.method, path
        ))),
    }
}

#[derive(Deserialize)]
struct Event {
    name: String,
    data: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Seconds past now a revocation reaches back from (servers' clocks may be
/// this far apart): a grant authorized within it is refused too, which
/// costs one call to the app's endpoint, never a revocation missed.
pub const REVOKE_MARGIN: u64 = 5;

/// The largest page of `GET …/channels/{c}/users?limit=` (and the page
/// size when only `after` is given).
pub const USERS_LIMIT_MAX: usize = 1000;

/// Events per history answer, unless `limit` says otherwise.
pub const HISTORY_LIMIT_DEFAULT: u64 = 100;
/// The largest `limit` of a history request (400 above it).
pub const HISTORY_LIMIT_MAX: u64 = 1000;

fn route_error(e: RouteError) -> ApiError {
    ApiError::Unavailable(format!("{e}; retry later"), jittered_retry_after(5))
}

struct Api<'a> {
    front: &'a Arc<Front>,
    live: &'a crate::state::Live,
    app: &'a Arc<App>,
    params: &'a [(String, String)],
    /// `X-Idempotency-Key`.
    idempotency_key: Option<String>,
    /// One deadline for everything this request waits for.
    deadline: tokio::time::Instant,
}

impl Api<'_> {
    fn room(&self, channel: &str) -> RoomKey {
        RoomKey {
            app: self.app.id.clone(),
            channel: Arc::from(channel),
        }
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// What is left of the request's deadline.
    fn wait(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
    }

    async fn events(&self, body: &[u8]) -> ApiResult {
        let event: Event = parse_json(body)?;
        let key = self
            .idempotency_key
            .clone()
            .or(event.idempotency_key.clone());
        self.keyed(key, body, || async {
            let mut infos = self.publish(vec![event]).await?;
            Ok(infos
                .pop()
                .flatten()
                .map_or_else(|| json!({}), |channels| json!({ "channels": channels })))
        })
        .await
    }

    async fn batch(&self, body: &[u8]) -> ApiResult {
        let batch: Batch = parse_json(body)?;
        if batch.batch.len() > MAX_BATCH {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_BATCH} events per batch"
            )));
        }
        self.keyed(self.idempotency_key.clone(), body, || async {
            let infos = self.publish(batch.batch).await?;
            let any_info = infos.iter().any(Option::is_some);
            let infos: Vec<Value> = infos
                .into_iter()
                .map(|i| {
                    i.and_then(|m| m.into_iter().next().map(|(_, v)| v))
                        .unwrap_or_else(|| json!({}))
                })
                .collect();
            Ok(if any_info {
                json!({ "batch": infos })
            } else {
                json!({})
            })
        })
        .await
    }

    /// Run `publish` once per idempotency key: a retry with the same key
    /// and body gets the first answer (and publishes nothing); the same
    /// key with another body is a conflict (409). Only answers that
    /// published are remembered: after a 503, a retry publishes.
    async fn keyed<F, Fut>(&self, key: Option<String>, body: &[u8], publish: F) -> ApiResult
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ApiResult>,
    {
        let Some(key) = key else {
            return publish().await;
        };
        check_key(&key)?;
        let replays = &self.front.replays;
        let hash = fnv(&[body]);
        let first = replays.get(&self.app.id, &key, hash).map_err(|_| {
            ApiError::Conflict(
                "this idempotency key was used for a different request within the last 5 minutes"
                    .into(),
            )
        })?;
        if let Some(first) = first {
            metrics::counter!("herdgate_publish_duplicates_total").increment(1);
            return Ok(first);
        }
        let answer = publish().await?;
        replays.put(&self.app.id, key, hash, answer.clone());
        Ok(answer)
    }

    /// Check an event; returns its channels, data text and excluded socket.
    fn validate(&self, e: &Event) -> Result<(Vec<String>, String, Option<ConnId>), ApiError> {
        names::check_event_name(&e.name).map_err(ApiError::BadRequest)?;
        let channels = match (&e.channels, &e.channel) {
            (Some(c), None) => c.clone(),
            (None, Some(c)) => vec![c.clone()],
            _ => {
                return Err(ApiError::BadRequest(
                    "give exactly one of \"channels\" and \"channel\"".into(),
                ))
            }
        };
        if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
            return Err(ApiError::BadRequest(format!(
                "between 1 and {MAX_CHANNELS_PER_EVENT} channels per event"
            )));
        }
        for c in &channels {
            names::check_channel(c)
                .map_err(|m| ApiError::BadRequest(format!("channel {c:?}: {m}")))?;
        }
        let data = match &e.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let max = self.live.config.limits.max_payload_bytes;
        if data.len() > max {
            return Err(ApiError::TooLarge(format!(
                "event data is larger than {max} bytes"
            )));
        }
        let exclude = match &e.socket_id {
            Some(s) => Some(
                ConnId::parse(s)
                    .ok_or_else(|| ApiError::BadRequest(format!("invalid socket_id {s:?}")))?,
            ),
            None => None,
        };
        Ok((channels, data, exclude))
    }

    /// Publish every event to each of its channels, all or nothing; with
    /// `info`, the asked attributes per channel of each event.
    async fn publish(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<Option<Map<String, Value>>>, ApiError> {
        // Validate everything before publishing anything.
        let mut checked = Vec::with_capacity(events.len());
        for e in &events {
            let c = self.validate(e)?;
            if let Some(info) = e.info.as_deref().filter(|s| !s.is_empty()) {
                // A bad `info` is refused before anything is published.
                for ch in &c.0 {
                    self.attributes(ch, info, Default::default(), false)?;
                }
            }
            if let Some(k) = &e.idempotency_key {
                check_key(k)?;
            }
            checked.push(c);
        }
        let count: usize = checked.iter().map(|c| c.0.len()).sum();
        let quota = self.front.quotas().of(&self.app.id);
        let rate = self.app.features.max_backend_events_per_second;
        if !quota.backend_events(rate, count.min(u32::MAX as usize) as u32) {
            metrics::counter!("herdgate_api_quota_refusals_total", "quota" => "backend_events")
                .increment(1);
            return Err(ApiError::TooManyRequests(
                "the app is over its event quota (max_backend_events_per_second)".into(),
                1,
            ));
        }
        let router = &self.front.node.router;
        let state = self.front.node.overload.state();
        let coalesce = |c: &str| self.live.config.overload.actions.coalesce_for(c, state);
        let request_key = self.idempotency_key.as_deref();
        let mut items = Vec::with_capacity(count);
        for (i, (e, (channels, data, exclude))) in events.iter().zip(&checked).enumerate() {
            // The owners' key for this event: its own, or the request's
            // with the event's place in the batch.
            let idem = match (&e.idempotency_key, request_key) {
                (Some(k), _) => Some(fnv(&[self.app.id.as_bytes(), k.as_bytes()])),
                (None, Some(k)) => Some(fnv(&[
                    self.app.id.as_bytes(),
                    k.as_bytes(),
                    &(i as u64).to_le_bytes(),
                ])),
                (None, None) => None,
            };
            for c in channels {
                items.push(crate::worker::Item {
                    room: self.room(c),
                    frame: protocol::event(&e.name, Some(c), data),
                    exclude: *exclude,
                    coalesce: coalesce(c),
                    idem,
                });
            }
        }
        router
            .publish_all(items, self.deadline)
            .await
            .map_err(route_error)?;
        metrics::counter!("herdgate_messages_published_total").increment(count as u64);
        let mut out = Vec::with_capacity(events.len());
        for (e, (channels, ..)) in events.iter().zip(&checked) {
            let Some(info) = e.info.as_deref().filter(|s| !s.is_empty()) else {
                out.push(None);
                continue;
            };
            // Published already: a channel whose count cannot be read in
            // time is left out of the answer, which stays a success.
            let mut m = Map::new();
            for c in channels {
                let ask = Ask::Info { room: self.room(c) };
                match router.ask(ask, self.wait()).await.and_then(Answer::info) {
                    Ok(room_info) => {
                        m.insert(c.clone(), self.attributes(c, info, room_info, false)?);
                    }
                    Err(e) => tracing::debug!(channel = %c, error = ?e, "info after publish"),
                }
            }
            out.push(Some(m));
        }
        Ok(out)
    }

    /// The `info` attributes asked for, checked against the channel kind.
    fn attributes(
        &self,
        channel: &str,
        info: &str,
        r: crate::types::RoomInfo,
        occupied: bool,
    ) -> Result<Value, ApiError> {
        let mut m = Map::new();
        if occupied {
            m.insert("occupied".into(), json!(r.subscription_count > 0));
        }
        for attr in info.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match attr {
                "user_count" if ChannelKind::of(channel) == ChannelKind::Presence => {
                    m.insert("user_count".into(), json!(r.user_count));
                }
                "user_count" => {
                    return Err(ApiError::BadRequest(
                        "user_count is only available for presence channels".into(),
                    ))
                }
                "subscription_count" => {
                    m.insert("subscription_count".into(), json!(r.subscription_count));
                }
                "cache" => {} // answered by `channel` (one channel's query)
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown info attribute {other:?}"
                    )))
                }
            }
        }
        Ok(Value::Object(m))
    }

    async fn channels(&self) -> ApiResult {
        let prefix = self.param("filter_by_prefix").unwrap_or("");
        let info = self.param("info").unwrap_or("");
        if info.split(',').any(|a| a.trim() == "user_count") && !prefix.starts_with("presence-") {
            return Err(ApiError::BadRequest(
                "info=user_count needs filter_by_prefix=presence-".into(),
            ));
        }
        let ask = Ask::Rooms {
            app: self.app.id.clone(),
            prefix: prefix.to_string(),
        };
        let list = self
            .front
            .node
            .router
            .ask(ask, self.wait())
            .await
            .and_then(Answer::rooms)
            .map_err(route_error)?;
        let mut channels = Map::new();
        for (name, r) in list {
            if name.starts_with('#') && !prefix.starts_with('#') {
                continue; // user channels are listed only when asked for
            }
            let attrs = self.attributes(&name, info, r, false)?;
            channels.insert(name, attrs);
        }
        Ok(json!({ "channels": channels }))
    }

    async fn channel(&self, name: &str) -> ApiResult {
        names::check_channel(name).map_err(ApiError::BadRequest)?;
        let router = &self.front.node.router;
        let r = router
            .ask(
                Ask::Info {
                    room: self.room(name),
                },
                self.wait(),
            )
            .await
            .and_then(Answer::info)
            .map_err(route_error)?;
        let info = self.param("info").unwrap_or("");
        let mut v = self.attributes(name, info, r, true)?;
        if info.split(',').any(|a| a.trim() == "cache") {
            // `{"data": "...", "ttl": seconds}` of the cached event, or null.
            let cached = if names::is_cache(name) {
                router
                    .ask(
                        Ask::Cache {
                            room: self.room(name),
                        },
                        self.wait(),
                    )
                    .await
                    .and_then(Answer::cache)
                    .map_err(route_error)?
            } else {
                None
            };
            v["cache"] =
                cached.map_or(Value::Null, |(data, ttl)| json!({"data": data, "ttl": ttl}));
        }
        Ok(v)
    }

    async fn users(&self, name: &str) -> ApiResult {
        if names::check_channel(name).map_err(ApiError::BadRequest)? != ChannelKind::Presence {
            return Err(ApiError::BadRequest(
                "users are only available for presence channels".into(),
            ));
        }
        let users = self
            .front
            .node
            .router
            .ask(
                Ask::Users {
                    room: self.room(name),
                },
                self.wait(),
            )
            .await
            .and_then(Answer::users)
            .map_err(route_error)?;
        // Paged (a big room's list): `limit` ids after `after`, sorted, and
        // the cursor of the next page.
        let limit = match self.param("limit") {
            None => None,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=USERS_LIMIT_MAX).contains(&n) => Some(n),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "limit must be between 1 and {USERS_LIMIT_MAX}"
                    )))
                }
            },
        };
        let after = self.param("after");
        if limit.is_none() && after.is_none() {
            let users: Vec<Value> = users.into_iter().map(|id| json!({ "id": id })).collect();
            return Ok(json!({ "users": users }));
        }
        let limit = limit.unwrap_or(USERS_LIMIT_MAX);
        let start = after.map_or(0, |a| users.partition_point(|u| u.as_str() <= a));
        let page: Vec<Value> = users[start..]
            .iter()
            .take(limit)
            .map(|id| json!({ "id": id }))
            .collect();
        let next =
            (start + page.len() < users.len()).then(|| users[start + page.len() - 1].clone());
        Ok(json!({ "users": page, "next": next }))
    }

    /// `GET …/channels/{name}/history?since=S&limit=N[&epoch=E]`: the events
    /// after serial `S` its owner keeps (docs/PROTOCOL.md "History and resume").
    async fn history(&self, name: &str) -> ApiResult {
        names::check_channel(name).map_err(ApiError::BadRequest)?;
        let number = |key: &str, default: u64| -> Result<u64, ApiError> {
            self.param(key).map_or(Ok(default), |v| {
                v.parse().map_err(|_| {
                    ApiError::BadRequest(format!("{key} must be a non-negative integer"))
                })
            })
        };
        let since = number("since", 0)?;
        let limit = number("limit", HISTORY_LIMIT_DEFAULT)?;
        if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {HISTORY_LIMIT_MAX}"
            )));
        }
        let epoch = self.param("epoch").map(String::from);
        let ask = Ask::History {
            room: self.room(name),
            since,
            epoch,
            limit: limit as u32, // ≤ HISTORY_LIMIT_MAX
        };
        let page = self
            .front
            .node
            .router
            .ask(ask, self.wait())
            .await
            .and_then(Answer::history)
            .map_err(route_error)?;
        #[derive(Deserialize)]
        struct Kept {
            event: String,
            data: Value,
        }
        let events: Vec<Value> = page
            .events
            .iter()
            .filter_map(|(serial, frame)| {
                let k: Kept = serde_json::from_str(frame.as_str()).ok()?;
                Some(json!({"serial": serial, "name": k.event, "data": k.data}))
            })
            .collect();
        Ok(json!({
            "epoch": page.epoch,
            "events": events,
            "complete": page.complete,
            "more": page.more,
        }))
    }

    /// `POST …/channels/{name}/users/{user}/remove`, body `{"ban_seconds": N}`
    /// or empty: take the user out of the channel on every socket, and ban
    /// them for N seconds (docs/PROTOCOL.md "Moderation").
    async fn remove(&self, name: &str, user: &str, body: &[u8]) -> ApiResult {
        names::check_channel(name).map_err(ApiError::BadRequest)?;
        names::check_user_id(user).map_err(ApiError::BadRequest)?;
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Removal {
            #[serde(default)]
            ban_seconds: u32,
        }
        let r: Removal = if body.iter().all(u8::is_ascii_whitespace) {
            Removal::default()
        } else {
            parse_json(body)?
        };
        if r.ban_seconds > crate::op::MAX_BAN_SECS {
            return Err(ApiError::BadRequest(format!(
                "ban_seconds must be at most {} (7 days)",
                crate::op::MAX_BAN_SECS
            )));
        }
        if r.ban_seconds > 0 && self.app.features.max_channel_bans == 0 {
            return Err(ApiError::BadRequest(
                "bans are off for this app (max_channel_bans = 0)".into(),
            ));
        }
        self.moderation_quota()?;
        let ask = Ask::Remove {
            room: self.room(name),
            user: Arc::from(user),
            ban_secs: r.ban_seconds,
        };
        let removed = self
            .front
            .node
            .router
            .ask(ask, self.wait())
            .await
            .and_then(Answer::removed)
            .map_err(route_error)?;
        match removed {
            Some(sockets) => Ok(json!({ "removed": sockets, "ban_seconds": r.ban_seconds })),
            None => {
                metrics::counter!("herdgate_api_quota_refusals_total", "quota" => "bans")
                    .increment(1);
                Err(ApiError::TooManyRequests(
                    "the app's ban list is full (max_channel_bans): lift bans or let them expire"
                        .into(),
                    60,
                ))
            }
        }
    }

    /// `POST …/channels/{name}/users/{user}/unban`: lift the user's ban.
    async fn unban(&self, name: &str, user: &str) -> ApiResult {
        names::check_channel(name).map_err(ApiError::BadRequest)?;
        names::check_user_id(user).map_err(ApiError::BadRequest)?;
        self.moderation_quota()?;
        let ask = Ask::Unban {
            room: self.room(name),
            user: Arc::from(user),
        };
        let lifted = self
            .front
            .node
            .router
            .ask(ask, self.wait())
            .await
            .and_then(Answer::lifted)
            .map_err(route_error)?;
        Ok(json!({ "lifted": lifted }))
    }

    /// Close the user's signed-in sockets (their owner) and, for an app
    /// with auth grants, revoke the user's grants at every owner: a grant
    /// its app authorized before now (plus [`REVOKE_MARGIN`] for clocks
    /// apart) is refused, so the next join asks the app's endpoint. The 200
    /// means both were done.
    /// A moderation call counts as one event against the app's
    /// `max_backend_events_per_second`: each costs a scan of the room at
    /// its owner.
    fn moderation_quota(&self) -> Result<(), ApiError> {
        let quota = self.front.quotas().of(&self.app.id);
        if quota.backend_events(self.app.features.max_backend_events_per_second, 1) {
            return Ok(());
        }
        metrics::counter!("herdgate_api_quota_refusals_total", "quota" => "backend_events")
            .increment(1);
        Err(ApiError::TooManyRequests(
            "the app is over its event quota (max_backend_events_per_second)".into(),
            1,
        ))
    }

    async fn terminate(&self, user: &str) -> ApiResult {
        names::check_user_id(user).map_err(ApiError::BadRequest)?;
        let router = &self.front.node.router;
        let ask = Ask::Terminate {
            room: RoomKey::user(&self.app.id, user),
        };
        if self.app.features.auth_grants.is_some() {
            let revoke = Ask::Revoke {
                app: self.app.id.clone(),
                user: Arc::from(user),
                before: crate::clock::unix_now().as_secs() + REVOKE_MARGIN,
            };
            router
                .ask(revoke, self.wait())
                .await
                .and_then(Answer::done)
                .map_err(route_error)?;
        }
        router
            .ask(ask, self.wait())
            .await
            .and_then(Answer::done)
            .map_err(route_error)?;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idempotency_hash_values_are_pinned() {
        // Keys already stored (replays, across a restart of an edge) must
        // still match.
        assert_eq!(super::fnv(&[b"{}"]), 0xc736_5819_83dd_a06e);
        assert_eq!(super::fnv(&[b"1", b"key-1"]), 0xb06a_f3ef_4e70_4507);
        assert_eq!(super::fnv(&[b""]), 0xaf64_724c_8602_eb6e);
    }
}
