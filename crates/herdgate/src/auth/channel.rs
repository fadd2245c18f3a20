//! Who may join a channel: the pure half of a subscription.
//!
//! Everything a subscription is judged by (the channel's kind, the client's
//! `auth` and `channel_data`, the user the socket signed in as, the app's
//! credentials) comes in as values, and the verdict goes out as one: the
//! member a presence channel is joined as, or the `pusher:subscription_error`
//! to answer. So it is tested without a socket, and the session only
//! carries it out (rate limits, load shedding and routing stay there).

use super::{channel_string, verify_token};
use crate::protocol::names::{self, ChannelKind};
use crate::protocol::ChannelData;
use crate::types::Member;
use std::sync::Arc;

/// A subscription as the client asked for it.
pub struct Request<'a> {
    pub socket_id: &'a str,
    pub channel: &'a str,
    pub kind: ChannelKind,
    /// The client's `auth`: `KEY:HEX`.
    pub auth: Option<&'a str>,
    pub channel_data: Option<&'a str>,
    /// The user the socket signed in as, if it did.
    pub signed_in: Option<&'a str>,
}

/// What the app's config says about it.
pub struct AppKeys<'a> {
    pub id: &'a str,
    pub key: &'a str,
    pub secret: &'a str,
    pub max_user_info_bytes: usize,
    /// The app takes grants (`auth_grants`).
    pub grants: bool,
}

/// A refused subscription: its `pusher:subscription_error` type, message
/// and status.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: &'static str,
    pub message: String,
    pub status: u16,
}

fn refuse(kind: &'static str, message: impl Into<String>, status: u16) -> Refusal {
    Refusal {
        kind,
        message: message.into(),
        status,
    }
}

/// Whether the socket may join: `Ok(Some(member))` for a presence channel,
/// `Ok(None)` for any other it may join.
pub fn authorize(req: &Request<'_>, app: &AppKeys<'_>) -> Result<Option<Member>, Refusal> {
    match req.kind {
        ChannelKind::Public => Ok(None),
        ChannelKind::User => {
            let wanted = &req.channel[names::USER_CHANNEL_PREFIX.len()..];
            if req.signed_in == Some(wanted) {
                Ok(None)
            } else {
                Err(refuse("AuthError", "sign in as this user first", 403))
            }
        }
        ChannelKind::Private | ChannelKind::PrivateEncrypted => {
            check_signature(req, app, None)?;
            Ok(None)
        }
        ChannelKind::Presence => {
            let Some(data) = req.channel_data else {
                return Err(refuse(
                    "AuthError",
                    "presence channels need channel_data",
                    400,
                ));
            };
            check_signature(req, app, Some(data))?;
            member(data, app.max_user_info_bytes).map(Some)
        }
    }
}

/// As [`authorize`], for an `auth` that presents a grant
/// ([`super::grant::is_presentation`]) at `now` (Unix seconds): the member
/// and the grant taken. A grant that is not taken is refused as a bad
/// signature is (the client falls back to the app's endpoint).
pub fn authorize_grant(
    req: &Request<'_>,
    app: &AppKeys<'_>,
    limits: super::grant::Limits,
    now: u64,
    proven: Option<&super::grant::Proven>,
    budget: impl FnOnce() -> bool,
) -> Result<(Option<Member>, super::grant::Grant, super::grant::Proven), Refusal> {
    use super::grant;
    let bad = || refuse("GrantRefused", "grant refused: ask the app's endpoint", 401);
    // Not encrypted channels: their authorization carries the channel's
    // shared secret, which a grant does not.
    let presence = match req.kind {
        ChannelKind::Private => false,
        ChannelKind::Presence => true,
        ChannelKind::PrivateEncrypted | ChannelKind::Public | ChannelKind::User => {
            return Err(bad())
        }
    };
    let (Some(auth), true) = (req.auth, app.grants) else {
        return Err(bad());
    };
    let data = req.channel_data.unwrap_or("");
    if presence && req.channel_data.is_none() {
        return Err(refuse(
            "AuthError",
            "presence channels need channel_data",
            400,
        ));
    }
    let presented = grant::Presented {
        auth,
        kind: grant::Kind::Channel,
        name: req.channel,
        socket_id: req.socket_id,
        data,
    };
    let creds = (app.id, app.key, app.secret);
    let (g, proof) =
        grant::check(creds, &presented, limits, now, proven, budget).map_err(|why| {
            metrics::counter!("herdgate_auth_grants_total", "result" => why.label()).increment(1);
            let status = if why == grant::Refused::Busy {
                503
            } else {
                401
            };
            refuse(
                "GrantRefused",
                format!("grant refused ({}): ask the app's endpoint", why.label()),
                status,
            )
        })?;
    if g.user != req.signed_in.unwrap_or("") {
        metrics::counter!("herdgate_auth_grants_total", "result" => "other_user").increment(1);
        return Err(refuse(
            "GrantRefused",
            "grant refused (other_user): ask the app's endpoint",
            401,
        ));
    }
    let member = if presence {
        Some(member(data, app.max_user_info_bytes)?)
    } else {
        None
    };
    Ok((member, g, proof))
}

fn check_signature(
    req: &Request<'_>,
    app: &AppKeys<'_>,
    data: Option<&str>,
) -> Result<(), Refusal> {
    let signed = channel_string(req.socket_id, req.channel, data);
    let ok = req
        .auth
        .is_some_and(|a| verify_token(app.key, app.secret, &signed, a));
    if ok {
        Ok(())
    } else {
        Err(refuse("AuthError", "invalid signature", 401))
    }
}

/// The member a (signed) `channel_data` names.
fn member(data: &str, max_info: usize) -> Result<Member, Refusal> {
    let cd = serde_json::from_str::<ChannelData>(data)
        .map_err(|e| refuse("InvalidChannelData", format!("channel_data: {e}"), 400))?;
    let user_id = cd.user_id.into_string();
    names::check_user_id(&user_id).map_err(|msg| refuse("InvalidChannelData", msg, 400))?;
    if cd
        .user_info
        .as_ref()
        .is_some_and(|i| i.get().len() > max_info)
    {
        return Err(refuse(
            "InvalidChannelData",
            format!("user_info is larger than {max_info} bytes"),
            400,
        ));
    }
    Ok(Member {
        user_id: Arc::from(user_id),
        user_info: cd.user_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Pusher authentication docs' vectors (the protocol crib): signed
    // by Pusher's own docs, not by this crate.
    const APP: AppKeys<'static> = AppKeys {
        id: "1",
        key: "278d425bdf160c739803",
        secret: "7ad3773142a6692b25b8",
        max_user_info_bytes: 1024,
        grants: false,
    };
    const PRIVATE_SIG: &str = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
    const PRESENCE_DATA: &str = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
    const PRESENCE_SIG: &str = "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80";

    fn req<'a>(channel: &'a str, auth: Option<&'a str>, data: Option<&'a str>) -> Request<'a> {
        Request {
            socket_id: "1234.1234",
            channel,
            kind: names::check_channel(channel).unwrap(),
            auth,
            channel_data: data,
            signed_in: None,
        }
    }

    #[test]
    fn public_channels_need_nothing() {
        assert!(matches!(
            authorize(&req("lobby", None, None), &APP),
            Ok(None)
        ));
    }

    #[test]
    fn a_private_channel_takes_its_signature_and_no_other() {
        let good = format!("{}:{PRIVATE_SIG}", APP.key);
        assert!(matches!(
            authorize(&req("private-foobar", Some(&good), None), &APP),
            Ok(None)
        ));
        for bad in [
            None,
            Some(PRIVATE_SIG.to_string()),        // no key
            Some(format!("other:{PRIVATE_SIG}")), // another key
            Some(format!("{}:{}", APP.key, &PRIVATE_SIG[..63])), // cut
        ] {
            let e = authorize(&req("private-foobar", bad.as_deref(), None), &APP).unwrap_err();
            assert_eq!((e.kind, e.status), ("AuthError", 401), "{bad:?}");
        }
        // Another channel's signature.
        let e = authorize(&req("private-other", Some(&good), None), &APP).unwrap_err();
        assert_eq!(e.status, 401);
    }

    #[test]
    fn a_presence_channel_joins_as_the_signed_member() {
        let auth = format!("{}:{PRESENCE_SIG}", APP.key);
        let m = authorize(
            &req("presence-foobar", Some(&auth), Some(PRESENCE_DATA)),
            &APP,
        )
        .unwrap()
        .unwrap();
        assert_eq!(&*m.user_id, "10");
        assert_eq!(m.user_info.unwrap().get(), r#"{"name":"Mr. Channels"}"#);
        // The data is signed byte for byte: a changed member fails.
        let other = PRESENCE_DATA.replace("10", "11");
        let e = authorize(&req("presence-foobar", Some(&auth), Some(&other)), &APP).unwrap_err();
        assert_eq!(e.status, 401);
        let e = authorize(&req("presence-foobar", Some(&auth), None), &APP).unwrap_err();
        assert_eq!((e.kind, e.status), ("AuthError", 400));
    }

    #[test]
    fn signed_channel_data_is_still_checked() {
        let small = AppKeys {
            max_user_info_bytes: 10,
            ..APP
        };
        let auth = format!("{}:{PRESENCE_SIG}", APP.key);
        let e = authorize(
            &req("presence-foobar", Some(&auth), Some(PRESENCE_DATA)),
            &small,
        )
        .unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str(), e.status),
            (
                "InvalidChannelData",
                "user_info is larger than 10 bytes",
                400
            )
        );
    }

    #[test]
    fn a_user_channel_is_for_the_signed_in_user_only() {
        let mut r = req("#server-to-user-42", None, None);
        assert_eq!(authorize(&r, &APP).unwrap_err().status, 403);
        r.signed_in = Some("41");
        assert_eq!(authorize(&r, &APP).unwrap_err().status, 403);
        r.signed_in = Some("42");
        assert!(matches!(authorize(&r, &APP), Ok(None)));
    }

    /// A grant never authorizes an encrypted channel (its authorization
    /// carries the shared secret), a public one or a user channel, nor
    /// anything when the app hands out no grants: refused before any
    /// decoding or signature check.
    #[test]
    fn grants_take_only_private_and_presence_channels_of_apps_that_hand_them_out() {
        use crate::auth::grant::Limits;
        let on = AppKeys {
            grants: true,
            ..APP
        };
        let limits = Limits {
            ttl: 300,
            max_age: 3600,
        };
        let auth = "hg-grant.v1:AAAA:BBBB";
        for channel in ["private-encrypted-x", "lobby", "#server-to-user-u1"] {
            let r = authorize_grant(
                &req(channel, Some(auth), None),
                &on,
                limits,
                0,
                None,
                || panic!("no signature checked for {channel}"),
            );
            assert_eq!(r.unwrap_err().kind, "GrantRefused", "{channel}");
        }
        let r = authorize_grant(
            &req("private-x", Some(auth), None),
            &APP,
            limits,
            0,
            None,
            || panic!("no signature checked with grants off"),
        );
        assert_eq!(r.unwrap_err().kind, "GrantRefused");
    }
}
