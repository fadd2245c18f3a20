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
//! worker that cannot be sure serves nothing.

#[cfg(feature = "etcd")]
pub mod etcd;

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

/// Whether a worker's lease is certainly valid now. Measured on
/// `CLOCK_BOOTTIME`, which keeps counting while the machine is suspended:
/// a host that wakes from a suspend wakes up fenced, not "valid".
pub struct Fence {
    /// Boot-clock nanoseconds until which serving is safe; `u64::MAX`: always.
    valid_until: AtomicU64,
}

impl Fence {
    pub fn always() -> Fence {
        Fence {
            valid_until: AtomicU64::new(u64::MAX),
        }
    }

    /// Invalid until [`Fence::extend`] is called.
    pub fn closed() -> Fence {
        Fence {
            valid_until: AtomicU64::new(0),
        }
    }

    pub fn is_valid(&self) -> bool {
        boot_nanos() < self.valid_until.load(Ordering::Acquire)
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
        self.valid_until.store(0, Ordering::Release);
    }
}

/// Nanoseconds on `CLOCK_BOOTTIME`.
pub fn boot_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_BOOTTIME exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
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
}
