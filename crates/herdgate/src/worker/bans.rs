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
//! full, in one sweep of the app's bans before a new one is refused.

use crate::types::RoomKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Default)]
pub(super) struct Bans {
    rooms: HashMap<RoomKey, HashMap<Arc<str>, Instant>>,
    /// Bans held per app (expired ones included until swept).
    per_app: HashMap<Arc<str>, usize>,
}

impl Bans {
    /// How long `user` is still banned from `room`, if they are.
    pub fn banned(&mut self, room: &RoomKey, user: &str, now: Instant) -> Option<Duration> {
        let until = *self.rooms.get(room)?.get(user)?;
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
        let there = self.rooms.get(room).is_some_and(|r| r.contains_key(user));
        if !there && self.count(&room.app) >= max {
            self.sweep(&room.app, now);
            if self.count(&room.app) >= max {
                return false;
            }
        }
        if !there {
            *self.per_app.entry(room.app.clone()).or_default() += 1;
        }
        self.rooms
            .entry(room.clone())
            .or_default()
            .insert(user.clone(), until);
        true
    }

    /// `false`: there was no ban to lift.
    pub fn lift(&mut self, room: &RoomKey, user: &str) -> bool {
        let Some(r) = self.rooms.get_mut(room) else {
            return false;
        };
        if r.remove(user).is_none() {
            return false;
        }
        if r.is_empty() {
            self.rooms.remove(room);
        }
        self.forget_one(&room.app);
        true
    }

    fn count(&self, app: &str) -> usize {
        self.per_app.get(app).copied().unwrap_or(0)
    }

    fn forget_one(&mut self, app: &Arc<str>) {
        if let Some(n) = self.per_app.get_mut(app) {
            *n -= 1;
            if *n == 0 {
                self.per_app.remove(app);
            }
        }
    }

    /// Drop the app's expired bans.
    fn sweep(&mut self, app: &Arc<str>, now: Instant) {
        let mut gone = 0;
        self.rooms.retain(|room, users| {
            if room.app == *app {
                let before = users.len();
                users.retain(|_, until| *until > now);
                gone += before - users.len();
            }
            !users.is_empty()
        });
        for _ in 0..gone {
            self.forget_one(app);
        }
    }

    /// Bans held, for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.per_app.values().sum()
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
