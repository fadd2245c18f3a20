//! Admission: who may hold a connection of this node, decided here and
//! nowhere else, before any work is spent on the connection.
//!
//! In the order a connection meets them ([`Gate`]):
//! 1. an accept permit (`limits.max_handshakes`) — the accept loop waits
//!    for one, and `/readyz` says so ([`AcceptPermits`]);
//! 2. a place among its IP's connections not yet upgraded
//!    (`limits.max_handshakes_per_ip`; trusted proxies exempt) — else dropped;
//! 3. at the upgrade (websocket or HTTP fallback), cheapest first: the
//!    app's allowed origins (403); the node draining or its load state
//!    refusing new connections; the node-wide new-connection rate (token
//!    bucket with burst); the per-IP cap; the node-wide cap (503 + Retry-After);
//! 4. the app's `max_connections` on this node (Pusher error 4004).
//!
//! Each check that counts takes its place atomically, and the returned
//! place ([`SessionSlot`], [`IpPlace`], [`crate::apps::ConnectionSlot`])
//! gives it back exactly once, when the connection ends.

use crate::apps::{App, ConnectionSlot, Quotas};
use crate::live::Live;
use crate::overload::Overload;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Every admission place of a client-facing node.
pub struct Gate {
    /// Open sessions (websocket and HTTP fallback), node-wide and per IP.
    pub sessions: Arc<Admission>,
    /// Connections not yet upgraded, per client IP (`limits.max_handshakes_per_ip`).
    pub handshakes: Arc<PerIp>,
    /// The public listener's accept permits (`limits.max_handshakes`).
    pub accept: AcceptPermits,
}

impl Gate {
    pub fn new(max_connections: usize, max_handshakes: usize) -> Gate {
        Gate {
            sessions: Admission::new(max_connections),
            handshakes: Arc::default(),
            accept: AcceptPermits::new(max_handshakes),
        }
    }

    /// A place among the connections `peer` has not yet upgraded, or
    /// `None` (the connection is dropped) when it holds
    /// `limits.max_handshakes_per_ip`. `Some(None)`: not counted (no cap,
    /// or a trusted proxy, whose clients are told apart by `X-Forwarded-For`).
    pub fn handshake(&self, live: &Live, peer: IpAddr) -> Option<Option<IpPlace>> {
        let max = live.config.limits.max_handshakes_per_ip;
        if max == 0 || live.is_trusted_proxy(peer) {
            return Some(None);
        }
        match self.handshakes.try_take(peer, max) {
            Some(place) => Some(Some(place)),
            None => {
                tracing::debug!(%peer, "too many connections not yet upgraded from this address");
                metrics::counter!("herdgate_connections_refused_total", "reason" => "handshakes_per_ip")
                    .increment(1);
                None
            }
        }
    }

    /// A session's place for client `ip` (the real client, after
    /// `X-Forwarded-For` from a trusted proxy) connecting to the app of
    /// `key` from `origin`, or why not. Counted in `overload.admitted`.
    pub fn admit(
        &self,
        live: &Live,
        overload: &Overload,
        closing: bool,
        ip: IpAddr,
        app: Option<(&str, Option<&str>)>,
    ) -> Result<SessionSlot, Refusal> {
        if let Some((key, origin)) = app {
            if let Some(app) = live.apps.by_key(key) {
                if !app.origin_allowed(origin) {
                    tracing::debug!(%ip, ?origin, "origin not allowed");
                    return Err(Refusal::Origin);
                }
            }
        }
        let state = overload.admission_state();
        let admitted = if closing {
            Err(Refusal::Draining)
        } else if live
            .config
            .overload
            .actions
            .refuse_connections
            .applies(state)
        {
            Err(Refusal::Overloaded)
        } else {
            let l = &live.config.limits;
            let limits = Limits {
                max_per_ip: l.max_connections_per_ip,
                rate: l.new_connections_per_second,
                burst: l.new_connections_burst,
            };
            self.sessions.try_admit(ip, limits)
        };
        match admitted {
            Ok(slot) => {
                overload.admitted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("herdgate_connections_accepted_total").increment(1);
                Ok(slot)
            }
            Err(r) => {
                metrics::counter!("herdgate_connections_refused_total", "reason" => r.label())
                    .increment(1);
                Err(r)
            }
        }
    }
}

/// The app of `key` and a place within its `max_connections` on this
/// node, or why not: no app has that key (a reload may have removed it
/// since the check), or the app is over its quota.
pub fn app_place(
    live: &Live,
    quotas: &Quotas,
    key: &str,
) -> Result<(Arc<App>, ConnectionSlot), AppRefusal> {
    let app = live.apps.by_key(key).cloned().ok_or(AppRefusal::Unknown)?;
    let Some(slot) = quotas.of(&app.id).connect(app.features.max_connections) else {
        metrics::counter!("herdgate_connections_refused_total", "reason" => "app_quota")
            .increment(1);
        return Err(AppRefusal::OverQuota);
    };
    Ok((app, slot))
}

/// Why [`app_place`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppRefusal {
    Unknown,
    OverQuota,
}

/// The public listener's accept permits: one per connection not yet a
/// session (`limits.max_handshakes`). When every one is held the accept
/// loop waits — and the node is *saturated*: `/readyz` answers 503 so the
/// load balancer stops sending users to a node that cannot accept them,
/// and the status page says so.
pub struct AcceptPermits {
    permits: Arc<tokio::sync::Semaphore>,
    max: usize,
    /// The last acquisition found every permit held (cleared by one that
    /// found a permit free at once).
    saturated: std::sync::atomic::AtomicBool,
    /// When a permit was last found free at once (milliseconds since
    /// `epoch`): under a sustained flood every acquisition waits, however
    /// briefly, so saturation lasts from here.
    free_ms: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

impl AcceptPermits {
    pub fn new(max: usize) -> AcceptPermits {
        AcceptPermits {
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            saturated: Default::default(),
            free_ms: Default::default(),
            epoch: Instant::now(),
        }
    }

    /// The next permit; marks the node saturated while it has to wait.
    pub async fn acquire(&self) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            self.free_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
            self.saturated.store(false, Ordering::Release);
            return p;
        }
        self.saturated.store(true, Ordering::Release);
        metrics::counter!("herdgate_accept_saturated_total").increment(1);
        // Client-caused (a flood holds the permits): debug, counted above.
        tracing::debug!(
            max_handshakes = self.max,
            "every accept permit is held: not accepting until one is free"
        );
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed")
    }

    pub fn saturated(&self) -> bool {
        self.saturated.load(Ordering::Acquire)
    }

    /// How long every acquisition has had to wait for a permit (zero when
    /// the last one found one free).
    pub fn saturated_for(&self) -> std::time::Duration {
        if !self.saturated() {
            return std::time::Duration::ZERO;
        }
        let since = self.free_ms.load(Ordering::Acquire);
        std::time::Duration::from_millis(
            (self.epoch.elapsed().as_millis() as u64).saturating_sub(since),
        )
    }

    pub fn in_use(&self) -> usize {
        self.max - self.permits.available_permits().min(self.max)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Why a session was refused; the label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The app does not allow the page's `Origin` (403).
    Origin,
    Draining,
    Overloaded,
    Rate,
    PerIp,
    MaxConnections,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Draining => "draining",
            Refusal::Overloaded => "overloaded",
            Refusal::Rate => "rate",
            Refusal::PerIp => "per_ip",
            Refusal::MaxConnections => "max_connections",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::Origin => "origin not allowed for this app",
            Refusal::Draining => "server is shutting down",
            Refusal::Overloaded => "server is overloaded and pacing new connections",
            Refusal::Rate => "too many new connections right now",
            Refusal::PerIp => "too many connections from this address",
            Refusal::MaxConnections => "server is at its connection limit",
        }
    }
}

pub struct Admission {
    open: AtomicUsize,
    max: AtomicUsize,
    per_ip: Arc<PerIp>,
    bucket: Mutex<Bucket>,
}

/// Places held per client IP, taken and given back atomically; an IP's
/// entry goes when its count reaches zero, so the map holds only IPs with a
/// place (bounded by the connections it counts). An IPv6 client is counted
/// by its /64 ([`ip_key`]): one host is routinely given a whole /64, so
/// counting single addresses would let it multiply every per-IP cap.
#[derive(Default)]
pub struct PerIp {
    map: Mutex<HashMap<IpAddr, u32>>,
}

/// One place of an IP in a [`PerIp`]; given back on drop.
pub struct IpPlace {
    of: Arc<PerIp>,
    ip: IpAddr,
}

/// What per-IP caps count: an IPv4 address (or an IPv4-mapped IPv6 one) as
/// it is, an IPv6 address by its /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

impl PerIp {
    /// Take a place for `ip` (counted by [`ip_key`]) unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpPlace> {
        let ip = ip_key(ip);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n as usize >= max {
            if *n == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpPlace {
            of: self.clone(),
            ip,
        })
    }

    /// IPs holding at least one place.
    pub fn ips(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut map = self.of.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The limits in force for one decision (from the live config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_per_ip: usize,
    pub rate: u32,
    pub burst: u32,
}

impl Admission {
    pub fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            per_ip: Arc::default(),
            bucket: Mutex::new(Bucket {
                tokens: f64::MAX,
                last: Instant::now(),
            }),
        })
    }

    /// A lower cap never closes open sessions; it only refuses new ones.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Take a place for a session from `ip`, or say why not.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr, l: Limits) -> Result<SessionSlot, Refusal> {
        self.take_token(l)?;
        let ip_place = if l.max_per_ip > 0 {
            Some(
                self.per_ip
                    .try_take(ip, l.max_per_ip)
                    .ok_or(Refusal::PerIp)?,
            )
        } else {
            None
        };
        // From here on the slot owns the per-IP place: dropping it on refusal gives it back.
        let mut slot = SessionSlot {
            admission: self.clone(),
            _ip: ip_place,
            counted: false,
        };
        let max = self.max();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::MaxConnections)?;
        metrics::gauge!("herdgate_connections_open").increment(1.0);
        slot.counted = true;
        Ok(slot)
    }

    fn take_token(&self, l: Limits) -> Result<(), Refusal> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * l.rate as f64;
        b.tokens = (b.tokens + refill).min(l.burst as f64);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Refusal::Rate)
        }
    }
}

/// One admitted session's places; given back on drop, exactly once.
pub struct SessionSlot {
    admission: Arc<Admission>,
    _ip: Option<IpPlace>,
    counted: bool,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if self.counted {
            self.admission.open.fetch_sub(1, Ordering::AcqRel);
            metrics::gauge!("herdgate_connections_open").decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: Limits = Limits {
        max_per_ip: 0,
        rate: 1_000_000,
        burst: 1_000_000,
    };

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let per = Arc::new(PerIp::default());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _p = per.try_take(a, 1).unwrap();
        assert!(per.try_take(b, 1).is_none(), "same /64, same count");
        assert!(per.try_take(other, 1).is_some());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ip_key(mapped), ip(1));
    }

    #[test]
    fn node_cap_and_release_once() {
        let a = Admission::new(2);
        let s1 = a.try_admit(ip(1), ANY).unwrap();
        let s2 = a.try_admit(ip(1), ANY).unwrap();
        assert_eq!(a.try_admit(ip(1), ANY).err(), Some(Refusal::MaxConnections));
        drop(s1);
        assert_eq!(a.open(), 1);
        let s3 = a.try_admit(ip(2), ANY).unwrap();
        drop((s2, s3));
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn per_ip_cap_and_its_place_is_returned_on_refusal() {
        let a = Admission::new(1);
        let l = Limits {
            max_per_ip: 1,
            ..ANY
        };
        let s = a.try_admit(ip(1), l).unwrap();
        assert_eq!(a.try_admit(ip(1), l).err(), Some(Refusal::PerIp));
        // ip(2) passes per-IP but hits the node cap: its per-IP place must not leak.
        assert_eq!(a.try_admit(ip(2), l).err(), Some(Refusal::MaxConnections));
        drop(s);
        assert_eq!(a.per_ip.ips(), 0);
        assert!(a.try_admit(ip(2), l).is_ok());
    }

    #[test]
    fn rate_limit_allows_the_burst() {
        let a = Admission::new(1000);
        let l = Limits {
            max_per_ip: 0,
            rate: 1,
            burst: 5,
        };
        let admitted: Vec<_> = (0..10).filter_map(|i| a.try_admit(ip(i), l).ok()).collect();
        assert_eq!(admitted.len(), 5);
        assert_eq!(a.try_admit(ip(99), l).err(), Some(Refusal::Rate));
    }

    #[test]
    fn concurrent_admission_never_exceeds_the_cap() {
        // Counted from outside: each thread says on a counter of its own
        // (not the one that enforces the cap) when it holds a slot. In each
        // round 8 threads try for 10 slots each (80 for a cap of 50) and hold
        // what they got until all are done, so they meet at the cap.
        const THREADS: usize = 8;
        let a = Admission::new(50);
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let round = Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (a, live, peak, round) = (a.clone(), live.clone(), peak.clone(), round.clone());
                std::thread::spawn(move || {
                    let mut full_rounds = 0;
                    for r in 0..50 {
                        let mut held = Vec::new();
                        for i in 0..10 {
                            if let Ok(s) = a.try_admit(ip((t * 31 + r * 7 + i) as u8), ANY) {
                                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                                held.push(s);
                            }
                        }
                        round.wait();
                        if live.load(Ordering::SeqCst) == 50 {
                            full_rounds += 1;
                        }
                        round.wait();
                        for s in held {
                            live.fetch_sub(1, Ordering::SeqCst);
                            drop(s);
                        }
                        round.wait();
                    }
                    full_rounds
                })
            })
            .collect();
        let full: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 50, "{peak} sessions held at once, cap 50");
        assert!(
            full.iter().all(|f| *f == 50),
            "every round filled the cap exactly: {full:?}"
        );
        assert_eq!(a.open(), 0);
    }
}
