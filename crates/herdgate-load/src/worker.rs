//! A worker: the sockets of one process.
//!
//! Worker `i` of `P` owns global sockets `g ≡ i (mod P)` (so each worker's sockets cover all
//! channels evenly) and source addresses from its own disjoint range. It opens them at
//! `rate / P` per second, reports when its initial connect phase is over (shared header), then
//! keeps them open — in churn, recycling random ones at `rate / P` per second — until the
//! controller sets the stop phase (or its parent disappears, or a hard deadline passes: the
//! tool must always stop by itself). Its counts and histograms come back as a [`WorkerResult`]:
//! directly in a single-process run, as one JSON line on stdout from a child process.

use crate::cli::{Plan, Scenario};
use crate::hist::{AtomicHist, Hist};
use crate::net;
use crate::shm::{Shm, PHASE_MEASURING, PHASE_STOP};
use crate::socket::{self, wait_shutdown, Outcome};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

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
    pub pongs_sent: u64,
    pub pings_sent: u64,
    #[serde(flatten)]
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
        self.pongs_sent += o.pongs_sent;
        self.pings_sent += o.pings_sent;
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
    pub shm: Arc<Shm>,
    pub tls: Option<TlsConnector>,
    pub stats: Stats,
    pub h_handshake: AtomicHist,
    pub h_ready: AtomicHist,
    pub h_delivery: AtomicHist,
    start: Instant,
    initial_pending: AtomicUsize,
    initial_ready: AtomicU64,
    last_initial_ready_us: AtomicU64,
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

    fn result(&self, initial_sockets: usize) -> WorkerResult {
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
            pongs_sent: s.pongs_sent.load(Relaxed),
            pings_sent: s.pings_sent.load(Relaxed),
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

/// Runs worker `index` of `count` until the controller's stop phase.
/// `parent_pid`: for child processes, stop if the parent goes away.
pub async fn run(
    plan: Arc<Plan>,
    shm: Arc<Shm>,
    index: usize,
    count: usize,
    parent_pid: Option<u32>,
) -> WorkerResult {
    let slots: Vec<usize> = (index..plan.connections).step_by(count).collect();
    let n = slots.len();
    let src_range = (plan.source_ips > 0)
        .then(|| net::source_ip_range(plan.source_ips as u32, index as u32, count as u32));
    let ctx = Arc::new(WorkerCtx {
        plan: plan.clone(),
        shm: shm.clone(),
        tls: plan.tls.clone().map(TlsConnector::from),
        stats: Stats::default(),
        h_handshake: AtomicHist::default(),
        h_ready: AtomicHist::default(),
        h_delivery: AtomicHist::default(),
        start: Instant::now(),
        initial_pending: AtomicUsize::new(n),
        initial_ready: AtomicU64::new(0),
        last_initial_ready_us: AtomicU64::new(0),
    });
    let churn = plan.scenario == Scenario::Churn;
    let recycle: Arc<Vec<Notify>> = Arc::new(if churn {
        (0..n).map(|_| Notify::new()).collect()
    } else {
        Vec::new()
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Ramp: spawn one task per slot at the planned rate.
    let rate = plan.initial_rate() / count as f64;
    let ramp = {
        let (ctx, recycle, mut stop_rx) = (ctx.clone(), recycle.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut set = JoinSet::new();
            let start = tokio::time::Instant::now();
            for (k, &g) in slots.iter().enumerate() {
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = wait_shutdown(&mut stop_rx) => {}
                    }
                }
                if *stop_rx.borrow() {
                    break;
                }
                let src = src_range
                    .clone()
                    .map(|r| net::source_ip(r.start + k as u32 % r.len() as u32));
                set.spawn(slot_loop(
                    ctx.clone(),
                    k,
                    g,
                    src,
                    recycle.clone(),
                    stop_rx.clone(),
                ));
            }
            while set.join_next().await.is_some() {}
        })
    };

    let hard_deadline = Instant::now()
        + Duration::from_secs_f64(
            plan.ramp_secs() + plan.connect_timeout * 2.0 + plan.duration + plan.drain + 120.0,
        );
    let connect_deadline =
        Instant::now() + Duration::from_secs_f64(plan.ramp_secs() + plan.connect_timeout + 5.0);
    let should_stop = || {
        shm.header().phase.load(Relaxed) >= PHASE_STOP
            || Instant::now() > hard_deadline
            || parent_pid.is_some_and(|p| std::os::unix::process::parent_id() != p)
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut reported = false;
    let mut churn_started: Option<(Instant, u64)> = None;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    while !should_stop() {
        tick.tick().await;
        if !reported
            && (ctx.initial_pending.load(Relaxed) == 0 || Instant::now() > connect_deadline)
        {
            reported = true;
            shm.header().workers_connected.fetch_add(1, Relaxed);
        }
        if churn
            && reported
            && n > 0
            && shm.header().phase.load(Relaxed) == PHASE_MEASURING
            && plan.rate > 0.0
        {
            let (since, issued) = churn_started.get_or_insert((Instant::now(), 0));
            let due = (since.elapsed().as_secs_f64() * plan.rate / count as f64) as u64;
            while *issued < due {
                recycle[rng.random_range(0..n)].notify_one();
                *issued += 1;
            }
        }
    }
    let _ = stop_tx.send(true);
    let abort = ramp.abort_handle();
    if tokio::time::timeout(Duration::from_secs(10), ramp)
        .await
        .is_err()
    {
        abort.abort();
    }
    ctx.result(n)
}

async fn slot_loop(
    ctx: Arc<WorkerCtx>,
    k: usize,
    g: usize,
    src: Option<Ipv4Addr>,
    recycle: Arc<Vec<Notify>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let outcome = socket::run_socket(&ctx, g, src, recycle.get(k), &mut stop, &mut first).await;
        ctx.resolve_first(&mut first, false);
        match outcome {
            Outcome::Shutdown => break,
            Outcome::Recycled => continue,
            Outcome::Failed | Outcome::Dropped if ctx.plan.scenario == Scenario::Churn => {
                // Keep the population up, like pusher-js would: retry after a second.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = wait_shutdown(&mut stop) => break,
                }
            }
            Outcome::Failed | Outcome::Dropped => break,
        }
    }
}
