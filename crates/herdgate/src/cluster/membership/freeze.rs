//! Serving through the loss of etcd: the membership freezes.
//!
//! A worker's lease can only expire at etcd. If etcd is gone for everyone
//! (its members down, or no quorum), no lease expires and no key changes:
//! the view every node holds stays the cluster's view, and serving on it
//! cannot make two owners. If only *some* nodes lost etcd, the others may
//! watch leases expire and rooms move; then the cut-off nodes must stop.
//! A node cannot tell the two apart by itself, so the peers it links with
//! are its witnesses: every heartbeat says whether the sender still hears
//! from etcd and which membership (its [`View::digest`]) it holds.
//!
//! * A **worker** whose lease can no longer be renewed keeps serving
//!   (its [`Fence`](super::Fence) *frozen*) only while it has lost etcd
//!   itself and **every** edge of its view is linked to it, heartbeating,
//!   has lost etcd too, and holds the same membership. The first edge that
//!   hears from etcd again, holds another membership, or goes silent ends
//!   the freeze: the worker is then fenced like any worker whose lease ran
//!   out (a worker whose lease lapsed before it could freeze never does).
//! * An **edge** whose watch is down keeps its view current only while it
//!   has lost etcd itself and every worker it is linked with says the
//!   same, with the same membership (at least one must be linked).
//! * When etcd answers again, a frozen node stays frozen for at most one
//!   keepalive round while its peers still hold the same membership, until
//!   its lease renewal (worker) or its watch (edge) is back; a changed
//!   membership anywhere thaws it at once. A worker whose renewal does not
//!   come is then fenced as usual (its lease is gone: it registers anew).
//!
//! So a whole cluster keeps serving while etcd is gone, with no joins,
//! leaves or failovers (a worker that dies meanwhile leaves its rooms
//! unavailable until etcd returns); a minority cut off from etcd — or any
//! node cut off while one of its peers still reaches etcd — stops serving
//! as before. What remains: a node that regains etcd first may act on a
//! newer view up to one heartbeat before its peers hear about it.

use crate::cluster::view::View;
use std::time::Duration;

/// What a peer said in its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSays {
    pub digest: u64,
    pub etcd_lost: bool,
    /// When it arrived (boot-clock nanoseconds).
    pub at: u64,
}

impl PeerSays {
    /// Agrees that etcd is gone, holds `digest`, and said so within `fresh`.
    fn agrees(&self, digest: u64, now: u64, fresh: Duration) -> bool {
        self.etcd_lost && self.same(digest, now, fresh)
    }

    /// Holds `digest` and said so within `fresh`.
    fn same(&self, digest: u64, now: u64, fresh: Duration) -> bool {
        self.digest == digest && Duration::from_nanos(now.saturating_sub(self.at)) <= fresh
    }
}

/// Whether a frozen node stays frozen while etcd comes back: every peer
/// of `peers` still holds the same membership (a changed one means the
/// view moved on: thaw at once). The caller bounds how long a node that
/// hears from etcd again waits for its own lease renewal or watch.
pub fn still_same(view: &View, peers: &[Option<PeerSays>], now: u64, fresh: Duration) -> bool {
    !peers.is_empty()
        && peers
            .iter()
            .all(|p| p.is_some_and(|p| p.same(view.digest, now, fresh)))
}

/// Whether a worker may serve on `view` without renewing its lease: it
/// lost etcd, and every edge of the view (`said(edge)`: its link's last
/// heartbeat, `None` without a link) agrees.
pub fn worker_may_freeze(
    own_lost: bool,
    view: &View,
    said: impl Fn(&str) -> Option<PeerSays>,
    now: u64,
    fresh: Duration,
) -> bool {
    own_lost
        && view.rev > 0
        && !view.edges.is_empty()
        && view
            .edges
            .iter()
            .all(|e| said(e).is_some_and(|p| p.agrees(view.digest, now, fresh)))
}

/// Whether an edge may keep routing by `view` while its watch is down: it
/// lost etcd, and every linked worker (`linked`) agrees.
pub fn edge_may_freeze(
    own_lost: bool,
    view: &View,
    linked: &[PeerSays],
    now: u64,
    fresh: Duration,
) -> bool {
    own_lost
        && view.rev > 0
        && !linked.is_empty()
        && linked.iter().all(|p| p.agrees(view.digest, now, fresh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::view::{NodeId, WorkerInfo};
    use std::collections::{BTreeMap, BTreeSet};

    fn view() -> View {
        let workers: BTreeMap<NodeId, WorkerInfo> = [(
            NodeId::from("w1"),
            WorkerInfo {
                addr: "127.0.0.1:7001".into(),
                vnodes: 64,
                state: "active".into(),
                incarnation: 5,
            },
        )]
        .into();
        let edges: BTreeSet<NodeId> = ["e1".into(), "e2".into()].into();
        View::new(7, workers, edges)
    }

    const FRESH: Duration = Duration::from_secs(1);
    const NOW: u64 = 100_000_000_000;

    fn lost(v: &View) -> PeerSays {
        PeerSays {
            digest: v.digest,
            etcd_lost: true,
            at: NOW - 1,
        }
    }

    #[test]
    fn a_worker_freezes_only_when_every_edge_of_its_view_lost_etcd_too() {
        let v = view();
        let all = |_: &str| Some(lost(&v));
        assert!(worker_may_freeze(true, &v, all, NOW, FRESH));
        assert!(
            !worker_may_freeze(false, &v, all, NOW, FRESH),
            "it still reaches etcd"
        );
        // One edge without a link: it may be following etcd elsewhere.
        let one_missing = |e: &str| (e == "e1").then(|| lost(&v));
        assert!(!worker_may_freeze(true, &v, one_missing, NOW, FRESH));
        // One edge still hears from etcd: etcd is alive, this worker is cut off.
        let one_reaches = |e: &str| {
            Some(PeerSays {
                etcd_lost: e == "e1",
                ..lost(&v)
            })
        };
        assert!(!worker_may_freeze(true, &v, one_reaches, NOW, FRESH));
        // Another membership, or a stale heartbeat.
        let other = |_: &str| {
            Some(PeerSays {
                digest: 1,
                ..lost(&v)
            })
        };
        assert!(!worker_may_freeze(true, &v, other, NOW, FRESH));
        let old = |_: &str| Some(PeerSays { at: 1, ..lost(&v) });
        assert!(!worker_may_freeze(true, &v, old, NOW, FRESH));
        // No edges, or no view yet: nothing to serve, nothing to freeze.
        let bare = View::new(7, v.workers.clone(), BTreeSet::new());
        assert!(!worker_may_freeze(true, &bare, all, NOW, FRESH));
        assert!(!worker_may_freeze(true, &View::empty(), all, NOW, FRESH));
    }

    #[test]
    fn an_edge_freezes_only_when_every_linked_worker_agrees() {
        let v = view();
        assert!(edge_may_freeze(true, &v, &[lost(&v), lost(&v)], NOW, FRESH));
        assert!(
            !edge_may_freeze(true, &v, &[], NOW, FRESH),
            "nobody to agree"
        );
        assert!(!edge_may_freeze(false, &v, &[lost(&v)], NOW, FRESH));
        let reaches = PeerSays {
            etcd_lost: false,
            ..lost(&v)
        };
        assert!(!edge_may_freeze(true, &v, &[lost(&v), reaches], NOW, FRESH));
    }

    #[test]
    fn a_frozen_node_stays_frozen_only_while_every_peer_holds_the_same_membership() {
        let v = view();
        let back = PeerSays {
            etcd_lost: false,
            ..lost(&v)
        };
        assert!(still_same(&v, &[Some(back), Some(lost(&v))], NOW, FRESH));
        let moved = PeerSays { digest: 9, ..back };
        assert!(!still_same(&v, &[Some(back), Some(moved)], NOW, FRESH));
        assert!(
            !still_same(&v, &[Some(back), None], NOW, FRESH),
            "a peer gone"
        );
        assert!(!still_same(&v, &[], NOW, FRESH));
    }
}
