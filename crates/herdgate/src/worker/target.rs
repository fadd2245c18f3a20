//! Where a room's frames go: a socket's outbound queue in this process, or
//! an edge node across a link (which fans out to its own sockets).

use crate::outbound::{CloseOrder, Outbound, Push};
use crate::protocol::Frame;
use crate::types::{ConnId, RoomKey};
use bytes::Bytes;
use std::sync::Arc;

/// An edge node as a worker sees it: one link, one copy of each frame
/// whatever the number of its sockets in the room.
pub trait RemoteEdge: Send + Sync {
    /// Stable for the edge node across reconnects.
    fn id(&self) -> u64;
    /// Encode the delivery of `frame` to the edge's sockets in `room` (but
    /// `exclude` and the sockets of `except_user`). The bytes do not depend
    /// on the edge: encoded once, they go to every edge of the room. The
    /// `serial` is for the edge's sockets that opted in to resume.
    fn encode_deliver(
        &self,
        room: &RoomKey,
        frame: &Frame,
        exclude: Option<ConnId>,
        except_user: Option<&str>,
        ack_id: u64,
        serial: Option<u64>,
    ) -> Bytes;
    /// Send an encoded delivery: queued on the link, or not (the link is
    /// down, or was over its bound and is now closed: the link's policy),
    /// and then whether the edge may still believe its link is up.
    fn send_deliver(&self, encoded: &Bytes) -> Sent;
    /// What acknowledgements of this link's deliveries are keyed by: one
    /// value per connection of the edge (a reconnected edge is a new one).
    fn ack_key(&self) -> u64;
    /// Send `frame` to one socket of the edge (subscription answers).
    fn deliver_to(&self, room: &RoomKey, conn: ConnId, frame: &Frame);
    /// Close one socket signed in as a user (`room` is the user's channel).
    fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder);
    /// A moderator took one socket out of `room`: the edge forgets its
    /// place there and sends it `notice` (a [`Frame::removes`] frame).
    fn removed(&self, room: &RoomKey, conn: ConnId, notice: &Frame);
}

/// What became of a delivery to an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued on the link: the edge confirms it (acknowledged publishes wait).
    Queued,
    /// Not sent, and the edge may not know yet: its link lease may still be
    /// running (docs/LINK.md "Link lease"). An acknowledged publish waits
    /// for it as if it were sent, until the lease has surely expired
    /// (then its sockets were told `unavailable`) or the publish's deadline.
    Held,
    /// Not sent, and the edge has surely told its sockets `unavailable`.
    Down,
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

    /// Tell a socket the owner took it out of `room` (the notice, which its
    /// session, and its edge, act on).
    pub fn remove(&self, room: &RoomKey, conn: ConnId, notice: &Frame) {
        match self {
            Target::Local(out) => {
                out.push(notice);
            }
            Target::Edge(e) => e.removed(room, conn, notice),
        }
    }

    pub fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder) {
        match self {
            Target::Local(out) => out.close(order),
            Target::Edge(e) => e.close(room, conn, order),
        }
    }
}
