//! The Kubernetes HorizontalPodAutoscaler's decision, played by a test on
//! real processes: the same formula and the same metrics as the HPAs the
//! manifests ship, with targets a 2-core test machine can cross in seconds.
//!
//! The controller's rule (autoscaling/v2, per metric):
//!
//! ```text
//! ratio   = current average per pod / target average per pod
//! desired = ceil(current replicas × ratio)    unless |ratio − 1| ≤ tolerance (0.1): keep
//! ```
//!
//! clamped to `[min, max]`, and a scale-down only to the highest
//! recommendation of the last `scale_down_window` (the HPA's
//! `behavior.scaleDown.stabilizationWindowSeconds`); scale-up is not
//! stabilized (`scaleUp.stabilizationWindowSeconds: 0`, as shipped).
//!
//! The metrics, read from the processes as the cluster's pipeline reads them:
//! * workers: CPU utilization — the process's CPU time (`utime + stime` from
//!   `/proc/<pid>/stat`, what cAdvisor reports) over a sampling window, as a
//!   fraction of the pod's CPU request ([`CpuMeter`]);
//! * edges: `herdgate_connections_open` from each edge's `/metrics`, the
//!   per-pod average the Prometheus adapter serves to the HPA.
//!
//! Only the magnitudes differ from what ships ([`Targets::SHIPPED`] vs
//! [`Targets::REHEARSAL`]); docs/CLUSTER.md "Autoscaling, rehearsed" has the table.

use std::time::{Duration, Instant};

/// The targets of the two HPAs, as the manifests spell them.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    /// Workers: CPU request of a pod, in cores (`resources.requests.cpu`).
    pub worker_cpu_request: f64,
    /// Workers: target average utilization, as a fraction of the request
    /// (`averageUtilization: 60` → 0.60).
    pub worker_cpu_utilization: f64,
    /// Edges: target average `herdgate_connections_open` per pod (`averageValue`).
    pub edge_connections: f64,
}

impl Targets {
    /// What `deploy/k8s/base/{worker,edge}/hpa.yaml` ship (a test checks
    /// they agree): workers at 60 % of their 1-CPU request; edges at 35,000
    /// open connections per pod (0.70 × `max_connections` 50,000). The
    /// edges' second metric, CPU at 70 %, is not played: an HPA with two
    /// metrics follows whichever proposes more pods, and the rehearsal
    /// scales edges on connections alone.
    pub const SHIPPED: Targets = Targets {
        worker_cpu_request: 1.0,
        worker_cpu_utilization: 0.60,
        edge_connections: 35_000.0,
    };

    /// The same targets scaled for a test on 2 shared cores: the same 60 %,
    /// of a 0.2-core request (0.12 core: a debug-build worker passes it at
    /// several hundred publishes a second and runs at about a third of it
    /// under the test's baseline stream); 40 connections per edge (1/875
    /// of the shipped 35,000).
    pub const REHEARSAL: Targets = Targets {
        worker_cpu_request: 0.2,
        worker_cpu_utilization: 0.60,
        edge_connections: 40.0,
    };

    /// The worker HPA on these targets.
    pub fn workers(&self, min: usize, max: usize, scale_down_window: Duration) -> Hpa {
        Hpa::new(self.worker_cpu_utilization, min, max, scale_down_window)
    }

    /// The edge HPA on these targets.
    pub fn edges(&self, min: usize, max: usize, scale_down_window: Duration) -> Hpa {
        Hpa::new(self.edge_connections, min, max, scale_down_window)
    }
}

/// The HPA's tolerance: no change while the ratio is within 10 % of 1
/// (kube-controller-manager's `--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;

/// One HorizontalPodAutoscaler on one metric.
#[derive(Debug, Clone)]
pub struct Hpa {
    /// Target average per pod, in the metric's unit (a utilization
    /// fraction, or connections).
    pub target: f64,
    pub tolerance: f64,
    pub min: usize,
    pub max: usize,
    /// `behavior.scaleDown.stabilizationWindowSeconds`.
    pub scale_down_window: Duration,
    /// Recent raw recommendations, for the scale-down window.
    history: Vec<(Instant, usize)>,
}

/// One decision, with what it was made from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Average of the per-pod metric.
    pub average: f64,
    /// `average / target`.
    pub ratio: f64,
    /// The formula's answer (clamped to `[min, max]`), before stabilization.
    pub recommended: usize,
    /// What the controller scales to.
    pub desired: usize,
}

impl Hpa {
    pub fn new(target: f64, min: usize, max: usize, scale_down_window: Duration) -> Hpa {
        assert!(target > 0.0 && min >= 1 && min <= max);
        Hpa {
            target,
            tolerance: TOLERANCE,
            min,
            max,
            scale_down_window,
            history: Vec::new(),
        }
    }

    /// The formula alone: `ceil(current × average / target)`, or `current`
    /// within the tolerance; clamped to `[min, max]`.
    pub fn recommend(&self, current: usize, per_pod: &[f64]) -> (f64, f64, usize) {
        if per_pod.is_empty() {
            return (0.0, 1.0, current.clamp(self.min, self.max));
        }
        let average = per_pod.iter().sum::<f64>() / per_pod.len() as f64;
        let ratio = average / self.target;
        let raw = if (ratio - 1.0).abs() <= self.tolerance {
            current
        } else {
            // Pods with a sample are the ones counted (a pod still starting
            // has none), as the controller counts ready pods with metrics.
            (per_pod.len() as f64 * ratio).ceil() as usize
        };
        (average, ratio, raw.clamp(self.min, self.max))
    }

    /// One controller sync at `now`: the formula, then the scale-down
    /// stabilization (the highest recommendation within the window).
    pub fn decide(&mut self, now: Instant, current: usize, per_pod: &[f64]) -> Decision {
        let (average, ratio, recommended) = self.recommend(current, per_pod);
        self.history.push((now, recommended));
        let window = self.scale_down_window;
        self.history
            .retain(|(at, _)| now.saturating_duration_since(*at) <= window);
        let desired = if recommended >= current {
            recommended
        } else {
            // `recommended` is in the window itself, so this is at least it.
            let highest = self.history.iter().map(|(_, r)| *r).max();
            highest.unwrap_or(recommended).min(current)
        };
        Decision {
            average,
            ratio,
            recommended,
            desired,
        }
    }
}

/// A process's CPU time so far (`utime + stime`), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((utime + stime) as f64 / crate::sys::clock_ticks_per_sec())
}

/// A pod's CPU utilization, as the resource metrics pipeline gives it: CPU
/// time used over a trailing window (metrics-server's is 15 s or so), divided
/// by the request. `/proc` counts CPU time in 10 ms ticks, so the window
/// sets the resolution: over 1 s, ±0.01 core.
#[derive(Debug)]
pub struct CpuMeter {
    pub pid: u32,
    /// The pod's CPU request, in cores.
    pub request: f64,
    pub window: Duration,
    /// (when, CPU seconds) of the samples within the window, and the last before it.
    samples: std::collections::VecDeque<(Instant, f64)>,
}

impl CpuMeter {
    pub fn new(pid: u32, request: f64, window: Duration) -> CpuMeter {
        let mut m = CpuMeter {
            pid,
            request,
            window,
            samples: Default::default(),
        };
        m.sample();
        m
    }

    /// Utilization over the window up to now: `None` on the first sample
    /// or when the process is gone.
    pub fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        let cpu = cpu_seconds(self.pid)?;
        self.samples.push_back((now, cpu));
        // Keep the newest sample at least a window old, and those after it.
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
        let (then, before) = *self.samples.front()?;
        let wall = now.duration_since(then).as_secs_f64();
        (wall > 0.0).then(|| (cpu - before) / wall / self.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa() -> Hpa {
        Hpa::new(0.6, 1, 3, Duration::from_secs(3))
    }

    #[test]
    fn the_formula_is_the_controllers() {
        let h = hpa();
        // Within 10 % of the target: no change.
        assert_eq!(h.recommend(1, &[0.65]).2, 1);
        assert_eq!(h.recommend(2, &[0.56, 0.60]).2, 2);
        // Above: ceil(1 × 0.9 / 0.6) = 2; ceil(2 × 1.0 / 0.6) = 4 → max 3.
        assert_eq!(h.recommend(1, &[0.9]).2, 2);
        assert_eq!(h.recommend(2, &[1.0, 1.0]).2, 3);
        // Below: ceil(2 × 0.1 / 0.6) = 1.
        assert_eq!(h.recommend(2, &[0.1, 0.1]).2, 1);
        // The connection target, per pod: 90 on one edge of 40 → 3.
        let e = Targets::REHEARSAL.edges(1, 4, Duration::ZERO);
        assert_eq!(e.recommend(1, &[90.0]).2, 3);
        assert_eq!(e.recommend(1, &[43.0]).2, 1);
    }

    #[test]
    fn scale_down_waits_for_the_window_scale_up_does_not() {
        let mut h = hpa();
        let t = Instant::now();
        assert_eq!(h.decide(t, 1, &[0.9]).desired, 2);
        // Load falls: the recommendation drops at once, the decision only
        // once the last higher recommendation left the window.
        let d = h.decide(t + Duration::from_secs(1), 2, &[0.1, 0.1]);
        assert_eq!((d.recommended, d.desired), (1, 2));
        let d = h.decide(t + Duration::from_secs(3), 2, &[0.1, 0.1]);
        assert_eq!(d.desired, 2, "t+0 is still within the 3 s window");
        let d = h.decide(t + Duration::from_millis(3100), 2, &[0.1, 0.1]);
        assert_eq!(d.desired, 1);
    }

    /// The values of `key:` lines in a manifest, unquoted.
    fn values(file: &str, key: &str) -> Vec<String> {
        let text = std::fs::read_to_string(crate::process::repo_path(file)).unwrap();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
            .map(|v| v.trim().trim_matches('"').to_string())
            .collect()
    }

    #[test]
    fn the_shipped_targets_are_the_manifests() {
        let s = Targets::SHIPPED;
        let worker_hpa = values("deploy/k8s/base/worker/hpa.yaml", "averageUtilization");
        assert_eq!(
            worker_hpa,
            [format!("{}", s.worker_cpu_utilization * 100.0)]
        );
        // requests, then limits: the request is the first `cpu`.
        let cpu = values("deploy/k8s/base/worker/statefulset.yaml", "cpu");
        assert_eq!(cpu.first(), Some(&format!("{}", s.worker_cpu_request)));
        let edge_hpa = values("deploy/k8s/base/edge/hpa.yaml", "averageValue");
        assert_eq!(edge_hpa, [format!("{}", s.edge_connections)]);
    }

    #[test]
    fn cpu_of_this_process_is_measured_over_the_window() {
        let window = Duration::from_millis(200);
        let mut m = CpuMeter::new(std::process::id(), 1.0, window);
        let busy = |d: Duration| {
            let until = Instant::now() + d;
            let mut x = 0u64;
            while Instant::now() < until {
                x = x.wrapping_mul(31).wrapping_add(1);
            }
            std::hint::black_box(x);
        };
        busy(Duration::from_millis(300));
        let u = m.sample().expect("a sample");
        // At most about one core (one thread; other tests run beside it),
        // and clearly more than nothing even on a busy machine.
        assert!(u > 0.02 && u < 1.5, "a busy loop's share of a core: {u}");
        // A window later, idle: the busy part is out of the window.
        std::thread::sleep(Duration::from_millis(300));
        let idle = m.sample().expect("a sample");
        assert!(idle < u, "idle {idle} after busy {u}");
        // Against half the request, the same CPU is twice the utilization.
        m.request = 0.5;
        busy(Duration::from_millis(300));
        let half = m.sample().expect("a sample");
        assert!(half > 0.04, "{half}");
    }
}
