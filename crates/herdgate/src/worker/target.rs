//! Where a room's frames go: a socket's outbound queue in this process, or
//! an edge node across a link (which fans out to its own sockets).

use crate::outbound::{CloseOrder, Outbound, Push};
use crate::protocol::Frame;
use crate::types::{ConnId, RoomKey};
use std::sync::Arc;

/// An edge node as a worker sees it. One call sends one copy to the edge,
/// whatever the number of its sockets in the room.
pub trait RemoteEdge: Send + Sync {
    fn id(&self) -> u64;
    /// Fan `frame` out to the edge's sockets in `room`, but `exclude` and the sockets of `except_user`.
    fn deliver(
        &self,
        room: &RoomKey,
        frame: &Frame,
        exclude: Option<ConnId>,
        except_user: Option<&str>,
    );
    /// Send `frame` to one socket of the edge (subscription answers).
    fn deliver_to(&self, room: &RoomKey, conn: ConnId, frame: &Frame);
    /// Close one socket signed in as a user (`room` is the user's channel).
    fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder);
}

#[derive(Clone)]
pub enum Target {
    Local(Arc<Outbound>),
    Edge(Arc<dyn RemoteEdge>),
}

impl Target {
    pub fn edge_id(&self) -> Option<u64> {
        match self {
            Target::Local(_) => None,
            Target::Edge(e) => Some(e.id()),
        }
    }

    /// Send one frame to this socket (locally, or through its edge).
    pub fn push_one(&self, room: &RoomKey, conn: ConnId, frame: &Frame) -> Push {
        match self {
            Target::Local(out) => out.push(frame),
            Target::Edge(e) => {
                e.deliver_to(room, conn, frame);
                Push::Queued
            }
        }
    }

    pub fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder) {
        match self {
            Target::Local(out) => out.close(order),
            Target::Edge(e) => e.close(room, conn, order),
        }
    }
}
