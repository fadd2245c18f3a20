//! How an etcd worker joins and leaves the ring: in steps, each one view
//! change, so rooms move a share at a time (and only into a joining worker,
//! only away from a leaving one: its points are hash-chained).

use crate::cluster::membership::Control;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Whether every edge of the worker's view has a live link to it.
pub type Linked = std::sync::Arc<std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>>;

#[derive(Clone)]
pub struct Scale {
    pub control: mpsc::Sender<Control>,
    pub incarnation: watch::Receiver<i64>,
    /// Ring weight when fully joined (`cluster.weight`).
    pub target: u32,
    pub steps: u32,
    pub interval: Duration,
    /// Set by the worker once it serves links.
    pub linked: Linked,
    /// Longest wait for the edges' links before the first step
    /// (`cluster.handover_timeout`): an edge that cannot connect is left to
    /// register when it does.
    pub link_wait: Duration,
}

impl Scale {
    fn vnodes(&self, step: u32) -> u32 {
        (self.target as u64 * step as u64 / self.steps.max(1) as u64) as u32
    }

    /// From weight 0 to the target in `steps`, once registered; again
    /// after every new incarnation (a lost lease means joining anew).
    pub async fn join(mut self) {
        loop {
            while *self.incarnation.borrow_and_update() == 0 {
                if self.incarnation.changed().await.is_err() {
                    return;
                }
            }
            // Owning nothing yet, wait for every edge of the view to link
            // here, so that the first rooms moved in find their edges.
            let deadline = tokio::time::Instant::now() + self.link_wait;
            while !self.linked.get().is_some_and(|f| f()) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for step in 1..=self.steps {
                let state = if step == self.steps {
                    "active"
                } else {
                    "joining"
                };
                let set = Control::Set {
                    vnodes: self.vnodes(step),
                    state,
                };
                if self.control.send(set).await.is_err() {
                    return;
                }
                tracing::info!(
                    step,
                    of = self.steps,
                    vnodes = self.vnodes(step),
                    "ring weight raised"
                );
                if step < self.steps {
                    tokio::time::sleep(self.interval).await;
                }
            }
            if self.incarnation.changed().await.is_err() {
                return;
            }
        }
    }

    /// Down to weight 0 in `steps` (each a planned handover), then remove
    /// the key; all within `deadline`, after which it leaves anyway (the
    /// rest goes the failover way).
    pub async fn leave(self, deadline: Duration) {
        let ramp = async {
            for step in (0..self.steps).rev() {
                let set = Control::Set {
                    vnodes: self.vnodes(step),
                    state: "draining",
                };
                if self.control.send(set).await.is_err() {
                    return;
                }
                tracing::info!(vnodes = self.vnodes(step), "ring weight lowered");
                tokio::time::sleep(self.interval).await;
            }
        };
        if tokio::time::timeout(deadline, ramp).await.is_err() {
            tracing::warn!("drain timeout: leaving with rooms still here (they fail over)");
        }
        let (done, left) = oneshot::channel();
        if self.control.send(Control::Leave { done }).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), left).await;
        }
    }
}
