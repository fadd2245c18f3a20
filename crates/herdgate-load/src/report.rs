//! The result of a run: JSON (serde) for machines, a Markdown table for people.
//!
//! Percentiles are given in milliseconds; the raw (sparse, mergeable) histograms in
//! microseconds are kept under `histograms` so results of several runs can be combined later.

use crate::cli::{ChannelKind, Scenario};
use crate::hist::Hist;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Pct {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Pct {
    /// Percentiles in ms of a µs histogram.
    pub fn of(h: &Hist) -> Pct {
        let ms = |us: u64| us as f64 / 1000.0;
        Pct {
            count: h.count,
            mean: h.mean() / 1000.0,
            p50: ms(h.quantile(0.50)),
            p90: ms(h.quantile(0.90)),
            p99: ms(h.quantile(0.99)),
            p999: ms(h.quantile(0.999)),
            max: ms(h.max),
        }
    }
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub scenario: Scenario,
    pub started_unix: u64,
    pub target: Target,
    pub config: Config,
    pub connections: Connections,
    pub handshake_ms: Pct,
    pub ready_ms: Pct,
    pub delivery: Delivery,
    pub publish_api_ms: Pct,
    pub server: Option<Server>,
    pub histograms: BTreeMap<&'static str, Hist>,
    /// Once a second: deliveries in that second and their latency.
    pub timeline: Vec<TimePoint>,
}

/// One second of the run (see [`Report::timeline`]).
#[derive(Serialize, Debug, Clone)]
pub struct TimePoint {
    pub t_secs: f64,
    pub delivered: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Target {
    pub url: String,
    pub api_url: String,
    pub app_id: String,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub connections: usize,
    pub rate: f64,
    pub ramp_rate: f64,
    pub channels: usize,
    pub per_conn: usize,
    pub channel_kind: ChannelKind,
    pub publish_rate: f64,
    pub payload: usize,
    pub duration_secs: f64,
    pub drain_secs: f64,
    pub processes: usize,
    pub source_ips: usize,
    pub publishers: usize,
}

#[derive(Serialize, Debug, Default)]
pub struct Connections {
    pub attempted: u64,
    pub tcp_connected: u64,
    pub upgraded: u64,
    pub established: u64,
    /// Sockets with every subscription answered and at least one accepted.
    pub subscribed: u64,
    pub subscription_errors: u64,
    pub refused: u64,
    pub refused_by_http_status: BTreeMap<u16, u64>,
    pub refused_by_close_code: BTreeMap<u16, u64>,
    pub dropped_after_ready: u64,
    pub dropped_by_close_code: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub recycled: u64,
    pub open_at_end_of_measure: u64,
    pub initial_sockets: u64,
    pub initial_ready: u64,
    pub connect_phase_secs: f64,
    pub connect_rate_per_sec: f64,
    pub pings_answered: u64,
    pub pings_sent: u64,
    /// Rise of the kernel's TcpExt ListenOverflows during the run (host-wide; on loopback, the
    /// server's accept queue overflowing: those clients waited for a SYN retransmit).
    pub kernel_listen_overflows: Option<u64>,
}

#[derive(Serialize, Debug, Default)]
pub struct Wire {
    pub compression_offered: bool,
    pub text_frames: u64,
    pub bytes: u64,
    pub bytes_per_frame: f64,
}

#[derive(Serialize, Debug, Default)]
pub struct Delivery {
    /// With `--deflate`: text frames received and their bytes on the wire (after compression,
    /// header included), over the whole run; `bytes_per_frame` is dominated by the events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire: Option<Wire>,
    pub measured_secs: f64,
    pub published: u64,
    pub publish_ok: u64,
    pub publish_failed_by_status: BTreeMap<u16, u64>,
    pub publish_errors: BTreeMap<String, u64>,
    pub publish_skipped: u64,
    /// Sum over publishes of sockets subscribed to the channel at publish time.
    pub expected: u64,
    /// Unique deliveries received (duplicates excluded).
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub missing: u64,
    /// Deliveries beyond a publish's expected count (sockets that subscribed around publish time).
    pub extra: u64,
    pub duplicates: u64,
    /// Deliveries that arrived after their ledger record was recycled.
    pub late: u64,
    pub latency_ms: Pct,
    /// With `--client-event-rate`: what the clap wave cost the sockets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_events: Option<ClientEvents>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceFrames>,
}

/// Presence frames received while the run measured (`--channel-kind presence`).
#[derive(Serialize, Debug, Default)]
pub struct PresenceFrames {
    /// `member_added` and `member_removed`.
    pub member_events: u64,
    /// A big room's `herdgate:presence_count`.
    pub count_events: u64,
    /// Both, per second, all sockets together.
    pub frames_per_sec: f64,
}

/// The clap wave (`--client-event-rate`), while the run measured.
#[derive(Serialize, Debug, Default)]
pub struct ClientEvents {
    pub sent: u64,
    /// Others' client events received (a server that fans them out).
    pub received: u64,
    /// `herdgate:tally` summaries received.
    pub tallies: u64,
    /// Frames of both kinds per subscribed socket per second.
    pub frames_per_socket_per_sec: f64,
}

#[derive(Serialize, Debug, Default)]
pub struct Server {
    pub pid: u32,
    /// Every process sampled (summed), when more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_connected_kib: Option<u64>,
    pub rss_steady_kib: Option<u64>,
    pub rss_per_conn_kib: Option<f64>,
    pub cpu_connect_secs: Option<f64>,
    pub cpu_measured_secs: Option<f64>,
    pub deliveries_per_cpu_sec: Option<f64>,
}

fn map_str<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "–".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pct_row(out: &mut String, name: &str, p: &Pct) {
    let _ = writeln!(
        out,
        "| {name} | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} ms (n={}) |",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into())
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let c = &self.connections;
        let d = &self.delivery;
        let cfg = &self.config;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "## herdgate-load {:?} against {}\n",
            self.scenario, self.target.url
        );
        let _ = writeln!(o, "| metric | value |\n|---|---|");
        let _ = writeln!(
            o,
            "| config | N={} rate={}/s channels={} per-conn={} kind={:?} publish={}/s payload={}B duration={}s processes={} source-ips={} |",
            cfg.connections, cfg.rate, cfg.channels, cfg.per_conn, cfg.channel_kind, cfg.publish_rate,
            cfg.payload, cfg.duration_secs, cfg.processes, cfg.source_ips
        );
        let _ = writeln!(
            o,
            "| connections attempted / established / subscribed | {} / {} / {} |",
            c.attempted, c.established, c.subscribed
        );
        let _ = writeln!(o, "| refused (total) | {} |", c.refused);
        let _ = writeln!(
            o,
            "| refused by HTTP status | {} |",
            map_str(&c.refused_by_http_status)
        );
        let _ = writeln!(
            o,
            "| refused by close code | {} |",
            map_str(&c.refused_by_close_code)
        );
        let _ = writeln!(
            o,
            "| dropped after ready (by close code) | {} ({}) |",
            c.dropped_after_ready,
            map_str(&c.dropped_by_close_code)
        );
        let _ = writeln!(o, "| other errors | {} |", map_str(&c.errors));
        if c.subscription_errors > 0 || c.recycled > 0 {
            let _ = writeln!(
                o,
                "| subscription errors / recycled | {} / {} |",
                c.subscription_errors, c.recycled
            );
        }
        let _ = writeln!(
            o,
            "| open at end of measure | {} |",
            c.open_at_end_of_measure
        );
        let _ = writeln!(
            o,
            "| connect phase | {}/{} ready in {:.2} s = {:.0} conn/s |",
            c.initial_ready, c.initial_sockets, c.connect_phase_secs, c.connect_rate_per_sec
        );
        if let Some(n) = c.kernel_listen_overflows.filter(|&n| n > 0) {
            let _ = writeln!(o, "| kernel listen-queue overflows (SYN retried) | {n} |");
        }
        let _ = writeln!(o, "| latency columns | p50 / p90 / p99 / p99.9 / max |");
        pct_row(&mut o, "handshake (TCP → 101)", &self.handshake_ms);
        pct_row(&mut o, "ready (TCP → subscribed)", &self.ready_ms);
        if d.published > 0 || d.delivered > 0 {
            let _ = writeln!(
                o,
                "| published ok / attempted (skipped) | {} / {} ({}) |",
                d.publish_ok, d.published, d.publish_skipped
            );
            if !d.publish_failed_by_status.is_empty() || !d.publish_errors.is_empty() {
                let _ = writeln!(
                    o,
                    "| publish failures | status {} ; {} |",
                    map_str(&d.publish_failed_by_status),
                    map_str(&d.publish_errors)
                );
            }
            let _ = writeln!(
                o,
                "| delivered / expected | {} / {} |",
                d.delivered, d.expected
            );
            let _ = writeln!(o, "| delivered per second | {:.0} |", d.delivered_per_sec);
            let _ = writeln!(
                o,
                "| missing / duplicate / extra / late | {} / {} / {} / {} |",
                d.missing, d.duplicates, d.extra, d.late
            );
            if let Some(w) = &d.wire {
                let _ = writeln!(
                    o,
                    "| wire bytes per text frame | {:.1} |",
                    w.bytes_per_frame
                );
                let _ = writeln!(
                    o,
                    "| text frames / wire bytes (compression offered) | {} / {} ({}) |",
                    w.text_frames, w.bytes, w.compression_offered
                );
            }
            pct_row(&mut o, "delivery latency", &d.latency_ms);
            pct_row(&mut o, "publish API call", &self.publish_api_ms);
        }
        if let Some(s) = &self.server {
            let _ = writeln!(
                o,
                "| server RSS before / connected / steady | {} / {} / {} KiB |",
                opt(s.rss_before_kib),
                opt(s.rss_connected_kib),
                opt(s.rss_steady_kib)
            );
            let _ = writeln!(
                o,
                "| server RSS per open connection | {} KiB |",
                opt(s.rss_per_conn_kib.map(|v| format!("{v:.2}")))
            );
            let _ = writeln!(
                o,
                "| server CPU connect / measured phase | {} / {} s |",
                opt(s.cpu_connect_secs.map(|v| format!("{v:.2}"))),
                opt(s.cpu_measured_secs.map(|v| format!("{v:.2}")))
            );
            let _ = writeln!(
                o,
                "| deliveries per server CPU-second | {} |",
                opt(s.deliveries_per_cpu_sec.map(|v| format!("{v:.0}")))
            );
        }
        if let Some(p) = &self.delivery.presence {
            let _ = writeln!(
                o,
                "| presence frames received: member events / count events / per second | {} / {} / {:.0} |",
                p.member_events, p.count_events, p.frames_per_sec
            );
        }
        if let Some(c) = &self.delivery.client_events {
            let _ = writeln!(
                o,
                "| client events sent / others' received / tallies received | {} / {} / {} |",
                c.sent, c.received, c.tallies
            );
            let _ = writeln!(
                o,
                "| frames per socket per second (client events + tallies) | {:.3} |",
                c.frames_per_socket_per_sec
            );
        }
        o
    }
}
