//! Command line and the resolved run plan.
//!
//! The scenario is the subcommand; every scenario takes the same options ([`Common`]) with
//! scenario-specific defaults filled in by [`Plan::new`]. Child processes are started with
//! the parent's own arguments plus hidden `--child-index/--child-count/--shm`, so the plan
//! must be a pure function of the arguments: every process derives the same one.

use crate::net::{self, Target};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rustls::ClientConfig;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Connections per worker process when `--processes` is not given (below the 20k fd limit).
pub const CONNS_PER_PROCESS: usize = 18_000;
/// Connections per source address when `--source-ips` is not given (ephemeral ports ~28k).
pub const CONNS_PER_SOURCE_IP: usize = 20_000;

#[derive(Parser, Debug)]
#[command(
    name = "herdgate-load",
    version,
    about = "Load generator for Pusher Channels protocol 7 servers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: ScenarioCmd,
}

#[derive(Subcommand, Debug)]
pub enum ScenarioCmd {
    /// Open N subscribed sockets and hold them for --duration; sample server RSS/CPU.
    Idle(Common),
    /// N sockets in one channel; publish to it at --publish-rate.
    Fanout(Common),
    /// N sockets spread over M channels; publish to random channels at --publish-rate.
    Rooms(Common),
    /// All N sockets at once (--rate 0); count established vs refused.
    Storm(Common),
    /// Keep N open while closing and reopening --rate sockets per second.
    Churn(Common),
    /// No server: the machine's write floor (one write(2) of a frame per
    /// socket per round on loopback), to compare a server's fan-out with.
    Floor(crate::floor::FloorArgs),
    /// Two servers: clients on private channels on A, A killed, all back on
    /// B; auth endpoint calls, TLS resumption, CPU per reconnect, recovery time.
    Herd(crate::herd::HerdArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Idle,
    Fanout,
    Rooms,
    Storm,
    Churn,
}

/// `--deflate on|off`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Public,
    Private,
    Presence,
}

impl ScenarioCmd {
    pub fn split(self) -> (Scenario, Common) {
        match self {
            ScenarioCmd::Idle(c) => (Scenario::Idle, c),
            ScenarioCmd::Fanout(c) => (Scenario::Fanout, c),
            ScenarioCmd::Rooms(c) => (Scenario::Rooms, c),
            ScenarioCmd::Storm(c) => (Scenario::Storm, c),
            ScenarioCmd::Churn(c) => (Scenario::Churn, c),
            ScenarioCmd::Floor(_) => unreachable!("floor runs without a plan (main)"),
            ScenarioCmd::Herd(_) => unreachable!("herd runs without a plan (main)"),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// WebSocket base URL (ws:// or wss://); sockets go to {url}/app/{key}.
    #[arg(long, default_value = "ws://127.0.0.1:6001")]
    pub url: String,
    /// HTTP API base URL [default: --url's host and port with http/https].
    #[arg(long)]
    pub api_url: Option<String>,
    /// App id [default: herdgate's embedded demo app].
    #[arg(long, default_value = "100001")]
    pub app_id: String,
    #[arg(long, default_value = "herdgate-demo-key")]
    pub key: String,
    #[arg(long, default_value = "herdgate-demo-secret")]
    pub secret: String,
    /// Sockets to keep open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second; 0 = all at once [default: 500; churn: closes+reopens per
    /// second, default 100; storm: always 0].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Churn only: connections per second while first filling up to N (0 = all at once).
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_rate: f64,
    /// Number of channels M [default: storm 1, rooms N/10, idle/churn N/100; fanout: always 1].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Channels each socket subscribes to (deterministic spread over the M; fanout: always 1).
    #[arg(long, default_value_t = 1)]
    pub per_conn: usize,
    #[arg(long, value_enum, default_value_t = ChannelKind::Public)]
    pub channel_kind: ChannelKind,
    /// Subscribe with herdgate's resume extension (`"resume":{}`): every
    /// event then carries its history serial (docs/PROTOCOL.md).
    #[arg(long)]
    pub resume: bool,
    /// Client events each ready socket sends per second on its first channel while the run
    /// measures (`client-reaction` `{"emoji":"👏"}`, phases spread at random): a clap wave.
    /// The report counts what the sockets receive back (`client_events`).
    #[arg(long, default_value_t = 0.0)]
    pub client_event_rate: f64,
    /// Events per second through the HTTP API [default: fanout 10, rooms 100, churn 10, else 0].
    #[arg(long)]
    pub publish_rate: Option<f64>,
    /// Approximate size of each event's data string, bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Pad events with JSON-like records (player stats) instead of one repeated letter, so
    /// compression sees realistic text.
    #[arg(long)]
    pub payload_json: bool,
    /// Count the bytes of every text frame on the wire (report: `delivery.wire`); `on` also
    /// offers permessage-deflate (as browsers do) and inflates what arrives compressed.
    #[arg(long, value_enum)]
    pub deflate: Option<OnOff>,
    /// Length of the measured phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Per-socket limit from TCP connect to subscribed, seconds.
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,
    /// Wait after the last publish before counting missing deliveries, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// Concurrent HTTP API connections of the publisher (one request in flight on each).
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// Server process(es) to sample (RSS from /proc/PID/status, CPU from
    /// /proc/PID/stat), comma-separated: several are summed (the edges and
    /// workers of a cluster on this host).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    #[arg(long)]
    pub md_out: Option<PathBuf>,
    /// Draw charts: PREFIX-latency.svg (delivery latency percentiles over
    /// time) and PREFIX-cdf.svg (the delivery latency distribution).
    #[arg(long, value_name = "PREFIX")]
    pub svg_out: Option<PathBuf>,
    /// Worker processes [default: ceil(N / 18000)].
    #[arg(long)]
    pub processes: Option<usize>,
    /// Loopback source addresses to spread sockets over (127.0.0.1, .2, …) [default: 0 =
    /// kernel's choice, or ceil(N / 20000) above 20000 connections].
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// PEM file of CA certificates to trust for wss/https.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Do not verify the server certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, hide = true)]
    pub child_index: Option<usize>,
    #[arg(long, hide = true)]
    pub child_count: Option<usize>,
    #[arg(long, hide = true)]
    pub shm: Option<PathBuf>,
}

/// Everything a run needs, identical in every process of the run.
pub struct Plan {
    pub scenario: Scenario,
    pub ws: Target,
    pub api: Target,
    pub url: String,
    pub api_url: String,
    /// Full socket URL: {url}/app/{key}?protocol=7&client=herdgate-load&version=0.1
    pub socket_url: String,
    pub app_id: String,
    pub key: String,
    pub secret: String,
    pub connections: usize,
    pub rate: f64,
    pub ramp_rate: f64,
    pub channels: usize,
    pub per_conn: usize,
    pub kind: ChannelKind,
    pub resume: bool,
    pub client_event_rate: f64,
    pub publish_rate: f64,
    pub payload: usize,
    pub payload_json: bool,
    pub deflate: Option<OnOff>,
    pub duration: f64,
    pub connect_timeout: f64,
    pub drain: f64,
    pub publishers: usize,
    pub server_pid: Vec<u32>,
    pub processes: usize,
    pub source_ips: usize,
    pub tls: Option<Arc<ClientConfig>>,
    pub quiet: bool,
    pub json_out: Option<PathBuf>,
    pub md_out: Option<PathBuf>,
    pub svg_out: Option<PathBuf>,
}

impl Plan {
    pub fn new(scenario: Scenario, c: &Common) -> Result<Plan> {
        let n = c.connections;
        if n == 0 {
            bail!("--connections must be at least 1");
        }
        let ws = Target::parse(&c.url)?;
        let api_url = match &c.api_url {
            Some(u) => u.clone(),
            None => format!(
                "{}://{}",
                if ws.tls { "https" } else { "http" },
                ws.authority()
            ),
        };
        let api = Target::parse(&api_url)?;
        if !(c.allow_remote || (ws.is_loopback() && api.is_loopback())) {
            bail!(
                "target {} / {} is not a loopback address (pass --allow-remote if you mean it)",
                c.url,
                api_url
            );
        }
        let (channels, per_conn) = match scenario {
            Scenario::Fanout => (1, 1),
            _ => {
                let m = c.channels.unwrap_or(match scenario {
                    Scenario::Rooms => n / 10,
                    Scenario::Storm => 1,
                    _ => n / 100,
                });
                let m = m.max(1);
                (m, c.per_conn.clamp(1, m))
            }
        };
        let publish_rate = c.publish_rate.unwrap_or(match scenario {
            Scenario::Fanout | Scenario::Churn => 10.0,
            Scenario::Rooms => 100.0,
            _ => 0.0,
        });
        let rate = match scenario {
            Scenario::Storm => 0.0,
            Scenario::Churn => c.rate.unwrap_or(100.0),
            _ => c.rate.unwrap_or(500.0),
        };
        let processes = c
            .child_count
            .or(c.processes)
            .unwrap_or(n.div_ceil(CONNS_PER_PROCESS))
            .clamp(1, n);
        let mut source_ips = c.source_ips.unwrap_or(if n > CONNS_PER_SOURCE_IP {
            n.div_ceil(CONNS_PER_SOURCE_IP)
        } else {
            0
        });
        if source_ips > 0 && !ws.is_loopback() {
            eprintln!("herdgate-load: --source-ips ignored: target is not a loopback address");
            source_ips = 0;
        }
        if source_ips > 0 && source_ips < processes {
            source_ips = processes; // each process needs a disjoint, non-empty range
        }
        if source_ips as u64 > net::MAX_SOURCE_IPS as u64 {
            bail!("--source-ips at most {}", net::MAX_SOURCE_IPS);
        }
        let tls = if ws.tls || api.tls {
            Some(net::tls_config(c.ca.as_deref(), c.insecure)?)
        } else {
            None
        };
        let base = c.url.trim_end_matches('/');
        let socket_url = format!(
            "{base}/app/{}?protocol=7&client=herdgate-load&version=0.1",
            c.key
        );
        for (name, v) in [
            ("rate", rate),
            ("publish-rate", publish_rate),
            ("duration", c.duration),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("--{name} must be a non-negative number");
            }
        }
        Ok(Plan {
            scenario,
            ws,
            api,
            url: c.url.clone(),
            api_url,
            socket_url,
            app_id: c.app_id.clone(),
            key: c.key.clone(),
            secret: c.secret.clone(),
            connections: n,
            rate,
            ramp_rate: c.ramp_rate.max(0.0),
            channels,
            per_conn,
            kind: c.channel_kind,
            resume: c.resume,
            client_event_rate: c.client_event_rate.max(0.0),
            publish_rate,
            payload: c.payload,
            payload_json: c.payload_json,
            deflate: c.deflate,
            duration: c.duration,
            connect_timeout: c.connect_timeout.max(0.1),
            drain: c.drain.max(0.0),
            publishers: c.publishers.max(1),
            server_pid: c.server_pid.clone(),
            processes,
            source_ips,
            tls,
            quiet: c.quiet,
            json_out: c.json_out.clone(),
            md_out: c.md_out.clone(),
            svg_out: c.svg_out.clone(),
        })
    }

    /// Name of channel `i`.
    pub fn channel_name(&self, i: usize) -> String {
        let prefix = match self.kind {
            ChannelKind::Public => "",
            ChannelKind::Private => "private-",
            ChannelKind::Presence => "presence-",
        };
        format!("{prefix}load-{i}")
    }

    /// Channel index from a name made by [`Plan::channel_name`].
    pub fn channel_index(name: &str) -> Option<usize> {
        name.rsplit_once("load-")?.1.parse().ok()
    }

    /// Channels of global socket `g`: K consecutive channels starting at g*K, modulo M, so
    /// every channel gets N*K/M sockets (±1) and consecutive sockets land in different ones.
    pub fn channels_of(&self, g: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.per_conn).map(move |t| (g * self.per_conn + t) % self.channels)
    }

    /// Seconds the initial connect phase is planned to take (ramp only).
    pub fn ramp_secs(&self) -> f64 {
        let r = if self.scenario == Scenario::Churn {
            self.ramp_rate
        } else {
            self.rate
        };
        if r > 0.0 {
            self.connections as f64 / r
        } else {
            0.0
        }
    }

    /// Initial connections per second (0 = all at once).
    pub fn initial_rate(&self) -> f64 {
        if self.scenario == Scenario::Churn {
            self.ramp_rate
        } else {
            self.rate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["herdgate-load"];
        v.extend_from_slice(args);
        let (s, c) = Cli::parse_from(v).scenario.split();
        Plan::new(s, &c).unwrap()
    }

    #[test]
    fn defaults_and_spread() {
        let p = plan(&["rooms", "-n", "100", "--channels", "7", "--per-conn", "3"]);
        assert_eq!(
            p.socket_url,
            "ws://127.0.0.1:6001/app/herdgate-demo-key?protocol=7&client=herdgate-load&version=0.1"
        );
        assert_eq!(p.api_url, "http://127.0.0.1:6001");
        let mut per_channel = vec![0; 7];
        for g in 0..100 {
            let cs: Vec<_> = p.channels_of(g).collect();
            assert_eq!(cs.len(), 3);
            assert!(cs[0] != cs[1] && cs[1] != cs[2] && cs[0] != cs[2]);
            cs.iter().for_each(|&c| per_channel[c] += 1);
        }
        assert!(
            per_channel.iter().all(|&k| k == 42 || k == 43),
            "{per_channel:?}"
        );
        assert_eq!(Plan::channel_index(&p.channel_name(6)), Some(6));
        let p = plan(&[
            "fanout",
            "-n",
            "40000",
            "--url",
            "wss://localhost:7000",
            "--insecure",
        ]);
        assert_eq!(
            (p.channels, p.processes, p.source_ips, p.publish_rate),
            (1, 3, 3, 10.0)
        );
        assert_eq!(p.api_url, "https://localhost:7000");
        assert_eq!(plan(&["storm", "--rate", "5"]).rate, 0.0);
    }

    #[test]
    fn remote_targets_need_opt_in() {
        let (s, c) = Cli::parse_from(["x", "idle", "--url", "ws://192.0.2.1:1"])
            .scenario
            .split();
        assert!(Plan::new(s, &c).is_err());
    }
}
