//! Bounded budgets. A token bucket: `rate` tokens per second, holding at most `burst` (per socket
//! for client events; per app, behind a mutex, for the app quotas).

use tokio::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    rate: f32,
    burst: f32,
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate as f32,
            burst: burst as f32,
            tokens: burst as f32,
            last: now,
        }
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(now, 1)
    }

    /// Take `n` tokens at once, or none.
    pub fn try_take_n(&mut self, now: Instant, n: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n as f32 {
            self.tokens -= n as f32;
            true
        } else {
            false
        }
    }
}

/// Bytes held in unfinished fragmented messages, node-wide, and the most
/// there may be (`limits.max_fragmented_bytes`). Each socket's unfinished
/// message is bounded by `max_message_bytes` already; this bounds them all
/// together, so many sockets each pinning a message's worth cannot add up
/// to the node's memory. Honest clients rarely fragment at all.
#[derive(Debug, Default)]
pub struct FragmentBudget {
    held: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl FragmentBudget {
    pub fn new(max: usize) -> FragmentBudget {
        FragmentBudget {
            held: Default::default(),
            max: std::sync::atomic::AtomicUsize::new(max),
        }
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hold `n` more bytes, or say how many that would make and the most
    /// there may be.
    pub fn try_hold(&self, n: usize) -> Result<(), (usize, usize)> {
        use std::sync::atomic::Ordering;
        let max = self.max.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h.saturating_add(n) <= max).then_some(h + n)
            })
            .map(|_| ())
            .map_err(|h| {
                metrics::counter!("herdgate_fragment_budget_refusals_total").increment(1);
                (h.saturating_add(n), max)
            })
    }

    pub fn release(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn allows_burst_then_refills_at_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10, 10, start);
        assert!((0..10).all(|_| b.try_take(start)));
        assert!(!b.try_take(start));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take(Instant::now()));
        assert!(!b.try_take(Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert_eq!(
            (0..20).filter(|_| b.try_take(now)).count(),
            10,
            "never more than the burst"
        );
    }
}
