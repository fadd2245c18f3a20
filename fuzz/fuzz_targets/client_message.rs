//! A text frame from a client socket, through everything the session does with
//! it before any I/O: frame parsing, `data` decoding for each pusher:* event,
//! presence `channel_data` / sign-in `user_data`, name checks, socket ids and
//! `KEY:HEXSIG` auth tokens. tungstenite only hands over valid UTF-8, so other
//! inputs are skipped.
#![no_main]

use herdgate::auth;
use herdgate::protocol::{
    self, names, ChannelData, SigninData, SubscribeData, UnsubscribeData, UserData,
};
use herdgate::types::ConnId;
use libfuzzer_sys::fuzz_target;

const KEY: &str = "278d425bdf160c739803";
const SECRET: &str = "7ad3773142a6692b25b8";

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    names_and_ids(text);
    channel_data(text);
    user_data(text);

    let Ok(frame) = protocol::parse_frame(text) else {
        return;
    };
    names_and_ids(&frame.event);
    if let Some(channel) = frame.channel.as_deref() {
        names_and_ids(channel);
    }
    // Every decoder on every frame, whatever its event: keeps coverage from
    // hinging on the fuzzer spelling "pusher:subscribe" first.
    if let Ok(d) = protocol::parse_data::<SubscribeData>("pusher:subscribe", frame.data) {
        names_and_ids(&d.channel);
        let data = d.channel_data.as_deref();
        if let Some(data) = data {
            channel_data(data);
        }
        if let Some(a) = d.auth.as_deref() {
            let signed = auth::channel_string("1234.1234", &d.channel, data);
            let _ = auth::verify_token(KEY, SECRET, &signed, a);
        }
    }
    if let Ok(d) = protocol::parse_data::<UnsubscribeData>("pusher:unsubscribe", frame.data) {
        names_and_ids(&d.channel);
    }
    if let Ok(d) = protocol::parse_data::<SigninData>("pusher:signin", frame.data) {
        user_data(&d.user_data);
        let signed = auth::signin_string("1234.1234", &d.user_data);
        let _ = auth::verify_token(KEY, SECRET, &signed, &d.auth);
    }
});

fn channel_data(s: &str) {
    if let Ok(cd) = serde_json::from_str::<ChannelData>(s) {
        user_id(cd.user_id.into_string());
        if let Some(info) = cd.user_info {
            let _ = info.get().len();
        }
    }
}

fn user_data(s: &str) {
    if let Ok(u) = serde_json::from_str::<UserData>(s) {
        user_id(u.id.into_string());
    }
}

fn user_id(id: String) {
    if names::check_user_id(&id).is_ok() {
        assert!(!id.is_empty() && id.len() <= names::MAX_USER_ID);
        // A valid user id must make a valid user channel unless it is too long.
        let channel = format!("{}{id}", names::USER_CHANNEL_PREFIX);
        if channel.len() <= names::MAX_CHANNEL_NAME {
            assert_eq!(
                names::check_channel(&channel),
                Ok(names::ChannelKind::User),
                "{channel:?}"
            );
        }
    }
}

fn names_and_ids(s: &str) {
    if let Ok(kind) = names::check_channel(s) {
        assert!(!s.is_empty() && s.len() <= names::MAX_CHANNEL_NAME);
        assert_eq!(kind.needs_auth(), names::ChannelKind::of(s).needs_auth());
    }
    if names::check_event_name(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= names::MAX_EVENT_NAME);
    }
    let _ = names::check_user_id(s);
    if let Some(id) = ConnId::parse(s) {
        // What we parse we can print and parse back to the same id.
        assert_eq!(ConnId::parse(&id.socket_id()), Some(id), "{s:?}");
    }
}
