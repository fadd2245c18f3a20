//! The admin listener: health for load balancers, Prometheus metrics, and
//! the status page for people (`/`, reading `/status/live`; see
//! [`super::status_page`]). It is a separate socket, bound to loopback by
//! default, so that neither probes nor scrapes compete with clients and
//! neither is exposed publicly. It keeps answering while the server drains
//! (`/readyz` says 503 then) and stops last.

use super::status_page::{self, StatusPage};
use super::{text, Body};
use crate::state::Shared;
use http::{Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Permit → accept → spawn, as on the public listener: at most
/// `limits.max_admin_connections` at once, each with a short header deadline.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        shared.live().config.limits.max_admin_connections,
    ));
    // The status page's samples live as long as the listener and are shared
    // by every viewer, so more viewers never mean more sampling.
    let page = Arc::new(StatusPage::default());
    let stop = shared.stopped.clone();
    crate::accept::run(
        listener,
        stop,
        "admin",
        move || permits.clone().acquire_owned(),
        |stream, _, permit| {
            let (shared, page) = (shared.clone(), page.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (shared, page) = (shared.clone(), page.clone());
                    async move { Ok::<_, Infallible>(respond(&req, &shared, &page).await) }
                });
                let mut b = http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5));
                let conn = b.serve_connection(TokioIo::new(stream), svc);
                // A scrape or probe takes milliseconds; an idle keep-alive gets
                // at most this long before its place goes to the next one.
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                drop(permit);
            });
        },
    )
    .await;
}

/// Whether `host` (a `Host` header) names this listener: an IP literal
/// (with or without a port), `localhost`, or one of `admin.allowed_hosts`.
/// A browser tricked by DNS rebinding sends the attacker's name, which is
/// none of these.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            _ => host,
        }
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// `Authorization: Bearer <token>` or `?token=<token>`, compared in constant time.
fn token_ok<B>(req: &Request<B>, token: &str) -> bool {
    use subtle_eq::eq;
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [bearer, query]
        .into_iter()
        .flatten()
        .any(|t| eq(t.as_bytes(), token.as_bytes()))
}

mod subtle_eq {
    /// Equal, in time that depends only on the lengths.
    pub fn eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

async fn respond<B>(req: &Request<B>, shared: &Shared, page: &StatusPage) -> Response<Body> {
    let path = req.uri().path();
    {
        let live = shared.live();
        let admin = &live.config.admin;
        let host = req
            .headers()
            .get(http::header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{0}"));
        // The probes tell nothing a page could steal, and health checkers
        // name the node however their platform does.
        let open = path == "/livez" || path == "/readyz";
        if !open && host.is_some_and(|h| !host_allowed(h, &admin.allowed_hosts)) {
            metrics::counter!("herdgate_admin_refused_total", "reason" => "host").increment(1);
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown Host: the admin listener answers to IP addresses, localhost and admin.allowed_hosts\n",
            );
        }
        if !admin.token.is_empty() && !open && !token_ok(req, &admin.token) {
            metrics::counter!("herdgate_admin_refused_total", "reason" => "token").increment(1);
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(http::header::WWW_AUTHENTICATE, "Bearer")
                .body(Body::full(
                    "admin.token is set: send Authorization: Bearer <token>\n",
                ))
                .expect("valid response");
        }
    }
    match path {
        "/" => status_page::page(),
        "/status/live" => {
            crate::http::json(StatusCode::OK, &page.live(shared, status(shared)).await)
        }
        // Alive as long as this process answers: load never fails liveness.
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.accept.saturated_for() >= SATURATED_NOT_READY => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: saturated (every accept permit is held)\n",
        ),
        "/readyz" if !ready(shared) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining or overloaded\n",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/status" => crate::http::json(StatusCode::OK, &status(shared)),
        "/metrics" => Response::builder()
            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Body::full(crate::telemetry::render_metrics()))
            .expect("valid response"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try / (status page), /status, /status/live, /livez, /readyz or /metrics\n",
        ),
    }
}

/// The membership view and links (cluster nodes), else null.
fn cluster_status(shared: &Shared) -> serde_json::Value {
    if let Some(edge) = shared.router.cluster_edge() {
        return edge.status();
    }
    shared
        .worker_status
        .get()
        .map_or(serde_json::Value::Null, |f| f())
}

/// How long every accept permit must have been held before `/readyz` says
/// so: a burst that fills the pool for a moment does not take the node out
/// of rotation (and a fleet-wide flood does not take every node out at
/// once for a blip); one that holds it does.
const SATURATED_NOT_READY: Duration = Duration::from_secs(1);

/// Ready for new connections: not draining, able to accept (a permit
/// freed within [`SATURATED_NOT_READY`]), and the load state does not refuse them.
fn ready(shared: &Shared) -> bool {
    if shared.accept.saturated_for() >= SATURATED_NOT_READY {
        return false;
    }
    let refuse = shared.live().config.overload.actions.refuse_connections;
    // An edge that cannot follow the cluster view serves no room: not ready.
    let current = shared.router.cluster_edge().is_none_or(|e| e.is_current());
    current && !shared.draining.is_cancelled() && !refuse.applies(shared.overload.admission_state())
}

fn status(shared: &Shared) -> serde_json::Value {
    let live = shared.live();
    let c = &live.config;
    let state = shared.overload.state();
    let snap = shared.overload.snapshot();
    serde_json::json!({
        "state": state.as_str(),
        "ready": ready(shared),
        "draining": shared.draining.is_cancelled(),
        "reasons": snap.reasons,
        "signals": snap.signals,
        "admission": shared.overload.admission_state().as_str(),
        "role": c.cluster.role.as_str(),
        "cluster": cluster_status(shared),
        "limited": c.overload.actions.limited(state, shared.overload.admission_state()),
        "connections": shared.sessions.open(),
        "accept": {
            "permits_in_use": shared.accept.in_use(),
            "max_handshakes": shared.accept.max(),
            "saturated": shared.accept.saturated(),
        },
        "limits": {
            "max_connections": shared.sessions.max(),
            "max_connections_per_ip": c.limits.max_connections_per_ip,
            "new_connections_per_second": c.limits.new_connections_per_second,
            "new_connections_burst": c.limits.new_connections_burst,
            "max_handshakes": c.limits.max_handshakes,
            "outbound_queue_messages": c.limits.outbound_queue_messages,
            "outbound_queue_bytes": c.limits.outbound_queue_bytes,
            "client_events_per_second": c.limits.client_events_per_second,
        },
    })
}
