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
                max_members,
                shed,
                resume,
            } => {
                let ok = self.subscribe(room, sub, member, max_members as usize, shed, resume);
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
        }
    }

    pub(super) fn told(&mut self, tell: Tell) {
        match tell {
            Tell::Leave { room, conn, shed } => self.unsubscribe(room, conn, shed),
            Tell::SignOut { room, conn } => self.sign_out(&room, conn),
            Tell::Unwatch { room, conn } => self.unwatch(&room, conn),
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
