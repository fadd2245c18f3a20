//! One room: its subscribers and, for presence channels, its members.
//!
//! Presence is per user, not per socket: a user with three tabs open is one
//! member, announced when the first socket joins and removed when the last
//! one leaves.

use super::{ConnId, Member, Subscriber};
use crate::protocol::{self, Frame};
use crate::session::outbound::{Outbound, Push};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;

pub(super) struct Entry {
    out: Arc<Outbound>,
    user: Option<Arc<str>>,
}

struct MemberState {
    info: Option<Box<RawValue>>,
    sockets: u32,
}

#[derive(Default)]
pub(super) struct Room {
    subscribers: HashMap<ConnId, Entry>,
    members: HashMap<Arc<str>, MemberState>,
}

/// What a fan-out did, for metrics.
#[derive(Default, Debug, Clone, Copy)]
pub struct Delivery {
    pub queued: u64,
    pub overflowed: u64,
}

impl Delivery {
    fn count(&mut self, p: Push) {
        match p {
            Push::Queued => self.queued += 1,
            Push::Overflow => self.overflowed += 1,
            Push::Closed => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Joined {
    /// Subscribed; `new_member` when this was the user's first socket.
    Ok {
        new_member: bool,
    },
    AlreadySubscribed,
    PresenceFull,
}

impl Room {
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscribers.len()
    }

    pub fn user_count(&self) -> usize {
        self.members.len()
    }

    pub fn user_ids(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(|k| &**k)
    }

    pub fn join(&mut self, sub: Subscriber, member: Option<Member>, max_members: usize) -> Joined {
        if self.subscribers.contains_key(&sub.id) {
            return Joined::AlreadySubscribed;
        }
        let mut new_member = false;
        let user = match member {
            Some(m) => {
                if !self.members.contains_key(&m.user_id) && self.members.len() >= max_members {
                    return Joined::PresenceFull;
                }
                let state = self.members.entry(m.user_id.clone()).or_insert_with(|| {
                    new_member = true;
                    MemberState {
                        info: m.user_info,
                        sockets: 0,
                    }
                });
                state.sockets += 1;
                Some(m.user_id)
            }
            None => None,
        };
        self.subscribers
            .insert(sub.id, Entry { out: sub.out, user });
        Joined::Ok { new_member }
    }

    /// Remove a socket; returns the user id if it was that user's last socket.
    pub fn leave(&mut self, id: ConnId) -> Option<Arc<str>> {
        let user = self.subscribers.remove(&id)?.user?;
        let state = self.members.get_mut(&user)?;
        state.sockets -= 1;
        if state.sockets == 0 {
            self.members.remove(&user);
            Some(user)
        } else {
            None
        }
    }

    pub fn presence_frame(&self, channel: &str) -> Frame {
        protocol::presence_subscription_succeeded(
            channel,
            self.members
                .iter()
                .map(|(id, m)| (&**id, m.info.as_deref())),
        )
    }

    pub fn member_info(&self, user: &str) -> Option<&RawValue> {
        self.members.get(user).and_then(|m| m.info.as_deref())
    }

    pub fn push_to(&self, id: ConnId, frame: &Frame) -> Option<Push> {
        self.subscribers.get(&id).map(|e| e.out.push(frame))
    }

    /// Hand the same frame to every subscriber but `exclude`. Never waits.
    pub fn fan_out(&self, frame: &Frame, exclude: Option<ConnId>) -> Delivery {
        let mut d = Delivery::default();
        for (id, e) in &self.subscribers {
            if Some(*id) != exclude {
                d.count(e.out.push(frame));
            }
        }
        d
    }

    /// Like `fan_out`, but skips every socket of `user`.
    pub fn fan_out_except_user(&self, frame: &Frame, user: &str) -> Delivery {
        let mut d = Delivery::default();
        for e in self.subscribers.values() {
            if e.user.as_deref() != Some(user) {
                d.count(e.out.push(frame));
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64) -> (Subscriber, Arc<Outbound>) {
        let out = Arc::new(Outbound::new(100, 100_000));
        (
            Subscriber {
                id: ConnId(id),
                out: out.clone(),
            },
            out,
        )
    }

    fn member(user: &str) -> Option<Member> {
        Some(Member {
            user_id: Arc::from(user),
            user_info: None,
        })
    }

    #[test]
    fn presence_is_per_user() {
        let mut room = Room::default();
        let (a1, _) = sub(1);
        let (a2, _) = sub(2);
        let (b, _) = sub(3);
        assert_eq!(
            room.join(a1, member("alice"), 10),
            Joined::Ok { new_member: true }
        );
        assert_eq!(
            room.join(a2, member("alice"), 10),
            Joined::Ok { new_member: false }
        );
        assert_eq!(
            room.join(b, member("bob"), 10),
            Joined::Ok { new_member: true }
        );
        assert_eq!(room.user_count(), 2);
        assert_eq!(room.subscription_count(), 3);
        assert_eq!(room.leave(ConnId(1)), None, "alice still has a socket");
        assert_eq!(room.leave(ConnId(2)).as_deref(), Some("alice"));
        assert_eq!(room.leave(ConnId(2)), None, "leaving twice is a no-op");
        assert_eq!(room.user_count(), 1);
    }

    #[test]
    fn presence_cap_counts_users_not_sockets() {
        let mut room = Room::default();
        assert!(matches!(
            room.join(sub(1).0, member("a"), 1),
            Joined::Ok { .. }
        ));
        assert!(matches!(
            room.join(sub(2).0, member("a"), 1),
            Joined::Ok { .. }
        ));
        assert_eq!(room.join(sub(3).0, member("b"), 1), Joined::PresenceFull);
        assert_eq!(
            room.join(sub(1).0, member("a"), 1),
            Joined::AlreadySubscribed
        );
    }

    #[test]
    fn fan_out_excludes_and_counts() {
        let mut room = Room::default();
        let (s1, o1) = sub(1);
        let (s2, o2) = sub(2);
        room.join(s1, None, 0);
        room.join(s2, None, 0);
        let d = room.fan_out(&Frame::from_static("x"), Some(ConnId(1)));
        assert_eq!(d.queued, 1);
        assert!(o1.drain().0.is_empty());
        assert_eq!(o2.drain().0.len(), 1);
    }
}
