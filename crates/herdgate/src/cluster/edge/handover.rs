//! Applying a new view at the edge, in revision order.
//!
//! 1. Links: start one for each worker new in the view, retire the ones gone.
//! 2. Route by the new view; keep the old ones for fencing until sealed.
//! 3. Every local socket of a room whose owner changed is registered with the
//!    new owner (silently: it is subscribed, its members are known), with
//!    awaited sends — never dropped on a full queue — and its sockets are
//!    told `herdgate:status {"room":"moving"}` (`ready` follows the new
//!    owner's `Open`).
//! 4. Wait until every previous owner still in the view has sealed this
//!    revision (its frames for the moved rooms are all here), or
//!    `handover_timeout` (an owner this edge cannot reach is not waited for).
//! 5. `ViewAck{rev}` on every link: the new owners open the rooms once every
//!    edge said so.

use super::links::{again_msg, WorkerLink};
use super::rooms::{Again, RoomCmd, RoomState};
use super::Edge;
use crate::cluster::link::{Msg, RegMode};
use crate::cluster::view::{NodeId, View};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

pub(super) async fn run(edge: Arc<Edge>) {
    let mut views = edge.membership.view.clone();
    let mut first = true;
    loop {
        let next = views.borrow_and_update().clone();
        let cur = edge.view();
        // Newer, or (defensively) different at the same revision.
        if first || next.rev > cur.rev || (next.rev == cur.rev && next.digest != cur.digest) {
            apply(&edge, next).await;
            first = false;
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

async fn apply(edge: &Arc<Edge>, new: Arc<View>) {
    let started = Instant::now();
    let old = edge.view();
    sync_links(edge, &new);
    edge.view.store(new.clone());
    {
        let mut h = edge.history.lock().unwrap_or_else(|p| p.into_inner());
        h.push_back(new.clone());
        while h.len() > super::HISTORY {
            h.pop_front();
        }
    }
    metrics::gauge!("herdgate_membership_revision").set(new.rev as f64);

    let (o, n) = (old.clone(), new.clone());
    let moved: Arc<dyn Fn(&crate::types::RoomKey) -> bool + Send + Sync> =
        Arc::new(move |k| o.owner(k) != n.owner(k));
    let again = edge.rooms.collect(moved.clone()).await;
    let mut previous: HashSet<NodeId> = HashSet::new();
    let mut by_owner: HashMap<NodeId, Vec<Again>> = HashMap::new();
    for a in again {
        let room = match &a {
            Again::Sub { room, .. } | Again::SignIn { room, .. } | Again::Watch { room, .. } => {
                room
            }
        };
        if let Some(p) = old.owner(room).filter(|p| new.worker(p).is_some()) {
            previous.insert(p.clone());
        }
        if let Some(owner) = new.owner(room) {
            by_owner.entry(owner.clone()).or_default().push(a);
        }
    }
    let mut registered = 0usize;
    let mut rooms_moved: HashSet<crate::types::RoomKey> = HashSet::new();
    let mut unreachable: HashSet<NodeId> = HashSet::new();
    for (owner, list) in by_owner {
        // A new owner this edge cannot reach now gets everything when its
        // link comes up (links register all they own on connect); until
        // then its rooms are unavailable here.
        let Some(tx) = edge.link(&owner).and_then(|l| l.tx()) else {
            unreachable.insert(owner);
            continue;
        };
        for a in &list {
            if let Again::Sub { room, .. } = a {
                rooms_moved.insert(room.clone());
            }
            if tx
                .send(&again_msg(a, RegMode::Move, new.rev))
                .await
                .is_err()
            {
                break;
            }
            registered += 1;
        }
    }
    if !rooms_moved.is_empty() {
        metrics::counter!("herdgate_room_moves_total", "reason" => "view")
            .increment(rooms_moved.len() as u64);
    }
    for (state, owners_down) in [(RoomState::Moving, false), (RoomState::Unavailable, true)] {
        let (n, moved, down) = (new.clone(), moved.clone(), unreachable.clone());
        let pred: Arc<dyn Fn(&crate::types::RoomKey) -> bool + Send + Sync> = Arc::new(move |k| {
            moved(k) && n.owner(k).is_some_and(|o| down.contains(o)) == owners_down
        });
        edge.rooms
            .broadcast(|| RoomCmd::SetState {
                pred: pred.clone(),
                state,
            })
            .await;
    }

    // Wait for the previous owners' seals.
    let deadline = started + edge.handover_timeout;
    let links: Vec<Arc<WorkerLink>> = previous.iter().filter_map(|p| edge.link(p)).collect();
    loop {
        let waits: Vec<_> = links.iter().map(|l| l.changed.notified()).collect();
        let mut waits: Vec<_> = waits.into_iter().map(Box::pin).collect();
        for w in waits.iter_mut() {
            w.as_mut().enable();
        }
        let unsealed: Vec<&NodeId> = links
            .iter()
            .filter(|l| l.is_up() && l.sealed_rev.load(Ordering::Acquire) < new.rev)
            .map(|l| &l.node)
            .collect();
        if unsealed.is_empty() {
            break;
        }
        if tokio::time::timeout_at(deadline, futures_util::future::select_all(waits))
            .await
            .is_err()
        {
            tracing::warn!(
                rev = new.rev,
                ?unsealed,
                "previous owners did not seal in time"
            );
            break;
        }
    }
    for w in new.workers.keys() {
        if let Some(tx) = edge.link(w).and_then(|l| l.tx()) {
            let _ = tx.send(&Msg::ViewAck { rev: new.rev }).await;
        }
    }
    edge.prune_history();
    tracing::info!(
        rev = new.rev,
        rooms_moved = rooms_moved.len(),
        registered,
        took_ms = started.elapsed().as_millis() as u64,
        "view applied"
    );
    metrics::counter!("herdgate_registrations_moved_total").increment(registered as u64);
    metrics::histogram!("herdgate_rehome_seconds").record(started.elapsed().as_secs_f64());
}

/// One link per worker of `view` (at the address it advertises).
fn sync_links(edge: &Arc<Edge>, view: &View) {
    let mut started = Vec::new();
    {
        let mut links = edge.links.write().unwrap_or_else(|p| p.into_inner());
        links.retain(|node, l| {
            let keep = view.worker(node).is_some_and(|w| w.addr == l.addr);
            if !keep {
                tracing::info!(worker = %node, "worker left the view: its link ends");
                l.retired.cancel();
            }
            keep
        });
        for (node, w) in &view.workers {
            if !links.contains_key(node) {
                let l = Arc::new(WorkerLink::new(node.clone(), w.addr.clone()));
                links.insert(node.clone(), l.clone());
                started.push(l);
            }
        }
    }
    for l in started {
        tokio::spawn(super::links::run(edge.clone(), l));
    }
}
