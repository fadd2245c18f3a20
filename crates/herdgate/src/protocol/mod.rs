//! Pusher Channels protocol v7: what clients send, what the server sends back.
//!
//! Parsing borrows from the frame and leaves event `data` as raw JSON, so a
//! client event is forwarded without being decoded and re-encoded. Server
//! frames are encoded once into shared bytes (see [`Frame`]) and the same
//! bytes go to every subscriber.

pub mod codes;
pub mod deflate;
mod encode;
pub mod names;
pub mod wsframe;

pub use encode::*;

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A frame as sent by a client: `{"event":…, "channel"?:…, "data"?:…}`.
#[derive(Debug, Deserialize)]
pub struct ClientFrame<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// `pusher:subscribe` data.
#[derive(Debug, Deserialize)]
pub struct SubscribeData {
    pub channel: String,
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub channel_data: Option<String>,
    /// herdgate's resume extension (docs/PROTOCOL.md "History and resume"):
    /// `{}` opts in, `{"serial":N,"epoch":"…"}` also asks for what followed.
    #[serde(default)]
    pub resume: Option<ResumeData>,
    /// herdgate's auth grants (docs/PROTOCOL.md "Auth grants"): the
    /// client's public key, asking for a grant if the app hands them out.
    #[serde(default)]
    pub grant: Option<GrantOffer>,
}

/// The `grant` of a `pusher:subscribe` or `pusher:signin`.
#[derive(Debug, Default, Deserialize)]
pub struct GrantOffer {
    /// base64url of an uncompressed P-256 point.
    #[serde(default)]
    pub key: String,
}

/// The `resume` of a `pusher:subscribe`.
#[derive(Debug, Default, Deserialize)]
pub struct ResumeData {
    #[serde(default)]
    pub serial: Option<u64>,
    #[serde(default)]
    pub epoch: Option<String>,
}

/// `pusher:unsubscribe` data.
#[derive(Debug, Deserialize)]
pub struct UnsubscribeData {
    pub channel: String,
}

/// `pusher:signin` data.
#[derive(Debug, Deserialize)]
pub struct SigninData {
    pub auth: String,
    pub user_data: String,
    /// herdgate extension: the key a sign-in grant should name
    /// (docs/PROTOCOL.md "Auth grants").
    #[serde(default)]
    pub grant: Option<GrantOffer>,
}

/// The parsed `channel_data` of a presence subscription.
#[derive(Debug, Deserialize)]
pub struct ChannelData {
    pub user_id: UserId,
    #[serde(default)]
    pub user_info: Option<Box<RawValue>>,
}

/// The parsed `user_data` of a sign-in: its `id`, and the `watchlist` of
/// user ids whose online status it is told.
#[derive(Debug, Deserialize)]
pub struct UserData {
    pub id: UserId,
    #[serde(default)]
    pub watchlist: Option<Vec<UserId>>,
}

/// Pusher accepts numeric user ids and sends them back as strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UserId {
    Str(String),
    Num(serde_json::Number),
}

impl UserId {
    /// The id as a string. A number that is not an integer (including
    /// integers too large for 64 bits, which JSON parsing turns into lossy
    /// floats that could make distinct ids collide) gives an empty string,
    /// which `names::check_user_id` refuses.
    pub fn into_string(self) -> String {
        match self {
            UserId::Str(s) => s,
            UserId::Num(n) if n.is_i64() || n.is_u64() => n.to_string(),
            UserId::Num(_) => String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("message is not a JSON object with an \"event\" string: {0}")]
    Malformed(String),
    #[error("\"data\" of {0} is missing or has the wrong shape: {1}")]
    BadData(&'static str, String),
}

/// Parse a client frame. Only a JSON object is a frame (serde would also
/// read a struct from an array), and errors never echo the client's input
/// back at length.
pub fn parse_frame(text: &str) -> Result<ClientFrame<'_>, ParseError> {
    if !text.trim_start().starts_with('{') {
        return Err(ParseError::Malformed("not a JSON object".into()));
    }
    serde_json::from_str(text).map_err(|e| ParseError::Malformed(short(&e)))
}

/// A serde error without the (client-chosen, possibly huge) value it quotes.
fn short(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let mut end = s.len().min(160);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Decode `data` into `T`, accepting both an object and a JSON-encoded string
/// holding an object (older clients send the latter).
pub fn parse_data<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    data: Option<&RawValue>,
) -> Result<T, ParseError> {
    let raw = data.ok_or_else(|| ParseError::BadData(what, "missing".into()))?;
    let text = raw.get();
    let inner;
    let object = if text.starts_with('"') {
        inner = serde_json::from_str::<String>(text)
            .map_err(|e| ParseError::BadData(what, short(&e)))?;
        inner.as_str()
    } else {
        text
    };
    if !object.trim_start().starts_with('{') {
        return Err(ParseError::BadData(what, "not a JSON object".into()));
    }
    serde_json::from_str(object).map_err(|e| ParseError::BadData(what, short(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subscribe_with_object_and_string_data() {
        let f = parse_frame(r#"{"event":"pusher:subscribe","data":{"channel":"a","auth":"k:s"}}"#)
            .unwrap();
        let d: SubscribeData = parse_data("pusher:subscribe", f.data).unwrap();
        assert_eq!(d.channel, "a");
        assert_eq!(d.auth.as_deref(), Some("k:s"));

        let f =
            parse_frame(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"b\"}"}"#).unwrap();
        let d: SubscribeData = parse_data("pusher:subscribe", f.data).unwrap();
        assert_eq!(d.channel, "b");
    }

    #[test]
    fn rejects_malformed_frames() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"event":1}"#,
            "nul",
            r#"{"event":"x","channel":5}"#,
        ] {
            assert!(parse_frame(bad).is_err(), "{bad:?} should not parse");
        }
        let f = parse_frame(r#"{"event":"pusher:subscribe","data":7}"#).unwrap();
        assert!(parse_data::<SubscribeData>("pusher:subscribe", f.data).is_err());
        let f = parse_frame(r#"{"event":"pusher:subscribe"}"#).unwrap();
        assert!(parse_data::<SubscribeData>("pusher:subscribe", f.data).is_err());
        let f = parse_frame(r#"{"event":"pusher:subscribe","data":["a"]}"#).unwrap();
        assert!(
            parse_data::<SubscribeData>("pusher:subscribe", f.data).is_err(),
            "arrays are not objects"
        );
        let long = format!(r#"{{"event":"{}"#, "x".repeat(30_000));
        assert!(
            parse_frame(&long).unwrap_err().to_string().len() < 300,
            "errors do not echo input"
        );
    }

    #[test]
    fn user_ids_may_be_numbers() {
        let c: ChannelData = serde_json::from_str(r#"{"user_id":10,"user_info":{"a":1}}"#).unwrap();
        assert_eq!(c.user_id.into_string(), "10");
        assert_eq!(c.user_info.unwrap().get(), r#"{"a":1}"#);
        let c: ChannelData =
            serde_json::from_str(r#"{"user_id":123456789012345678901234567890}"#).unwrap();
        assert!(
            names::check_user_id(&c.user_id.into_string()).is_err(),
            "no lossy float ids"
        );
    }
}
