//! HTTP on the public listener: websocket upgrades on `/app/{key}` and the
//! Pusher HTTP API on `/apps/{id}/…`, served by hyper, one task per TCP
//! connection. The request head must arrive within `handshake_timeout`
//! (slow clients cannot hold a connection slot forever).

pub mod admin;
mod api;
mod body;
mod error;
pub mod sign;
mod status_page;
mod upgrade;
pub mod xhr;

pub use error::ApiError;

use crate::outbound::DirectSocket;
use crate::state::Front;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

pub use body::Body;

/// Serve one accepted connection (plain TCP or TLS) until it closes,
/// upgrades or the server stops. Its first request head must arrive by
/// `deadline` (the connection's accept-to-upgrade deadline); later heads on
/// a keep-alive connection get the same length of time. `direct`, for a
/// plain TCP connection, goes with its websocket upgrade to the session.
pub async fn serve_connection<I>(
    stream: I,
    direct: Option<DirectSocket>,
    peer: SocketAddr,
    front: Arc<Front>,
    deadline: tokio::time::Instant,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let live = front.live();
    let cfg = &live.config;
    let svc = tower::ServiceBuilder::new()
        .map_response(count_status)
        .service_fn({
            let front = front.clone();
            move |mut req: Request<Incoming>| {
                if let Some(d) = &direct {
                    if upgrade::is_websocket(&req) {
                        req.extensions_mut().insert(d.clone());
                    }
                }
                route(req, peer, front.clone())
            }
        });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(
            deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(std::time::Duration::from_millis(1)),
        )
        .max_buf_size(cfg.limits.max_request_header_bytes)
        .keep_alive(true);
    drop(live);
    let conn = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = front.node.life.closing.cancelled() => {
            // Finish the request in flight, take no new ones.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

fn count_status(resp: Response<Body>) -> Response<Body> {
    metrics::counter!("herdgate_http_requests_total", "status" => resp.status().as_str().to_owned())
        .increment(1);
    resp
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    front: Arc<Front>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let resp = if upgrade::is_websocket(&req) {
        upgrade::handle(req, peer, &front)
    } else if path.starts_with("/apps/") {
        api::handle(req, &front).await
    } else if xhr::is_fallback(path) {
        xhr::handle(req, peer, &front).await
    } else if path == "/" {
        text(
            StatusCode::OK,
            "herdgate: Pusher protocol 7 on /app/{key}, HTTP API on /apps/{id}\n",
        )
    } else {
        ApiError::NotFound("no such endpoint".into()).into_response()
    };
    Ok(resp)
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::full(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::full(value.to_string()))
        .expect("valid response")
}
