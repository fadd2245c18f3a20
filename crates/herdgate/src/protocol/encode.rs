//! Server → client frames, encoded once.
//!
//! A [`Frame`] is the JSON text of one websocket message in shared,
//! reference-counted bytes: cloning it for the 10,000th subscriber costs an
//! atomic increment, not an allocation.

use super::deflate::{self, Deflate};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::{Arc, OnceLock};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One server message: its JSON text, shared, and — made by the first
/// socket that wants it, then shared too — its permessage-deflate form.
///
/// A room's event is one `Frame` for all its subscribers, so it is
/// compressed at most once however many sockets negotiated compression
/// (see [`deflate`]). Cloning is one atomic increment.
#[derive(Clone)]
pub struct Frame(Arc<Encoded>);

struct Encoded {
    text: Utf8Bytes,
    /// Set once a socket with compression asked: the compressed payload,
    /// or `None` when compressing did not make it smaller.
    deflated: OnceLock<Option<Bytes>>,
    /// A moderator's removal notice ([`removed`]): the session forgets the
    /// channel once, when it first meets the notice (`claimed`). Only the
    /// room's owner makes one, one per socket.
    removes: bool,
    claimed: std::sync::atomic::AtomicBool,
}

/// RSV1: set on the first frame of a compressed message (RFC 7692 §6).
pub const RSV1: u8 = 0x40;

impl Frame {
    fn new(text: Utf8Bytes) -> Frame {
        Frame(Arc::new(Encoded {
            text,
            deflated: OnceLock::new(),
            removes: false,
            claimed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// `text` as a removal notice (see [`removed`]): the cluster link
    /// carries the notice's text in a message of its own.
    pub fn removal(text: Bytes) -> Result<Frame, std::str::Utf8Error> {
        Ok(Frame(Arc::new(Encoded {
            text: Utf8Bytes::try_from(text)?,
            deflated: OnceLock::new(),
            removes: true,
            claimed: std::sync::atomic::AtomicBool::new(false),
        })))
    }

    /// Made by [`removed`] (or [`Frame::removal`]): the socket no longer
    /// holds the channel it names.
    pub fn removes(&self) -> bool {
        self.0.removes
    }

    pub fn from_static(s: &'static str) -> Frame {
        Frame::new(Utf8Bytes::from_static(s))
    }

    pub fn as_str(&self) -> &str {
        self.0.text.as_str()
    }

    /// The text as a websocket library's message payload.
    pub fn text(&self) -> &Utf8Bytes {
        &self.0.text
    }

    /// What goes on the wire for a socket with `deflate` (negotiated, with
    /// the node's settings) or without: the bits to add to the first header
    /// byte ([`RSV1`] or 0) and the payload. The same for every call on the
    /// same frame and settings, so a write cut short resumes where it was.
    pub fn wire(&self, deflate: Option<Deflate>) -> (u8, &[u8]) {
        let text = self.0.text.as_bytes();
        match deflate {
            Some(d) if text.len() >= d.min_bytes() as usize => {
                match self
                    .0
                    .deflated
                    .get_or_init(|| deflate::compress(text, d.level()))
                {
                    Some(z) => (RSV1, z),
                    None => (0, text),
                }
            }
            _ => (0, text),
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Frame {
        Frame::new(Utf8Bytes::from(s))
    }
}

impl From<&str> for Frame {
    fn from(s: &str) -> Frame {
        Frame::new(Utf8Bytes::from(s))
    }
}

/// The text, shared (for the cluster link, which carries text only).
impl From<Frame> for Bytes {
    fn from(f: Frame) -> Bytes {
        Bytes::from(f.0.text.clone())
    }
}

impl TryFrom<Bytes> for Frame {
    type Error = std::str::Utf8Error;
    fn try_from(b: Bytes) -> Result<Frame, Self::Error> {
        Utf8Bytes::try_from(b).map(Frame::new)
    }
}

#[derive(Serialize)]
struct Out<'a, D: Serialize + ?Sized> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: &'a D,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

fn frame<D: Serialize + ?Sized>(
    event: &str,
    channel: Option<&str>,
    data: &D,
    user_id: Option<&str>,
) -> Frame {
    let text = serde_json::to_string(&Out {
        event,
        channel,
        data,
        user_id,
    })
    .expect("serializing strings and raw JSON cannot fail");
    Frame::from(text)
}

/// An event whose `data` is a string (HTTP API publishes and all server
/// events carry `data` as a JSON-encoded string).
pub fn event(event: &str, channel: Option<&str>, data: &str) -> Frame {
    frame(event, channel, data, None)
}

/// A client event, forwarded with its `data` exactly as the client sent it;
/// on presence channels it carries the sender's `user_id`.
pub fn client_event(event: &str, channel: &str, data: &RawValue, user_id: Option<&str>) -> Frame {
    frame(event, Some(channel), data, user_id)
}

/// `data` is a JSON value encoded into a string, as Pusher does for its own events.
fn internal<T: Serialize>(name: &str, channel: Option<&str>, data: &T) -> Frame {
    let inner = serde_json::to_string(data).expect("serializable");
    event(name, channel, &inner)
}

pub fn connection_established(socket_id: &str, activity_timeout_secs: u64) -> Frame {
    #[derive(Serialize)]
    struct D<'a> {
        socket_id: &'a str,
        activity_timeout: u64,
    }
    internal(
        "pusher:connection_established",
        None,
        &D {
            socket_id,
            activity_timeout: activity_timeout_secs,
        },
    )
}

/// `pusher:error`; `code` is `None` for errors Pusher reports without one.
pub fn error(code: Option<u16>, message: &str) -> Frame {
    #[derive(Serialize)]
    struct D<'a> {
        code: Option<u16>,
        message: &'a str,
    }
    internal("pusher:error", None, &D { code, message })
}

/// `frame` (a JSON object) with `"serial":N` added at its end: what a
/// socket that opted in to resume gets instead of the shared frame.
pub fn with_serial(frame: &Frame, serial: u64) -> Frame {
    splice(frame, &format!(",\"serial\":{serial}"))
}

/// A subscription answer with the position of a socket that opted in to
/// resume: `"epoch"` and `"serial"` added at its end.
pub fn with_position(frame: &Frame, epoch: &str, serial: u64) -> Frame {
    let epoch = serde_json::to_string(epoch).expect("a string");
    splice(frame, &format!(",\"epoch\":{epoch},\"serial\":{serial}"))
}

fn splice(frame: &Frame, extra: &str) -> Frame {
    let text = frame.as_str();
    let body = text.strip_suffix('}').unwrap_or(text);
    let mut out = String::with_capacity(text.len() + extra.len());
    out.push_str(body);
    out.push_str(extra);
    out.push('}');
    Frame::from(out)
}

/// `herdgate:resumed` on a channel, after the replay of a resume: whether
/// nothing was missed, and the position from which the socket goes on.
pub fn resumed(channel: &str, recovered: bool, epoch: &str, serial: u64) -> Frame {
    #[derive(Serialize)]
    struct D<'a> {
        recovered: bool,
        epoch: &'a str,
        serial: u64,
    }
    internal(
        "herdgate:resumed",
        Some(channel),
        &D {
            recovered,
            epoch,
            serial,
        },
    )
}

/// `herdgate:grant`, on the connection (not the channel: an encrypted
/// channel would take it for ciphertext): the grant the client may present
/// for `channel` on a later connection, when it expires (Unix seconds) and
/// its seconds to live (the client's clock may differ).
pub fn grant(channel: &str, grant: &str, expires: u64, ttl: u64) -> Frame {
    grant_frame(GrantData {
        channel: Some(channel),
        given: Some((grant, expires, ttl)),
        ..GrantData::default()
    })
}

/// `herdgate:grant` for a sign-in: `{"signin": true, grant, expires, ttl}`.
pub fn signin_grant(grant: &str, expires: u64, ttl: u64) -> Frame {
    grant_frame(GrantData {
        signin: true,
        given: Some((grant, expires, ttl)),
        ..GrantData::default()
    })
}

/// A sign-in grant not taken (or not renewed): `{"signin": true, refused}`.
pub fn signin_grant_refused(refused: &str) -> Frame {
    grant_frame(GrantData {
        signin: true,
        refused: Some(refused),
        ..GrantData::default()
    })
}

/// `herdgate:grant` refusing to renew `channel`'s grant, and why:
/// `{channel, refused}`.
pub fn grant_refused(channel: &str, refused: &str) -> Frame {
    grant_frame(GrantData {
        channel: Some(channel),
        refused: Some(refused),
        ..GrantData::default()
    })
}

/// The data of every `herdgate:grant`: for the sign-in or a channel, a
/// grant given (`grant`, `expires`, `ttl`) or `refused`.
#[derive(Default)]
struct GrantData<'a> {
    signin: bool,
    channel: Option<&'a str>,
    given: Option<(&'a str, u64, u64)>,
    refused: Option<&'a str>,
}

fn grant_frame(d: GrantData<'_>) -> Frame {
    #[derive(Serialize)]
    struct D<'a> {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        signin: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        grant: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ttl: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        refused: Option<&'a str>,
    }
    internal(
        "herdgate:grant",
        None,
        &D {
            signin: d.signin,
            channel: d.channel,
            grant: d.given.map(|g| g.0),
            expires: d.given.map(|g| g.1),
            ttl: d.given.map(|g| g.2),
            refused: d.refused,
        },
    )
}

pub fn pong() -> Frame {
    Frame::from_static(r#"{"event":"pusher:pong","data":"{}"}"#)
}

pub fn ping() -> Frame {
    Frame::from_static(r#"{"event":"pusher:ping","data":"{}"}"#)
}

pub fn subscription_succeeded(channel: &str) -> Frame {
    event(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        "{}",
    )
}

/// Presence members as sent in `subscription_succeeded`.
/// `pusher_internal:subscription_succeeded` of a presence channel: `count`
/// is the number of `members` listed, unless given (a big room lists some).
pub fn presence_subscription_succeeded<'a, I>(
    channel: &str,
    count: Option<usize>,
    members: I,
) -> Frame
where
    I: IntoIterator<Item = (&'a str, Option<&'a RawValue>)>,
{
    let null = RawValue::from_string("null".into()).expect("valid");
    let mut ids = Vec::new();
    let mut hash = serde_json::Map::new();
    for (id, info) in members {
        ids.push(id);
        let info: serde_json::Value =
            serde_json::from_str(info.unwrap_or(&null).get()).unwrap_or_default();
        hash.insert(id.to_string(), info);
    }
    let count = count.unwrap_or(ids.len());
    let data = serde_json::json!({"presence": {"count": count, "ids": ids, "hash": hash}});
    internal(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        &data,
    )
}

pub fn member_added(channel: &str, user_id: &str, user_info: Option<&RawValue>) -> Frame {
    #[derive(Serialize)]
    struct D<'a> {
        user_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_info: Option<&'a RawValue>,
    }
    internal(
        "pusher_internal:member_added",
        Some(channel),
        &D { user_id, user_info },
    )
}

/// `herdgate:presence_count` `{count}` on a big presence channel: the
/// number of members now (pusher-js emits it on the channel; the
/// `herdgate-presence` plugin sets `members.count` from it).
pub fn presence_count(channel: &str, count: usize) -> Frame {
    internal(
        "herdgate:presence_count",
        Some(channel),
        &serde_json::json!({ "count": count }),
    )
}

pub fn member_removed(channel: &str, user_id: &str) -> Frame {
    internal(
        "pusher_internal:member_removed",
        Some(channel),
        &serde_json::json!({ "user_id": user_id }),
    )
}

/// `pusher:subscription_error` on the channel, in the shape pusher-js passes
/// to `channel.bind('pusher:subscription_error', …)`.
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> Frame {
    internal(
        "pusher:subscription_error",
        Some(channel),
        &serde_json::json!({ "type": kind, "error": message, "status": status }),
    )
}

/// A moderator took the socket out of `channel` (docs/PROTOCOL.md
/// "Moderation"): `pusher:subscription_error` of type `Removed`, which
/// pusher-js emits on the channel; `ban_seconds` > 0 when it may not come
/// back for that long. Marked: the session forgets the channel as it
/// writes it.
pub fn removed(channel: &str, ban_seconds: u32) -> Frame {
    let f = internal(
        "pusher:subscription_error",
        Some(channel),
        &serde_json::json!({
            "type": "Removed",
            "error": "removed from the channel by a moderator",
            "status": 403,
            "ban_seconds": ban_seconds,
        }),
    );
    Frame::removal(Bytes::from(f)).expect("JSON is UTF-8")
}

/// A subscription refused because the user is banned from the channel for
/// `retry_after` more seconds.
pub fn banned(channel: &str, retry_after: u64) -> Frame {
    internal(
        "pusher:subscription_error",
        Some(channel),
        &serde_json::json!({
            "type": "Banned",
            "error": "banned from the channel by a moderator",
            "status": 403,
            "retry_after": retry_after,
        }),
    )
}

/// The channel a removal notice names, the first time it is asked (then
/// `None`): the session forgets that channel exactly once, whether it meets
/// the notice in its queue before a client message or as it writes it.
pub fn claim_removed_channel(frame: &Frame) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Notice {
        channel: String,
    }
    let first = frame.removes()
        && !frame
            .0
            .claimed
            .swap(true, std::sync::atomic::Ordering::AcqRel);
    first
        .then(|| serde_json::from_str::<Notice>(frame.as_str()).ok())
        .flatten()
        .map(|n| n.channel)
}

pub fn signin_success(user_data: &str) -> Frame {
    internal(
        "pusher:signin_success",
        None,
        &serde_json::json!({ "user_data": user_data }),
    )
}

/// `pusher:cache_miss`: a cache channel with nothing cached (pusher-js
/// emits it as a channel event).
pub fn cache_miss(channel: &str) -> Frame {
    frame("pusher:cache_miss", Some(channel), "{}", None)
}

/// `pusher_internal:subscription_count` (pusher-js sets
/// `channel.subscriptionCount` and emits `pusher:subscription_count`).
pub fn subscription_count(channel: &str, count: usize) -> Frame {
    internal(
        "pusher_internal:subscription_count",
        Some(channel),
        &serde_json::json!({ "subscription_count": count }),
    )
}

/// `pusher_internal:watchlist_events`: who of a signed-in user's watchlist
/// is online or offline (pusher-js: `pusher.user.watchlist.bind(...)`).
pub fn watchlist_events(online: &[&str], offline: &[&str]) -> Frame {
    let mut events = Vec::new();
    if !online.is_empty() {
        events.push(serde_json::json!({"name": "online", "user_ids": online}));
    }
    if !offline.is_empty() {
        events.push(serde_json::json!({"name": "offline", "user_ids": offline}));
    }
    internal(
        "pusher_internal:watchlist_events",
        None,
        &serde_json::json!({ "events": events }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The four `herdgate:grant` shapes the plugin reads (docs/PROTOCOL.md
    /// "Auth grants"), byte for byte.
    #[test]
    fn grant_frames_have_their_documented_shapes() {
        let data = |f: Frame| {
            let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
            assert_eq!(v["event"], "herdgate:grant");
            v["data"].as_str().unwrap().to_string()
        };
        assert_eq!(
            data(grant("private-a", "g", 10, 5)),
            r#"{"channel":"private-a","grant":"g","expires":10,"ttl":5}"#
        );
        assert_eq!(
            data(signin_grant("g", 10, 5)),
            r#"{"signin":true,"grant":"g","expires":10,"ttl":5}"#
        );
        assert_eq!(
            data(grant_refused("private-a", "revoked")),
            r#"{"channel":"private-a","refused":"revoked"}"#
        );
        assert_eq!(
            data(signin_grant_refused("revoked")),
            r#"{"signin":true,"refused":"revoked"}"#
        );
    }

    #[test]
    fn parity_events_have_pusher_js_shapes() {
        let v: serde_json::Value =
            serde_json::from_str(subscription_count("c", 7).as_str()).unwrap();
        assert_eq!(v["event"], "pusher_internal:subscription_count");
        assert_eq!(v["data"], r#"{"subscription_count":7}"#);
        let v: serde_json::Value =
            serde_json::from_str(watchlist_events(&["a"], &["b", "c"]).as_str()).unwrap();
        assert!(v.get("channel").is_none(), "a connection-level event");
        let d: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            d,
            serde_json::json!({"events":[{"name":"online","user_ids":["a"]},{"name":"offline","user_ids":["b","c"]}]})
        );
        assert_eq!(
            cache_miss("cache-x").as_str(),
            r#"{"event":"pusher:cache_miss","channel":"cache-x","data":"{}"}"#
        );
    }

    #[test]
    fn server_events_carry_string_data() {
        let f = connection_established("1.2", 120);
        assert_eq!(
            f.as_str(),
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(error(Some(4301), "slow down").as_str()).unwrap();
        let inner: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(inner["code"], 4301);
    }

    #[test]
    fn presence_succeeded_shape() {
        let info = RawValue::from_string(r#"{"name":"A"}"#.into()).unwrap();
        let f =
            presence_subscription_succeeded("presence-x", None, [("1", Some(&*info)), ("2", None)]);
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        let d: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(d["presence"]["count"], 2);
        assert_eq!(d["presence"]["ids"], serde_json::json!(["1", "2"]));
        assert_eq!(d["presence"]["hash"]["1"]["name"], "A");
    }

    #[test]
    fn client_event_keeps_raw_data_and_user_id() {
        let raw = RawValue::from_string(r#"{"typing":true}"#.into()).unwrap();
        let f = client_event("client-t", "presence-x", &raw, Some("7"));
        assert_eq!(
            f.as_str(),
            r#"{"event":"client-t","channel":"presence-x","data":{"typing":true},"user_id":"7"}"#
        );
    }
}
