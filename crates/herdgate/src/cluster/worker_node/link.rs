//! One connected edge, as the rooms see it: a [`RemoteEdge`] whose frames go
//! into the link's byte-bounded queue.
//!
//! Policy when the queue is full: the link is closed. An edge that cannot
//! keep up with its rooms would otherwise miss frames silently; closed, it
//! reconnects and registers again, and in between its acknowledged
//! publishes fail (nothing is acknowledged that was not delivered).

use crate::cluster::link::{encode, LinkTx, Msg, SendError, LEASE_HOLD};
use crate::outbound::CloseOrder;
use crate::protocol::Frame;
use crate::types::{ConnId, RoomKey};
use crate::worker::{RemoteEdge, Sent};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub(super) struct EdgeLink {
    pub id: u64,
    /// Acknowledgements of this connection's deliveries (random per connection).
    pub ack_key: u64,
    pub name: String,
    pub tx: LinkTx,
    /// The edge's last heartbeat (its witness statement, see `freeze`).
    pub says: std::sync::Mutex<Option<crate::cluster::membership::freeze::PeerSays>>,
    /// The newest `sent` of the edge's heartbeats, echoed back in ours.
    pub peer_sent: AtomicU64,
    /// When the newest of those arrived. The edge's link lease runs at most
    /// [`LEASE_HOLD`] heartbeats past it (docs/LINK.md "Link lease").
    last_beat: std::sync::Mutex<Instant>,
    pub heartbeat: Duration,
    /// Set once acknowledgements stop waiting for this connection (see
    /// [`EdgeLink::held_until`]); deliveries are then [`Sent::Down`].
    pub released: std::sync::atomic::AtomicBool,
}

impl EdgeLink {
    pub fn new(id: u64, name: String, tx: LinkTx, heartbeat: Duration) -> EdgeLink {
        EdgeLink {
            id,
            ack_key: rand::random::<u64>() | 1,
            name,
            tx,
            says: std::sync::Mutex::new(None),
            peer_sent: AtomicU64::new(0),
            last_beat: std::sync::Mutex::new(Instant::now()),
            heartbeat,
            released: Default::default(),
        }
    }

    /// An edge heartbeat arrived: echo it at once.
    pub fn heartbeat_from_edge(&self, sent: u64) {
        self.peer_sent.fetch_max(sent, Ordering::AcqRel);
        *self.last_beat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.tx.beat_now();
    }

    /// Until when the edge may still believe this link is up.
    pub fn held_until(&self) -> Instant {
        *self.last_beat.lock().unwrap_or_else(|p| p.into_inner()) + self.heartbeat * LEASE_HOLD
    }

    pub fn send_msg(&self, msg: &Msg) -> bool {
        self.send(encode(msg))
    }

    fn send(&self, frame: Bytes) -> bool {
        match self.tx.try_send_encoded(frame) {
            Ok(()) => true,
            Err(SendError::Full) => {
                metrics::counter!("herdgate_link_overflows_total").increment(1);
                tracing::warn!(edge = %self.name, "link queue full: closing the link (the edge registers again)");
                self.tx.close();
                false
            }
            Err(SendError::Closed) => false,
        }
    }
}

impl RemoteEdge for EdgeLink {
    fn id(&self) -> u64 {
        self.id
    }

    fn encode_deliver(
        &self,
        room: &RoomKey,
        frame: &Frame,
        exclude: Option<ConnId>,
        except_user: Option<&str>,
        ack_id: u64,
        serial: Option<u64>,
    ) -> Bytes {
        encode(&Msg::Deliver {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            frame: Bytes::from(frame.clone()),
            exclude: exclude.map(|c| c.0),
            except_user: except_user.map(String::from),
            ack_id,
            serial,
        })
    }

    fn send_deliver(&self, encoded: &Bytes) -> Sent {
        if self.send(encoded.clone()) {
            Sent::Queued
        } else if !self.released.load(Ordering::Acquire) && Instant::now() < self.held_until() {
            Sent::Held
        } else {
            Sent::Down
        }
    }

    fn ack_key(&self) -> u64 {
        self.ack_key
    }

    fn deliver_to(&self, room: &RoomKey, conn: ConnId, frame: &Frame) {
        self.send(encode(&Msg::DeliverTo {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            frame: Bytes::from(frame.clone()),
        }));
    }

    fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder) {
        self.send(encode(&Msg::Close {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            code: order.code,
        }));
    }

    fn removed(&self, room: &RoomKey, conn: ConnId, notice: &Frame) {
        self.send(encode(&Msg::Removed {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            frame: Bytes::from(notice.clone()),
        }));
    }
}
