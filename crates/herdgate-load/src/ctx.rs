//! What one worker's socket tasks share: the plan, the counters and
//! histograms they book into, and how a socket's attempt ended. Both the
//! worker (which owns the sockets) and each socket task use it.

use crate::cli::Plan;
use crate::hist::{AtomicHist, Hist};
use crate::shm::Shm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_rustls::TlsConnector;

/// How a socket's life ended, for the slot that owns it.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Shutdown,
    Recycled,
    Failed,
    Dropped,
}

/// Why a connection attempt failed before the socket was ready.
#[derive(Debug)]
pub enum Fail {
    /// The upgrade was answered with this HTTP status.
    Http(u16),
    /// Closed (or `pusher:error`) with this code before ready.
    Close(u16),
    /// TCP/TLS failure label (`tcp_refused`, `tcp_timeout`, `tls`, …).
    Connect(String),
    Other(String),
}

#[derive(Default)]
pub struct Stats {
    pub attempted: AtomicU64,
    pub tcp_connected: AtomicU64,
    pub upgraded: AtomicU64,
    pub established: AtomicU64,
    pub ready: AtomicU64,
    pub subscriptions_ok: AtomicU64,
    pub subscription_errors: AtomicU64,
    pub dropped: AtomicU64,
    pub recycled: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub late: AtomicU64,
    pub other_events: AtomicU64,
    /// While measuring: client events sent, client events received from
    /// others, and `herdgate:tally` summaries received.
    pub client_events_sent: AtomicU64,
    pub client_events_received: AtomicU64,
    pub tallies_received: AtomicU64,
    /// While measuring: presence member events and big rooms' count events received.
    pub member_events_received: AtomicU64,
    pub presence_counts_received: AtomicU64,
    pub pongs_sent: AtomicU64,
    pub pings_sent: AtomicU64,
    maps: Mutex<Maps>,
}

#[derive(Default, Clone, Debug, Serialize, Deserialize)]
pub struct Maps {
    pub refused_http: BTreeMap<u16, u64>,
    pub refused_close: BTreeMap<u16, u64>,
    pub dropped_close: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
}

/// Everything one worker measured; children print it as one JSON line.
#[derive(Default, Clone, Debug, Serialize, Deserialize)]
pub struct WorkerResult {
    pub attempted: u64,
    pub tcp_connected: u64,
    pub upgraded: u64,
    pub established: u64,
    pub ready: u64,
    pub subscriptions_ok: u64,
    pub subscription_errors: u64,
    pub dropped: u64,
    pub recycled: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub late: u64,
    pub other_events: u64,
    #[serde(default)]
    pub client_events_sent: u64,
    #[serde(default)]
    pub client_events_received: u64,
    #[serde(default)]
    pub tallies_received: u64,
    #[serde(default)]
    pub member_events_received: u64,
    #[serde(default)]
    pub presence_counts_received: u64,
    pub pongs_sent: u64,
    pub pings_sent: u64,
    /// Text frames and their bytes as they were on the wire (`--deflate` only).
    #[serde(default)]
    pub wire_frames: u64,
    #[serde(default)]
    pub wire_bytes: u64,
    /// Nested, not flattened: serde reads a flattened map's keys as strings
    /// only, so close codes (`u16` keys) would not come back.
    pub maps: Maps,
    /// Sockets of the initial connect phase, and how many of them became ready.
    pub initial_sockets: u64,
    pub initial_ready: u64,
    /// Seconds from this worker's first attempt to its last initial socket becoming ready.
    pub connect_span_secs: f64,
    pub handshake_us: Hist,
    pub ready_us: Hist,
    pub delivery_us: Hist,
}

fn add_map<K: Ord + Clone>(a: &mut BTreeMap<K, u64>, b: &BTreeMap<K, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

impl WorkerResult {
    pub fn merge(&mut self, o: &WorkerResult) {
        self.attempted += o.attempted;
        self.tcp_connected += o.tcp_connected;
        self.upgraded += o.upgraded;
        self.established += o.established;
        self.ready += o.ready;
        self.subscriptions_ok += o.subscriptions_ok;
        self.subscription_errors += o.subscription_errors;
        self.dropped += o.dropped;
        self.recycled += o.recycled;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.late += o.late;
        self.other_events += o.other_events;
        self.client_events_sent += o.client_events_sent;
        self.client_events_received += o.client_events_received;
        self.tallies_received += o.tallies_received;
        self.member_events_received += o.member_events_received;
        self.presence_counts_received += o.presence_counts_received;
        self.pongs_sent += o.pongs_sent;
        self.pings_sent += o.pings_sent;
        self.wire_frames += o.wire_frames;
        self.wire_bytes += o.wire_bytes;
        add_map(&mut self.maps.refused_http, &o.maps.refused_http);
        add_map(&mut self.maps.refused_close, &o.maps.refused_close);
        add_map(&mut self.maps.dropped_close, &o.maps.dropped_close);
        add_map(&mut self.maps.errors, &o.maps.errors);
        self.initial_sockets += o.initial_sockets;
        self.initial_ready += o.initial_ready;
        // Workers ramp in parallel: the run's span is the longest one.
        self.connect_span_secs = self.connect_span_secs.max(o.connect_span_secs);
        self.handshake_us.merge(&o.handshake_us);
        self.ready_us.merge(&o.ready_us);
        self.delivery_us.merge(&o.delivery_us);
    }

    /// Refusals: deliberate "no" from the server (HTTP status, close code, TCP RST).
    pub fn refused(&self) -> u64 {
        self.maps.refused_http.values().sum::<u64>()
            + self.maps.refused_close.values().sum::<u64>()
            + self.maps.errors.get("tcp_refused").copied().unwrap_or(0)
    }
}

/// State shared by the socket tasks of one worker.
pub struct WorkerCtx {
    pub plan: Arc<Plan>,
    /// Text frames on the wire, counted with `--deflate` (see `wire`).
    pub wire: Arc<crate::wire::WireCount>,
    pub shm: Arc<Shm>,
    pub tls: Option<TlsConnector>,
    pub stats: Stats,
    pub h_handshake: AtomicHist,
    pub h_ready: AtomicHist,
    pub h_delivery: AtomicHist,
    pub start: Instant,
    pub initial_pending: AtomicUsize,
    pub initial_ready: AtomicU64,
    pub last_initial_ready_us: AtomicU64,
}

impl WorkerCtx {
    /// Marks this slot's first attempt as resolved (once).
    pub fn resolve_first(&self, first: &mut bool, ok: bool) {
        if std::mem::take(first) {
            if ok {
                self.initial_ready.fetch_add(1, Relaxed);
                self.last_initial_ready_us
                    .fetch_max(self.start.elapsed().as_micros() as u64, Relaxed);
            }
            self.initial_pending.fetch_sub(1, Relaxed);
        }
    }

    pub fn error(&self, label: &str) {
        let mut m = self.stats.maps.lock().unwrap();
        *m.errors.entry(label.to_string()).or_default() += 1;
    }

    /// Books a failed attempt.
    pub fn fail(&self, first: &mut bool, f: Fail) -> Outcome {
        let h = self.shm.header();
        let refused = matches!(&f, Fail::Http(_) | Fail::Close(_))
            || matches!(&f, Fail::Connect(l) if l == "tcp_refused");
        if refused {
            h.refused.fetch_add(1, Relaxed)
        } else {
            h.failed.fetch_add(1, Relaxed)
        };
        {
            let mut m = self.stats.maps.lock().unwrap();
            match f {
                Fail::Http(s) => *m.refused_http.entry(s).or_default() += 1,
                Fail::Close(c) => *m.refused_close.entry(c).or_default() += 1,
                Fail::Connect(l) | Fail::Other(l) => *m.errors.entry(l).or_default() += 1,
            }
        }
        self.resolve_first(first, false);
        Outcome::Failed
    }

    /// Books a ready socket closed by the server (close code) or lost (error label).
    pub fn dropped(&self, what: Result<u16, &str>) {
        self.stats.dropped.fetch_add(1, Relaxed);
        let mut m = self.stats.maps.lock().unwrap();
        match what {
            Ok(code) => *m.dropped_close.entry(code).or_default() += 1,
            Err(label) => *m.errors.entry(label.to_string()).or_default() += 1,
        }
    }

    pub fn result(&self, initial_sockets: usize) -> WorkerResult {
        let s = &self.stats;
        WorkerResult {
            attempted: s.attempted.load(Relaxed),
            tcp_connected: s.tcp_connected.load(Relaxed),
            upgraded: s.upgraded.load(Relaxed),
            established: s.established.load(Relaxed),
            ready: s.ready.load(Relaxed),
            subscriptions_ok: s.subscriptions_ok.load(Relaxed),
            subscription_errors: s.subscription_errors.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            recycled: s.recycled.load(Relaxed),
            delivered: s.delivered.load(Relaxed),
            duplicates: s.duplicates.load(Relaxed),
            late: s.late.load(Relaxed),
            other_events: s.other_events.load(Relaxed),
            client_events_sent: s.client_events_sent.load(Relaxed),
            client_events_received: s.client_events_received.load(Relaxed),
            tallies_received: s.tallies_received.load(Relaxed),
            member_events_received: s.member_events_received.load(Relaxed),
            presence_counts_received: s.presence_counts_received.load(Relaxed),
            pongs_sent: s.pongs_sent.load(Relaxed),
            pings_sent: s.pings_sent.load(Relaxed),
            wire_frames: self.wire.frames.load(Relaxed),
            wire_bytes: self.wire.bytes.load(Relaxed),
            maps: s.maps.lock().unwrap().clone(),
            initial_sockets: initial_sockets as u64,
            initial_ready: self.initial_ready.load(Relaxed),
            connect_span_secs: self.last_initial_ready_us.load(Relaxed) as f64 / 1e6,
            handshake_us: self.h_handshake.snapshot(),
            ready_us: self.h_ready.snapshot(),
            delivery_us: self.h_delivery.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_result_with_close_codes_survives_the_trip_from_a_child() {
        let mut r = WorkerResult::default();
        r.maps.dropped_close.insert(4201, 3);
        r.maps.refused_http.insert(503, 2);
        r.maps.errors.insert("ws_protocol".into(), 1);
        let line = serde_json::to_string(&r).unwrap();
        let back: WorkerResult = serde_json::from_str(&line).unwrap();
        assert_eq!(back.maps.dropped_close.get(&4201), Some(&3));
        assert_eq!(back.maps.refused_http.get(&503), Some(&2));
    }
}
