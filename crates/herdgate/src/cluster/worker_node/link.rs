//! One connected edge, as the rooms see it: a [`RemoteEdge`] whose frames go
//! into the link's byte-bounded queue.
//!
//! Policy when the queue is full: the link is closed. An edge that cannot
//! keep up with its rooms would otherwise miss frames silently; closed, it
//! reconnects and registers again, and in between its acknowledged
//! publishes fail (nothing is acknowledged that was not delivered).

use crate::cluster::link::{encode, LinkTx, Msg, SendError};
use crate::outbound::CloseOrder;
use crate::protocol::Frame;
use crate::types::{ConnId, RoomKey};
use crate::worker::RemoteEdge;
use bytes::Bytes;

pub(super) struct EdgeLink {
    pub id: u64,
    pub name: String,
    pub tx: LinkTx,
    /// The edge's last heartbeat (its witness statement, see `freeze`).
    pub says: std::sync::Mutex<Option<crate::cluster::membership::freeze::PeerSays>>,
}

impl EdgeLink {
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

    fn send_deliver(&self, encoded: &Bytes) -> bool {
        self.send(encoded.clone())
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
}
