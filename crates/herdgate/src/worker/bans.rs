//! Channel bans a moderator set (docs/PROTOCOL.md "Moderation").
//!
//! A ban lives where the room lives, at its owner, because the owner
//! decides every join of the room, in order, whatever authorized it (the
//! app's signature, or an auth grant): a ban therefore holds on every edge
//! at once, and the owner is the one place that needs no copy of it.
//!
//! Bounded per app (`max_channel_bans` at this owner): a full list refuses
//! the next ban rather than evicting one (evicting would lift a ban nobody
//! lifted). Expired bans go when met (a join, a lift) and, when the list is
//! full, in one sweep of that app's bans before a new one is refused (none
//! before the app's earliest ban ends).

use crate::types::RoomKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Default)]
pub(super) struct Bans {
    apps: HashMap<Arc<str>, AppBans>,
}

/// One app's bans at this owner.
#[derive(Default)]
struct AppBans {
    /// channel → user → until.
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, Instant>>,
    count: usize,
    /// No ban of the app ends before this: a sweep before it finds nothing.
    earliest: Option<Instant>,
}

impl Bans {
    /// How long `user` is still banned from `room`, if they are.
    pub fn banned(&mut self, room: &RoomKey, user: &str, now: Instant) -> Option<Duration> {
        let until = *self
            .apps
            .get(&room.app)?
            .rooms
            .get(&room.channel)?
            .get(user)?;
        if until > now {
            return Some(until - now);
        }
        self.lift(room, user);
        None
    }

    /// Ban `user` from `room` until `until` (a ban already there is
    /// replaced). `false`: the app holds `max` bans here, even after its
    /// expired ones went; nothing changed.
    pub fn ban(
        &mut self,
        room: &RoomKey,
        user: &Arc<str>,
        until: Instant,
        max: usize,
        now: Instant,
    ) -> bool {
        let a = self.apps.entry(room.app.clone()).or_default();
        let there = a
            .rooms
            .get(&room.channel)
            .is_some_and(|r| r.contains_key(user));
        if !there && a.count >= max {
            a.sweep(now);
            if a.count >= max {
                if a.count == 0 {
                    self.apps.remove(&room.app);
                }
                return false;
            }
        }
        if !there {
            a.count += 1;
        }
        a.earliest = Some(a.earliest.map_or(until, |e| e.min(until)));
        a.rooms
            .entry(room.channel.clone())
            .or_default()
            .insert(user.clone(), until);
        true
    }

    /// `false`: there was no ban to lift.
    pub fn lift(&mut self, room: &RoomKey, user: &str) -> bool {
        let Some(a) = self.apps.get_mut(&room.app) else {
            return false;
        };
        let Some(r) = a.rooms.get_mut(&room.channel) else {
            return false;
        };
        if r.remove(user).is_none() {
            return false;
        }
        if r.is_empty() {
            a.rooms.remove(&room.channel);
        }
        a.count -= 1;
        if a.count == 0 {
            self.apps.remove(&room.app);
        }
        true
    }

    /// Keep only the bans of the rooms `keep` picks (the rooms this owner
    /// still holds after a view change: the others' bans do not move).
    pub fn retain(&mut self, keep: &dyn Fn(&RoomKey) -> bool) {
        self.apps.retain(|app, a| {
            a.rooms.retain(|channel, users| {
                let key = RoomKey {
                    app: app.clone(),
                    channel: channel.clone(),
                };
                let kept = keep(&key);
                if !kept {
                    a.count -= users.len();
                }
                kept
            });
            a.count > 0
        });
    }

    /// Bans held, for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.apps.values().map(|a| a.count).sum()
    }
}

impl AppBans {
    /// Drop the expired bans (nothing to do before the earliest end).
    fn sweep(&mut self, now: Instant) {
        if self.earliest.is_none_or(|e| e > now) {
            return;
        }
        let mut earliest: Option<Instant> = None;
        let mut count = 0;
        self.rooms.retain(|_, users| {
            users.retain(|_, until| *until > now);
            for until in users.values() {
                earliest = Some(earliest.map_or(*until, |e| e.min(*until)));
            }
            count += users.len();
            !users.is_empty()
        });
        self.count = count;
        self.earliest = earliest;
    }
}

/// Sockets a moderator removed lately, per room: a silent re-registration
/// of one (its edge's link came back before the edge heard of the removal,
/// or the notice was lost with the link) is refused with the notice again,
/// instead of quietly undoing the removal. Bounded: [`MAX_RECENT`] entries,
/// each kept [`RECENT_FOR`]; at the bound the oldest goes.
#[derive(Default)]
pub(super) struct Recent {
    order: std::collections::VecDeque<(Instant, RoomKey, crate::types::ConnId)>,
    set: std::collections::HashSet<(RoomKey, crate::types::ConnId)>,
}

/// Removed sockets remembered per realtime worker.
pub const MAX_RECENT: usize = 10_000;
/// How long: past a link's lease and a handover, with room to spare.
pub const RECENT_FOR: Duration = Duration::from_secs(120);

impl Recent {
    pub fn note(&mut self, room: &RoomKey, conn: crate::types::ConnId, now: Instant) {
        self.expire(now);
        if self.order.len() >= MAX_RECENT {
            if let Some((_, r, c)) = self.order.pop_front() {
                self.set.remove(&(r, c));
            }
        }
        if self.set.insert((room.clone(), conn)) {
            self.order.push_back((now, room.clone(), conn));
        }
    }

    pub fn contains(&mut self, room: &RoomKey, conn: crate::types::ConnId, now: Instant) -> bool {
        self.expire(now);
        self.set.contains(&(room.clone(), conn))
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.duration_since(*at) < RECENT_FOR {
                break;
            }
            let (_, r, c) = self.order.pop_front().expect("a front");
            self.set.remove(&(r, c));
        }
    }
}

/// Users whose auth grants were revoked (`terminate_connections`): a join
/// taken by a grant whose line the app authorized before the revocation is
/// refused, at every owner (each keeps the list: the joins of a user's
/// grants go to any room's owner).
///
/// An entry is needed only while a grant authorized before it could still
/// be presented: `auth_grant_max_age` after it. At most [`MAX_REVOKED`] per
/// app; beyond that the oldest goes, and the app's **floor** rises to its
/// time: every grant of the app authorized before the floor is refused (more
/// endpoint calls, never a revocation undone).
#[derive(Default)]
pub(super) struct Revoked {
    apps: HashMap<Arc<str>, AppRevoked>,
}

/// Revocations kept per app at each owner.
pub const MAX_REVOKED: usize = 10_000;

#[derive(Default)]
struct AppRevoked {
    /// user → revoked grants authorized before this (Unix seconds).
    users: HashMap<Arc<str>, u64>,
    /// Every grant authorized before this is refused (raised by eviction).
    floor: u64,
}

impl Revoked {
    /// Revoke `user`'s grants authorized before `before` (Unix seconds).
    /// Entries older than `max_age` (as of `now`) are dropped first.
    pub fn revoke(&mut self, app: &Arc<str>, user: &Arc<str>, before: u64, max_age: u64, now: u64) {
        let a = self.apps.entry(app.clone()).or_default();
        a.users.retain(|_, t| t.saturating_add(max_age) > now);
        if a.users.len() >= MAX_REVOKED && !a.users.contains_key(user) {
            if let Some((oldest, t)) = a
                .users
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(u, t)| (u.clone(), *t))
            {
                a.users.remove(&oldest);
                a.floor = a.floor.max(t);
            }
        }
        let t = a.users.entry(user.clone()).or_insert(0);
        *t = (*t).max(before);
    }

    /// Whether a grant for `users` (the member and the signed-in user) that
    /// the app authorized at `authorized` is revoked.
    pub fn voids(&self, app: &str, users: [Option<&str>; 2], authorized: u64) -> bool {
        let Some(a) = self.apps.get(app) else {
            return false;
        };
        authorized < a.floor
            || users
                .into_iter()
                .flatten()
                .any(|u| a.users.get(u).is_some_and(|t| authorized < *t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(app: &str, ch: &str) -> RoomKey {
        RoomKey {
            app: app.into(),
            channel: ch.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_ban_holds_until_it_expires_then_goes() {
        let mut b = Bans::default();
        let (r, u) = (room("1", "presence-qa"), Arc::from("mallory"));
        let now = Instant::now();
        assert!(b.ban(&r, &u, now + Duration::from_secs(60), 10, now));
        assert_eq!(b.banned(&r, "mallory", now), Some(Duration::from_secs(60)));
        assert_eq!(b.banned(&r, "alice", now), None);
        assert_eq!(b.banned(&room("1", "presence-other"), "mallory", now), None);
        assert_eq!(b.banned(&room("2", "presence-qa"), "mallory", now), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(b.banned(&r, "mallory", Instant::now()), None);
        assert_eq!(b.len(), 0, "an expired ban met is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_list_refuses_until_bans_expire_or_are_lifted() {
        let mut b = Bans::default();
        let now = Instant::now();
        let r = room("1", "private-chat");
        for i in 0..3 {
            let until = now + Duration::from_secs(10 * (i + 1));
            assert!(b.ban(&r, &Arc::from(format!("u{i}")), until, 3, now));
        }
        // Re-banning one already banned takes no new place.
        assert!(b.ban(&r, &Arc::from("u0"), now + Duration::from_secs(10), 3, now));
        assert!(!b.ban(&r, &Arc::from("u3"), now + Duration::from_secs(5), 3, now));
        // Another app has a list of its own.
        assert!(b.ban(
            &room("2", "c"),
            &Arc::from("u3"),
            now + Duration::from_secs(5),
            3,
            now
        ));
        assert!(b.lift(&r, "u2"));
        assert!(!b.lift(&r, "u2"), "lifted once");
        assert!(b.ban(&r, &Arc::from("u3"), now + Duration::from_secs(5), 3, now));
        assert!(!b.ban(&r, &Arc::from("u4"), now + Duration::from_secs(5), 3, now));
        // u0's ban (10 s) and u3's (5 s) expire: swept when the next ban
        // needs a place.
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert!(b.ban(&r, &Arc::from("u4"), now + Duration::from_secs(5), 3, now));
        assert_eq!(b.banned(&r, "u0", now), None);
        assert_eq!(b.banned(&r, "u1", now), Some(Duration::from_secs(10)));
        assert_eq!(
            b.len(),
            3,
            "u1 and u4 of app 1; app 2's, expired, not swept yet"
        );
    }

    #[test]
    fn revoked_grants_are_those_authorized_before_and_the_bound_only_refuses_more() {
        let mut r = Revoked::default();
        let app: Arc<str> = "1".into();
        r.revoke(&app, &Arc::from("u"), 1_000, 3_600, 1_000);
        assert!(r.voids("1", [Some("u"), None], 999));
        assert!(
            r.voids("1", [None, Some("u")], 999),
            "as the member or signed in"
        );
        assert!(!r.voids("1", [Some("u"), None], 1_000), "authorized after");
        assert!(!r.voids("1", [Some("v"), None], 1), "another user");
        assert!(!r.voids("2", [Some("u"), None], 1), "another app");
        // Past max_age the entry goes (no grant that old is taken anyway).
        r.revoke(&app, &Arc::from("w"), 5_000, 3_600, 4_601);
        assert!(!r.voids("1", [Some("u"), None], 999));
        // At the bound the oldest goes and the floor rises to its time.
        for i in 0..MAX_REVOKED as u64 {
            r.revoke(&app, &Arc::from(format!("x{i}")), 6_000 + i, 3_600, 6_000);
        }
        assert!(
            r.voids("1", [Some("nobody"), None], 4_999),
            "below the floor"
        );
        assert!(!r.voids("1", [Some("nobody"), None], 5_000));
        assert!(r.voids("1", [Some("x9999"), None], 15_998));
        assert!(r.apps["1"].users.len() <= MAX_REVOKED);
    }

    #[tokio::test(start_paused = true)]
    async fn bans_of_rooms_that_moved_away_go_and_free_their_places() {
        let mut b = Bans::default();
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        assert!(b.ban(&room("1", "a"), &Arc::from("u"), until, 2, now));
        assert!(b.ban(&room("1", "b"), &Arc::from("u"), until, 2, now));
        b.retain(&|k: &RoomKey| &*k.channel == "a");
        assert_eq!(b.banned(&room("1", "b"), "u", now), None);
        assert!(b.banned(&room("1", "a"), "u", now).is_some());
        assert!(
            b.ban(&room("1", "c"), &Arc::from("u"), until, 2, now),
            "a place freed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recently_removed_sockets_are_remembered_for_a_while_and_bounded() {
        let mut r = Recent::default();
        let c = crate::types::ConnId(7);
        let now = Instant::now();
        r.note(&room("1", "a"), c, now);
        assert!(r.contains(&room("1", "a"), c, now));
        assert!(!r.contains(&room("1", "b"), c, now));
        tokio::time::advance(RECENT_FOR).await;
        assert!(!r.contains(&room("1", "a"), c, Instant::now()));
        for i in 0..(MAX_RECENT as u64 + 5) {
            r.note(&room("1", "a"), crate::types::ConnId(i), Instant::now());
        }
        assert_eq!(r.order.len(), MAX_RECENT);
        assert!(!r.contains(&room("1", "a"), crate::types::ConnId(0), Instant::now()));
        assert!(r.contains(
            &room("1", "a"),
            crate::types::ConnId(MAX_RECENT as u64 + 4),
            Instant::now()
        ));
    }

    #[test]
    fn no_bans_allowed_refuses_every_ban() {
        let mut b = Bans::default();
        let now = Instant::now();
        assert!(!b.ban(
            &room("1", "c"),
            &Arc::from("u"),
            now + Duration::from_secs(1),
            0,
            now
        ));
    }
}
