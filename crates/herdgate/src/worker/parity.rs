//! Pusher features a room's owner computes: cache channels, subscription
//! counts, idempotent publishes, watchlists. Each keeps bounded state in
//! the owning worker, so in a cluster it is computed once, across edges.
//!
//! * **Cache** — the last server-triggered event of a cache channel, kept
//!   for the app's `cache_ttl` even with no subscriber; at most
//!   `cache_max_bytes` per app on each worker, the oldest forgotten first.
//!   A room that moves to another worker leaves its cache behind (dropped):
//!   until the next publish, subscribers there get `pusher:cache_miss`.
//! * **Counts** — `pusher_internal:subscription_count` on every change, at
//!   once while the room has at most [`COUNT_AT_ONCE`] subscribers, then at
//!   most once per [`COUNT_EVERY`] (Pusher's rule).
//! * **Idempotency** — publish keys seen per room within
//!   [`IDEM_WINDOW`] (at most [`IDEM_MAX`] per worker, oldest forgotten
//!   first): a publish whose key was seen is not sent again.
//! * **Watchers** — per user, the sockets watching them (their sign-in's
//!   `watchlist`), told `online` / `offline` on every transition of that
//!   user's signed-in sockets.

use crate::protocol::Frame;
use crate::types::RoomKey;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Counts go out at once up to this many subscribers...
pub const COUNT_AT_ONCE: usize = 100;
/// ...and at most this often above it.
pub const COUNT_EVERY: Duration = Duration::from_secs(5);
/// How long a publish's idempotency key is remembered.
pub const IDEM_WINDOW: Duration = Duration::from_secs(300);
/// Keys remembered per worker at most.
pub const IDEM_MAX: usize = 100_000;
/// `cache_miss` webhooks per channel at most this often.
pub const CACHE_MISS_EVERY: Duration = Duration::from_secs(10);

struct Cached {
    frame: Frame,
    expires: Instant,
    /// Matches the entry in `order` that belongs to this value.
    seq: u64,
}

/// Cached events, bounded in bytes per app (FIFO eviction).
#[derive(Default)]
pub struct Cache {
    entries: HashMap<RoomKey, Cached>,
    order: VecDeque<(RoomKey, u64)>,
    bytes: HashMap<Arc<str>, usize>,
    seq: u64,
    /// When a `cache_miss` webhook last went out per channel (bounded by
    /// the entries swept with it).
    misses: HashMap<RoomKey, Instant>,
}

impl Cache {
    /// Keep `frame` as `room`'s last event for `ttl`, within `max_bytes`
    /// for its app.
    pub fn put(&mut self, room: &RoomKey, frame: Frame, ttl: Duration, max_bytes: usize) {
        self.remove(room);
        let len = frame.len();
        if len > max_bytes {
            return;
        }
        // Forget the oldest of the app's entries until this one fits.
        while self.bytes.get(&room.app).copied().unwrap_or(0) + len > max_bytes {
            let Some(i) = self.order.iter().position(|(k, _)| k.app == room.app) else {
                break;
            };
            let (k, seq) = self.order.remove(i).expect("found");
            if self.entries.get(&k).is_some_and(|c| c.seq == seq) {
                self.remove(&k);
            }
        }
        self.seq += 1;
        *self.bytes.entry(room.app.clone()).or_default() += len;
        self.order.push_back((room.clone(), self.seq));
        self.entries.insert(
            room.clone(),
            Cached {
                frame,
                expires: Instant::now() + ttl,
                seq: self.seq,
            },
        );
        metrics::gauge!("herdgate_cache_bytes").increment(len as f64);
    }

    fn remove(&mut self, room: &RoomKey) {
        if let Some(c) = self.entries.remove(room) {
            let len = c.frame.len();
            if let Some(b) = self.bytes.get_mut(&room.app) {
                *b -= len;
            }
            metrics::gauge!("herdgate_cache_bytes").decrement(len as f64);
            // Its `order` entry stays until popped: it no longer matches.
            if self.order.len() > 2 * self.entries.len() + 64 {
                let entries = &self.entries;
                self.order
                    .retain(|(k, seq)| entries.get(k).is_some_and(|c| c.seq == *seq));
            }
        }
    }

    /// The cached frame, unless expired; with its remaining time.
    pub fn get(&mut self, room: &RoomKey) -> Option<(Frame, Duration)> {
        let now = Instant::now();
        match self.entries.get(room) {
            Some(c) if c.expires > now => Some((c.frame.clone(), c.expires - now)),
            Some(_) => {
                self.remove(room);
                None
            }
            None => None,
        }
    }

    /// Forget every cached room `keep` refuses (they moved away).
    pub fn retain(&mut self, keep: &dyn Fn(&RoomKey) -> bool) {
        let gone: Vec<RoomKey> = self.entries.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            self.remove(&k);
        }
        self.misses.retain(|k, _| keep(k));
    }

    /// Whether a `cache_miss` webhook may go out for `room` now.
    pub fn miss_webhook_due(&mut self, room: &RoomKey) -> bool {
        let now = Instant::now();
        if self.misses.len() > 10_000 {
            self.misses
                .retain(|_, at| now.duration_since(*at) < CACHE_MISS_EVERY);
        }
        match self.misses.get(room) {
            Some(at) if now.duration_since(*at) < CACHE_MISS_EVERY => false,
            _ => {
                self.misses.insert(room.clone(), now);
                true
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Idempotency keys seen per room.
#[derive(Default)]
pub struct Idem {
    seen: HashMap<(RoomKey, u64), Instant>,
    order: VecDeque<((RoomKey, u64), Instant)>,
}

impl Idem {
    /// Whether this is the first publish with `key` to `room` within the
    /// window (and remember it).
    pub fn first(&mut self, room: &RoomKey, key: u64) -> bool {
        let now = Instant::now();
        while let Some((k, at)) = self.order.front() {
            if now.duration_since(*at) < IDEM_WINDOW && self.order.len() < IDEM_MAX {
                break;
            }
            if self.seen.get(k) == Some(at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        let k = (room.clone(), key);
        if self.seen.contains_key(&k) {
            return false;
        }
        self.seen.insert(k.clone(), now);
        self.order.push_back((k, now));
        true
    }
}

/// Subscription-count broadcasts waiting for their interval (rooms above
/// [`COUNT_AT_ONCE`]); one entry per room.
#[derive(Default)]
pub struct Counts {
    /// When the room may broadcast again, and whether a change waits.
    rooms: HashMap<RoomKey, (Instant, bool)>,
}

impl Counts {
    /// A count changed: whether to broadcast now (else it goes out when due).
    pub fn changed(&mut self, room: &RoomKey, subscribers: usize) -> bool {
        let now = Instant::now();
        match self.rooms.get_mut(room) {
            Some((next, waiting)) if *next > now => {
                *waiting = true;
                false
            }
            _ => {
                if subscribers > COUNT_AT_ONCE {
                    self.rooms.insert(room.clone(), (now + COUNT_EVERY, false));
                } else {
                    self.rooms.remove(room);
                }
                true
            }
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.rooms
            .values()
            .filter(|(_, waiting)| *waiting)
            .map(|(at, _)| *at)
            .min()
    }

    /// Rooms whose waiting change is due now.
    pub fn due(&mut self, now: Instant) -> Vec<RoomKey> {
        let due: Vec<RoomKey> = self
            .rooms
            .iter()
            .filter(|(_, (at, waiting))| *waiting && *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        // Rooms whose interval passed with no change wait no more; the ones
        // sent now start a new interval.
        self.rooms.retain(|_, (at, waiting)| *waiting || *at > now);
        for k in &due {
            self.rooms.insert(k.clone(), (now + COUNT_EVERY, false));
        }
        due
    }

    pub fn forget(&mut self, room: &RoomKey) {
        self.rooms.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(app: &str, c: &str) -> RoomKey {
        RoomKey {
            app: Arc::from(app),
            channel: Arc::from(c),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_expires_and_is_bounded_per_app() {
        let mut c = Cache::default();
        let f = |s: &str| Frame::from(s.to_string());
        c.put(
            &room("1", "cache-a"),
            f("aaaa"),
            Duration::from_secs(10),
            10,
        );
        c.put(
            &room("1", "cache-b"),
            f("bbbb"),
            Duration::from_secs(10),
            10,
        );
        c.put(
            &room("2", "cache-a"),
            f("xxxxxxxx"),
            Duration::from_secs(10),
            10,
        );
        assert_eq!(c.len(), 3, "apps are bounded apart");
        c.put(
            &room("1", "cache-c"),
            f("cccc"),
            Duration::from_secs(10),
            10,
        );
        assert!(c.get(&room("1", "cache-a")).is_none(), "the oldest went");
        assert!(c.get(&room("1", "cache-b")).is_some());
        c.put(&room("1", "cache-b"), f("BB"), Duration::from_secs(1), 10);
        assert_eq!(
            c.get(&room("1", "cache-b")).unwrap().0.as_str(),
            "BB",
            "latest wins"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(c.get(&room("1", "cache-b")).is_none(), "expired");
        assert!(c.get(&room("1", "cache-c")).is_some());
        c.put(
            &room("1", "cache-z"),
            f("too large for 10"),
            Duration::from_secs(1),
            10,
        );
        assert!(c.get(&room("1", "cache-z")).is_none());
        c.retain(&|k: &RoomKey| &*k.app != "2");
        assert!(
            c.get(&room("2", "cache-a")).is_none(),
            "moved away: dropped"
        );
        assert!(c.miss_webhook_due(&room("1", "cache-q")));
        assert!(!c.miss_webhook_due(&room("1", "cache-q")), "de-duplicated");
        tokio::time::advance(CACHE_MISS_EVERY).await;
        assert!(c.miss_webhook_due(&room("1", "cache-q")));
    }

    #[tokio::test(start_paused = true)]
    async fn idempotency_keys_are_per_room_and_expire() {
        let mut i = Idem::default();
        assert!(i.first(&room("1", "a"), 7));
        assert!(!i.first(&room("1", "a"), 7), "seen");
        assert!(i.first(&room("1", "b"), 7), "another room");
        tokio::time::advance(IDEM_WINDOW).await;
        assert!(i.first(&room("1", "a"), 7), "forgotten after the window");
    }

    #[tokio::test(start_paused = true)]
    async fn counts_go_at_once_for_small_rooms_and_every_5_s_above_100() {
        let mut c = Counts::default();
        let r = room("1", "big");
        assert!(c.changed(&r, 50));
        assert!(c.changed(&r, 51), "small: at once, every time");
        assert!(c.changed(&r, 150), "the first change of a big room goes");
        assert!(!c.changed(&r, 151), "then it waits");
        assert!(!c.changed(&r, 152));
        assert_eq!(c.next_due(), Some(Instant::now() + COUNT_EVERY));
        tokio::time::advance(COUNT_EVERY).await;
        assert_eq!(c.due(Instant::now()), vec![r.clone()]);
        assert_eq!(c.next_due(), None);
        assert!(
            !c.changed(&r, 153),
            "a new interval started with that broadcast"
        );
        tokio::time::advance(COUNT_EVERY).await;
        assert_eq!(c.due(Instant::now()), vec![r.clone()]);
        tokio::time::advance(COUNT_EVERY).await;
        assert!(c.due(Instant::now()).is_empty());
        assert!(
            c.changed(&r, 154),
            "an interval without changes: at once again"
        );
    }
}
