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
use crate::admission::{AppRefusal, Refusal, SessionSlot};
use crate::outbound::DirectSocket;
use crate::protocol::{self, codes};
use crate::session::{self, Session};
use crate::state::Front;
use http::{header, HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

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

/// A Pusher-level refusal sent after the upgrade (over the HTTP fallback:
/// in the session's first response).
pub(super) struct PusherRefusal(pub u16, pub &'static str);

/// A session request that passed the Pusher checks: its app key, and
/// whether it opted in to resume on every channel (`herdgate_resume=1`).
pub(super) struct Checked {
    pub key: String,
    pub resume: bool,
}

fn check_pusher_request(uri: &http::Uri, front: &Front) -> Result<Checked, PusherRefusal> {
    let Some(key) = uri
        .path()
        .strip_prefix("/app/")
        .filter(|k| !k.is_empty() && !k.contains('/'))
    else {
        return Err(PusherRefusal(
            codes::PATH_NOT_FOUND,
            "path not found: expected /app/{key}",
        ));
    };
    check_pusher_params(key, uri.query().unwrap_or(""), front)
}

/// The Pusher checks of a new session (websocket or HTTP fallback): the
/// app `key` exists and is enabled, the `query` names a protocol we speak.
pub(super) fn check_pusher_params(
    key: &str,
    query: &str,
    front: &Front,
) -> Result<Checked, PusherRefusal> {
    let (mut protocol, mut version, mut resume) = (None, None, false);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("protocol", v)) => protocol = Some(v),
            Some(("version", v)) => version = Some(v),
            Some(("herdgate_resume", v)) => resume = v == "1",
            _ => {}
        }
    }
    match front.live().apps.by_key(key) {
        None => {
            return Err(PusherRefusal(
                codes::UNKNOWN_APP,
                "application does not exist",
            ))
        }
        Some(app) if !app.enabled => {
            return Err(PusherRefusal(
                codes::APP_DISABLED,
                "application is disabled",
            ))
        }
        Some(_) => {}
    }
    match protocol {
        None => {
            return Err(PusherRefusal(
                codes::NO_PROTOCOL,
                "no protocol version supplied",
            ))
        }
        Some(p) if !matches!(p, "5" | "6" | "7") => {
            return Err(PusherRefusal(
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
            return Err(PusherRefusal(
                codes::INVALID_VERSION,
                "invalid version string format",
            ));
        }
    }
    Ok(Checked {
        key: key.to_string(),
        resume,
    })
}

pub fn handle(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    front: &Arc<Front>,
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
    let check = check_pusher_request(req.uri(), front);
    let (slot, peer) = match admit(h, peer, front, &check) {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let live = front.live();
    let ws_config = live.ws_config();
    // permessage-deflate, when offered and on (protocol::deflate says how).
    let deflate = live.deflate().and_then(|d| {
        let offers = h
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        crate::protocol::deflate::negotiate(offers).map(|answer| (d, answer))
    });
    drop(live);

    let on_upgrade = hyper::upgrade::on(&mut req);
    let direct = req.extensions_mut().remove::<DirectSocket>();
    drop(req);
    // The task's future is allocated once and lives as long as the socket,
    // sized by its largest state: the handshake steps are boxed so that
    // only the session loop's state stays.
    let handshake = Box::new(Handshake {
        on_upgrade,
        ws_config,
        check,
        peer,
        front: front.clone(),
        slot,
        direct,
        deflate: deflate.map(|(d, _)| d),
    });
    front.node.life.tasks.spawn(session_task(handshake));

    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some((_, answer)) = deflate {
        metrics::counter!("herdgate_connections_compressed_total").increment(1);
        resp = resp.header(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    resp.body(Body::default()).expect("valid response")
}

/// Admission of a new session (websocket or HTTP fallback), before any
/// session work ([`crate::admission`] decides): the real client address,
/// then origin, drain, overload, rate and caps. A refusal is the response
/// to send: 403 for an origin the app does not allow, else 503 with a
/// jittered Retry-After.
pub(super) fn admit(
    h: &HeaderMap,
    peer: SocketAddr,
    front: &Front,
    check: &Result<Checked, PusherRefusal>,
) -> Result<(SessionSlot, SocketAddr), Box<Response<Body>>> {
    let live = front.live();
    // The real client, if a trusted proxy says who it is.
    let xff = h.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let peer = SocketAddr::new(
        crate::realaddr::client_ip(peer.ip(), xff, &live.trusted_proxies),
        peer.port(),
    );
    let origin = h.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let app = check.as_ref().ok().map(|c| (c.key.as_str(), origin));
    let node = &front.node;
    let closing = node.life.closing.is_cancelled();
    match front
        .gate
        .admit(&live, &node.overload, closing, peer.ip(), app)
    {
        Ok(slot) => Ok((slot, peer)),
        Err(Refusal::Origin) => Err(Box::new(
            ApiError::Forbidden(Refusal::Origin.message().into()).into_response(),
        )),
        Err(r) => Err(Box::new(
            ApiError::Unavailable(r.message().into(), jittered_retry_after(RETRY_AFTER_MAX))
                .into_response(),
        )),
    }
}

/// The app of a new session (websocket or HTTP fallback), and its place
/// within the app's `max_connections` on this node; or the refusal (4004
/// over the quota; 4001 if a reload removed the app since the check).
pub(super) fn session_app(
    front: &Front,
    key: &str,
) -> Result<(Arc<crate::apps::App>, crate::apps::ConnectionSlot), PusherRefusal> {
    crate::admission::app_place(&front.live(), front.quotas(), key).map_err(|r| match r {
        AppRefusal::Unknown => PusherRefusal(codes::UNKNOWN_APP, "application does not exist"),
        AppRefusal::OverQuota => {
            PusherRefusal(codes::OVER_QUOTA, "Application is over connection quota")
        }
    })
}

/// What the session task needs to finish the upgrade. One heap value, so the
/// task's future carries a pointer rather than every field for its lifetime.
struct Handshake {
    on_upgrade: hyper::upgrade::OnUpgrade,
    ws_config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    check: Result<Checked, PusherRefusal>,
    peer: SocketAddr,
    front: Arc<Front>,
    slot: SessionSlot,
    /// The plain TCP socket under the upgrade, for direct writes.
    direct: Option<DirectSocket>,
    /// permessage-deflate, if negotiated.
    deflate: Option<crate::protocol::deflate::Deflate>,
}

/// The value of a box, freeing the box now rather than when its binding
/// goes out of scope (for a task, at the end of the socket's life).
#[allow(clippy::boxed_local)] // the point: the box is freed on return
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// What a websocket holds for its whole life besides its loop's own state:
/// its socket (reader and writer), its session, and its places in the
/// admission counts. One heap value, lent to the loop.
struct Live {
    reader: session::websocket::WsReader<TokioIo<hyper::upgrade::Upgraded>>,
    writer: session::websocket::WsWriter<tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>>,
    session: Session,
    /// The session's log span (here rather than in the task's future).
    span: tracing::Span,
    _slot: SessionSlot,
    _quota: crate::apps::ConnectionSlot,
}

async fn session_task(h: Box<Handshake>) {
    // The upgrade and the checks run in their own (boxed, then freed)
    // future, so the task keeps only what the loop needs.
    let Some(mut live) = Box::pin(start(h)).await else {
        return;
    };
    let Live {
        reader,
        writer,
        session,
        span,
        ..
    } = &mut *live;
    InSpan {
        span,
        fut: session::run(reader, writer, session),
    }
    .await;
}

pin_project_lite::pin_project! {
    /// `Instrument`, lending the span instead of holding it: every byte of
    /// a session task's future is paid for by every idle socket.
    struct InSpan<'a, F> {
        span: &'a tracing::Span,
        #[pin]
        fut: F,
    }
}

impl<F: std::future::Future> std::future::Future for InSpan<'_, F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.fut.poll(cx)
    }
}

/// Finish the upgrade; a refused client is told why here.
async fn start(h: Box<Handshake>) -> Option<Box<Live>> {
    let Handshake {
        on_upgrade,
        ws_config,
        check,
        peer,
        front,
        slot,
        direct,
        deflate,
    } = unbox(h);
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return None;
        }
    };
    let (mut reader, mut writer) = session::websocket::server(
        TokioIo::new(upgraded),
        ws_config,
        Some(front.fragments.clone()),
        deflate,
    );
    match check.and_then(|c| session_app(&front, &c.key).map(|a| (c, a))) {
        Ok((Checked { resume, .. }, (app, quota))) => {
            let mut session = Session::new(front.session.clone(), app);
            session.resume_all = resume;
            // Rooms write plain-TCP sockets in place; with a write window,
            // when it ends (see `outbound::window`).
            if let Some(socket) = direct {
                session.write_directly(socket.with_deflate(deflate));
            }
            let span = tracing::debug_span!("session", socket_id = %session.socket_id(), %peer);
            Some(Box::new(Live {
                reader,
                writer,
                session,
                span,
                _slot: slot,
                _quota: quota,
            }))
        }
        Err(PusherRefusal(code, message)) => {
            refuse_after_upgrade(&mut reader, &mut writer, code, message, peer).await;
            None
        }
    }
}

/// The Pusher way to refuse: `pusher:error` with the code, then a close with it.
async fn refuse_after_upgrade<R, T>(
    reader: &mut R,
    writer: &mut T,
    code: u16,
    message: &'static str,
    peer: SocketAddr,
) where
    R: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
    T: session::transport::Transport,
{
    tracing::debug!(%peer, code, message, "websocket refused");
    metrics::counter!("herdgate_connections_closed_total", "reason" => "pusher_error").increment(1);
    writer.enqueue([protocol::error(Some(code), message)].into());
    session::close(reader, writer, code, message).await;
}
