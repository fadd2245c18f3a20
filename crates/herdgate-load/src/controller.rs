//! The controller: phases of a run, worker processes, the publisher, the report.
//!
//! Phases: sample the server → start workers (in-process, or `P` child processes re-executing
//! this binary with hidden options) → wait until every worker has finished its initial connect
//! phase → measure for `--duration` (publisher running; churn recycling) → stop publishing,
//! drain, settle the ledger → tell workers to stop (shared phase flag) → merge their results.
//! Every wait is bounded, so a run always ends by itself; Ctrl-C ends the current phase early
//! and still reports.

use crate::cli::Plan;
use crate::ctx::WorkerResult;
use crate::hist::{quantile_of_counts, Hist};
use crate::procstat::{self, Sample};
use crate::publisher::{self, LedgerTotals, PublishStats};
use crate::report::{self, Pct, Report};
use crate::shm::{Shm, PHASE_DRAINING, PHASE_MEASURING, PHASE_STOP};
use crate::worker;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::io::Write;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

enum Workers {
    InProcess(JoinHandle<WorkerResult>),
    Children(Vec<(tokio::process::Child, JoinHandle<Vec<u8>>)>),
}

impl Workers {
    fn all_exited(&mut self) -> bool {
        match self {
            Workers::InProcess(h) => h.is_finished(),
            Workers::Children(cs) => cs
                .iter_mut()
                .all(|(c, _)| !matches!(c.try_wait(), Ok(None))),
        }
    }

    /// Collects results, waiting at most `limit` for workers to finish.
    async fn collect(self, limit: Duration) -> Vec<WorkerResult> {
        match self {
            Workers::InProcess(h) => match tokio::time::timeout(limit, h).await {
                Ok(Ok(r)) => vec![r],
                _ => {
                    eprintln!("herdgate-load: worker did not finish");
                    vec![]
                }
            },
            Workers::Children(cs) => {
                let mut out = Vec::new();
                for (i, (mut child, reader)) in cs.into_iter().enumerate() {
                    if tokio::time::timeout(limit, child.wait()).await.is_err() {
                        eprintln!("herdgate-load: worker process {i} did not exit; killing it");
                        let _ = child.kill().await;
                    }
                    let bytes = reader.await.unwrap_or_default();
                    let text = String::from_utf8_lossy(&bytes);
                    let last = text.lines().rev().find(|l| !l.trim().is_empty());
                    match last.map(|l| (l, serde_json::from_str::<WorkerResult>(l))) {
                        Some((_, Ok(r))) => out.push(r),
                        Some((l, Err(e))) => eprintln!(
                            "herdgate-load: worker process {i} returned no result: {e} (in {} bytes: {:.200}…)",
                            l.len(),
                            l
                        ),
                        None => eprintln!(
                            "herdgate-load: worker process {i} returned no result (status {:?})",
                            child.try_wait().ok().flatten()
                        ),
                    }
                }
                out
            }
        }
    }
}

/// Sleeps until `deadline` or until `done()` or an interrupt, polling every 50 ms.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while Instant::now() < deadline && !done() && !INTERRUPTED.load(Relaxed) {
        tokio::time::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

fn spawn_children(plan: &Plan, shm: &Shm, args: &[OsString]) -> Result<Workers> {
    let exe = std::env::current_exe().context("locating own executable")?;
    let path = shm.path().context("shared region has no path")?;
    let mut children = Vec::new();
    for i in 0..plan.processes {
        let mut child = tokio::process::Command::new(&exe)
            .args(args)
            .arg("--child-index")
            .arg(i.to_string())
            .arg("--child-count")
            .arg(plan.processes.to_string())
            .arg("--shm")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker process {i}"))?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf).await;
            buf
        });
        children.push((child, reader));
    }
    Ok(Workers::Children(children))
}

/// Samples deliveries and their latency once a second until `stop` (the
/// report's timeline, for charts), printing the live line unless `quiet`.
async fn progress(
    shm: Arc<Shm>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
    quiet: bool,
) -> Vec<report::TimePoint> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut prev_delivered = 0u64;
    let mut prev_hist: Vec<u64> = vec![0; shm.live_hist().len()];
    let mut timeline = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let h = shm.header();
        let delivered = h.delivered.load(Relaxed);
        let now_hist: Vec<u64> = shm.live_hist().iter().map(|c| c.load(Relaxed)).collect();
        let window: Vec<u64> = now_hist
            .iter()
            .zip(&prev_hist)
            .map(|(a, b)| a - b)
            .collect();
        let ms = |q: f64| quantile_of_counts(&window, q).map(|us| us as f64 / 1000.0);
        // Bounded: one point per second of the run.
        timeline.push(report::TimePoint {
            t_secs: start.elapsed().as_secs_f64(),
            delivered: delivered - prev_delivered,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
        });
        prev_hist = now_hist;
        if quiet {
            prev_delivered = delivered;
            continue;
        }
        let p99 = ms(0.99)
            .map(|v| format!("{v:.2} ms"))
            .unwrap_or_else(|| "–".into());
        eprint!(
            "\r[{:>5.0}s] attempted {} established {} open {} refused {} failed {} | {} msg/s p99 {}    ",
            start.elapsed().as_secs_f64(),
            h.attempted.load(Relaxed),
            h.established.load(Relaxed),
            h.open.load(Relaxed),
            h.refused.load(Relaxed),
            h.failed.load(Relaxed),
            delivered - prev_delivered,
            p99
        );
        let _ = std::io::stderr().flush();
        prev_delivered = delivered;
    }
    if !quiet {
        eprintln!();
    }
    timeline
}

/// Runs the whole scenario; `args` are this process's arguments (for child processes).
pub async fn run(plan: Arc<Plan>, args: Vec<OsString>) -> Result<Report> {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nherdgate-load: interrupted, finishing the run early");
            INTERRUPTED.store(true, Relaxed);
        }
    });
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let shm = Arc::new(if plan.processes > 1 {
        Shm::create(plan.channels)?
    } else {
        Shm::anonymous(plan.channels)?
    });
    let before = procstat::sample(&plan.server_pid);
    if !plan.server_pid.is_empty() && before.rss_kib.is_none() {
        eprintln!(
            "herdgate-load: cannot read /proc for --server-pid; server figures will be missing"
        );
    }

    let start = Instant::now();
    let mut workers = if plan.processes > 1 {
        spawn_children(&plan, &shm, &args)?
    } else {
        Workers::InProcess(tokio::spawn(worker::run(
            plan.clone(),
            shm.clone(),
            0,
            1,
            None,
        )))
    };
    let (progress_tx, progress_rx) = watch::channel(false);
    let progress_task = tokio::spawn(progress(shm.clone(), start, progress_rx, plan.quiet));

    // Connect phase.
    let connect_deadline =
        start + Duration::from_secs_f64(plan.ramp_secs() + plan.connect_timeout + 15.0);
    let expect = plan.processes as u64;
    wait_until(connect_deadline, || {
        shm.header().workers_connected.load(Relaxed) >= expect || workers.all_exited()
    })
    .await;
    let connected = procstat::sample(&plan.server_pid);

    // Measured phase.
    shm.header().phase.store(PHASE_MEASURING, Relaxed);
    let measure_start = Instant::now();
    let totals = Arc::new(LedgerTotals::default());
    let (pub_tx, pub_rx) = watch::channel(false);
    let publisher = tokio::spawn(publisher::run(
        plan.clone(),
        shm.clone(),
        totals.clone(),
        pub_rx,
    ));
    wait_until(
        measure_start + Duration::from_secs_f64(plan.duration),
        || workers.all_exited(),
    )
    .await;
    let steady = procstat::sample(&plan.server_pid);
    let open_at_end = shm.header().open.load(Relaxed);
    let measured_secs = measure_start.elapsed().as_secs_f64();
    shm.header().phase.store(PHASE_DRAINING, Relaxed);
    let _ = pub_tx.send(true);
    let pub_stats: PublishStats = publisher.await.unwrap_or_default();
    if pub_stats.attempted > 0 {
        let drain_end = Instant::now() + Duration::from_secs_f64(plan.drain);
        wait_until(drain_end, || false).await;
    }
    let after = procstat::sample(&plan.server_pid);
    for s in shm.ledger_settle_all() {
        totals.absorb(s);
    }

    // Stop.
    shm.header().phase.store(PHASE_STOP, Relaxed);
    // Workers report after their own drain; with many sockets per core
    // they take longer to get there.
    let limit =
        Duration::from_secs(30).max(Duration::from_secs_f64(plan.connections as f64 / 4000.0));
    let results = workers.collect(limit).await;
    let _ = progress_tx.send(true);
    let timeline = progress_task.await.unwrap_or_default();
    if results.is_empty() {
        anyhow::bail!("no worker produced a result (see the errors above)");
    }
    let mut w = WorkerResult::default();
    for r in &results {
        w.merge(r);
    }
    let mut report = build_report(
        &plan,
        started_unix,
        w,
        pub_stats,
        &totals,
        [before, connected, steady, after],
        open_at_end,
        measured_secs,
    );
    report.timeline = timeline;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    plan: &Plan,
    started_unix: u64,
    w: WorkerResult,
    p: PublishStats,
    totals: &LedgerTotals,
    [before, connected, steady, after]: [Sample; 4],
    open_at_end: u64,
    measured_secs: f64,
) -> Report {
    let cpu = |a: Sample, b: Sample| Some(b.cpu_secs? - a.cpu_secs?);
    let cpu_measured = cpu(connected, after);
    let server = plan.server_pid.first().map(|&pid| report::Server {
        pid,
        pids: plan.server_pid.clone(),
        rss_before_kib: before.rss_kib,
        rss_connected_kib: connected.rss_kib,
        rss_steady_kib: steady.rss_kib,
        rss_per_conn_kib: match (before.rss_kib, steady.rss_kib) {
            (Some(a), Some(b)) if open_at_end > 0 => {
                Some((b as f64 - a as f64) / open_at_end as f64)
            }
            _ => None,
        },
        cpu_connect_secs: cpu(before, connected),
        cpu_measured_secs: cpu_measured,
        deliveries_per_cpu_sec: cpu_measured
            .filter(|&c| c > 0.0 && w.delivered > 0)
            .map(|c| w.delivered as f64 / c),
    });
    let connections = report::Connections {
        attempted: w.attempted,
        tcp_connected: w.tcp_connected,
        upgraded: w.upgraded,
        established: w.established,
        subscribed: w.ready,
        subscription_errors: w.subscription_errors,
        refused: w.refused(),
        refused_by_http_status: w.maps.refused_http.clone(),
        refused_by_close_code: w.maps.refused_close.clone(),
        dropped_after_ready: w.dropped,
        dropped_by_close_code: w.maps.dropped_close.clone(),
        errors: w.maps.errors.clone(),
        recycled: w.recycled,
        open_at_end_of_measure: open_at_end,
        initial_sockets: w.initial_sockets,
        initial_ready: w.initial_ready,
        connect_phase_secs: w.connect_span_secs,
        connect_rate_per_sec: if w.connect_span_secs > 0.0 {
            w.initial_ready as f64 / w.connect_span_secs
        } else {
            0.0
        },
        pings_answered: w.pongs_sent,
        pings_sent: w.pings_sent,
        kernel_listen_overflows: match (before.listen_overflows, after.listen_overflows) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    };
    let delivery = report::Delivery {
        wire: plan.deflate.map(|d| report::Wire {
            compression_offered: d == crate::cli::OnOff::On,
            text_frames: w.wire_frames,
            bytes: w.wire_bytes,
            bytes_per_frame: w.wire_bytes as f64 / w.wire_frames.max(1) as f64,
        }),
        measured_secs,
        published: p.attempted,
        publish_ok: p.ok,
        publish_failed_by_status: p.failed_by_status.clone(),
        publish_errors: p.errors.clone(),
        publish_skipped: p.skipped,
        expected: totals.expected.load(Relaxed),
        delivered: w.delivered,
        delivered_per_sec: if measured_secs > 0.0 {
            w.delivered as f64 / measured_secs
        } else {
            0.0
        },
        missing: totals.missing.load(Relaxed),
        extra: totals.extra.load(Relaxed),
        duplicates: w.duplicates,
        late: w.late,
        latency_ms: Pct::of(&w.delivery_us),
        presence: (plan.kind == crate::cli::ChannelKind::Presence).then(|| {
            report::PresenceFrames {
                member_events: w.member_events_received,
                count_events: w.presence_counts_received,
                frames_per_sec: (w.member_events_received + w.presence_counts_received) as f64
                    / measured_secs.max(1e-9),
            }
        }),
        client_events: (plan.client_event_rate > 0.0).then(|| report::ClientEvents {
            sent: w.client_events_sent,
            received: w.client_events_received,
            tallies: w.tallies_received,
            frames_per_socket_per_sec: (w.client_events_received + w.tallies_received) as f64
                / (w.ready.max(1) as f64 * measured_secs.max(1e-9)),
        }),
    };
    let mut histograms: std::collections::BTreeMap<&'static str, Hist> = Default::default();
    let (handshake_ms, ready_ms, publish_api_ms) = (
        Pct::of(&w.handshake_us),
        Pct::of(&w.ready_us),
        Pct::of(&p.api_us),
    );
    histograms.insert("handshake_us", w.handshake_us);
    histograms.insert("ready_us", w.ready_us);
    histograms.insert("delivery_us", w.delivery_us);
    histograms.insert("publish_api_us", p.api_us);
    Report {
        timeline: Vec::new(),
        tool: "herdgate-load",
        version: env!("CARGO_PKG_VERSION"),
        scenario: plan.scenario,
        started_unix,
        target: report::Target {
            url: plan.url.clone(),
            api_url: plan.api_url.clone(),
            app_id: plan.app_id.clone(),
        },
        config: report::Config {
            connections: plan.connections,
            rate: plan.rate,
            ramp_rate: plan.ramp_rate,
            channels: plan.channels,
            per_conn: plan.per_conn,
            channel_kind: plan.kind,
            publish_rate: plan.publish_rate,
            payload: plan.payload,
            duration_secs: plan.duration,
            drain_secs: plan.drain,
            processes: plan.processes,
            source_ips: plan.source_ips,
            publishers: plan.publishers,
        },
        connections,
        handshake_ms,
        ready_ms,
        delivery,
        publish_api_ms,
        server,
        histograms,
    }
}
