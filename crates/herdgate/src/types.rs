//! The vocabulary every layer shares: who a socket is, which room a frame
//! is for, who is present in it, and why a room could not be reached.
//!
//! A leaf module: it depends on nothing else in the crate, so that the
//! session, the router, the workers and the cluster link can all speak of
//! rooms and sockets without importing one another.

use serde_json::value::RawValue;
use std::sync::Arc;

/// The numeric form of a socket id `"<hi>.<lo>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConnId(pub u64);

impl ConnId {
    pub fn socket_id(self) -> String {
        format!("{}.{}", self.0 >> 32, self.0 & 0xffff_ffff)
    }

    /// Parse `"<hi>.<lo>"` where both halves fit in 32 bits.
    pub fn parse(socket_id: &str) -> Option<ConnId> {
        let (hi, lo) = socket_id.split_once('.')?;
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(hi) || !digits(lo) {
            return None;
        }
        let (hi, lo): (u32, u32) = (hi.parse().ok()?, lo.parse().ok()?);
        Some(ConnId(((hi as u64) << 32) | lo as u64))
    }
}

/// A presence member as announced by its `channel_data`. Between nodes it
/// travels as `(user_id, raw user_info JSON)`, checked for JSON on arrival.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(into = "WireMember", try_from = "WireMember")]
pub struct Member {
    pub user_id: Arc<str>,
    pub user_info: Option<Box<RawValue>>,
}

impl PartialEq for Member {
    fn eq(&self, other: &Member) -> bool {
        self.user_id == other.user_id
            && self.user_info.as_ref().map(|i| i.get()) == other.user_info.as_ref().map(|i| i.get())
    }
}

/// A member on the wire: user id and raw `user_info` JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireMember(String, Option<String>);

impl From<Member> for WireMember {
    fn from(m: Member) -> WireMember {
        WireMember(
            m.user_id.to_string(),
            m.user_info.map(|i| i.get().to_string()),
        )
    }
}

impl TryFrom<WireMember> for Member {
    type Error = serde_json::Error;

    fn try_from(w: WireMember) -> Result<Member, serde_json::Error> {
        Ok(Member {
            user_id: Arc::from(w.0),
            user_info: w.1.map(RawValue::from_string).transpose()?,
        })
    }
}

/// A room is a channel within an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RoomKey {
    pub app: Arc<str>,
    pub channel: Arc<str>,
}

/// The channel prefix of a signed-in user's room (the protocol's
/// `#server-to-user-`).
const USER_ROOM_PREFIX: &str = "#server-to-user-";

impl RoomKey {
    /// The `#server-to-user-{user}` room of a signed-in user.
    pub fn user(app: &Arc<str>, user: &str) -> RoomKey {
        RoomKey {
            app: app.clone(),
            channel: Arc::from(format!("{USER_ROOM_PREFIX}{user}")),
        }
    }

    /// The user whose room this is (the inverse of [`RoomKey::user`]); the
    /// channel as it is for any other room.
    pub fn user_id(&self) -> &str {
        self.channel
            .strip_prefix(USER_ROOM_PREFIX)
            .unwrap_or(&self.channel)
    }
}

/// The answer to a channel query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoomInfo {
    pub subscription_count: usize,
    pub user_count: usize,
}

/// Load shedding asked of a room by the edge that sends the command: the
/// edge knows its load state, the worker only carries it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shed {
    /// Presence rooms with more members than this get no member_added/removed.
    pub member_events_max: Option<usize>,
    /// Re-homing after a worker change: register or unregister without any
    /// event to the socket (it is already subscribed).
    pub silent: bool,
    /// With `silent`: still announce a member the room does not have (an
    /// edge's sockets restored after its lease expired). Without it, a silent
    /// registration announces nothing (a moved room: members are known).
    pub announce: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The owner's mailbox stayed full past the deadline: back off and retry.
    #[error("realtime worker is overloaded")]
    Busy,
    /// The owner went away (shutting down).
    #[error("realtime worker is gone")]
    Gone,
    /// The room's owner cannot be reached from this node now (cluster: its
    /// link is down, or the room is being handed over): retry shortly.
    #[error("the room is unavailable here for a moment")]
    Unavailable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_room_names_its_user_with_the_protocol_prefix() {
        let room = RoomKey::user(&Arc::from("1"), "u-42");
        let prefix = crate::protocol::names::USER_CHANNEL_PREFIX;
        assert_eq!(&*room.channel, format!("{prefix}u-42"));
        assert_eq!(room.user_id(), "u-42");
    }

    #[test]
    fn socket_ids_round_trip() {
        for raw in [0u64, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            let id = ConnId(raw);
            assert_eq!(ConnId::parse(&id.socket_id()), Some(id));
        }
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.b",
            "1.2.3",
            "99999999999.1",
            "4294967296.0",
            "-1.2",
        ] {
            assert_eq!(ConnId::parse(bad), None, "{bad:?}");
        }
    }
}

/// A subscription that opted in to resume (docs/PROTOCOL.md "History and
/// resume"): its channel events carry their serial, and with `since` the
/// owner first replays what followed that position.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    pub since: Option<Position>,
    /// At most this many bytes, and this many events, of replay: what the
    /// socket's queue still has room for (more is answered `recovered: false`).
    pub max_bytes: usize,
    pub max_events: usize,
}

/// Where a client was in a channel: the last serial it saw, in which epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub serial: u64,
    pub epoch: String,
}
