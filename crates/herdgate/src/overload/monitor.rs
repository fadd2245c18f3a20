//! The sampling task: measures the signals, steps the state machine, tells
//! sessions about changes and keeps the last sample for `/status`.

use super::{reasons, Machine, Overload, Signal, Snapshot, StepDown, Tuning};
use crate::config::OverloadConfig;
use crate::outbound::OUTBOUND_BYTES;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// What the monitor samples and where it reports. The node implements it
/// (`state::Shared`), so this module depends on no layer above it.
pub trait Sampled: Send + Sync + 'static {
    fn overload(&self) -> &Overload;
    /// `[overload]` as configured now (a reload may change it).
    fn overload_config(&self) -> OverloadConfig;
    fn open_sessions(&self) -> usize;
    fn max_sessions(&self) -> usize;
    /// Commands waiting in the fullest queue to a room owner.
    fn mailbox_depth(&self) -> usize;
    /// Cancelled when the node has stopped: the monitor ends.
    fn stopped(&self) -> &CancellationToken;
}

pub fn spawn_monitor<N: Sampled>(node: Arc<N>) {
    tokio::spawn(run(node));
}

async fn run<N: Sampled>(node: Arc<N>) {
    let memory_limit_auto = memory_limit();
    let mut machine = Machine::default();
    // Admission is rated apart: the `connections` signal is left out (the
    // cap itself refuses at the limit and frees places the moment sockets
    // leave), and it reopens after a short cooldown in one step, so clients
    // retrying after a herd meet an open door.
    let mut admission = Machine::default();
    let mut interval_len = node.overload_config().sample_interval.get();
    let mut tick = tokio::time::interval(interval_len);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_admitted = node.overload().admitted.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    let mut in_burst = false;
    let mut trim = Trim::default();
    loop {
        let scheduled = tokio::select! {
            t = tick.tick() => t,
            _ = node.stopped().cancelled() => return,
        };
        let now = Instant::now();
        let lag_ms = now.saturating_duration_since(scheduled).as_secs_f64() * 1000.0;
        let config = node.overload_config();
        let o = &config;

        let admitted = node.overload().admitted.load(Ordering::Relaxed);
        let secs = now.duration_since(last_at).as_secs_f64().max(1e-3);
        let accept_rate = (admitted - last_admitted) as f64 / secs;
        (last_admitted, last_at) = (admitted, now);
        // After a burst of handshakes, give the freed handshake buffers back:
        // they are interleaved with the long-lived per-socket allocations and
        // would otherwise stay resident as holes.
        if accept_rate > 100.0 {
            in_burst = true;
        } else if in_burst {
            in_burst = false;
            crate::sys::release_free_memory();
        }
        let limit = if o.memory_limit_bytes > 0 {
            o.memory_limit_bytes
        } else {
            memory_limit_auto
        };
        let rss = crate::sys::rss_bytes().unwrap_or(0);
        let outbound = OUTBOUND_BYTES.sum().max(0) as f64;
        if trim.after_burst(outbound as u64, node.open_sessions()) {
            crate::sys::release_free_memory();
        }
        let mailbox = node.mailbox_depth() as f64;
        let max_conn = node.max_sessions().max(1) as f64;
        let signals = vec![
            Signal {
                name: "connections",
                value: node.open_sessions() as f64 / max_conn,
                thresholds: o.connections,
            },
            Signal {
                name: "accept_rate",
                value: accept_rate,
                thresholds: o.accept_rate,
            },
            Signal {
                name: "memory",
                value: rss as f64 / limit.max(1) as f64,
                thresholds: o.memory,
            },
            Signal {
                name: "scheduling_lag_ms",
                value: lag_ms,
                thresholds: o.scheduling_lag_ms,
            },
            Signal {
                name: "outbound_bytes",
                value: outbound,
                thresholds: o.outbound_bytes,
            },
            Signal {
                name: "mailbox_depth",
                value: mailbox,
                thresholds: o.mailbox_depth,
            },
        ];
        metrics::gauge!("herdgate_outbound_queue_bytes").set(outbound);
        metrics::gauge!("herdgate_worker_mailbox_depth").set(mailbox);
        metrics::gauge!("herdgate_scheduling_lag_seconds").set(lag_ms / 1000.0);
        metrics::gauge!("herdgate_rss_bytes").set(rss as f64);
        // Fold histogram samples into their buckets even if nobody scrapes,
        // so they never pile up between scrapes.
        crate::telemetry::init_metrics().run_upkeep();

        let tuning = Tuning {
            hysteresis: o.hysteresis,
            cooldown: o.cooldown.get(),
            step_down: StepDown::OneState,
        };
        let admission_tuning = Tuning {
            cooldown: o.admission_cooldown.get(),
            step_down: StepDown::ToCalm,
            ..tuning
        };
        let signals = if o.enabled { signals } else { Vec::new() };
        let admission_signals: Vec<Signal> = signals
            .iter()
            .filter(|s| s.name != "connections")
            .cloned()
            .collect();
        let at = now;
        let admission_changed = admission.step(&admission_signals, at, admission_tuning);
        if let Some(a) = admission_changed {
            tracing::warn!(admission = a.as_str(), reasons = ?reasons(&admission_signals), "admission state changed");
            node.overload().set_admission(a);
        }
        let changed = machine.step(&signals, at, tuning);
        if changed.is_some() || admission_changed.is_some() {
            let state = machine.state();
            let limited = o.actions.limited(state, admission.state());
            if changed.is_some() {
                tracing::warn!(state = state.as_str(), reasons = ?reasons(&signals), limited = ?limited, "load state changed");
            }
            node.overload().set(state, &limited);
        }
        node.overload().record(Snapshot {
            reasons: reasons(&signals),
            signals,
        });

        let wanted = o.sample_interval.get();
        if wanted != interval_len {
            interval_len = wanted;
            tick = tokio::time::interval(wanted);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
    }
}

/// When to give freed heap back to the OS: after a burst of queued bytes
/// drained (or its sockets closed), or after many sessions ended. Queues and
/// sessions free their memory when they empty or end, but the allocator
/// keeps it resident (interleaved with live allocations) until trimmed.
#[derive(Default)]
struct Trim {
    outbound_peak: u64,
    sessions_peak: usize,
}

impl Trim {
    const BURST_BYTES: u64 = 16 << 20;
    const SESSIONS: usize = 1000;

    fn after_burst(&mut self, outbound: u64, sessions: usize) -> bool {
        self.outbound_peak = self.outbound_peak.max(outbound);
        self.sessions_peak = self.sessions_peak.max(sessions);
        let drained = self.outbound_peak >= Self::BURST_BYTES && outbound < self.outbound_peak / 4;
        let left = self.sessions_peak - sessions >= Self::SESSIONS.max(self.sessions_peak / 4);
        if drained || left {
            (self.outbound_peak, self.sessions_peak) = (outbound, sessions);
            return true;
        }
        false
    }
}

/// The memory limit of this process's own cgroup (the path in
/// /proc/self/cgroup: a systemd unit's `MemoryMax=`, v2 or v1), else the
/// cgroup root's, else physical RAM.
fn memory_limit() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path_of = |prefix: &str| {
        own.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|p| p.trim_end_matches('/').to_string())
    };
    let v2 = path_of("0::").and_then(|p| read(&format!("/sys/fs/cgroup{p}/memory.max")));
    let v1 = own
        .lines()
        .find_map(|l| {
            l.split_once(":memory:")
                .map(|(_, p)| p.trim_end_matches('/').to_string())
        })
        .and_then(|p| read(&format!("/sys/fs/cgroup/memory{p}/memory.limit_in_bytes")));
    let cgroup = v2
        .or(v1)
        .or_else(|| read("/sys/fs/cgroup/memory.max"))
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    let physical = crate::sys::physical_memory();
    match cgroup {
        Some(c) if c > 0 && c < physical => c,
        _ => physical.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::Trim;

    #[test]
    fn trims_once_after_a_drained_burst_or_a_mass_close() {
        let mut t = Trim::default();
        assert!(!t.after_burst(1 << 20, 100), "small queues: no trim");
        assert!(!t.after_burst(64 << 20, 5000), "burst in progress");
        assert!(!t.after_burst(20 << 20, 5000), "still more than a quarter");
        assert!(t.after_burst(1 << 20, 5000), "drained");
        assert!(!t.after_burst(1 << 20, 5000), "once");
        assert!(!t.after_burst(0, 4500), "500 left: not yet");
        assert!(t.after_burst(0, 3500), "1500 left");
        assert!(!t.after_burst(0, 3400));
    }
}
