//! The Pusher HTTP API: publish events, query channels and users, terminate
//! a user's connections. Every request is signed (see `sign`); every answer
//! is JSON. A publish is encoded once per channel and handed to the room's
//! owner; if the owner's mailbox stays full the answer is 503, never a
//! silent drop after a 200.

use super::error::jittered_retry_after;
use super::{json, sign, ApiError, Body};
use crate::apps::App;
use crate::protocol::{self, names, names::ChannelKind};
use crate::state::Shared;
use crate::types::{ConnId, RoomKey, RouteError};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_CHANNELS_PER_EVENT: usize = 100;
pub const MAX_BATCH: usize = 10;
/// How long a request may wait for space in a worker's mailbox.
const MAILBOX_WAIT: Duration = Duration::from_secs(1);

type ApiResult = Result<Value, ApiError>;

pub async fn handle(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    match handle_inner(req, shared).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => {
            tracing::debug!(error = %e, status = %e.status(), "api request refused");
            e.into_response()
        }
    }
}

async fn handle_inner(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> ApiResult {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let segments: Vec<String> = path["/apps/".len()..]
        .split('/')
        .map(sign::percent_decode)
        .collect();
    let live = shared.live();
    let app = live
        .apps
        .by_id(&segments[0])
        .ok_or_else(|| ApiError::NotFound(format!("unknown app id {:?}", segments[0])))?
        .clone();

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
    let params = sign::parse_query(parts.uri.query().unwrap_or(""));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    sign::verify(parts.method.as_str(), path, &params, &body, &app, now)?;
    if !app.enabled {
        return Err(ApiError::Forbidden("application is disabled".into()));
    }

    let api = Api {
        shared,
        live: &live,
        app: &app,
        params: &params,
    };
    let rest: Vec<&str> = segments[1..].iter().map(String::as_str).collect();
    match (&parts.method, rest.as_slice()) {
        (&Method::POST, ["events"]) => api.events(&body).await,
        (&Method::POST, ["batch_events"]) => api.batch(&body).await,
        (&Method::GET, ["channels"]) => api.channels().await,
        (&Method::GET, ["channels", name]) => api.channel(name).await,
        (&Method::GET, ["channels", name, "users"]) => api.users(name).await,
        (&Method::POST, ["users", user, "terminate_connections"]) => api.terminate(user).await,
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
}

#[derive(Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn route_error(e: RouteError) -> ApiError {
    ApiError::Unavailable(format!("{e}; retry later"), jittered_retry_after(5))
}

struct Api<'a> {
    shared: &'a Arc<Shared>,
    live: &'a crate::state::Live,
    app: &'a Arc<App>,
    params: &'a [(String, String)],
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

    async fn events(&self, body: &[u8]) -> ApiResult {
        let event: Event = parse_json(body)?;
        let info = self.publish(event).await?;
        Ok(info.map_or_else(|| json!({}), |channels| json!({ "channels": channels })))
    }

    async fn batch(&self, body: &[u8]) -> ApiResult {
        let batch: Batch = parse_json(body)?;
        if batch.batch.len() > MAX_BATCH {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_BATCH} events per batch"
            )));
        }
        // Validate the whole batch before publishing any of it.
        for e in &batch.batch {
            self.validate(e)?;
        }
        let mut infos = Vec::new();
        let mut any_info = false;
        for e in batch.batch {
            let info = self.publish(e).await?;
            any_info |= info.is_some();
            infos.push(
                info.and_then(|m| m.into_iter().next().map(|(_, v)| v))
                    .unwrap_or_else(|| json!({})),
            );
        }
        Ok(if any_info {
            json!({ "batch": infos })
        } else {
            json!({})
        })
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

    /// Publish to each channel; with `info`, answer the asked attributes per channel.
    async fn publish(&self, e: Event) -> Result<Option<Map<String, Value>>, ApiError> {
        let (channels, data, exclude) = self.validate(&e)?;
        let router = &self.shared.router;
        let state = self.shared.overload.state();
        let coalesce = |c: &str| self.live.config.overload.actions.coalesce_for(c, state);
        for c in &channels {
            let frame = protocol::event(&e.name, Some(c), &data);
            router
                .publish(self.room(c), frame, exclude, coalesce(c), MAILBOX_WAIT)
                .await
                .map_err(route_error)?;
            metrics::counter!("herdgate_messages_published_total").increment(1);
        }
        let Some(info) = e.info.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let mut out = Map::new();
        for c in &channels {
            let room_info = router
                .query(self.room(c), MAILBOX_WAIT)
                .await
                .map_err(route_error)?;
            out.insert(c.clone(), self.attributes(c, info, room_info, false)?);
        }
        Ok(Some(out))
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
                "cache" => {} // cache channels are not supported; nothing to report
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
        let list = self
            .shared
            .router
            .list(&self.app.id, prefix, MAILBOX_WAIT)
            .await
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
        let r = self
            .shared
            .router
            .query(self.room(name), MAILBOX_WAIT)
            .await
            .map_err(route_error)?;
        self.attributes(name, self.param("info").unwrap_or(""), r, true)
    }

    async fn users(&self, name: &str) -> ApiResult {
        if names::check_channel(name).map_err(ApiError::BadRequest)? != ChannelKind::Presence {
            return Err(ApiError::BadRequest(
                "users are only available for presence channels".into(),
            ));
        }
        let users = self
            .shared
            .router
            .users(self.room(name), MAILBOX_WAIT)
            .await
            .map_err(route_error)?;
        let users: Vec<Value> = users.into_iter().map(|id| json!({ "id": id })).collect();
        Ok(json!({ "users": users }))
    }

    async fn terminate(&self, user: &str) -> ApiResult {
        names::check_user_id(user).map_err(ApiError::BadRequest)?;
        self.shared
            .router
            .terminate(&self.app.id, user, MAILBOX_WAIT)
            .await
            .map_err(route_error)?;
        Ok(json!({}))
    }
}
