//! The websocket upgrade on `/app/{key}`.
//!
//! Admission happens here, before any upgrade work: a node at its session cap
//! answers `503` with a jittered `Retry-After`, which a browser's websocket
//! reports as a failed connect and pusher-js retries with backoff.
//! Pusher-level problems (unknown app key, bad protocol version, wrong path)
//! are answered the Pusher way: upgrade, send `pusher:error`, close with its
//! 40xx code — pusher-js then gives up instead of retrying in a loop.
//!
//! The session runs in a task of its own, spawned here. The connection task
//! that served the HTTP request ends once the upgrade is handed over, so the
//! (large) HTTP state is freed and only the (small) session future lives on.

use super::error::jittered_retry_after;
use super::{ApiError, Body};
use crate::protocol::{self, codes};
use crate::session::{self, Session};
use crate::state::{SessionSlot, Shared};
use http::{header, HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

/// Seconds a refused client is told to wait, at most.
const RETRY_AFTER_MAX: u64 = 10;

pub fn is_websocket<B>(req: &Request<B>) -> bool {
    header_has(req.headers(), header::UPGRADE, "websocket")
}

fn header_has(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// A Pusher-level refusal sent after the upgrade.
struct Refusal(u16, &'static str);

fn check_pusher_request(uri: &http::Uri, shared: &Shared) -> Result<String, Refusal> {
    let Some(key) = uri
        .path()
        .strip_prefix("/app/")
        .filter(|k| !k.is_empty() && !k.contains('/'))
    else {
        return Err(Refusal(
            codes::PATH_NOT_FOUND,
            "path not found: expected /app/{key}",
        ));
    };
    let (mut protocol, mut version) = (None, None);
    for pair in uri.query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("protocol", v)) => protocol = Some(v),
            Some(("version", v)) => version = Some(v),
            _ => {}
        }
    }
    match shared.live().apps.by_key(key) {
        None => return Err(Refusal(codes::UNKNOWN_APP, "application does not exist")),
        Some(app) if !app.enabled => {
            return Err(Refusal(codes::APP_DISABLED, "application is disabled"))
        }
        Some(_) => {}
    }
    match protocol {
        None => return Err(Refusal(codes::NO_PROTOCOL, "no protocol version supplied")),
        Some(p) if !matches!(p, "5" | "6" | "7") => {
            return Err(Refusal(
                codes::UNSUPPORTED_PROTOCOL,
                "unsupported protocol version",
            ))
        }
        _ => {}
    }
    if let Some(v) = version {
        let ok = !v.is_empty()
            && v.len() <= 32
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(Refusal(
                codes::INVALID_VERSION,
                "invalid version string format",
            ));
        }
    }
    Ok(key.to_string())
}

pub fn handle(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let h = req.headers();
    if req.method() != http::Method::GET || !header_has(h, header::CONNECTION, "upgrade") {
        return ApiError::BadRequest(
            "a websocket upgrade must be a GET with Connection: upgrade".into(),
        )
        .into_response();
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut resp =
            ApiError::BadRequest("only websocket version 13 is supported".into()).into_response();
        *resp.status_mut() = StatusCode::UPGRADE_REQUIRED;
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, "13".parse().expect("valid"));
        return resp;
    }
    let Some(accept) = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return ApiError::BadRequest("missing Sec-WebSocket-Key".into()).into_response();
    };
    if shared.closing.is_cancelled() {
        return refuse("server is shutting down", "draining");
    }
    let Some(slot) = shared.sessions.try_take() else {
        return refuse("server is at its connection limit", "max_connections");
    };
    metrics::counter!("herdgate_connections_accepted_total").increment(1);

    let check = check_pusher_request(req.uri(), shared);
    let on_upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    let shared2 = shared.clone();
    let ws_config = shared.live().ws_config();
    shared.tasks.spawn(Box::pin(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                start(ws, check, peer, shared2, slot).await;
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade failed"),
        }
    }));

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::default())
        .expect("valid response")
}

fn refuse(message: &str, reason: &'static str) -> Response<Body> {
    metrics::counter!("herdgate_connections_refused_total", "reason" => reason).increment(1);
    ApiError::Unavailable(message.into(), jittered_retry_after(RETRY_AFTER_MAX)).into_response()
}

async fn start<S>(
    mut ws: WebSocketStream<S>,
    check: Result<String, Refusal>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: SessionSlot,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _slot = slot;
    let key = match check {
        Ok(key) => key,
        Err(Refusal(code, message)) => {
            tracing::debug!(%peer, code, message, "websocket refused");
            metrics::counter!("herdgate_connections_closed_total", "reason" => "pusher_error")
                .increment(1);
            use futures_util::SinkExt;
            let _ = ws
                .send(tokio_tungstenite::tungstenite::Message::Text(
                    protocol::error(Some(code), message),
                ))
                .await;
            session::close(&mut ws, code, message).await;
            return;
        }
    };
    let live = shared.live();
    let Some(app) = live.apps.by_key(&key).cloned() else {
        return; // removed by a reload between the check and the upgrade
    };
    drop(live);
    let session = Session::new(shared, app);
    let span = tracing::info_span!("session", socket_id = %session.socket_id(), %peer);
    let end = session::run(ws, session).instrument(span.clone()).await;
    span.in_scope(|| tracing::debug!(?end, "session ended"));
}
