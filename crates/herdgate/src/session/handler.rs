//! What a session does with each client message.
//!
//! Mistakes a client can make get an answer on the socket (`pusher:error` or
//! `pusher:subscription_error`) and the socket stays open; only a bad sign-in
//! closes it (4009), as Pusher does. Each answer is listed in docs/PROTOCOL.md.

use super::{Channel, End, Session};
use crate::auth;
use crate::protocol::{self, codes, names, names::ChannelKind};
use crate::types::{Member, RoomKey, RouteError};
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

type Handled = Result<(), End>;

impl Session {
    pub(super) async fn handle_text(&mut self, text: &str) -> Handled {
        let frame = match protocol::parse_frame(text) {
            Ok(f) => f,
            Err(e) => return self.error(None, &e.to_string()),
        };
        match &*frame.event {
            "pusher:ping" => {
                self.out.push(&protocol::pong());
                Ok(())
            }
            "pusher:pong" => Ok(()),
            "pusher:subscribe" => match protocol::parse_data("pusher:subscribe", frame.data) {
                Ok(d) => self.subscribe(d).await,
                Err(e) => self.error(None, &e.to_string()),
            },
            "pusher:unsubscribe" => {
                match protocol::parse_data::<protocol::UnsubscribeData>(
                    "pusher:unsubscribe",
                    frame.data,
                ) {
                    Ok(d) => self.unsubscribe(&d.channel).await,
                    Err(e) => self.error(None, &e.to_string()),
                }
            }
            "pusher:signin" => match protocol::parse_data("pusher:signin", frame.data) {
                Ok(d) => self.signin(d).await,
                Err(e) => self.error(None, &e.to_string()),
            },
            name if name.starts_with("client-") => {
                let channel = frame.channel.as_deref().unwrap_or("");
                self.client_event(name, channel, frame.data).await
            }
            other => {
                tracing::debug!(event = other, "unknown event from client");
                self.error(None, &format!("unsupported event {:?}", truncate(other)))
            }
        }
    }

    fn error(&self, code: Option<u16>, message: &str) -> Handled {
        self.out.push(&protocol::error(code, message));
        Ok(())
    }

    fn sub_error(&self, channel: &str, kind: &str, message: &str, status: u16) -> Handled {
        tracing::debug!(channel, kind, message, "subscription refused");
        let channel = if channel.len() > names::MAX_CHANNEL_NAME {
            truncate(channel)
        } else {
            channel
        };
        self.out.push(&protocol::subscription_error(
            channel, kind, message, status,
        ));
        Ok(())
    }

    fn subscribed(&self, channel: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| &*c.name == channel)
    }

    async fn subscribe(&mut self, d: protocol::SubscribeData) -> Handled {
        let channel = d.channel.as_str();
        let kind = match names::check_channel(channel) {
            Ok(k) => k,
            Err(msg) => return self.sub_error(channel, "InvalidChannel", &msg, 400),
        };
        if self.subscribed(channel).is_some() {
            tracing::debug!(channel, "already subscribed");
            return Ok(());
        }
        let live = self.shared.live();
        let limits = &live.config.limits;
        if self.channels.len() >= limits.max_channels_per_connection {
            return self.sub_error(
                channel,
                "LimitReached",
                "too many channels on this connection",
                403,
            );
        }
        if live
            .config
            .overload
            .actions
            .refuses_subscription(channel, self.shared.overload.state())
        {
            crate::overload::shed("subscription_refused");
            return self.sub_error(
                channel,
                "OverCapacity",
                "this feature is paused while the server is under load; retry later",
                503,
            );
        }
        let max_members = limits.max_presence_members;
        let app = live.apps.by_key(&self.app.key).unwrap_or(&self.app).clone();
        drop(live);
        let mut member = None;
        match kind {
            ChannelKind::Public => {}
            ChannelKind::User => {
                let wanted = &channel[names::USER_CHANNEL_PREFIX.len()..];
                if self.user.as_deref() != Some(wanted) {
                    return self.sub_error(channel, "AuthError", "sign in as this user first", 403);
                }
            }
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence => {
                let data = if kind == ChannelKind::Presence {
                    match d.channel_data.as_deref() {
                        Some(data) => Some(data),
                        None => {
                            return self.sub_error(
                                channel,
                                "AuthError",
                                "presence channels need channel_data",
                                400,
                            )
                        }
                    }
                } else {
                    None
                };
                let signed = auth::channel_string(&self.socket_id(), channel, data);
                let auth_ok = d
                    .auth
                    .as_deref()
                    .is_some_and(|a| auth::verify_token(&app.key, &app.secret, &signed, a));
                if !auth_ok {
                    return self.sub_error(channel, "AuthError", "invalid signature", 401);
                }
                if let Some(data) = data {
                    match serde_json::from_str::<protocol::ChannelData>(data) {
                        Ok(cd) => {
                            let user_id = cd.user_id.into_string();
                            if let Err(msg) = names::check_user_id(&user_id) {
                                return self.sub_error(channel, "InvalidChannelData", &msg, 400);
                            }
                            member = Some(Member {
                                user_id: Arc::from(user_id),
                                user_info: cd.user_info,
                            });
                        }
                        Err(e) => {
                            return self.sub_error(
                                channel,
                                "InvalidChannelData",
                                &format!("channel_data: {e}"),
                                400,
                            )
                        }
                    }
                }
            }
        }
        let name: Arc<str> = Arc::from(channel);
        let user = member.as_ref().map(|m| m.user_id.clone());
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: name.clone(),
        };
        match self
            .shared
            .router
            .subscribe(room, self.subscriber(), member, max_members, self.shed())
            .await
        {
            Ok(true) => {
                self.channels.push(Channel { name, kind, user });
                Ok(())
            }
            // Refused by the room (its subscription_error is queued): the
            // socket is not subscribed, so it is not recorded here either.
            Ok(false) => Ok(()),
            Err(RouteError::Unavailable) => self.sub_error(
                channel,
                "Unavailable",
                "the room is moving or unavailable; retry in a moment",
                503,
            ),
            Err(_) => Err(End::shutdown()),
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> Handled {
        let Some(pos) = self.channels.iter().position(|c| &*c.name == channel) else {
            return Ok(());
        };
        let ch = self.channels.swap_remove(pos);
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: ch.name,
        };
        let _ = self
            .shared
            .router
            .unsubscribe(room, self.id, self.shed())
            .await;
        Ok(())
    }

    async fn signin(&mut self, d: protocol::SigninData) -> Handled {
        let signed = auth::signin_string(&self.socket_id(), &d.user_data);
        let app = self.current_app();
        if !auth::verify_token(&app.key, &app.secret, &signed, &d.auth) {
            self.out.push(&protocol::error(
                Some(codes::UNAUTHORIZED),
                "invalid sign-in signature",
            ));
            return Err(End::close(
                codes::UNAUTHORIZED,
                "invalid sign-in signature",
                "signin_failed",
            ));
        }
        let id = match serde_json::from_str::<protocol::UserData>(&d.user_data) {
            Ok(u) => u.id.into_string(),
            Err(e) => {
                return self.error(
                    None,
                    &format!("user_data must be a JSON object with an \"id\": {e}"),
                )
            }
        };
        if let Err(msg) = names::check_user_id(&id) {
            return self.error(None, &msg);
        }
        let router = &self.shared.router;
        if let Some(old) = self.user.take() {
            let _ = router.sign_out(&self.app.id, &old, self.id).await;
        }
        match router.sign_in(&self.app.id, &id, self.subscriber()).await {
            Ok(()) => {}
            Err(RouteError::Unavailable) => {
                return self.error(
                    None,
                    "sign-in is unavailable for a moment (the user's room is moving); retry",
                )
            }
            Err(_) => return Err(End::shutdown()),
        }
        self.user = Some(Arc::from(id));
        self.out.push(&protocol::signin_success(&d.user_data));
        Ok(())
    }

    async fn client_event(
        &mut self,
        event: &str,
        channel: &str,
        data: Option<&RawValue>,
    ) -> Handled {
        let live = self.shared.live();
        let app = live.apps.by_key(&self.app.key).unwrap_or(&self.app);
        if !app.enable_client_events {
            return self.error(None, "client events are disabled for this app");
        }
        if let Err(msg) = names::check_event_name(event) {
            return self.error(None, &msg);
        }
        let Some(ch) = self.subscribed(channel) else {
            return self.error(
                None,
                "client events need a channel this socket is subscribed to",
            );
        };
        if !ch.kind.allows_client_events() {
            return self.error(
                None,
                "client events are only allowed on private and presence channels",
            );
        }
        let (name, user) = (ch.name.clone(), ch.user.clone());
        let limits = &live.config.limits;
        let data = data.unwrap_or_else(|| <&RawValue>::from(&*EMPTY_OBJECT));
        if data.get().len() > limits.max_payload_bytes {
            return self.error(None, "event data is larger than the payload limit");
        }
        // Load shedding first: degraded nodes drop client events, pressured
        // ones halve their rate (each event costs two tokens).
        let state = self.shared.overload.state();
        let actions = &live.config.overload.actions;
        if actions.drop_client_events.applies(state) {
            crate::overload::shed("client_event_dropped");
            return self.error(
                Some(codes::CLIENT_EVENT_RATE_LIMIT),
                "client events are paused while the server is under load",
            );
        }
        let cost = if actions.limit_client_events.applies(state) {
            2
        } else {
            1
        };
        let now = Instant::now();
        let rate = limits.client_events_per_second;
        let bucket = self
            .limiter
            .get_or_insert_with(|| super::ratelimit::TokenBucket::new(rate, rate, now));
        if !(0..cost).all(|_| bucket.try_take(now)) {
            metrics::counter!("herdgate_client_events_dropped_total", "reason" => "rate_limit")
                .increment(1);
            return self.error(
                Some(codes::CLIENT_EVENT_RATE_LIMIT),
                "client event rate limit exceeded",
            );
        }
        let frame = protocol::client_event(event, &name, data, user.as_deref());
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: name,
        };
        metrics::counter!("herdgate_client_events_total").increment(1);
        if self
            .shared
            .router
            .client_event(room, frame, self.id)
            .await
            .is_err()
        {
            return Err(End::shutdown());
        }
        Ok(())
    }
}

static EMPTY_OBJECT: std::sync::LazyLock<Box<RawValue>> =
    std::sync::LazyLock::new(|| RawValue::from_string("{}".into()).expect("valid JSON"));

/// Echo at most a short prefix of client-chosen text back in errors and logs.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
