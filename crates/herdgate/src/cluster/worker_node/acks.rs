//! Acknowledged publishes: a 200 for an HTTP API publish means every edge
//! the owner sent it to confirmed receipt (`DeliverAck`).
//!
//! The waiter is registered before the publish is queued to the room, so a
//! receipt can never arrive before anyone waits for it. A refusal (an edge
//! said no, or did not answer within the edge's own wait) is answered
//! `Refused`: the HTTP API answers 503, and nothing was counted as sent.
//! Edges whose link is down are not waited for, and an edge whose link goes
//! down while a publish waits for it is no longer waited for — but only
//! once its sockets were told `herdgate:status {"room":"unavailable"}`:
//! the worker lets a lost connection go ([`Acks::edge_gone`]) when the
//! edge closed it (it tells its sockets first) or when the edge's link
//! lease has surely run out (docs/LINK.md "Link lease"); until then a
//! delivery it could not send counts as waited for. The sockets then miss
//! what is published until the edge returns: a gap they are told about
//! before the 200, never a silent one. Publishes through the edges that still reach the owner keep
//! succeeding while one edge is cut off. What remains beyond that: an edge
//! crash after its receipt loses its own sockets' copies, which it would
//! lose anyway.

use crate::cluster::link::Refusal;
use crate::worker::Delivery;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

#[derive(Default)]
pub(super) struct Acks {
    waiting: Mutex<HashMap<u64, Waiting>>,
}

struct Waiting {
    confirmed: HashSet<u64>,
    /// Edges whose link went down while this waited.
    gone: HashSet<u64>,
    refused: bool,
    changed: Arc<Notify>,
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start waiting for receipts of `ack_id`.
    pub fn expect(&self, ack_id: u64) -> Arc<Notify> {
        let changed = Arc::new(Notify::new());
        self.lock().insert(
            ack_id,
            Waiting {
                confirmed: HashSet::new(),
                gone: HashSet::new(),
                refused: false,
                changed: changed.clone(),
            },
        );
        changed
    }

    pub fn forget(&self, ack_id: u64) {
        self.lock().remove(&ack_id);
    }

    /// Receipts from edge `edge`; ids nobody waits for (answered already) are ignored.
    pub fn receipts(&self, edge: u64, ids: &[(u64, bool)]) {
        let mut waiting = self.lock();
        for (id, ok) in ids {
            if let Some(w) = waiting.get_mut(id) {
                if *ok {
                    w.confirmed.insert(edge);
                } else {
                    w.refused = true;
                }
                w.changed.notify_one();
            }
        }
    }

    /// Edge `edge`'s link went down: no waiter waits for it any more.
    pub fn edge_gone(&self, edge: u64) {
        for w in self.lock().values_mut() {
            w.gone.insert(edge);
            w.changed.notify_one();
        }
    }

    /// Where `ack_id` stands against the edges it went to.
    fn outcome(&self, ack_id: u64, edges: &[u64]) -> Option<Result<(), Refusal>> {
        let waiting = self.lock();
        let w = waiting.get(&ack_id)?;
        if w.refused {
            return Some(Err(Refusal::Nack));
        }
        edges
            .iter()
            .all(|e| w.confirmed.contains(e) || w.gone.contains(e))
            .then_some(Ok(()))
    }
}

/// Wait for the fan-out of `ack_id`, then for every edge it went to, all
/// within `wait`.
pub(super) async fn confirm(
    acks: &Acks,
    ack_id: u64,
    changed: Arc<Notify>,
    delivery: oneshot::Receiver<Delivery>,
    wait: Duration,
) -> Result<(), Refusal> {
    let deadline = tokio::time::Instant::now() + wait;
    let result = async {
        let d = tokio::time::timeout_at(deadline, delivery)
            .await
            .map_err(|_| Refusal::Busy)?
            .map_err(|_| Refusal::Busy)?;
        // Edges whose link is down are not waited for: they tell their
        // sockets the room is unavailable (and register them again when the
        // link returns, or the worker drops them after the edge's lease).
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(outcome) = acks.outcome(ack_id, &d.edges) {
                return outcome;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Refusal::Busy);
            }
        }
    }
    .await;
    acks.forget(ack_id);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(edges: &[u64]) -> oneshot::Receiver<Delivery> {
        let (tx, rx) = oneshot::channel();
        tx.send(Delivery {
            edges: edges.to_vec(),
            ..Delivery::default()
        })
        .unwrap();
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_only_when_every_edge_confirmed() {
        let acks = Arc::new(Acks::default());
        let n = acks.expect(1);
        let a = acks.clone();
        let t = tokio::spawn(async move {
            confirm(&a, 1, n, delivered(&[10, 20]), Duration::from_secs(1)).await
        });
        acks.receipts(10, &[(1, true)]);
        tokio::task::yield_now().await;
        assert!(!t.is_finished(), "one edge of two");
        acks.receipts(20, &[(1, true)]);
        assert_eq!(t.await.unwrap(), Ok(()));
        assert!(acks.lock().is_empty());

        // A receipt that came before the fan-out was reported still counts.
        let n = acks.expect(2);
        acks.receipts(10, &[(2, true)]);
        assert_eq!(
            confirm(&acks, 2, n, delivered(&[10]), Duration::from_secs(1)).await,
            Ok(())
        );
        // No answer within the wait: refused; a no: refused.
        let n = acks.expect(3);
        assert_eq!(
            confirm(&acks, 3, n, delivered(&[10]), Duration::from_secs(1)).await,
            Err(Refusal::Busy)
        );
        let n = acks.expect(4);
        acks.receipts(10, &[(4, false)]);
        assert_eq!(
            confirm(&acks, 4, n, delivered(&[10]), Duration::from_secs(1)).await,
            Err(Refusal::Nack)
        );
        // An edge whose link goes down meanwhile is not waited for.
        let n = acks.expect(6);
        let a = acks.clone();
        let t = tokio::spawn(async move {
            confirm(&a, 6, n, delivered(&[10, 20]), Duration::from_secs(1)).await
        });
        acks.receipts(10, &[(6, true)]);
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        acks.edge_gone(20);
        assert_eq!(t.await.unwrap(), Ok(()));
        // Nobody subscribed anywhere: nothing to wait for.
        let n = acks.expect(5);
        assert_eq!(
            confirm(&acks, 5, n, delivered(&[]), Duration::from_secs(1)).await,
            Ok(())
        );
    }
}
