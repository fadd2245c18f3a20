//! The admin listener: health for load balancers, Prometheus metrics, and
//! the status page for people (`/`, reading `/status/live`; see
//! [`super::status_page`]). It is a separate socket, bound to loopback by
//! default, so that neither probes nor scrapes compete with clients and
//! neither is exposed publicly. It keeps answering while the server drains
//! (`/readyz` says 503 then) and stops last.

use super::status_page::{self, StatusPage};
use super::{text, Body};
use crate::state::{Front, Node};
use http::{Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What the admin listener reads: the node, its client-facing side if it
/// has one (open sessions, accept permits), and a cluster worker's view of
/// the cluster.
pub struct Admin {
    pub node: Arc<Node>,
    pub front: Option<Arc<Front>>,
    pub worker_status: Option<Arc<std::sync::OnceLock<crate::cluster::worker_node::StatusFn>>>,
}

impl Admin {
    /// Open sessions (none on a worker).
    pub fn open_sessions(&self) -> usize {
        self.front.as_ref().map_or(0, |f| f.gate.sessions.open())
    }

    fn saturated_for(&self) -> Duration {
        self.front
            .as_ref()
            .map_or(Duration::ZERO, |f| f.gate.accept.saturated_for())
    }
}

/// Permit → accept → spawn, as on the public listener: at most
/// `limits.max_admin_connections` at once, each with a short header deadline.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        admin.node.live().config.limits.max_admin_connections,
    ));
    // The status page's samples live as long as the listener and are shared
    // by every viewer, so more viewers never mean more sampling.
    let page = Arc::new(StatusPage::default());
    let stop = admin.node.life.stopped.clone();
    crate::accept::run(
        listener,
        stop,
        "admin",
        move || permits.clone().acquire_owned(),
        |stream, _, permit| {
            let (admin, page) = (admin.clone(), page.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (admin, page) = (admin.clone(), page.clone());
                    async move { Ok::<_, Infallible>(respond(&req, &admin, &page).await) }
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

async fn respond<B>(req: &Request<B>, admin: &Admin, page: &StatusPage) -> Response<Body> {
    let path = req.uri().path();
    {
        let live = admin.node.live();
        let conf = &live.config.admin;
        let host = req
            .headers()
            .get(http::header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{0}"));
        // The probes tell nothing a page could steal, and health checkers
        // name the node however their platform does.
        let open = path == "/livez" || path == "/readyz";
        if !open && host.is_some_and(|h| !host_allowed(h, &conf.allowed_hosts)) {
            metrics::counter!("herdgate_admin_refused_total", "reason" => "host").increment(1);
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown Host: the admin listener answers to IP addresses, localhost and admin.allowed_hosts\n",
            );
        }
        if !conf.token.is_empty() && !open && !token_ok(req, &conf.token) {
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
        "/status/live" => crate::http::json(StatusCode::OK, &page.live(admin, status(admin)).await),
        // Alive as long as this process answers: load never fails liveness.
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if admin.saturated_for() >= SATURATED_NOT_READY => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: saturated (every accept permit is held)\n",
        ),
        "/readyz" if !ready(admin) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining or overloaded\n",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/status" => crate::http::json(StatusCode::OK, &status(admin)),
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
fn cluster_status(admin: &Admin) -> serde_json::Value {
    if let Some(edge) = admin.node.router.cluster_edge() {
        return edge.status();
    }
    admin
        .worker_status
        .as_ref()
        .and_then(|s| s.get())
        .map_or(serde_json::Value::Null, |f| f())
}

/// How long every accept permit must have been held before `/readyz` says
/// so: a burst that fills the pool for a moment does not take the node out
/// of rotation (and a fleet-wide flood does not take every node out at
/// once for a blip); one that holds it does.
const SATURATED_NOT_READY: Duration = Duration::from_secs(1);

/// Ready for new connections: not draining, able to accept (a permit
/// freed within [`SATURATED_NOT_READY`]), and the load state does not refuse them.
fn ready(admin: &Admin) -> bool {
    if admin.saturated_for() >= SATURATED_NOT_READY {
        return false;
    }
    let node = &admin.node;
    let refuse = node.live().config.overload.actions.refuse_connections;
    // An edge that cannot follow the cluster view serves no room: not ready.
    let current = node.router.cluster_edge().is_none_or(|e| e.is_current());
    current
        && !node.life.draining.is_cancelled()
        && !refuse.applies(node.overload.admission_state())
}

fn status(admin: &Admin) -> serde_json::Value {
    let node = &admin.node;
    let live = node.live();
    let c = &live.config;
    let state = node.overload.state();
    let snap = node.overload.snapshot();
    let accept = admin.front.as_ref().map(|f| &f.gate.accept);
    serde_json::json!({
        "state": state.as_str(),
        "ready": ready(admin),
        "draining": node.life.draining.is_cancelled(),
        "reasons": snap.reasons,
        "signals": snap.signals,
        "admission": node.overload.admission_state().as_str(),
        "role": c.cluster.role.as_str(),
        "cluster": cluster_status(admin),
        "limited": c.overload.actions.limited(state, node.overload.admission_state()),
        "connections": admin.open_sessions(),
        "accept": {
            "permits_in_use": accept.map_or(0, |a| a.in_use()),
            "max_handshakes": accept.map_or(c.limits.max_handshakes, |a| a.max()),
            "saturated": accept.is_some_and(|a| a.saturated()),
        },
        "limits": {
            "max_connections": admin.front.as_ref().map_or(c.limits.max_connections, |f| f.gate.sessions.max()),
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
