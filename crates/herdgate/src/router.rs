//! The router: which worker owns a room, and how to reach it.
//!
//! Sessions and the HTTP API talk to rooms only through this type. Whether
//! the owner runs in this process (standalone: the [`worker::Pool`]) or on a
//! remote worker behind a network link (an edge of a cluster, see
//! [`cluster::edge`]) is the router's business, not theirs; each variant
//! implements the same operations.

use crate::cluster::edge::Edge;
use crate::op::{Answer, Ask, Join, Tell};
use crate::protocol::Frame;
use crate::types::{ConnId, RoomKey, RouteError};
use crate::worker::{self, Subscriber, Target};
use std::sync::Arc;
use std::time::Duration;

pub enum Router {
    /// Rooms on this process's workers.
    Local(Arc<worker::Pool>),
    /// Rooms on remote workers: this node is a cluster edge.
    Edge(Arc<Edge>),
}

impl Router {
    /// The cluster edge behind this router, if this node is an edge.
    pub fn cluster_edge(&self) -> Option<&Arc<Edge>> {
        match self {
            Router::Edge(e) => Some(e),
            Router::Local(_) => None,
        }
    }

    /// Commands (or link frames) waiting in the fullest queue to a room owner.
    pub fn max_mailbox_depth(&self) -> usize {
        match self {
            Router::Local(p) => p.max_mailbox_depth(),
            Router::Edge(e) => e.max_queue_depth(),
        }
    }

    /// Take a place for a socket at the owner (a subscription, a sign-in,
    /// a watch): `Ok(false)` when refused (a subscription's
    /// `pusher:subscription_error` is queued to the socket already; a
    /// sign-in's user is at its `max` signed-in sockets, counted by the
    /// user's owner, cluster-wide).
    pub async fn join(&self, join: Join, sub: Subscriber) -> Result<bool, RouteError> {
        match self {
            Router::Local(p) => p.join(join, sub).await,
            Router::Edge(e) => {
                let Target::Local(out) = sub.to else {
                    return Err(RouteError::Gone);
                };
                e.join(join, sub.id, out).await
            }
        }
    }

    /// A client event: the sender's own task waits for mailbox space.
    pub async fn client_event(
        &self,
        room: RoomKey,
        frame: Frame,
        sender: ConnId,
    ) -> Result<(), RouteError> {
        match self {
            Router::Local(p) => p.client_event(room, frame, sender).await,
            Router::Edge(e) => {
                // A client event lost to a moving room is dropped, not a
                // reason to close the sender's socket.
                if e.publish(room, frame, Some(sender), None, None)
                    .await
                    .is_err()
                {
                    metrics::counter!("herdgate_client_events_dropped_total", "reason" => "owner_unreachable").increment(1);
                }
                Ok(())
            }
        }
    }

    /// An HTTP API publish; `coalesce` when the load state sheds this channel's events.
    pub async fn publish(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        wait: Duration,
    ) -> Result<(), RouteError> {
        match self {
            Router::Local(p) => p.publish(room, frame, exclude, coalesce, wait).await,
            Router::Edge(e) => e.publish(room, frame, exclude, coalesce, Some(wait)).await,
        }
    }

    /// Publish to every room of `items` or to none (standalone: mailbox
    /// space reserved in every owner first; cluster: see
    /// [`Edge::publish_all`]).
    pub async fn publish_all(
        &self,
        items: Vec<worker::Item>,
        deadline: tokio::time::Instant,
    ) -> Result<(), RouteError> {
        match self {
            Router::Local(p) => p.publish_all(items, deadline).await,
            Router::Edge(e) => e.publish_all(items, deadline).await,
        }
    }

    /// Tell a room's owner what a socket let go of: forgotten on this
    /// side first, then told (an owner out of reach learns it when its
    /// link's registrations are replayed, or drops them with the link).
    pub async fn tell(&self, tell: Tell) -> Result<(), RouteError> {
        match self {
            Router::Local(p) => p.tell(tell).await,
            Router::Edge(e) => {
                e.tell(tell).await;
                Ok(())
            }
        }
    }

    /// Ask a room's owner (or every owner, for [`Ask::Rooms`]) and wait
    /// at most `wait` for the answer.
    pub async fn ask(&self, ask: Ask, wait: Duration) -> Result<Answer, RouteError> {
        match self {
            Router::Local(p) => p.ask(ask, wait).await,
            Router::Edge(e) => e.ask(ask, wait).await,
        }
    }
}
