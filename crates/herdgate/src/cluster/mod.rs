//! Edges and workers on many hosts, no central broker on the message path.
//!
//! `role = "edge"` nodes hold client sockets and the HTTP API; `role =
//! "worker"` nodes own rooms. Who owns a room is a pure function of the room
//! and the membership [`view`] — one agreed list of workers per revision,
//! from etcd or from static config ([`membership`]) — so every node places
//! every room alike, and link state never moves a room. docs/CLUSTER.md
//! describes layouts and failure behaviour, docs/LINK.md the [`link`].

pub mod edge;
pub mod link;
pub mod membership;
pub mod tls;
pub mod view;
pub mod worker_node;

use crate::config::Config;
#[cfg(feature = "etcd")]
use crate::config::Membership as Mode;
use membership::Membership;
use tokio_util::sync::CancellationToken;
use view::NodeId;

/// Bytes queued on one link before its sender's policy applies.
pub const LINK_QUEUE_BYTES: usize = 64 << 20;

/// An edge's membership: the static list, or its etcd registration.
pub fn membership_for_edge(config: &Config, id: NodeId, stop: CancellationToken) -> Membership {
    let cl = &config.cluster;
    match cl.membership {
        #[cfg(feature = "etcd")]
        Mode::Etcd => membership::etcd::start(
            &cl.etcd,
            id,
            membership::etcd::Registration::Edge {
                addr: config.server.listen.clone(),
            },
            stop,
        ),
        _ => {
            let _ = (id, stop);
            Membership::fixed(&cl.workers, crate::ring::DEFAULT_VNODES as u32)
        }
    }
}

/// A worker's membership: none (static: it serves what edges send it), or
/// its etcd registration, joining with weight 0.
pub fn membership_for_worker(
    config: &Config,
    id: NodeId,
    advertised: String,
    stop: CancellationToken,
) -> Membership {
    let cl = &config.cluster;
    match cl.membership {
        #[cfg(feature = "etcd")]
        Mode::Etcd => membership::etcd::start(
            &cl.etcd,
            id,
            membership::etcd::Registration::Worker(view::WorkerInfo {
                addr: advertised,
                vnodes: 0,
                state: "joining".into(),
                incarnation: 0,
            }),
            stop,
        ),
        _ => {
            let _ = (id, stop, advertised);
            Membership::none()
        }
    }
}
