//! How a worker decides each [`Join`], answers each [`Ask`] and takes each
//! [`Tell`]: one method per operation, each touching only the state it
//! names. Runs on the worker's task, in mailbox order.

use super::{info, Decided, Subscriber, Worker};
use crate::op::{Answer, Ask, Join, Since, Tell, PAGE_BYTES};
use crate::outbound::CloseOrder;
use crate::protocol;
use crate::types::{ConnId, RoomKey};
use std::sync::Arc;

impl Worker {
    pub(super) fn joined(&mut self, join: Join, sub: Subscriber, reply: Option<Decided>) {
        match join {
            Join::Room {
                room,
                member,
                user,
                granted,
                max_members,
                shed,
                resume,
            } => {
                let max = max_members as usize;
                let ok = self.subscribe(room, sub, member, user, granted, max, shed, resume);
                if let Some(reply) = reply {
                    reply(ok);
                }
            }
            Join::SignIn { room, max, silent } => {
                self.sign_in(room, sub, max as usize, silent, reply)
            }
            Join::Watch {
                app,
                users,
                announce,
            } => {
                self.watch(&app, &users, sub, announce);
                if let Some(reply) = reply {
                    reply(true);
                }
            }
        }
    }

    /// Record a signed-in socket unless the user is at `max` (> 0); the
    /// user's first socket makes them online (unless `silent`), after the
    /// answer.
    fn sign_in(
        &mut self,
        room: RoomKey,
        sub: Subscriber,
        max: usize,
        silent: bool,
        reply: Option<Decided>,
    ) {
        let socks = self.users.entry(room.clone()).or_default();
        let was_online = !socks.is_empty();
        let ok = max == 0 || socks.len() < max || socks.contains_key(&sub.id);
        if ok {
            socks.insert(sub.id, sub.to);
        } else if socks.is_empty() {
            self.users.remove(&room);
        }
        if let Some(reply) = reply {
            reply(ok);
        }
        if ok && !was_online && !silent {
            self.user_transition(&room, true);
        }
    }

    /// The socket watches `users` (all owned here); with `announce` it is
    /// told at once, in one frame, who of them is online and who offline (in
    /// order with any later transition).
    fn watch(&mut self, app: &Arc<str>, users: &[Arc<str>], sub: Subscriber, announce: bool) {
        let rooms: Vec<RoomKey> = users.iter().map(|u| RoomKey::user(app, u)).collect();
        let (mut online, mut offline) = (Vec::new(), Vec::new());
        for room in &rooms {
            let user = room.user_id();
            if self.users.get(room).is_some_and(|s| !s.is_empty()) {
                online.push(user);
            } else {
                offline.push(user);
            }
            self.watchers
                .entry(room.clone())
                .or_default()
                .insert(sub.id, sub.to.clone());
        }
        if let (true, Some(first)) = (announce, rooms.first()) {
            let frame = protocol::watchlist_events(&online, &offline);
            sub.to.push_one(first, sub.id, &frame);
        }
    }

    pub(super) fn answer(&mut self, ask: Ask) -> Answer {
        match ask {
            Ask::Info { room } => Answer::Info(self.rooms.get(&room).map(info).unwrap_or_default()),
            Ask::Users { room } => Answer::Users(self.user_ids(&room)),
            Ask::Rooms { app, prefix } => Answer::Rooms(self.rooms_of(&app, &prefix)),
            Ask::Cache { room } => Answer::Cache(self.cached(&room)),
            Ask::History {
                room,
                since,
                epoch,
                limit,
            } => Answer::History(self.kept_since(&room, since, epoch.as_deref(), limit as usize)),
            Ask::Terminate { room } => {
                self.terminate(&room);
                Answer::Done
            }
            Ask::Remove {
                room,
                user,
                ban_secs,
            } => self.remove_user(room, user, ban_secs),
            Ask::Revoke { app, user, before } => {
                let max_age = self
                    .policies
                    .load()
                    .get(&app)
                    .and_then(|p| p.features.auth_grants)
                    .map_or(0, |g| g.max_age.as_secs());
                let now = crate::clock::unix_now().as_secs();
                // With grants off no grant is taken; a reload turning them
                // on again must still find this one: kept an hour at least.
                self.revoked
                    .revoke(&app, &user, before, max_age.max(3600), now);
                Answer::Done
            }
            Ask::Revoked { room, authorized } => {
                let user = room.user_id();
                Answer::Revoked(
                    self.revoked
                        .voids(&room.app, [Some(user), None], authorized),
                )
            }
            Ask::Unban { room, user } => {
                let lifted = self.bans.lift(&room, &user);
                if lifted {
                    metrics::counter!("herdgate_moderation_total", "action" => "unban")
                        .increment(1);
                }
                Answer::Lifted(lifted)
            }
        }
    }

    pub(super) fn told(&mut self, tell: Tell) {
        match tell {
            Tell::Leave { room, conn, shed } => self.unsubscribe(room, conn, shed),
            Tell::SignOut { room, conn } => self.sign_out(&room, conn),
            Tell::Unwatch { room, conn } => self.unwatch(&room, conn),
            Tell::Identify { room, conn, user } => self.identify(room, conn, user),
        }
    }

    /// A subscriber of a non-presence room signed in as `user`: recorded
    /// (a removal names it now), and out at once if `user` is banned here.
    fn identify(&mut self, room: RoomKey, conn: ConnId, user: Arc<str>) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(to) = r.identify(conn, &user) else {
            return;
        };
        let now = tokio::time::Instant::now();
        if let Some(left) = self.bans.banned(&room, &user, now) {
            metrics::counter!("herdgate_moderation_total", "action" => "refused").increment(1);
            let secs = u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX);
            self.unsubscribe(room.clone(), conn, crate::types::Shed::default());
            self.recent.note(&room, conn, now);
            to.remove(&room, conn, &protocol::removed(&room.channel, secs));
        }
    }

    /// The user's last signed-in socket leaving makes them offline.
    fn sign_out(&mut self, room: &RoomKey, conn: ConnId) {
        if let Some(socks) = self.users.get_mut(room) {
            socks.remove(&conn);
            if socks.is_empty() {
                self.users.remove(room);
                self.user_transition(room, false);
            }
        }
    }

    fn unwatch(&mut self, room: &RoomKey, conn: ConnId) {
        if let Some(w) = self.watchers.get_mut(room) {
            w.remove(&conn);
            if w.is_empty() {
                self.watchers.remove(room);
            }
        }
    }

    fn user_ids(&self, room: &RoomKey) -> Vec<String> {
        let mut users: Vec<String> = self
            .rooms
            .get(room)
            .map(|r| r.user_ids().map(String::from).collect())
            .unwrap_or_default();
        users.sort_unstable();
        users
    }

    fn rooms_of(&self, app: &Arc<str>, prefix: &str) -> Vec<(String, crate::types::RoomInfo)> {
        let mut rooms: Vec<_> = self
            .rooms
            .iter()
            .filter(|(k, _)| k.app == *app && k.channel.starts_with(prefix))
            .map(|(k, r)| (k.channel.to_string(), info(r)))
            .collect();
        rooms.sort_by(|a, b| a.0.cmp(&b.0));
        rooms
    }

    /// The cached event's `data` and its seconds left.
    fn cached(&mut self, room: &RoomKey) -> Option<(String, u64)> {
        self.cache.get(room).map(|(frame, left)| {
            let data = serde_json::from_str::<serde_json::Value>(frame.as_str())
                .ok()
                .and_then(|v| v["data"].as_str().map(String::from))
                .unwrap_or_default();
            (data, left.as_secs())
        })
    }

    /// One page of what the room keeps after `since`.
    fn kept_since(
        &mut self,
        room: &RoomKey,
        since: u64,
        epoch: Option<&str>,
        limit: usize,
    ) -> Since {
        self.check_history_policy();
        let mut page = self.history.since(room, since, epoch, limit, PAGE_BYTES, 0);
        if page.events.is_empty() && page.more {
            // One event larger than a page still goes out, alone.
            page = self.history.since(room, since, epoch, 1, usize::MAX, 0);
        }
        if self.history_bounds(room).is_none() {
            page.complete = false; // history is off for the channel
        }
        page.epoch = self.history.epoch().to_string();
        page
    }

    /// A moderator's removal: `user`'s sockets leave the room (its members
    /// see them go, as on any leave) and each is sent the notice; with
    /// `ban_secs` > 0 the user is refused the room that long, first (a full
    /// ban list does nothing at all).
    fn remove_user(&mut self, room: RoomKey, user: Arc<str>, ban_secs: u32) -> Answer {
        let secs = ban_secs.min(crate::op::MAX_BAN_SECS);
        if secs > 0 {
            let max = self
                .policies
                .load()
                .get(&room.app)
                .map_or(0, |p| p.features.max_channel_bans);
            let now = tokio::time::Instant::now();
            let until = now + std::time::Duration::from_secs(u64::from(secs));
            if !self.bans.ban(&room, &user, until, max, now) {
                metrics::counter!("herdgate_moderation_total", "action" => "ban_refused")
                    .increment(1);
                return Answer::BansFull;
            }
            metrics::counter!("herdgate_moderation_total", "action" => "ban").increment(1);
        }
        let sockets = self
            .rooms
            .get(&room)
            .map(|r| r.sockets_of(&user))
            .unwrap_or_default();
        let everyone = crate::types::Shed::default();
        let now = tokio::time::Instant::now();
        for (conn, to) in &sockets {
            self.unsubscribe(room.clone(), *conn, everyone);
            self.recent.note(&room, *conn, now);
            // One notice per socket: each session claims its own.
            to.remove(&room, *conn, &protocol::removed(&room.channel, secs));
        }
        metrics::counter!("herdgate_moderation_total", "action" => "remove").increment(1);
        Answer::Removed {
            sockets: u32::try_from(sockets.len()).unwrap_or(u32::MAX),
        }
    }

    /// Close every socket signed in as the room's user.
    fn terminate(&self, room: &RoomKey) {
        let order = CloseOrder {
            code: protocol::codes::UNAUTHORIZED,
            reason: "connection terminated by the app",
        };
        for (id, to) in self.users.get(room).into_iter().flat_map(|s| s.iter()) {
            to.close(room, *id, order);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::op::{Answer, Ask, Join};
    use crate::outbound::Outbound;
    use crate::protocol::{self, Frame};
    use crate::types::{ConnId, Member, RoomKey, Shed};
    use crate::worker::{policies_of, Pool, Subscriber};
    use std::sync::Arc;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(5);

    fn pool() -> Pool {
        let config = crate::config::Config::from_toml_str(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nmax_channel_bans = 2\n",
        )
        .unwrap();
        let policies = Arc::new(arc_swap::ArcSwap::from_pointee(policies_of(&config)));
        Pool::start(
            1,
            1024,
            None,
            policies,
            Arc::new(|| crate::config::LoadState::Normal),
        )
    }

    fn room() -> RoomKey {
        RoomKey {
            app: "1".into(),
            channel: "presence-qa".into(),
        }
    }

    async fn join(p: &Pool, id: u64, user: &str) -> (Arc<Outbound>, bool) {
        let out = Arc::new(Outbound::new(100, 1 << 20));
        let join = Join::Room {
            room: room(),
            member: Some(Member {
                user_id: user.into(),
                user_info: None,
            }),
            user: None,
            granted: None,
            max_members: 100,
            shed: Shed::default(),
            resume: None,
        };
        let ok = p
            .join(join, Subscriber::local(ConnId(id), out.clone()))
            .await
            .unwrap();
        (out, ok)
    }

    fn texts(out: &Outbound) -> Vec<String> {
        out.drain()
            .frames
            .iter()
            .map(|f| f.as_str().to_string())
            .collect()
    }

    /// The owner takes the removed socket out before it answers: a client
    /// event its session sends afterwards (not having read the notice yet)
    /// reaches nobody, and the ban refuses its next join whatever signed it.
    #[tokio::test]
    async fn a_removed_socket_is_out_before_the_answer_and_banned_after() {
        let p = pool();
        let (mallory, _) = join(&p, 1, "mallory").await;
        let (alice, _) = join(&p, 2, "alice").await;
        texts(&mallory);
        texts(&alice);
        let ask = Ask::Remove {
            room: room(),
            user: "mallory".into(),
            ban_secs: 60,
        };
        assert_eq!(
            p.ask(ask, WAIT).await.unwrap(),
            Answer::Removed { sockets: 1 }
        );
        let d = mallory.drain();
        assert!(d.removal, "the notice is marked for the session");
        assert_eq!(d.frames.len(), 1);
        assert_eq!(
            protocol::claim_removed_channel(&d.frames[0]).as_deref(),
            Some("presence-qa")
        );
        assert_eq!(
            protocol::claim_removed_channel(&d.frames[0]),
            None,
            "claimed once"
        );
        let spam = Frame::from("{\"event\":\"client-spam\",\"channel\":\"presence-qa\"}");
        p.client_event(room(), spam, ConnId(1)).await.unwrap();
        // A question behind the client event in the owner's mailbox: once
        // answered, the event was handled.
        let info = p.ask(Ask::Info { room: room() }, WAIT).await.unwrap();
        assert_eq!(info.info().unwrap().user_count, 1);
        let heard = texts(&alice);
        assert_eq!(heard.len(), 1, "{heard:?}");
        assert!(heard[0].contains("member_removed"), "{heard:?}");
        // Banned: refused, told why; a second user banned fills the list
        // (2), a third is refused and nothing is done.
        let (again, ok) = join(&p, 3, "mallory").await;
        assert!(!ok);
        assert!(texts(&again)[0].contains("Banned"));
        let ban = |u: &str| Ask::Remove {
            room: room(),
            user: u.into(),
            ban_secs: 60,
        };
        assert_eq!(
            p.ask(ban("bob"), WAIT).await.unwrap(),
            Answer::Removed { sockets: 0 }
        );
        assert_eq!(p.ask(ban("alice"), WAIT).await.unwrap(), Answer::BansFull);
        assert!(texts(&alice).is_empty(), "a refused ban removed nobody");
        let lift = Ask::Unban {
            room: room(),
            user: "mallory".into(),
        };
        assert_eq!(
            p.ask(lift.clone(), WAIT).await.unwrap(),
            Answer::Lifted(true)
        );
        assert_eq!(p.ask(lift, WAIT).await.unwrap(), Answer::Lifted(false));
        assert!(join(&p, 4, "mallory").await.1, "lifted: back in");
    }
}
