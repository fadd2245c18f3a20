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
use crate::ctx::{Outcome, Stats, WorkerCtx, WorkerResult};
use crate::hist::AtomicHist;
use crate::net;
use crate::shm::{Shm, PHASE_MEASURING, PHASE_STOP};
use crate::socket::{self, wait_shutdown};
use rand::{Rng, SeedableRng};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

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
        wire: Default::default(),
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
