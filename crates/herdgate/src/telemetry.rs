//! Logs (`tracing`) and metrics (`metrics` + Prometheus exposition).

use crate::config::LogConfig;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;
static LOG_FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Install the log subscriber; a second call (tests) is a no-op. The level
/// can be changed later with [`set_log_level`] (config reload); `RUST_LOG`,
/// when set, wins over the config.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| crate::config::log_filter(&f).ok())
        .or_else(|| crate::config::log_filter(&default_filter(&cfg.level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let installed = if cfg.format == crate::config::LogFormat::Json {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_target(false))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi),
            )
            .try_init()
    };
    if installed.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Change the log filter of a running process (ignored while `RUST_LOG` is set).
pub fn set_log_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let Some(handle) = LOG_FILTER.get() {
        let Ok(filter) = crate::config::log_filter(&default_filter(level)) else {
            return tracing::warn!(level, "not a log filter; the level stays");
        };
        if let Err(e) = handle.reload(filter) {
            tracing::warn!(error = %e, "could not change the log level");
        }
    }
}

/// rustls logs what clients get wrong (bad SNI, failed handshakes) at warn
/// level; at the edge those are client-caused, so they stay quiet unless the
/// operator asks for rustls by name.
fn default_filter(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide metrics recorder once and describe every metric.
pub fn init_metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "herdgate_delivery_delay_seconds".into(),
                ),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            )
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

pub fn render_metrics() -> String {
    init_metrics().render()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("herdgate_connections_open", "Open websocket sessions");
    describe_counter!(
        "herdgate_connections_accepted_total",
        "Websocket upgrades admitted"
    );
    describe_counter!(
        "herdgate_connections_refused_total",
        "Websocket upgrades refused before the upgrade, by reason"
    );
    describe_counter!(
        "herdgate_connections_closed_total",
        "Websocket sessions ended, by reason"
    );
    describe_counter!(
        "herdgate_tcp_accepted_total",
        "TCP connections accepted on the public listener"
    );
    describe_gauge!("herdgate_subscriptions", "Socket-channel subscriptions");
    describe_gauge!("herdgate_channels", "Occupied channels");
    describe_counter!(
        "herdgate_messages_published_total",
        "Events published through the HTTP API, per channel"
    );
    describe_counter!(
        "herdgate_messages_delivered_total",
        "Frames queued to sockets by room fan-out"
    );
    describe_counter!(
        "herdgate_messages_written_in_place_total",
        "Of the delivered frames, those a room wrote to an idle plain-TCP socket itself"
    );
    describe_counter!(
        "herdgate_write_window_flushes_total",
        "Sockets whose write window ended, by how their held frames went out"
    );
    describe_counter!(
        "herdgate_outbound_overflows_total",
        "Frames refused because a socket's outbound queue was full"
    );
    describe_counter!("herdgate_client_events_total", "Client events forwarded");
    describe_counter!(
        "herdgate_client_events_dropped_total",
        "Client events dropped, by reason"
    );
    describe_counter!(
        "herdgate_http_requests_total",
        "HTTP responses on the public listener, by status"
    );
    metrics::describe_histogram!(
        "herdgate_delivery_delay_seconds",
        metrics::Unit::Seconds,
        "Time from a frame entering a socket's outbound queue to being written to the socket (oldest frame of each write)"
    );
    describe_counter!(
        "herdgate_accept_errors_total",
        "accept() failures (e.g. out of file descriptors), by listener: public, admin or link"
    );
    describe_counter!(
        "herdgate_config_reloads_total",
        "Config reloads (SIGHUP), by result: ok or invalid"
    );
    describe_gauge!(
        "herdgate_load_state",
        "Load state: 0 normal, 1 pressured, 2 degraded, 3 critical"
    );
    describe_gauge!(
        "herdgate_outbound_queue_bytes",
        "Bytes waiting in all sockets' outbound queues"
    );
    describe_counter!(
        "herdgate_proxy_protocol_errors_total",
        "Connections dropped for a missing or malformed PROXY protocol header"
    );
    describe_gauge!("herdgate_rss_bytes", "Resident memory of the process");
    describe_gauge!(
        "herdgate_scheduling_lag_seconds",
        "How late the runtime ran the load monitor's periodic tick"
    );
    describe_counter!(
        "herdgate_shed_total",
        "Load-shedding actions taken, by action"
    );
    describe_counter!(
        "herdgate_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out, by reason"
    );
    describe_counter!(
        "herdgate_tls_handshakes_total",
        "TLS handshakes completed, by kind: full or resumed (a session ticket)"
    );
    describe_counter!(
        "herdgate_conflation_overflow_total",
        "Events to a conflated channel sent at once: max_keys keys were waiting"
    );
    describe_counter!(
        "herdgate_auth_grants_total",
        "Auth grants issued, and presented grants refused, by result"
    );
    describe_counter!(
        "herdgate_tls_tickets_refused_total",
        "TLS session tickets that resumed nothing, by reason"
    );
    describe_counter!(
        "herdgate_tls_reloads_total",
        "TLS certificate reloads, by result"
    );
    describe_gauge!(
        "herdgate_worker_mailbox_depth",
        "Commands waiting in the fullest worker mailbox"
    );
    // Present from the start, not only after the first change.
    metrics::gauge!("herdgate_load_state").set(0.0);
}
