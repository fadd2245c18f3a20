//! The ~3 s wait of `channel_vacated` and `member_removed`, in the room's
//! worker: a channel or a user that is back within the window produces
//! neither the vacated/removed event nor the occupied/added one, so a page
//! reload or a reconnect after a drain does not reach the backend as a
//! spurious pair.
//!
//! Bounded: at most `max` events wait; beyond that they are sent at once
//! (counted as `herdgate_webhook_debounce_overflows_total`).

use crate::types::RoomKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio_util::time::{delay_queue, DelayQueue};

/// What waits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pending {
    Vacated(RoomKey),
    Removed(RoomKey, Arc<str>),
    /// `user_offline`, by the user's `#server-to-user-{id}` room.
    Offline(RoomKey),
}

impl Pending {
    pub fn room(&self) -> &RoomKey {
        match self {
            Pending::Vacated(r) | Pending::Removed(r, _) | Pending::Offline(r) => r,
        }
    }
}

pub struct Debounce {
    delay: Duration,
    max: usize,
    queue: DelayQueue<Pending>,
    index: HashMap<Pending, delay_queue::Key>,
}

impl Debounce {
    pub fn new(delay: Duration, max: usize) -> Debounce {
        Debounce {
            delay,
            max,
            queue: DelayQueue::new(),
            index: HashMap::new(),
        }
    }

    /// Hold `p` for the delay. False when it cannot wait (full, or no
    /// delay configured): send it now.
    pub fn hold(&mut self, p: Pending) -> bool {
        if self.delay.is_zero() {
            return false;
        }
        if self.index.contains_key(&p) {
            return true;
        }
        if self.index.len() >= self.max {
            metrics::counter!("herdgate_webhook_debounce_overflows_total").increment(1);
            return false;
        }
        let key = self.queue.insert(p.clone(), self.delay);
        self.index.insert(p, key);
        true
    }

    /// Drop `p` if it waits; whether it did (then neither event is sent).
    pub fn cancel(&mut self, p: &Pending) -> bool {
        match self.index.remove(p) {
            Some(key) => {
                self.queue.remove(&key);
                true
            }
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// The next event whose wait is over (pending while none waits).
    pub async fn next(&mut self) -> Pending {
        std::future::poll_fn(|cx| match self.queue.poll_expired(cx) {
            Poll::Ready(Some(expired)) => {
                let p = expired.into_inner();
                self.index.remove(&p);
                Poll::Ready(p)
            }
            _ => Poll::Pending,
        })
        .await
    }

    /// Everything waiting for rooms `pred` selects, out of the wait now
    /// (rooms moving to another worker; shutdown).
    pub fn take(&mut self, pred: impl Fn(&RoomKey) -> bool) -> Vec<Pending> {
        let gone: Vec<Pending> = self
            .index
            .keys()
            .filter(|p| pred(p.room()))
            .cloned()
            .collect();
        for p in &gone {
            self.cancel(p);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(c: &str) -> RoomKey {
        RoomKey {
            app: Arc::from("1"),
            channel: Arc::from(c),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_then_fires_and_a_return_cancels() {
        let mut d = Debounce::new(Duration::from_secs(3), 10);
        assert!(d.hold(Pending::Vacated(room("a"))));
        assert!(d.hold(Pending::Removed(room("b"), Arc::from("u"))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            d.cancel(&Pending::Vacated(room("a"))),
            "back within the window"
        );
        assert!(!d.cancel(&Pending::Vacated(room("a"))));
        let t = tokio::time::Instant::now();
        assert_eq!(d.next().await, Pending::Removed(room("b"), Arc::from("u")));
        assert_eq!(t.elapsed(), Duration::from_secs(2), "3 s after it was held");
        assert!(d.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_and_flushable() {
        let mut d = Debounce::new(Duration::from_secs(3), 2);
        assert!(d.hold(Pending::Vacated(room("a"))));
        assert!(d.hold(Pending::Vacated(room("b"))));
        assert!(d.hold(Pending::Vacated(room("a"))), "already waiting");
        assert!(!d.hold(Pending::Vacated(room("c"))), "full: send now");
        let taken = d.take(|r| &*r.channel == "a");
        assert_eq!(taken, vec![Pending::Vacated(room("a"))]);
        assert_eq!(d.len(), 1);
        assert!(!Debounce::new(Duration::ZERO, 2).hold(Pending::Vacated(room("a"))));
    }
}
