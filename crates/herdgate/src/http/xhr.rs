//! The HTTP fallback transports of pusher-js, for networks that break
//! websockets: `xhr_streaming` and `xhr_polling` at pusher-js's default
//! `httpPath`, `/pusher` (docs/PROTOCOL.md "HTTP fallback transports").
//!
//! A session is `/pusher/app/{key}/{server}/{session}` (pusher-js picks
//! `server` in 0–999 and an 8-character `session`), with three requests:
//!
//! * `…/xhr_streaming` — a response held open, one line per batch: `o`
//!   (open, first response only), `a["<frame>",…]`, `h` (heartbeat, every
//!   [`HEARTBEAT`]), `c[code,"reason"]` (close).
//! * `…/xhr` — the same lines, but each response ends after one line (or
//!   a heartbeat after [`HEARTBEAT`]) and the client polls again.
//! * `…/xhr_send` — a JSON array of the client's messages (each a Pusher
//!   frame as a string); `204` once they are queued to the session.
//!
//! The first receive request of a session is admitted like a websocket
//! upgrade (same caps, same 503 + `Retry-After`) and also within
//! `limits.max_http_sessions`; the session then runs the same loop as a
//! websocket session over a [`Pipe`](crate::pipe::Pipe).

use super::upgrade::{self, Checked, PusherRefusal};
use super::{ApiError, Body};
use crate::pipe::{Full, Pipe, Taken, ToSession, DETACHED_MAX};
use crate::protocol::{self, Frame};
use crate::session::xhr::{PipeReader, PipeWriter};
use crate::session::{self, Session};
use crate::state::Front;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// A receive request with nothing to carry answers `h` after this long
/// (under the 30 s idle timeouts of common proxies).
pub const HEARTBEAT: Duration = Duration::from_secs(25);
/// Largest `xhr_send` body; larger is refused with 413.
pub const MAX_SEND_BYTES: usize = 64 * 1024;
/// Chunks waiting to be written on one streaming response.
const STREAM_CHUNKS: usize = 4;
/// pusher-js reopens its stream once it has read more than this (UTF-16
/// units of `responseText`) and aborts the old one, losing what is still in
/// flight on it: a stream past it carries nothing more, the next one does.
const CLIENT_STREAM_MAX: usize = 256 * 1024;

/// The three requests of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Streaming,
    Polling,
    Send,
}

/// `/pusher/app/{key}/{server}/{session}/{kind}`: `(key, session id, kind)`.
pub fn parse(path: &str) -> Option<(&str, String, Kind)> {
    let rest = path.strip_prefix("/pusher/app/")?;
    let mut parts = rest.split('/');
    let (key, server, session, kind) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || key.is_empty() {
        return None;
    }
    let server_ok = (1..=3).contains(&server.len()) && server.bytes().all(|b| b.is_ascii_digit());
    let session_ok =
        (1..=32).contains(&session.len()) && session.bytes().all(|b| b.is_ascii_alphanumeric());
    if !server_ok || !session_ok {
        return None;
    }
    let kind = match kind {
        "xhr_streaming" => Kind::Streaming,
        "xhr" => Kind::Polling,
        "xhr_send" => Kind::Send,
        _ => return None,
    };
    Some((key, format!("{key}/{server}/{session}"), kind))
}

pub fn is_fallback(path: &str) -> bool {
    path.starts_with("/pusher/")
}

/// Every fallback response may be read by a page of another origin (the
/// app's `allowed_origins` are checked when a session opens, as for
/// websockets); pusher-js sends `Content-Type: application/json`, so
/// browsers ask first (`OPTIONS`).
pub async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    front: &Arc<Front>,
) -> Response<Body> {
    let mut resp = if req.method() == http::Method::OPTIONS {
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .header(header::ACCESS_CONTROL_ALLOW_METHODS, "POST, GET, OPTIONS")
            .header(header::ACCESS_CONTROL_ALLOW_HEADERS, "Content-Type")
            .header(header::ACCESS_CONTROL_MAX_AGE, "86400")
            .body(Body::default())
            .expect("valid response")
    } else {
        serve(req, peer, front).await
    };
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        http::HeaderValue::from_static("*"),
    );
    resp
}

async fn serve(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    front: &Arc<Front>,
) -> Response<Body> {
    let Some((key, id, kind)) = parse(req.uri().path()) else {
        return ApiError::NotFound(
            "expected /pusher/app/{key}/{server}/{session}/(xhr_streaming|xhr|xhr_send)".into(),
        )
        .into_response();
    };
    if req.method() != http::Method::POST && req.method() != http::Method::GET {
        return ApiError::BadRequest("the HTTP fallback takes POST (or GET)".into())
            .into_response();
    }
    if kind == Kind::Send {
        return send(req, &id, peer, front).await;
    }
    let pipe = match front.pipes.get(&id) {
        // A session id is chosen by the client: only its opener may take
        // what the session sends.
        Some(p) if !p.owned_by(client_ip(&req, peer, front)) => {
            metrics::counter!("herdgate_http_fallback_refused_total", "reason" => "address")
                .increment(1);
            return ApiError::Forbidden("this HTTP session was opened from another address".into())
                .into_response();
        }
        Some(p) => p,
        None => {
            let check = upgrade::check_pusher_params(key, req.uri().query().unwrap_or(""), front);
            match open(&req, peer, front, &id, check) {
                Ok(p) => p,
                Err(resp) => return *resp,
            }
        }
    };
    receive(pipe, kind, front)
}

/// A new session: admitted, its pipe registered, its task spawned.
fn open(
    req: &Request<hyper::body::Incoming>,
    peer: SocketAddr,
    front: &Arc<Front>,
    id: &str,
    check: Result<Checked, PusherRefusal>,
) -> Result<Arc<Pipe>, Box<Response<Body>>> {
    let (slot, peer) = upgrade::admit(req.headers(), peer, front, &check)?;
    let (Checked { resume, .. }, (app, quota)) =
        match check.and_then(|c| upgrade::session_app(front, &c.key).map(|a| (c, a))) {
            Ok(ok) => ok,
            Err(PusherRefusal(code, message)) => return Err(Box::new(refused(code, message))),
        };
    let (pipe, from_client) = Pipe::new(peer.ip());
    // Each session's requests hold HTTP connections, which count as
    // handshakes: half of those stay for websocket upgrades and the API.
    let (max, max_per_ip) = {
        let live = front.live();
        let l = &live.config.limits;
        (
            l.max_http_sessions.min(l.max_handshakes / 2),
            l.max_http_sessions_per_ip,
        )
    };
    let place = match front
        .pipes
        .insert(id.to_string(), pipe.clone(), max, max_per_ip)
    {
        Ok(place) => place,
        Err(full) => {
            let (reason, message) = match full {
                Full::Node => (
                    "http_sessions",
                    "too many HTTP fallback sessions on this node; retry later",
                ),
                Full::PerIp => (
                    "http_sessions_per_ip",
                    "too many HTTP fallback sessions from this address; retry later",
                ),
            };
            metrics::counter!("herdgate_connections_refused_total", "reason" => reason)
                .increment(1);
            return Err(Box::new(
                ApiError::Unavailable(message.into(), super::error::jittered_retry_after(10))
                    .into_response(),
            ));
        }
    };
    let (front2, id2, pipe2) = (front.clone(), id.to_string(), pipe.clone());
    front.node.life.tasks.spawn(async move {
        let (_slot, _quota, _place) = (slot, quota, place);
        let mut reader = PipeReader(from_client);
        let mut writer = PipeWriter(pipe2.clone());
        let mut session = Box::new(Session::new(front2.session.clone(), app));
        session.resume_all = resume;
        let span = tracing::debug_span!("http_session", socket_id = %session.socket_id(), %peer);
        session::run(&mut reader, &mut writer, &mut session)
            .instrument(span)
            .await;
        // The session stays findable until a receive request has carried
        // its close (`c[code,"reason"]`), for a while: a poll that arrives
        // after the end gets the close, not a new session.
        let grace = tokio::time::sleep(DETACHED_MAX);
        tokio::pin!(grace);
        loop {
            let changed = pipe2.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !pipe2.close_pending() {
                break;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = &mut grace => break,
                _ = front2.node.life.stopped.cancelled() => break,
            }
        }
        front2.pipes.remove(&id2);
    });
    Ok(pipe)
}

/// A Pusher refusal over the fallback: the session opens, is told why, and closes.
fn refused(code: u16, message: &'static str) -> Response<Body> {
    tracing::debug!(code, message, "HTTP fallback session refused");
    metrics::counter!("herdgate_connections_closed_total", "reason" => "pusher_error").increment(1);
    let error = protocol::error(Some(code), message);
    let mut body = String::from("o\n");
    body.push_str(&batch(&[error]));
    body.push_str(&close_line(code, message));
    lines(Body::full(body))
}

/// `a["<frame>",…]\n`
fn batch(frames: &[Frame]) -> String {
    let texts: Vec<&str> = frames.iter().map(|f| f.as_str()).collect();
    format!(
        "a{}\n",
        serde_json::to_string(&texts).expect("strings serialize")
    )
}

fn close_line(code: u16, reason: &str) -> String {
    format!(
        "c{}\n",
        serde_json::to_string(&(code, reason)).expect("serializable")
    )
}

fn lines(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "application/javascript; charset=UTF-8",
        )
        .header(
            header::CACHE_CONTROL,
            "no-store, no-cache, must-revalidate, max-age=0",
        )
        .body(body)
        .expect("valid response")
}

/// The next line for a receive request: frames, the close, a heartbeat
/// after [`HEARTBEAT`] of nothing, or `None` when superseded (or stopping).
async fn next_line(pipe: &Pipe, id: u64, front: &Front) -> Option<(String, bool)> {
    let beat = tokio::time::sleep(HEARTBEAT);
    tokio::pin!(beat);
    loop {
        // Registered before looking, so a push between the look and the
        // wait is not missed.
        let changed = pipe.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match pipe.take(id) {
            Taken::Frames(f) => return Some((batch(&f), false)),
            Taken::Closed(f, code, reason) => {
                let mut line = if f.is_empty() {
                    String::new()
                } else {
                    batch(&f)
                };
                line.push_str(&close_line(code, &reason));
                return Some((line, true));
            }
            Taken::Superseded => return None,
            Taken::Empty => {}
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = &mut beat => return Some(("h\n".into(), false)),
            _ = front.node.life.stopped.cancelled() => return None,
        }
    }
}

fn receive(pipe: Arc<Pipe>, kind: Kind, front: &Arc<Front>) -> Response<Body> {
    let (id, first) = pipe.attach();
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_CHUNKS);
    let (front, tasks) = (front.clone(), front.node.life.tasks.clone());
    // The response's body is written by a task of its own (tracked: a
    // shutdown waits for it), ended when the session closes, the client
    // goes away (the body's receiver is dropped) or a newer receive
    // request supersedes it.
    tasks.spawn(async move {
        carry(&pipe, id, first, kind, &tx, &front).await;
        drop(tx); // the response ends here
                  // A client that sends no receive request for a while is gone.
        if pipe.detach(id) {
            tokio::select! {
                _ = tokio::time::sleep(DETACHED_MAX) => {}
                _ = front.node.life.closing.cancelled() => return,
            }
            if pipe.abandoned_since(id) {
                let _ = pipe.to_session.try_send(ToSession::Gone);
            }
        }
    });
    lines(Body::chunks(rx))
}

async fn superseded(pipe: &Pipe, id: u64) {
    loop {
        let changed = pipe.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !pipe.is_current(id) {
            return;
        }
        changed.await;
    }
}

/// Write one receive request's lines (`first`: it opens the session).
async fn carry(
    pipe: &Pipe,
    id: u64,
    first: bool,
    kind: Kind,
    tx: &mpsc::Sender<Bytes>,
    front: &Front,
) {
    let mut sent = 0usize;
    if first {
        sent += 2;
        if tx.send(Bytes::from_static(b"o\n")).await.is_err() || kind == Kind::Polling {
            return;
        }
    }
    loop {
        if kind == Kind::Streaming && sent > CLIENT_STREAM_MAX {
            // The client reopens now; wait to be superseded, keep the rest for it.
            tokio::select! {
                _ = tx.closed() => {}
                _ = front.node.life.stopped.cancelled() => {}
                _ = superseded(pipe, id) => {}
            }
            return;
        }
        let next = tokio::select! {
            n = next_line(pipe, id, front) => n,
            _ = tx.closed() => None,
        };
        let Some((line, closed)) = next else { return };
        sent += line.chars().map(char::len_utf16).sum::<usize>();
        if tx.send(Bytes::from(line)).await.is_err() || closed || kind == Kind::Polling {
            return;
        }
    }
}

/// The client's address: the peer, or who a trusted proxy says it is.
fn client_ip(
    req: &Request<hyper::body::Incoming>,
    peer: SocketAddr,
    front: &Front,
) -> std::net::IpAddr {
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    crate::realaddr::client_ip(peer.ip(), xff, &front.live().trusted_proxies)
}

/// `xhr_send`: a JSON array of the client's messages, each a string.
///
/// A client can make this request wait twice — sending its body slowly,
/// and sending faster than its session reads — and the request holds a
/// connection permit meanwhile: both waits share one deadline
/// (`server.handshake_timeout`), after which the request is answered
/// (408, 503) and its permit is free. Only the address that opened the
/// session may send on it (403), [`MAX_SENDS`](crate::pipe::MAX_SENDS) at
/// once (429).
async fn send(
    req: Request<hyper::body::Incoming>,
    id: &str,
    peer: SocketAddr,
    front: &Front,
) -> Response<Body> {
    let Some(pipe) = front.pipes.get(id) else {
        return ApiError::NotFound("no such HTTP session (it may have ended)".into())
            .into_response();
    };
    let client = client_ip(&req, peer, front);
    let (wait, max_message) = {
        let live = front.live();
        let c = &live.config;
        (c.server.handshake_timeout.get(), c.limits.max_message_bytes)
    };
    if !pipe.owned_by(client) {
        metrics::counter!("herdgate_http_fallback_refused_total", "reason" => "address")
            .increment(1);
        return ApiError::Forbidden("this HTTP session was opened from another address".into())
            .into_response();
    }
    let Some(_sending) = pipe.start_send() else {
        metrics::counter!("herdgate_http_fallback_refused_total", "reason" => "sends").increment(1);
        return ApiError::TooManyRequests(
            "too many xhr_send requests in flight on this session".into(),
            1,
        )
        .into_response();
    };
    let deadline = tokio::time::Instant::now() + wait;
    let limited = http_body_util::Limited::new(req.into_body(), MAX_SEND_BYTES);
    let body = match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return ApiError::TooLarge(format!(
                "an xhr_send body may be at most {MAX_SEND_BYTES} bytes"
            ))
            .into_response();
        }
        Ok(Err(_)) => {
            return ApiError::BadRequest("could not read the body".into()).into_response()
        }
        Err(_) => {
            metrics::counter!("herdgate_http_fallback_refused_total", "reason" => "body_timeout")
                .increment(1);
            return ApiError::Timeout(format!("xhr_send body not received within {wait:?}"))
                .into_response();
        }
    };
    let messages: Vec<String> = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(_) => {
            return ApiError::BadRequest(
                "an xhr_send body must be a JSON array of strings (Pusher frames)".into(),
            )
            .into_response()
        }
    };
    if let Some(m) = messages.iter().find(|m| m.len() > max_message) {
        // What a websocket closes with 1009; here the request is refused.
        return ApiError::TooLarge(format!(
            "a message of {} bytes is over limits.max_message_bytes ({max_message})",
            m.len()
        ))
        .into_response();
    }
    for m in messages {
        // Bounded: a client that sends faster than its session reads waits
        // here (its request is slow), until the deadline; it is never
        // buffered without limit.
        match tokio::time::timeout_at(deadline, pipe.to_session.send(ToSession::Text(m))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return ApiError::NotFound("the HTTP session ended".into()).into_response()
            }
            Err(_) => {
                metrics::counter!("herdgate_http_fallback_refused_total", "reason" => "session_busy")
                    .increment(1);
                return ApiError::Unavailable(
                    "the session is not reading its messages; retry later".into(),
                    1,
                )
                .into_response();
            }
        }
    }
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::default())
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_parsed_strictly() {
        let (key, id, kind) = parse("/pusher/app/k/123/abcdefgh/xhr_streaming").unwrap();
        assert_eq!(
            (key, id.as_str(), kind),
            ("k", "k/123/abcdefgh", Kind::Streaming)
        );
        assert_eq!(parse("/pusher/app/k/1/a/xhr").unwrap().2, Kind::Polling);
        assert_eq!(parse("/pusher/app/k/1/a/xhr_send").unwrap().2, Kind::Send);
        for bad in [
            "/pusher/app/k/1234/a/xhr",
            "/pusher/app/k/x/a/xhr",
            "/pusher/app/k/1/a-b/xhr",
            "/pusher/app/k/1/a/xhr/more",
            "/pusher/app//1/a/xhr",
            "/pusher/app/k/1/a/eventsource",
            "/pusher/app/k/1/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/xhr",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn lines_are_what_pusher_js_reads() {
        let f = [Frame::from_static(r#"{"event":"e","data":"{}"}"#)];
        assert_eq!(
            batch(&f),
            "a[\"{\\\"event\\\":\\\"e\\\",\\\"data\\\":\\\"{}\\\"}\"]\n"
        );
        assert_eq!(
            close_line(4200, "bye \"now\""),
            "c[4200,\"bye \\\"now\\\"\"]\n"
        );
    }
}
