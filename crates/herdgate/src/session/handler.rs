//! What a session does with each client message.
//!
//! Mistakes a client can make get an answer on the socket (`pusher:error` or
//! `pusher:subscription_error`) and the socket stays open; only a bad sign-in
//! closes it (4009), as Pusher does. Each answer is listed in docs/PROTOCOL.md.

use super::{Channel, End, Session};
use crate::auth;
use crate::op::{Join, Tell};
use crate::protocol::{self, codes, names, names::ChannelKind};
use crate::types::{RoomKey, RouteError};
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

type Handled = Result<(), End>;

impl Session {
    pub(super) async fn handle_text(&mut self, text: &str) -> Handled {
        // A moderator's removal queued and not yet written: forgotten now,
        // so an unsubscribe and subscribe racing it meet the owner's truth.
        for name in self.out.claim_queued_removals() {
            self.channels.retain(|c| *c.name != *name);
        }
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
            "herdgate:grant" => match protocol::parse_data("herdgate:grant", frame.data) {
                Ok(r) => self.renew_grant(r).await,
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
        tracing::debug!(
            channel = truncate(channel),
            kind,
            message,
            "subscription refused"
        );
        // The channel as the client wrote it, however long (its message is
        // capped by `limits.max_message_bytes`): pusher-js finds the
        // pending channel by its exact name, and a cut name would leave it
        // pending for ever.
        self.out.push(&protocol::subscription_error(
            channel, kind, message, status,
        ));
        Ok(())
    }

    /// Spend one channel-operation token (a subscribe or a sign-in); `false`
    /// when the socket is over `limits.channel_ops_per_second` (burst
    /// `channel_ops_burst`, at least `max_channels_per_connection` + 2).
    pub(super) fn channel_op(&mut self, op: &'static str) -> bool {
        let now = Instant::now();
        let ok = match &mut self.ops {
            Some(b) => b.try_take(now),
            None => {
                let live = self.ctx.node.live();
                let mut b = crate::ratelimit::TokenBucket::new(
                    live.config.limits.channel_ops_per_second,
                    live.config.channel_ops_burst(),
                    now,
                );
                let ok = b.try_take(now);
                self.ops = Some(b);
                ok
            }
        };
        if !ok {
            metrics::counter!("herdgate_channel_ops_refused_total", "op" => op).increment(1);
        }
        ok
    }

    pub(super) fn subscribed(&self, channel: &str) -> Option<&Channel> {
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
        if !self.channel_op("subscribe") {
            return self.sub_error(
                channel,
                "LimitReached",
                "too many subscriptions per second on this connection; retry later",
                429,
            );
        }
        let live = self.ctx.node.live();
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
            .refuses_subscription(channel, self.ctx.node.overload.state())
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
        // Replayed events go into the socket's queue at once: within half
        // of the room it has left now (a reconnect resubscribes every
        // channel in a row, and each replay lands before the next
        // subscription is sent), so a replay never overflows it.
        let resume = (d.resume.is_some() || self.resume_all).then(|| {
            let r = d.resume.unwrap_or_default();
            let (frames, bytes) = self.out.room();
            crate::types::Resume {
                since: match (r.serial, r.epoch) {
                    (Some(serial), Some(epoch)) if epoch.len() <= 64 => {
                        Some(crate::types::Position { serial, epoch })
                    }
                    // A serial without its epoch, or an epoch no owner ever
                    // made: not recovered.
                    (Some(serial), _) => Some(crate::types::Position {
                        serial,
                        epoch: String::new(),
                    }),
                    _ => None,
                },
                max_bytes: bytes / 2,
                max_events: frames.saturating_sub(16) / 2,
            }
        });
        drop(live);
        let app = self.current_app()?;
        let request = auth::channel::Request {
            socket_id: &self.socket_id(),
            channel,
            kind,
            auth: d.auth.as_deref(),
            channel_data: d.channel_data.as_deref(),
            signed_in: self.user.as_ref().map(|u| &*u.id),
        };
        let keys = auth::channel::AppKeys {
            id: &app.id,
            key: &app.key,
            secret: &app.secret,
            max_user_info_bytes: app.features.max_user_info_bytes,
            grants: app.features.auth_grants.is_some(),
        };
        let now = crate::clock::unix_now().as_secs();
        let settings = app.features.auth_grants;
        let presented = d.auth.as_deref().is_some_and(auth::grant::is_presentation);
        let authorized = if !presented {
            auth::channel::authorize(&request, &keys).map(|m| (m, None))
        } else {
            // With grants off, refused before any decoding.
            let limits = settings.map_or(auth::grant::Limits { ttl: 0, max_age: 0 }, |s| {
                auth::grant::Limits {
                    ttl: s.ttl.as_secs(),
                    max_age: s.max_age.as_secs(),
                }
            });
            let proven = self.proven.as_deref();
            let budget = || self.ctx.grant_checks();
            match auth::channel::authorize_grant(&request, &keys, limits, now, proven, budget) {
                Ok((m, g, proof)) => {
                    self.proven = Some(Box::new(proof));
                    Ok((m, Some(g)))
                }
                Err(r) => Err(r),
            }
        };
        let (member, taken) = match authorized {
            Ok(ok) => ok,
            Err(r) => return self.sub_error(channel, r.kind, &r.message, r.status),
        };
        let granted = taken.as_ref().map(|g| g.authorized);
        // The grant this subscription gets once it succeeds: a renewal of
        // the one it presented, or a first one for the key it offered.
        let grant = match settings {
            // Not encrypted channels (a grant carries no shared secret).
            Some(s) if matches!(kind, ChannelKind::Private | ChannelKind::Presence) => self
                .grant_for(
                    s,
                    channel,
                    d.channel_data.as_deref(),
                    taken,
                    d.grant.as_ref(),
                    now,
                ),
            _ => None,
        };
        let name: Arc<str> = Arc::from(channel);
        let user = member.as_ref().map(|m| m.user_id.clone());
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: name.clone(),
        };
        let join = Join::Room {
            room,
            member,
            // Whom a moderator's removal or ban names outside presence
            // channels, and (with the member) whose revoked grants the
            // owner refuses.
            user: self.user.as_ref().map(|u| u.id.clone()),
            granted,
            max_members: max_members.min(u32::MAX as usize) as u32,
            shed: self.shed(),
            resume,
        };
        match self.ctx.node.router.join(join, self.subscriber()).await {
            Ok(true) => {
                // Most sockets hold one channel: room for exactly that first.
                if self.channels.is_empty() {
                    self.channels.reserve_exact(1);
                }
                self.channels.push(Channel { name, kind, user });
                if let Some(g) = &grant {
                    self.hand_grant(&app, g);
                }
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
        // Always done (it frees what the socket holds). Leaving a presence
        // channel also spends a token when there is one (each pair tells
        // every member twice), so the next subscribe waits for the bucket.
        // Elsewhere it is free (a vacated followed by an occupied within
        // the webhook debounce sends neither).
        let ch = self.channels.swap_remove(pos);
        if ch.kind == ChannelKind::Presence {
            if let Some(b) = &mut self.ops {
                b.try_take(Instant::now());
            }
        }
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: ch.name,
        };
        let leave = Tell::Leave {
            room,
            conn: self.id,
            shed: self.shed(),
        };
        let _ = self.ctx.node.router.tell(leave).await;
        Ok(())
    }

    async fn signin(&mut self, d: protocol::SigninData) -> Handled {
        if !self.channel_op("signin") {
            return self.error(
                Some(codes::CLIENT_EVENT_RATE_LIMIT),
                "too many sign-ins per second on this connection; retry later",
            );
        }
        let app = self.current_app()?;
        let now = crate::clock::unix_now().as_secs();
        // A sign-in grant presented instead of the app's signature: checked
        // as a channel's is; refused without closing (the plugin then asks
        // the app's endpoint).
        let taken = if auth::grant::is_presentation(&d.auth) {
            match self.take_signin_grant(&app, &d, now) {
                Ok(g) => Some(g),
                Err(why) => {
                    self.out.push(&protocol::signin_grant_refused(why));
                    return Ok(());
                }
            }
        } else {
            None
        };
        let signed = auth::signin_string(&self.socket_id(), &d.user_data);
        if taken.is_none() && !auth::verify_token(&app.key, &app.secret, &signed, &d.auth) {
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
        let (id, watchlist) = match serde_json::from_str::<protocol::UserData>(&d.user_data) {
            Ok(u) => (
                u.id.into_string(),
                u.watchlist
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| w.into_string())
                    .collect::<Vec<_>>(),
            ),
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
        let f = &app.features;
        if watchlist.len() > f.max_watchlist && f.max_watchlist > 0 {
            return self.error(
                None,
                &format!("the watchlist names more than {} users", f.max_watchlist),
            );
        }
        if let Some(bad) = watchlist.iter().find(|w| names::check_user_id(w).is_err()) {
            return self.error(
                None,
                &format!("watchlist: invalid user id {:?}", truncate(bad)),
            );
        }
        let mut watchlist: Vec<Arc<str>> = if f.max_watchlist == 0 {
            Vec::new() // watchlists off for this app
        } else {
            watchlist.into_iter().map(Arc::from).collect()
        };
        watchlist.sort();
        watchlist.dedup();
        let router = &self.ctx.node.router;
        // terminate_connections revoked the user's grants since? Their
        // owner keeps the revocation: asked before anything is done.
        if let Some(g) = &taken {
            if let Some(why) = self.signin_grant_revoked(&id, g.authorized).await {
                self.out.push(&protocol::signin_grant_refused(why));
                return Ok(());
            }
        }
        if let Some(old) = self.user.take() {
            old.release(router, &self.app.id, self.id).await;
        }
        let join = Join::SignIn {
            room: RoomKey::user(&self.app.id, &id),
            max: f.max_connections_per_user.min(u32::MAX as usize) as u32,
            silent: false,
        };
        match router.join(join, self.subscriber()).await {
            Ok(true) => {}
            Ok(false) => {
                let why = "the user has too many connections";
                self.out
                    .push(&protocol::error(Some(codes::OVER_QUOTA), why));
                return Err(End::close(codes::OVER_QUOTA, why, "user_quota"));
            }
            Err(RouteError::Unavailable) => {
                return self.error(
                    None,
                    "sign-in is unavailable for a moment (the user's room is moving); retry",
                )
            }
            Err(_) => return Err(End::shutdown()),
        }
        // And once more now that the owner holds the socket: a
        // terminate_connections between the first question and the join
        // revoked first (every owner answers its Revoke before its Terminate
        // is sent), so it is seen here, in order, and undone.
        if let Some(g) = &taken {
            if let Some(why) = self.signin_grant_revoked(&id, g.authorized).await {
                let undo = Tell::SignOut {
                    room: RoomKey::user(&self.app.id, &id),
                    conn: self.id,
                };
                let _ = router.tell(undo).await;
                self.out.push(&protocol::signin_grant_refused(why));
                return Ok(());
            }
        }
        self.out.push(&protocol::signin_success(&d.user_data));
        if let Some(g) = self.signin_grant_for(&app, &d, &id, taken, now) {
            self.hand_grant(&app, &g);
        }
        // Recorded before watching, so that the release signs out and
        // unwatches whatever this got to register.
        let watched = watchlist.clone();
        let id: Arc<str> = Arc::from(id);
        self.user = Some(Box::new(super::SignedIn {
            id: id.clone(),
            watchlist,
        }));
        // The channels it subscribed before signing in (pusher-js signs in
        // and subscribes at once): their owners learn who it is now, so a
        // moderator's removal names it and a ban of this user applies.
        for ch in self
            .channels
            .iter()
            .filter(|c| c.kind != ChannelKind::Presence)
        {
            let identify = Tell::Identify {
                room: RoomKey {
                    app: self.app.id.clone(),
                    channel: ch.name.clone(),
                },
                conn: self.id,
                user: id.clone(),
            };
            if router.tell(identify).await.is_err() {
                return Err(End::shutdown());
            }
        }
        // After signin_success: the owners of the watched users tell this
        // socket who is online, then every transition.
        let watch = Join::Watch {
            app: self.app.id.clone(),
            users: watched,
            announce: true,
        };
        if !matches!(&watch, Join::Watch { users, .. } if users.is_empty())
            && router.join(watch, self.subscriber()).await.is_err()
        {
            return Err(End::shutdown());
        }
        Ok(())
    }

    /// Whether a sign-in grant of `user` that the app authorized at
    /// `authorized` may not be taken: `revoked` (terminate_connections), or
    /// `busy` (the user's owner did not answer: refused, the plugin asks
    /// the app). `None`: it may.
    async fn signin_grant_revoked(&self, user: &str, authorized: u64) -> Option<&'static str> {
        let ask = crate::op::Ask::Revoked {
            room: RoomKey::user(&self.app.id, user),
            authorized,
        };
        let wait = std::time::Duration::from_secs(2);
        match self
            .ctx
            .node
            .router
            .ask(ask, wait)
            .await
            .and_then(crate::op::Answer::revoked)
        {
            Ok(false) => None,
            Ok(true) => {
                metrics::counter!("herdgate_auth_grants_total", "result" => "revoked").increment(1);
                Some("revoked")
            }
            Err(_) => Some("busy"),
        }
    }

    async fn client_event(
        &mut self,
        event: &str,
        channel: &str,
        data: Option<&RawValue>,
    ) -> Handled {
        let app = self.current_app()?;
        let live = self.ctx.node.live();
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
        let state = self.ctx.node.overload.state();
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
            .get_or_insert_with(|| crate::ratelimit::TokenBucket::new(rate, rate, now));
        if !bucket.try_take_n(now, cost) {
            metrics::counter!("herdgate_client_events_dropped_total", "reason" => "rate_limit")
                .increment(1);
            return self.error(
                Some(codes::CLIENT_EVENT_RATE_LIMIT),
                "client event rate limit exceeded",
            );
        }
        let app_rate = app.features.max_client_events_per_second;
        if app_rate > 0 && !self.ctx.quotas.of(&app.id).client_event(app_rate) {
            metrics::counter!("herdgate_client_events_dropped_total", "reason" => "app_quota")
                .increment(1);
            return self.error(
                Some(codes::CLIENT_EVENT_RATE_LIMIT),
                "the app's client event quota is exceeded",
            );
        }
        let frame = protocol::client_event(event, &name, data, user.as_deref());
        let room = RoomKey {
            app: self.app.id.clone(),
            channel: name,
        };
        metrics::counter!("herdgate_client_events_total").increment(1);
        if self
            .ctx
            .node
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
