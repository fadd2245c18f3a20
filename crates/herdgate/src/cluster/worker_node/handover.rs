//! The handover barrier, on the worker: seal what moved away, open what
//! moved in once every edge registered it.
//!
//! For each new view (in revision order):
//!
//! 1. **Seal.** Every room this worker no longer owns is dropped from its
//!    workers, after every command queued before (their frames go out
//!    first); then `Sealed{rev}` goes to every edge. Links are FIFO, so an
//!    edge has all of this worker's frames for a moved room before it sees
//!    `Sealed`, and accepts none after it.
//! 2. **Barrier.** Rooms this worker gained stay *sealed* — registrations
//!    yes, publishes no (`Refused{Sealed}`) — until every edge in the view
//!    has sent `ViewAck{≥ rev}` on a live link, which follows its
//!    registrations of the moved rooms; or until `cluster.handover_timeout`,
//!    when the edges that did not answer are left out (counted). An edge
//!    left out has no link here, so it tells its sockets of these rooms they
//!    are unavailable, and registers them when its link comes up.
//! 3. **Open.** `Open{rev}` to every edge; publishes flow.

use super::Node;
use crate::cluster::link::Msg;
use crate::cluster::view::View;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut views = node.membership.view.clone();
    let mut incarnation = node.membership.incarnation.clone();
    let mut applied = (0u64, 0u64); // (rev, digest)
                                    // Rooms start sealed: no edge has registered anything here yet.
    *node.open_view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(View::empty());
    node.accepted
        .store(*incarnation.borrow_and_update(), Ordering::Release);
    loop {
        // A new incarnation first: edges are refused ("starting") until it
        // is handled, so a view's barrier would wait for them in vain.
        if incarnation.has_changed().unwrap_or(false) {
            new_incarnation(&node, &mut incarnation).await;
            applied = (0, 0);
        }
        let view = views.borrow_and_update().clone();
        // Newer, or (defensively) different at the same revision.
        if view.rev > applied.0 || (view.rev == applied.0 && view.digest != applied.1) {
            hand_over(&node, &view, incarnation.clone()).await;
            applied = (view.rev, view.digest);
        }
        tokio::select! {
            biased;
            r = incarnation.changed() => {
                if r.is_err() {
                    return;
                }
                new_incarnation(&node, &mut incarnation).await;
                applied = (0, 0);
            }
            r = views.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// A new incarnation (the lease was lost, or the first registration):
/// whatever this process held belongs to whoever owned it meanwhile.
async fn new_incarnation(node: &Node, incarnation: &mut tokio::sync::watch::Receiver<i64>) {
    let current = *incarnation.borrow_and_update();
    let dropped = node.pool.retain(Arc::new(|_| false)).await;
    if dropped > 0 {
        tracing::warn!(dropped, "new incarnation: rooms held before dropped");
    }
    *node.open_view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(View::empty());
    // Edges may connect (and register) from now on.
    node.accepted.store(current, Ordering::Release);
}

async fn hand_over(
    node: &Node,
    view: &Arc<View>,
    mut incarnation: tokio::sync::watch::Receiver<i64>,
) {
    let started = Instant::now();
    let rev = view.rev;
    let (me, v) = (node.id.clone(), view.clone());
    let dropped = node
        .pool
        .retain(Arc::new(move |k| v.owner(k) == Some(&me)))
        .await;
    if dropped > 0 {
        tracing::info!(rev, dropped, "rooms that moved away sealed and dropped");
        metrics::counter!("herdgate_room_moves_total", "reason" => "view")
            .increment(dropped as u64);
    }
    for link in node.links() {
        let _ = link.tx.send(&Msg::Sealed { rev }).await;
    }
    let deadline = started + node.handover_timeout;
    loop {
        let acked = node.view_acked.notified();
        tokio::pin!(acked);
        acked.as_mut().enable();
        let waiting = node.waiting_for(view);
        if waiting.is_empty() {
            break;
        }
        tokio::select! {
            r = tokio::time::timeout_at(deadline, acked) => if r.is_err() {
                metrics::counter!("herdgate_handover_timeouts_total").increment(1);
                tracing::warn!(
                    rev,
                    ?waiting,
                    "handover barrier timed out; opening without these edges"
                );
                break;
            },
            // A new incarnation drops everything: this barrier is moot.
            _ = incarnation.changed() => return,
        }
    }
    *node.open_view.write().unwrap_or_else(|p| p.into_inner()) = view.clone();
    for link in node.links() {
        let _ = link.tx.send(&Msg::Open { rev }).await;
    }
    let took = started.elapsed();
    metrics::histogram!("herdgate_handover_seconds").record(took.as_secs_f64());
    tracing::info!(rev, took_ms = took.as_millis() as u64, "view open");
}
