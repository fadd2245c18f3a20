//! Channel history on the room's owner: what a reconnecting client missed.
//!
//! Every server event (HTTP API publish) of a channel with history gets a
//! **serial** from its worker: one counter for all the worker's rooms, so a
//! room's serials increase but are not contiguous. The worker's **epoch** is
//! random at its start: a serial means something only with the epoch it was
//! given in, and a restarted worker, or another worker that took a room over
//! (failover, scale-out), answers every older position "not recovered".
//!
//! A room keeps its recent events in a ring, bounded per channel prefix in
//! events and age, and per app in bytes (oldest events of the app forgotten
//! first). Each ring has a **floor**: the newest serial it lost (evicted,
//! expired, shed, or before the ring existed). A client at serial `S`
//! recovers completely if and only if `S ≥ floor`, since every event of the
//! room after the floor is in the ring. An emptied ring is dropped and its
//! floor kept in a bounded list of tombstones; past that list the floor of
//! any forgotten room is the highest floor forgotten (`lost`): wrong only
//! in the safe direction (a resume told `recovered: false` that could have
//! succeeded), never a silent gap.

use crate::op::Since;
use crate::protocol::Frame;
use crate::types::RoomKey;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Floors of dropped rings remembered per worker.
pub const TOMBS_MAX: usize = 10_000;
/// Rings are swept for expired events this often (and at each publish).
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// What a kept event costs beyond its frame, for the byte budget: its ring
/// and eviction slots, the shared frame's header, allocator rounding
/// (measured: docs/BENCHMARKS.md "History and resume").
const EVENT_OVERHEAD: usize = 192;

struct Kept {
    serial: u64,
    at: Instant,
    frame: Frame,
}

struct Ring {
    events: VecDeque<Kept>,
    floor: u64,
    bytes: usize,
}

/// The bounds of one channel's history: events and age.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_events: usize,
    pub ttl: Duration,
    /// The app's bytes per worker.
    pub app_bytes: usize,
}

/// One app's kept bytes and events, and its events `(room, serial)`
/// oldest first (with entries of events already gone, compacted away).
#[derive(Default)]
struct AppKept {
    bytes: usize,
    events: usize,
    order: VecDeque<(RoomKey, u64)>,
}

pub struct Histories {
    epoch: Arc<str>,
    serial: u64,
    rings: HashMap<RoomKey, Ring>,
    /// Per app: bytes kept, and its events in serial order (for eviction).
    apps: HashMap<Arc<str>, AppKept>,
    /// Floors of dropped rings, each with the number of its entry in
    /// `tomb_order` (older entries of the same room are stale).
    tombs: HashMap<RoomKey, (u64, u64)>,
    tomb_order: VecDeque<(RoomKey, u64)>,
    tomb_seq: u64,
    lost: u64,
    next_sweep: Instant,
}

impl Default for Histories {
    fn default() -> Self {
        Histories::new(Arc::from(format!("{:016x}", rand::random::<u64>())))
    }
}

impl Histories {
    pub fn new(epoch: Arc<str>) -> Histories {
        Histories {
            epoch,
            serial: 0,
            rings: HashMap::new(),
            apps: HashMap::new(),
            tombs: HashMap::new(),
            tomb_order: VecDeque::new(),
            tomb_seq: 0,
            lost: 0,
            next_sweep: Instant::now() + SWEEP_EVERY,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// Start a new epoch: every position handed out so far says nothing
    /// any more (what channels keep history changed, so the events of a
    /// channel while it kept none are nowhere).
    pub fn new_epoch(&mut self) {
        self.epoch = Arc::from(format!("{:016x}", rand::random::<u64>()));
    }

    /// The newest serial handed out: the position of a socket subscribing now.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Keep `frame` as `room`'s next event; its serial. `bounds` none: the
    /// channel keeps no history (its events have no serial). `shed`: the
    /// event gets a serial but is not kept, and neither is anything before it.
    pub fn record(
        &mut self,
        room: &RoomKey,
        frame: &Frame,
        bounds: Option<Bounds>,
        shed: bool,
    ) -> Option<u64> {
        let Some(b) = bounds else {
            self.drop_ring(room, None);
            return None;
        };
        self.serial += 1;
        let serial = self.serial;
        let now = Instant::now();
        if shed {
            crate::overload::shed("history");
            self.drop_ring(room, Some(serial));
            return Some(serial);
        }
        let cost = frame.len() + EVENT_OVERHEAD;
        if cost > b.app_bytes {
            self.drop_ring(room, Some(serial));
            return Some(serial);
        }
        if !self.rings.contains_key(room) {
            let floor = self.floor_of_forgotten(room);
            self.rings.insert(
                room.clone(),
                Ring {
                    events: VecDeque::new(),
                    floor,
                    bytes: 0,
                },
            );
        }
        let app = self.apps.entry(room.app.clone()).or_default();
        app.bytes += cost;
        app.events += 1;
        app.order.push_back((room.clone(), serial));
        let ring = self.rings.get_mut(room).expect("just made");
        ring.events.push_back(Kept {
            serial,
            at: now,
            frame: frame.clone(),
        });
        ring.bytes += cost;
        metrics::gauge!("herdgate_history_bytes").increment(cost as f64);
        metrics::gauge!("herdgate_history_events").increment(1.0);
        // This ring's own bounds, then the app's bytes.
        let (mut freed, mut gone) = (0usize, 0usize);
        while ring.events.len() > b.max_events
            || ring.events.front().is_some_and(|e| e.at + b.ttl <= now)
        {
            freed += pop_front(ring);
            gone += 1;
        }
        self.uncount(&room.app, freed, gone);
        self.evict_app(&room.app, b.app_bytes);
        Some(serial)
    }

    /// Forget the oldest events of `app` until it is within `max_bytes`.
    fn evict_app(&mut self, app: &Arc<str>, max_bytes: usize) {
        loop {
            let Some(kept) = self.apps.get_mut(app) else {
                return;
            };
            if kept.bytes <= max_bytes {
                break;
            }
            let Some((room, serial)) = kept.order.pop_front() else {
                break;
            };
            let Some(ring) = self.rings.get_mut(&room) else {
                continue;
            };
            if ring.events.front().is_some_and(|e| e.serial == serial) {
                let freed = pop_front(ring);
                kept.bytes = kept.bytes.saturating_sub(freed);
                kept.events = kept.events.saturating_sub(1);
                metrics::counter!("herdgate_history_evicted_total").increment(1);
                if ring.events.is_empty() {
                    self.drop_ring(&room, None);
                }
            }
        }
        self.compact(app);
    }

    /// Drop `app`'s FIFO entries for events no longer kept, once they are
    /// most of it (each kept event has exactly one live entry), so the FIFO
    /// stays within twice the kept events: amortized O(1) per event.
    fn compact(&mut self, app: &Arc<str>) {
        let Some(kept) = self.apps.get_mut(app) else {
            return;
        };
        if kept.order.len() > 2 * kept.events + 1024 {
            let rings = &self.rings;
            kept.order.retain(|(k, s)| {
                rings
                    .get(k)
                    .is_some_and(|r| r.events.binary_search_by_key(s, |e| e.serial).is_ok())
            });
        }
    }

    fn uncount(&mut self, app: &Arc<str>, bytes: usize, events: usize) {
        if let Some(kept) = self.apps.get_mut(app) {
            kept.bytes = kept.bytes.saturating_sub(bytes);
            kept.events = kept.events.saturating_sub(events);
        }
    }

    /// Drop a room's ring; its floor (or `lost_up_to`, if newer) is
    /// remembered as a tombstone.
    fn drop_ring(&mut self, room: &RoomKey, lost_up_to: Option<u64>) {
        let mut floor = lost_up_to.unwrap_or(0);
        if let Some(mut ring) = self.rings.remove(room) {
            let (mut freed, gone) = (0, ring.events.len());
            while !ring.events.is_empty() {
                freed += pop_front(&mut ring);
            }
            self.uncount(&room.app, freed, gone);
            floor = floor.max(ring.floor);
        } else if lost_up_to.is_none() {
            return; // nothing kept, nothing lost
        }
        self.bury(room, floor);
    }

    fn bury(&mut self, room: &RoomKey, floor: u64) {
        let old = self.tombs.get(room).map_or(0, |t| t.0);
        self.tomb_seq += 1;
        self.tombs
            .insert(room.clone(), (floor.max(old), self.tomb_seq));
        self.tomb_order.push_back((room.clone(), self.tomb_seq));
        while self.tombs.len() > TOMBS_MAX {
            let Some((k, seq)) = self.tomb_order.pop_front() else {
                break;
            };
            if self.tombs.get(&k).is_some_and(|t| t.1 == seq) {
                let (f, _) = self.tombs.remove(&k).expect("present");
                self.lost = self.lost.max(f);
            }
        }
        // Stale entries (re-buried or revived rooms) are dropped once they
        // are most of the list.
        if self.tomb_order.len() > 2 * self.tombs.len() + 1024 {
            let tombs = &self.tombs;
            self.tomb_order
                .retain(|(k, seq)| tombs.get(k).is_some_and(|t| t.1 == *seq));
        }
    }

    /// The floor of a room with no ring: its tombstone, or every forgotten room's.
    fn floor_of_forgotten(&mut self, room: &RoomKey) -> u64 {
        // Its entry in `tomb_order` goes stale and is skipped or compacted.
        self.tombs.remove(room).map_or(self.lost, |t| t.0)
    }

    /// The events of `room` after `since` (at most `limit`, within
    /// `max_bytes` of frames counting `extra` more each), if `epoch` is
    /// this worker's.
    pub fn since(
        &self,
        room: &RoomKey,
        since: u64,
        epoch: Option<&str>,
        limit: usize,
        max_bytes: usize,
        extra: usize,
    ) -> Since {
        let same_epoch = epoch.is_none_or(|e| e == &*self.epoch);
        // A position from another epoch says nothing: everything kept is
        // offered, and the answer is not complete.
        let since_here = if same_epoch { since } else { 0 };
        let floor = match self.rings.get(room) {
            Some(r) => r.floor,
            None => self.tombs.get(room).map_or(self.lost, |t| t.0),
        };
        let mut answer = Since {
            complete: same_epoch && since <= self.serial && since >= floor,
            ..Since::default()
        };
        let mut bytes = 0;
        if let Some(r) = self.rings.get(room) {
            for e in r.events.iter().filter(|e| e.serial > since_here) {
                let len = e.frame.len() + extra;
                if answer.events.len() >= limit || bytes + len > max_bytes {
                    answer.more = true;
                    break;
                }
                bytes += len;
                answer.events.push((e.serial, e.frame.clone()));
            }
        }
        answer
    }

    /// When the next sweep for expired events is due.
    pub fn next_sweep(&self) -> Option<Instant> {
        (!self.rings.is_empty()).then_some(self.next_sweep)
    }

    /// Forget expired events (`ttl_of` gives each room's bounds now).
    pub fn sweep(&mut self, ttl_of: &dyn Fn(&RoomKey) -> Option<Duration>) {
        let now = Instant::now();
        self.next_sweep = now + SWEEP_EVERY;
        let mut emptied = Vec::new();
        let mut freed: HashMap<Arc<str>, (usize, usize)> = HashMap::new();
        for (k, ring) in self.rings.iter_mut() {
            let ttl = ttl_of(k).unwrap_or(Duration::ZERO);
            while ring.events.front().is_some_and(|e| e.at + ttl <= now) {
                let f = freed.entry(k.app.clone()).or_default();
                f.0 += pop_front(ring);
                f.1 += 1;
            }
            if ring.events.is_empty() {
                emptied.push(k.clone());
            }
        }
        for (app, (bytes, events)) in freed {
            self.uncount(&app, bytes, events);
        }
        for k in emptied {
            self.drop_ring(&k, None);
        }
        let apps: Vec<Arc<str>> = self.apps.keys().cloned().collect();
        for app in apps {
            self.compact(&app);
        }
    }

    /// Drop every ring `keep` refuses: those rooms moved to another owner,
    /// which publishes what this worker never sees. Each gets a floor newer
    /// than any position handed out so far (a serial of its own), so a
    /// resume here from before the move, should the room come back, is not
    /// recovered.
    /// `rooms`: the rooms (with subscribers) that moved, ring or not: their
    /// sockets were given positions here. A room this worker knows nothing
    /// of any more may have moved too (its positions were handed out
    /// before): the floor of every forgotten room rises to now as well.
    pub fn retain(&mut self, keep: &dyn Fn(&RoomKey) -> bool, rooms: &[RoomKey]) {
        self.serial += 1;
        let now = self.serial;
        let mut gone: Vec<RoomKey> = self.rings.keys().filter(|k| !keep(k)).cloned().collect();
        gone.extend(
            rooms
                .iter()
                .filter(|k| !self.rings.contains_key(*k))
                .cloned(),
        );
        for k in gone {
            self.drop_ring(&k, Some(now));
        }
        for (k, t) in self.tombs.iter_mut() {
            if !keep(k) {
                t.0 = now;
            }
        }
        self.lost = now;
    }
}

/// Remove a ring's oldest event; the bytes it freed.
fn pop_front(ring: &mut Ring) -> usize {
    let Some(e) = ring.events.pop_front() else {
        return 0;
    };
    let cost = e.frame.len() + EVENT_OVERHEAD;
    ring.floor = ring.floor.max(e.serial);
    ring.bytes -= cost;
    metrics::gauge!("herdgate_history_bytes").decrement(cost as f64);
    metrics::gauge!("herdgate_history_events").decrement(1.0);
    cost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> RoomKey {
        RoomKey {
            app: Arc::from("1"),
            channel: Arc::from(c),
        }
    }

    fn b(max_events: usize) -> Option<Bounds> {
        Some(Bounds {
            max_events,
            ttl: Duration::from_secs(120),
            app_bytes: 1 << 20,
        })
    }

    fn frame(i: u64) -> Frame {
        Frame::from(format!(
            "{{\"event\":\"e\",\"channel\":\"c\",\"data\":\"{i}\"}}"
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_position_within_the_ring_recovers_exactly_what_followed_it() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let at = h.serial();
        let serials: Vec<u64> = (0..10)
            .map(|i| h.record(&room, &frame(i), b(100), false).unwrap())
            .collect();
        let s = h.since(&room, serials[3], Some("E"), 100, usize::MAX, 0);
        assert!(s.complete && !s.more);
        assert_eq!(
            s.events.iter().map(|e| e.0).collect::<Vec<_>>(),
            serials[4..]
        );
        let s = h.since(&room, at, Some("E"), 100, usize::MAX, 0);
        assert!(
            s.complete,
            "a socket that subscribed before the first event"
        );
        assert_eq!(s.events.len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_stale_epochs_and_future_serials_are_not_recovered() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let first = h.record(&room, &frame(0), b(5), false).unwrap();
        for i in 1..10 {
            h.record(&room, &frame(i), b(5), false);
        }
        let s = h.since(&room, first, Some("E"), 100, usize::MAX, 0);
        assert!(!s.complete, "events after the position were evicted");
        assert_eq!(s.events.len(), 5, "what is kept is still offered");
        assert!(
            !h.since(&room, first + 5, Some("OTHER"), 100, usize::MAX, 0)
                .complete
        );
        assert!(
            !h.since(&room, 1 << 40, Some("E"), 100, usize::MAX, 0)
                .complete,
            "forged"
        );
        assert!(
            h.since(&room, first + 4, Some("E"), 100, usize::MAX, 0)
                .complete
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_rings_are_dropped_and_their_floor_remembered() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let s1 = h.record(&room, &frame(0), b(5), false).unwrap();
        let before = s1 - 1;
        tokio::time::advance(Duration::from_secs(121)).await;
        h.sweep(&|_| Some(Duration::from_secs(120)));
        assert!(h.rings.is_empty());
        assert!(
            !h.since(&room, before, Some("E"), 10, usize::MAX, 0)
                .complete,
            "the event expired"
        );
        assert!(
            h.since(&room, s1, Some("E"), 10, usize::MAX, 0).complete,
            "nothing after it"
        );
        let s2 = h.record(&room, &frame(1), b(5), false).unwrap();
        assert!(h.since(&room, s1, Some("E"), 10, usize::MAX, 0).complete);
        assert_eq!(
            h.since(&room, s1, Some("E"), 10, usize::MAX, 0).events[0].0,
            s2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_app_byte_budget_forgets_the_oldest_events_of_the_app_first() {
        let mut h = Histories::new(Arc::from("E"));
        let one = frame(0).len() + EVENT_OVERHEAD;
        let bounds = Some(Bounds {
            max_events: 100,
            ttl: Duration::from_secs(120),
            app_bytes: 3 * one,
        });
        let (a, c) = (key("a"), key("c"));
        let a1 = h.record(&a, &frame(0), bounds, false).unwrap();
        h.record(&c, &frame(0), bounds, false);
        h.record(&c, &frame(0), bounds, false);
        h.record(&c, &frame(0), bounds, false);
        assert!(!h.rings.contains_key(&a), "a's only event was the oldest");
        assert!(!h.since(&a, a1 - 1, Some("E"), 10, usize::MAX, 0).complete);
        assert!(h.since(&a, a1, Some("E"), 10, usize::MAX, 0).complete);
        assert_eq!(h.apps[&Arc::from("1")].bytes, 3 * one);
        assert_eq!(h.apps[&Arc::from("1")].events, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shedding_and_moves_never_leave_a_silent_gap() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let s1 = h.record(&room, &frame(0), b(5), false).unwrap();
        h.record(&room, &frame(1), b(5), true);
        assert!(
            !h.since(&room, s1, Some("E"), 10, usize::MAX, 0).complete,
            "shed"
        );
        let s3 = h.record(&room, &frame(2), b(5), false).unwrap();
        h.retain(&|_| false, &[]);
        assert!(
            !h.since(&room, s3, Some("E"), 10, usize::MAX, 0).complete,
            "moved away"
        );
        let s4 = h.record(&room, &frame(3), b(5), false).unwrap();
        assert!(
            !h.since(&room, s3, Some("E"), 10, usize::MAX, 0).complete,
            "moved back"
        );
        assert!(h.since(&room, s4, Some("E"), 10, usize::MAX, 0).complete);
        // A room with subscribers but no event kept moves, and comes back.
        let quiet = key("quiet");
        let at = h.serial();
        h.retain(&|_| false, std::slice::from_ref(&quiet));
        assert!(!h.since(&quiet, at, Some("E"), 10, usize::MAX, 0).complete);
    }

    #[tokio::test(start_paused = true)]
    async fn a_view_change_leaves_no_old_position_complete_for_a_room_it_may_have_moved() {
        let mut h = Histories::new(Arc::from("E"));
        // A room that only has a tombstone (its event expired) ...
        let tomb = key("tomb");
        let s = h.record(&tomb, &frame(0), b(5), false).unwrap();
        tokio::time::advance(Duration::from_secs(121)).await;
        h.sweep(&|_| Some(Duration::from_secs(120)));
        assert!(h.since(&tomb, s, Some("E"), 10, usize::MAX, 0).complete);
        // ... and one this worker knows nothing of, whose socket got a position.
        let quiet = key("nothing-here");
        let at = h.serial();
        assert!(h.since(&quiet, at, Some("E"), 10, usize::MAX, 0).complete);
        h.retain(&|_| false, &[]);
        assert!(
            !h.since(&tomb, s, Some("E"), 10, usize::MAX, 0).complete,
            "tombstoned"
        );
        assert!(
            !h.since(&quiet, at, Some("E"), 10, usize::MAX, 0).complete,
            "unknown"
        );
        // A position handed out after the change is good again.
        let now = h.serial();
        let s2 = h.record(&quiet, &frame(1), b(5), false).unwrap();
        let page = h.since(&quiet, now, Some("E"), 10, usize::MAX, 0);
        assert!(page.complete);
        assert_eq!(page.events[0].0, s2);
    }

    #[test]
    fn pages_and_replays_stop_at_their_byte_bound_counting_the_serial() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let at = h.serial();
        for i in 0..3 {
            h.record(&room, &frame(i), b(5), false);
        }
        let one = frame(0).len();
        let page = h.since(&room, at, Some("E"), 10, 2 * (one + 30), 30);
        assert_eq!(page.events.len(), 2);
        assert!(page.more && page.complete);
    }

    #[test]
    fn a_new_epoch_makes_every_old_position_incomplete() {
        let mut h = Histories::new(Arc::from("E"));
        let room = key("c");
        let at = h.serial();
        h.record(&room, &frame(0), b(5), false);
        h.new_epoch();
        assert_ne!(&**h.epoch(), "E");
        assert!(!h.since(&room, at, Some("E"), 10, usize::MAX, 0).complete);
        let epoch = h.epoch().to_string();
        assert!(
            h.since(&room, h.serial(), Some(&epoch), 10, usize::MAX, 0)
                .complete
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_tombstones_raise_the_floor_of_every_forgotten_room() {
        let mut h = Histories::new(Arc::from("E"));
        for i in 0..TOMBS_MAX + 1 {
            let k = key(&format!("r{i}"));
            h.record(&k, &frame(0), b(1), true);
        }
        let fresh = key("never");
        assert!(!h.since(&fresh, 0, Some("E"), 10, usize::MAX, 0).complete);
        assert!(
            h.since(&fresh, h.serial(), Some("E"), 10, usize::MAX, 0)
                .complete
        );
        assert!(h.tombs.len() <= TOMBS_MAX);
    }
}
