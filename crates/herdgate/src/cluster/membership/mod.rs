//! Where a node's view of the cluster comes from, and whether a worker may
//! serve.
//!
//! * **static** (`cluster.workers`): edges hold one fixed view, rev 1, the
//!   same list on every edge. No failover: a worker that is down leaves its
//!   rooms unavailable until it returns, so two owners are impossible.
//! * **etcd**: every node registers its key under a lease and applies the
//!   cluster's keys in revision order through a watch (see [`etcd`]).
//!
//! A [`Fence`] says whether a worker's lease is certainly still valid; a
//! worker that cannot be sure serves nothing — unless the whole cluster
//! lost etcd at once (see [`freeze`]): then nobody can change the view, and
//! the cluster keeps serving on the view it had, its membership frozen.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod freeze;
#[cfg(feature = "etcd")]
pub mod ticket_keys;

use super::view::{NodeId, View, WorkerInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A node's membership: its view (updated in revision order), its fence,
/// and, for an etcd worker, the handle that changes its own entry.
pub struct Membership {
    pub view: watch::Receiver<Arc<View>>,
    pub fence: Arc<Fence>,
    /// Set while this node cannot follow the view (its watch is down past
    /// the lease): an edge then serves no room and says it is not ready.
    pub stale: Arc<AtomicBool>,
    /// When this node last heard from etcd (static: always "now").
    pub contact: Arc<Contact>,
    /// etcd: the incarnation (create revision) of this node's key, 0 before
    /// it is registered; a new one means the old one's state is gone.
    pub incarnation: watch::Receiver<i64>,
    pub control: Option<mpsc::Sender<Control>>,
    /// Why the view keeps its value alive (static: the sender).
    _keep: Option<watch::Sender<Arc<View>>>,
}

/// Changes a worker asks of its own entry (etcd).
#[derive(Debug)]
pub enum Control {
    /// Set its ring weight and state ("joining", "active", "draining").
    Set { vnodes: u32, state: &'static str },
    /// Remove its key (revoke its lease) and stop renewing it.
    Leave {
        done: tokio::sync::oneshot::Sender<()>,
    },
}

impl Membership {
    /// An edge's fixed view over the configured worker addresses (named by
    /// address, 64 points each), as every static edge builds it.
    pub fn fixed(workers: &[String], vnodes: u32) -> Membership {
        let workers: BTreeMap<NodeId, WorkerInfo> = workers
            .iter()
            .map(|a| {
                (
                    NodeId::from(a.as_str()),
                    WorkerInfo {
                        addr: a.clone(),
                        vnodes,
                        state: "active".into(),
                        incarnation: 0,
                    },
                )
            })
            .collect();
        let (tx, rx) = watch::channel(Arc::new(View::new(1, workers, BTreeSet::new())));
        let (_, incarnation) = watch::channel(0);
        Membership {
            view: rx,
            fence: Arc::new(Fence::always()),
            stale: Arc::default(),
            contact: Arc::new(Contact::never_lost()),
            incarnation,
            control: None,
            _keep: Some(tx),
        }
    }

    /// A static worker: it knows no view (it serves whatever edges send it).
    pub fn none() -> Membership {
        Membership::fixed(&[], 64)
    }

    pub fn current(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn is_static(&self) -> bool {
        self._keep.is_some()
    }
}

/// When a node last had an answer from etcd, on the boot clock.
pub struct Contact {
    /// Boot-clock nanoseconds of the last answer; `u64::MAX`: static
    /// membership (there is no etcd to lose).
    last_ok: AtomicU64,
    /// How long without an answer counts as having lost etcd.
    lost_after: Duration,
}

impl Contact {
    pub fn new(lost_after: Duration) -> Contact {
        Contact {
            last_ok: AtomicU64::new(0),
            lost_after,
        }
    }

    pub fn never_lost() -> Contact {
        Contact {
            last_ok: AtomicU64::new(u64::MAX),
            lost_after: Duration::MAX,
        }
    }

    /// etcd answered (a keepalive, a list, a watch response).
    pub fn ok(&self) {
        self.last_ok.fetch_max(boot_nanos(), Ordering::AcqRel);
    }

    /// How long without an answer counts as lost.
    pub fn lost_after(&self) -> Duration {
        self.lost_after
    }

    /// Whether this node has had no answer from etcd for `lost_after`.
    pub fn is_lost(&self) -> bool {
        match self.last_ok.load(Ordering::Acquire) {
            u64::MAX => false,
            0 => true, // never answered
            last => Duration::from_nanos(boot_nanos().saturating_sub(last)) >= self.lost_after,
        }
    }
}

/// Whether a worker's lease is certainly valid now. Measured on
/// `CLOCK_BOOTTIME`, which keeps counting while the machine is suspended:
/// a host that wakes from a suspend wakes up fenced, not "valid".
pub struct Fence {
    /// Boot-clock nanoseconds until which serving is safe; `u64::MAX`: always.
    valid_until: AtomicU64,
    /// Set while the whole cluster has lost etcd ([`freeze`]): serving on the
    /// frozen view is safe although the lease cannot be renewed.
    frozen: AtomicBool,
}

impl Fence {
    pub fn always() -> Fence {
        Fence {
            valid_until: AtomicU64::new(u64::MAX),
            frozen: AtomicBool::new(false),
        }
    }

    /// Invalid until [`Fence::extend`] is called.
    pub fn closed() -> Fence {
        Fence {
            valid_until: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
            || boot_nanos() < self.valid_until.load(Ordering::Acquire)
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Valid by the lease alone (not by a freeze).
    pub fn lease_valid(&self) -> bool {
        boot_nanos() < self.valid_until.load(Ordering::Acquire)
    }

    /// Freeze or thaw. A fence freezes only while it is valid: a worker
    /// whose lease already lapsed never serves again on its old view.
    /// Returns whether it is frozen now.
    pub fn set_frozen(&self, frozen: bool) -> bool {
        if !frozen {
            self.frozen.store(false, Ordering::Release);
            return false;
        }
        if self.is_valid() {
            self.frozen.store(true, Ordering::Release);
        }
        self.is_frozen()
    }

    /// How long it stays valid from now (zero if it is not).
    pub fn remaining(&self) -> Duration {
        let until = self.valid_until.load(Ordering::Acquire);
        if until == u64::MAX {
            return Duration::MAX;
        }
        Duration::from_nanos(until.saturating_sub(boot_nanos()))
    }

    /// Valid until `since + ttl - margin`, `since` being when the renewal
    /// that granted `ttl` was *sent* (etcd's own expiry is never earlier).
    pub fn extend(&self, since: u64, ttl: Duration, margin: Duration) {
        let until = since + ttl.saturating_sub(margin).as_nanos() as u64;
        self.valid_until.fetch_max(until, Ordering::AcqRel);
    }

    pub fn close(&self) {
        self.frozen.store(false, Ordering::Release);
        self.valid_until.store(0, Ordering::Release);
    }
}

/// Nanoseconds on `CLOCK_BOOTTIME` ([`crate::sys::boot_time`]).
pub fn boot_nanos() -> u64 {
    u64::try_from(crate::sys::boot_time().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_opens_for_the_granted_time_minus_the_margin_from_the_send() {
        let f = Fence::closed();
        assert!(!f.is_valid());
        let sent = boot_nanos();
        f.extend(sent, Duration::from_secs(3), Duration::from_millis(500));
        assert!(f.is_valid());
        assert!(f.remaining() <= Duration::from_millis(2500));
        // A renewal sent earlier never shortens it.
        f.extend(
            sent - 10_000_000_000,
            Duration::from_secs(3),
            Duration::ZERO,
        );
        assert!(f.is_valid());
        f.close();
        assert!(!f.is_valid());
        assert!(Fence::always().is_valid());
    }

    #[test]
    fn only_a_valid_fence_freezes_and_a_frozen_one_outlives_its_lease() {
        let f = Fence::closed();
        assert!(!f.set_frozen(true), "a lapsed lease never freezes");
        f.extend(boot_nanos(), Duration::from_secs(60), Duration::ZERO);
        assert!(f.set_frozen(true));
        f.valid_until.store(1, Ordering::Release); // the lease runs out
        assert!(f.is_valid(), "frozen: valid past the lease");
        assert!(!f.set_frozen(false));
        assert!(!f.is_valid(), "thawed: the lease decides again");
        assert!(!f.set_frozen(true), "and once lapsed it stays fenced");
    }

    #[test]
    fn contact_is_lost_after_its_interval_without_an_answer() {
        let c = Contact::new(Duration::from_secs(60));
        assert!(c.is_lost(), "never answered");
        c.ok();
        assert!(!c.is_lost());
        c.last_ok
            .store(boot_nanos() - 61_000_000_000, Ordering::Release);
        assert!(c.is_lost(), "a minute without an answer");
        assert!(!Contact::never_lost().is_lost());
    }
}
