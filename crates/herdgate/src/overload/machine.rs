//! The load state machine: signals in, one state out, with hysteresis.
//!
//! A state is entered as soon as any signal reaches its threshold (shed load
//! early), and left one step at a time, only after every signal has stayed
//! below its *exit* level — the threshold lowered by the hysteresis margin —
//! for a whole cooldown. A signal hovering around a threshold therefore
//! cannot make the node flap between states.

use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

pub use crate::config::LoadState;

/// The state whose threshold count is `level` (0..=3).
fn state_at_level(level: usize) -> LoadState {
    LoadState::from_u8(level.min(3) as u8)
}

/// One measured signal and its thresholds for pressured, degraded, critical.
#[derive(Debug, Clone, Serialize)]
pub struct Signal {
    pub name: &'static str,
    pub value: f64,
    pub thresholds: [f64; 3],
}

impl Signal {
    /// How many thresholds (scaled by `scale`) the value reaches: 0..=3.
    fn level(&self, scale: f64) -> usize {
        self.thresholds
            .iter()
            .filter(|t| self.value >= **t * scale)
            .count()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Exit level = threshold × (1 − hysteresis).
    pub hysteresis: f64,
    /// How long signals must stay below exit levels before stepping down.
    pub cooldown: Duration,
    /// After a cooldown: one state down (features come back one by one), or
    /// straight to the state the signals are calm for (admission).
    pub step_down: StepDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDown {
    OneState,
    ToCalm,
}

#[derive(Debug)]
pub struct Machine {
    state: LoadState,
    calm_since: Option<Instant>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            state: LoadState::Normal,
            calm_since: None,
        }
    }
}

impl Machine {
    pub fn state(&self) -> LoadState {
        self.state
    }

    /// Feed one sample; returns the new state if it changed.
    pub fn step(&mut self, signals: &[Signal], now: Instant, t: Tuning) -> Option<LoadState> {
        let up = state_at_level(signals.iter().map(|s| s.level(1.0)).max().unwrap_or(0));
        let down = state_at_level(
            signals
                .iter()
                .map(|s| s.level(1.0 - t.hysteresis))
                .max()
                .unwrap_or(0),
        );
        if up > self.state {
            self.state = up;
            self.calm_since = None;
            return Some(up);
        }
        if down >= self.state {
            self.calm_since = None;
            return None;
        }
        match self.calm_since {
            None => {
                self.calm_since = Some(now);
                None
            }
            Some(since) if now.duration_since(since) >= t.cooldown => {
                self.state = match t.step_down {
                    StepDown::OneState => LoadState::from_u8(self.state as u8 - 1),
                    StepDown::ToCalm => down,
                };
                // The next step down needs a full cooldown of its own.
                self.calm_since = (down < self.state).then_some(now);
                Some(self.state)
            }
            Some(_) => None,
        }
    }
}

/// Human-readable reasons: every signal at or above its pressured threshold.
pub fn reasons(signals: &[Signal]) -> Vec<String> {
    signals
        .iter()
        .filter(|s| s.level(1.0) > 0)
        .map(|s| {
            let level = state_at_level(s.level(1.0));
            let t = s.thresholds[s.level(1.0) - 1];
            format!("{} {:.3} >= {:.3} ({})", s.name, s.value, t, level.as_str())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tuning = Tuning {
        hysteresis: 0.1,
        cooldown: Duration::from_secs(10),
        step_down: StepDown::OneState,
    };

    fn sig(v: f64) -> Vec<Signal> {
        vec![
            Signal {
                name: "connections",
                value: v,
                thresholds: [0.7, 0.85, 0.95],
            },
            Signal {
                name: "lag_ms",
                value: 0.0,
                thresholds: [20.0, 100.0, 500.0],
            },
        ]
    }

    #[test]
    fn enters_immediately_at_the_highest_reached_state() {
        let mut m = Machine::default();
        let t0 = Instant::now();
        assert_eq!(m.step(&sig(0.5), t0, T), None);
        assert_eq!(m.step(&sig(0.72), t0, T), Some(LoadState::Pressured));
        assert_eq!(
            m.step(&sig(0.99), t0, T),
            Some(LoadState::Critical),
            "jumps straight to critical"
        );
    }

    #[test]
    fn leaves_one_step_per_cooldown_and_only_below_the_exit_level() {
        let mut m = Machine::default();
        let t0 = Instant::now();
        m.step(&sig(0.96), t0, T);
        // 0.90 is below critical's 0.95 but above its exit level 0.855: stays critical.
        for i in 0..30 {
            assert_eq!(m.step(&sig(0.90), t0 + Duration::from_secs(i), T), None);
        }
        assert_eq!(m.state(), LoadState::Critical);
        // Calm: below every exit level.
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(m.step(&sig(0.1), t1, T), None, "cooldown starts");
        assert_eq!(m.step(&sig(0.1), t1 + Duration::from_secs(9), T), None);
        assert_eq!(
            m.step(&sig(0.1), t1 + Duration::from_secs(10), T),
            Some(LoadState::Degraded)
        );
        assert_eq!(m.step(&sig(0.1), t1 + Duration::from_secs(15), T), None);
        assert_eq!(
            m.step(&sig(0.1), t1 + Duration::from_secs(20), T),
            Some(LoadState::Pressured)
        );
        assert_eq!(
            m.step(&sig(0.1), t1 + Duration::from_secs(30), T),
            Some(LoadState::Normal)
        );
    }

    #[test]
    fn to_calm_leaves_in_one_step_after_one_cooldown() {
        let t = Tuning {
            cooldown: Duration::from_secs(2),
            step_down: StepDown::ToCalm,
            ..T
        };
        let mut m = Machine::default();
        let t0 = Instant::now();
        m.step(&sig(0.99), t0, t);
        assert_eq!(m.state(), LoadState::Critical);
        assert_eq!(m.step(&sig(0.1), t0 + Duration::from_secs(1), t), None);
        assert_eq!(m.step(&sig(0.1), t0 + Duration::from_secs(2), t), None);
        assert_eq!(
            m.step(&sig(0.1), t0 + Duration::from_secs(3), t),
            Some(LoadState::Normal),
            "critical to normal in one step"
        );
        // Calm only down to pressured's exit level: stops there.
        let mut m = Machine::default();
        m.step(&sig(0.99), t0, t);
        m.step(&sig(0.72), t0 + Duration::from_secs(1), t);
        assert_eq!(
            m.step(&sig(0.72), t0 + Duration::from_secs(3), t),
            Some(LoadState::Pressured)
        );
    }

    #[test]
    fn a_spike_during_cooldown_resets_it() {
        let mut m = Machine::default();
        let t0 = Instant::now();
        m.step(&sig(0.86), t0, T);
        assert_eq!(m.state(), LoadState::Degraded);
        m.step(&sig(0.1), t0 + Duration::from_secs(1), T);
        // Back above degraded's exit level (0.765) for one sample.
        m.step(&sig(0.8), t0 + Duration::from_secs(5), T);
        assert_eq!(
            m.step(&sig(0.1), t0 + Duration::from_secs(12), T),
            None,
            "cooldown restarted"
        );
        assert_eq!(
            m.step(&sig(0.1), t0 + Duration::from_secs(22), T),
            Some(LoadState::Pressured)
        );
    }

    #[test]
    fn hovering_at_a_threshold_does_not_flap() {
        let mut m = Machine::default();
        let t0 = Instant::now();
        let mut changes = 0;
        for i in 0..1000 {
            let v = if i % 2 == 0 { 0.701 } else { 0.699 };
            changes += m
                .step(&sig(v), t0 + Duration::from_millis(500 * i), T)
                .is_some() as usize;
        }
        assert_eq!(changes, 1, "entered pressured once and stayed");
    }

    #[test]
    fn reasons_name_the_signals_over_threshold() {
        let r = reasons(&sig(0.9));
        assert_eq!(r.len(), 1);
        assert!(
            r[0].starts_with("connections 0.900 >= 0.850 (degraded)"),
            "{r:?}"
        );
    }
}
