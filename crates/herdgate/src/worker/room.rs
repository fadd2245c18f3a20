//! One room: its subscribers and, for presence channels, its members.
//!
//! Presence is per user, not per socket: a user with three tabs open is one
//! member, announced when the first socket joins and removed when the last
//! one leaves.

use super::{RemoteEdge, Sent, Subscriber, Target};
use crate::outbound::{Outbound, Push, Windows};
use crate::protocol::{self, Frame};
use crate::types::{ConnId, Member, RoomKey};
use serde_json::value::RawValue;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A subscriber: where it is, and the user it joined as (the presence
/// member, or elsewhere the user it was signed in as: whom a moderator's
/// removal names; members count only in presence rooms).
pub(super) struct Entry {
    to: Target,
    user: Option<Arc<str>>,
}

struct MemberState {
    info: Option<Box<RawValue>>,
    sockets: u32,
    /// The app marked them (`"featured": true` in `user_info`): listed and
    /// announced in a big room too.
    featured: bool,
}

/// Whether a presence `user_info` carries `"featured": true`.
fn is_featured(info: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        featured: bool,
    }
    info.is_some_and(|i| {
        i.get().contains("featured")
            && serde_json::from_str::<Flag>(i.get()).is_ok_and(|f| f.featured)
    })
}

/// An edge with sockets in the room, and how many.
struct EdgeRef {
    edge: Arc<dyn RemoteEdge>,
    sockets: u32,
}

/// A socket of this process in the room.
struct Local {
    id: ConnId,
    out: Arc<Outbound>,
    user: Option<Arc<str>>,
    /// Opted in to resume: its events carry their serial.
    resume: bool,
}

#[derive(Default)]
pub(super) struct Room {
    subscribers: HashMap<ConnId, Entry>,
    /// This process's sockets, the ones a fan-out pushes to one by one.
    local: Vec<Local>,
    /// Edges with sockets here: a fan-out sends each one copy, so its cost
    /// is one per edge, not one per remote subscriber.
    edges: Vec<EdgeRef>,
    members: HashMap<Arc<str>, MemberState>,
    /// The featured members' ids: a big room's snapshot lists them without
    /// scanning every member.
    featured: std::collections::HashSet<Arc<str>>,
    /// More members than the app's `presence_full_members` came in: big
    /// mode until the room empties (docs/PROTOCOL.md "Big presence rooms").
    big: bool,
    /// Pacing of direct writes: when the last fan-out started, and the CPU
    /// time per socket of the last fan-out that wrote in place.
    pace: Cell<(Option<Instant>, Duration)>,
}

/// How many sockets ahead a fan-out asks the CPU to fetch the queue of: a
/// large room's queues are spread over the heap, and the lock of each is
/// otherwise a cache miss that the loop waits for.
const PREFETCH_AHEAD: usize = 8;

/// How long one fan-out may write in place before it queues the rest.
const IN_PLACE_BUDGET: Duration = Duration::from_millis(50);

/// Whom a fan-out reaches, and how.
#[derive(Default, Clone, Copy)]
pub struct To<'a> {
    /// Not this socket (the sender of a client event, a publish's `socket_id`).
    pub exclude: Option<ConnId>,
    /// Not this user's sockets (a member's own `member_added`).
    pub except_user: Option<&'a str>,
    /// Edges confirm receipt of a frame with an id (≠ 0).
    pub ack_id: u64,
    /// The event's history serial, for sockets that opted in to resume.
    pub serial: Option<u64>,
    /// Idle plain-TCP sockets may be written in place.
    pub direct: bool,
    /// The worker's write windows: a plain-TCP socket of an app with a
    /// `write_delay` whose window this fan-out opens is noted there, and
    /// flushed by the worker when it ends. `None`: such sockets keep their
    /// window with their session's timer.
    pub windows: Option<&'a Windows>,
}

impl<'a> To<'a> {
    /// Everyone, written in place if `direct`, windows kept by `windows`.
    pub fn room(direct: bool, windows: &'a Windows) -> To<'a> {
        To {
            direct,
            windows: Some(windows),
            ..To::default()
        }
    }
}

/// What a fan-out did, for metrics and acknowledgements.
#[derive(Default, Debug, Clone)]
pub struct Delivery {
    /// Delivered: queued, or written in place.
    pub queued: u64,
    /// Of those, written in place (see [`crate::outbound::direct`]).
    pub written: u64,
    pub overflowed: u64,
    /// Edges an acknowledged frame waits for, by [`RemoteEdge::ack_key`]:
    /// those it went to (they confirm receipt), and those whose link just
    /// went down but whose lease may still run ([`Sent::Held`]).
    pub edges: Vec<u64>,
    /// Edges whose link is down and whose lease has surely expired: their
    /// sockets were told the room is unavailable, they are not waited for.
    pub edges_down: u32,
}

impl Delivery {
    fn count(&mut self, p: Push) {
        match p {
            Push::Queued | Push::Held(_) => self.queued += 1,
            Push::Written => {
                self.queued += 1;
                self.written += 1;
            }
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

    /// Whether the socket is subscribed here.
    pub fn holds(&self, id: ConnId) -> bool {
        self.subscribers.contains_key(&id)
    }

    /// Socket `id`, subscribed here but not as a presence member, is `user`
    /// from now on; where it is (`None`: not here, or a member).
    pub fn identify(&mut self, id: ConnId, user: &Arc<str>) -> Option<Target> {
        let e = self.subscribers.get_mut(&id)?;
        if e.user
            .as_ref()
            .is_some_and(|u| self.members.contains_key(u))
        {
            return None;
        }
        e.user = Some(user.clone());
        if let Some(l) = self.local.iter_mut().find(|l| l.id == id) {
            l.user = Some(user.clone());
        }
        Some(e.to.clone())
    }

    /// The sockets that joined as `user`, and where they are.
    pub fn sockets_of(&self, user: &str) -> Vec<(ConnId, Target)> {
        self.subscribers
            .iter()
            .filter(|(_, e)| e.user.as_deref() == Some(user))
            .map(|(id, e)| (*id, e.to.clone()))
            .collect()
    }

    fn add_target(&mut self, id: ConnId, to: &Target, user: &Option<Arc<str>>, resume: bool) {
        match to {
            Target::Local(out) => self.local.push(Local {
                id,
                out: out.clone(),
                user: user.clone(),
                resume,
            }),
            Target::Edge(e) => match self.edges.iter_mut().find(|r| r.edge.id() == e.id()) {
                Some(r) => {
                    r.sockets += 1;
                    r.edge = e.clone(); // the edge's current link
                }
                None => self.edges.push(EdgeRef {
                    edge: e.clone(),
                    sockets: 1,
                }),
            },
        }
    }

    fn remove_target(&mut self, id: ConnId, to: &Target) {
        match to {
            Target::Local(_) => {
                if let Some(i) = self.local.iter().position(|l| l.id == id) {
                    self.local.swap_remove(i);
                }
            }
            Target::Edge(e) => {
                if let Some(i) = self.edges.iter().position(|r| r.edge.id() == e.id()) {
                    self.edges[i].sockets -= 1;
                    if self.edges[i].sockets == 0 {
                        self.edges.swap_remove(i);
                    }
                }
            }
        }
    }

    /// `signed_in`: outside presence rooms, the user the socket is signed
    /// in as (kept for a moderator's removal, never a member).
    pub fn join(
        &mut self,
        sub: Subscriber,
        member: Option<Member>,
        signed_in: Option<Arc<str>>,
        max_members: usize,
        resume: bool,
    ) -> Joined {
        if let Some(e) = self.subscribers.get_mut(&sub.id) {
            // An edge that reconnected registers its sockets again: they are
            // now reached through the new link.
            if let (Target::Edge(new), Target::Edge(_)) = (&sub.to, &e.to) {
                e.to = sub.to.clone();
                if let Some(r) = self.edges.iter_mut().find(|r| r.edge.id() == new.id()) {
                    r.edge = new.clone();
                }
            }
            return Joined::AlreadySubscribed;
        }
        let mut new_member = false;
        let user = match member {
            Some(m) => {
                if !self.members.contains_key(&m.user_id) && self.members.len() >= max_members {
                    return Joined::PresenceFull;
                }
                let featured_ids = &mut self.featured;
                let state = self.members.entry(m.user_id.clone()).or_insert_with(|| {
                    new_member = true;
                    let featured = is_featured(m.user_info.as_deref());
                    if featured {
                        featured_ids.insert(m.user_id.clone());
                    }
                    MemberState {
                        info: m.user_info,
                        sockets: 0,
                        featured,
                    }
                });
                state.sockets += 1;
                Some(m.user_id)
            }
            None => signed_in,
        };
        self.add_target(sub.id, &sub.to, &user, resume);
        self.subscribers.insert(sub.id, Entry { to: sub.to, user });
        Joined::Ok { new_member }
    }

    /// Remove a socket; returns the user id if it was that user's last socket.
    #[cfg(test)]
    pub fn leave(&mut self, id: ConnId) -> Option<Arc<str>> {
        self.leave_member(id).map(|(user, _)| user)
    }

    /// [`Room::leave`], with whether the member gone was featured.
    pub fn leave_member(&mut self, id: ConnId) -> Option<(Arc<str>, bool)> {
        let entry = self.subscribers.remove(&id)?;
        self.remove_target(id, &entry.to);
        let user = entry.user?;
        let state = self.members.get_mut(&user)?;
        state.sockets -= 1;
        if state.sockets == 0 {
            let featured = state.featured;
            self.members.remove(&user);
            if featured {
                self.featured.remove(&user);
            }
            Some((user, featured))
        } else {
            None
        }
    }

    /// Enter big mode once the room holds more than `full` members; whether
    /// it is big.
    pub fn grow(&mut self, full: usize) -> bool {
        if !self.big && self.members.len() > full {
            self.big = true;
        }
        self.big
    }

    pub fn is_big(&self) -> bool {
        self.big
    }

    /// Whether the others hear of a member joining or leaving: always in a
    /// small room; in a big one only of featured members.
    pub fn announces(&self, featured: bool) -> bool {
        !self.big || featured
    }

    pub fn is_featured(&self, user: &str) -> bool {
        self.members.get(user).is_some_and(|m| m.featured)
    }

    /// The joiner's `subscription_succeeded`: every member in a small room;
    /// in a big one the true count, and the joiner with at most `full`
    /// featured members.
    pub fn presence_frame(&self, channel: &str, joiner: &str, full: usize) -> Frame {
        if !self.big {
            return protocol::presence_subscription_succeeded(
                channel,
                None,
                self.members
                    .iter()
                    .map(|(id, m)| (&**id, m.info.as_deref())),
            );
        }
        let me = self
            .members
            .get_key_value(joiner)
            .map(|(id, m)| (&**id, m.info.as_deref()));
        let featured = self
            .featured
            .iter()
            .filter(|id| &***id != joiner)
            .take(full)
            .filter_map(|id| self.members.get_key_value(id))
            .map(|(id, m)| (&**id, m.info.as_deref()));
        protocol::presence_subscription_succeeded(
            channel,
            Some(self.members.len()),
            me.into_iter().chain(featured),
        )
    }

    pub fn member_info(&self, user: &str) -> Option<&RawValue> {
        self.members.get(user).and_then(|m| m.info.as_deref())
    }

    pub fn push_to(&self, key: &RoomKey, id: ConnId, frame: &Frame) -> Option<Push> {
        self.subscribers
            .get(&id)
            .map(|e| e.to.push_one(key, id, frame))
    }

    /// Hand the same frame to every subscriber but `exclude` (and, with
    /// `except_user`, every socket of that user). Local sockets get it in
    /// their queues; each edge gets one copy, encoded once, and fans out
    /// itself (`ack_id` ≠ 0: it confirms receipt). With a `serial`, sockets
    /// that opted in to resume get the frame with it (encoded once, when
    /// the first of them is reached); edges get the serial to do the same.
    /// With `direct`, idle plain-TCP sockets are written in place, unless
    /// the room publishes so fast that writing in place would keep this
    /// thread busy all the time (events closer together than what writing
    /// the room in place costs, from a smoothed CPU time per socket):
    /// queued frames are then written in batches by the sockets' own tasks,
    /// on every core. One fan-out writes in place for at most
    /// `IN_PLACE_BUDGET`. Never waits.
    pub fn fan_out(&self, key: &RoomKey, frame: &Frame, to: To<'_>) -> Delivery {
        let To {
            exclude,
            except_user,
            ack_id,
            serial,
            direct,
            windows,
        } = to;
        let mut d = Delivery::default();
        let mut numbered: Option<Frame> = None;
        let (last, per_socket) = self.pace.get();
        let start = Instant::now();
        let n = self.local.len();
        // What writing in place would cost now, from what it cost per
        // socket last time.
        let estimate = per_socket * n as u32;
        let mut direct = direct && n > 0 && last.is_none_or(|t| start.duration_since(t) > estimate);
        let cpu = if direct {
            crate::sys::thread_cpu_time()
        } else {
            Duration::ZERO
        };
        let mut in_place = 0u32;
        for (i, l) in self.local.iter().enumerate() {
            if let Some(ahead) = self.local.get(i + PREFETCH_AHEAD) {
                crate::sys::prefetch(Arc::as_ptr(&ahead.out));
            }
            // One fan-out writes in place for a bounded time: in a huge
            // room the rest is queued, and the sockets' own tasks write it
            // in parallel instead of one thread writing on and on.
            if direct && i % 64 == 63 && start.elapsed() >= IN_PLACE_BUDGET {
                direct = false;
            }
            if Some(l.id) != exclude && (except_user.is_none() || l.user.as_deref() != except_user)
            {
                let f = match serial {
                    Some(n) if l.resume => {
                        numbered.get_or_insert_with(|| protocol::with_serial(frame, n))
                    }
                    _ => frame,
                };
                in_place += u32::from(direct);
                let p = match windows {
                    Some(_) => l.out.push_room(f, direct),
                    None if direct => l.out.push_direct(f),
                    None => l.out.push_shared(f),
                };
                if let Push::Held(ms) = p {
                    // This event opened the socket's write window.
                    if !windows.is_some_and(|w| w.hold(&l.out, start, ms)) {
                        metrics::counter!("herdgate_write_window_flushes_total", "how" => "session_timer").increment(1);
                        l.out.wake();
                    }
                }
                d.count(p);
            }
        }
        if d.written > 0 {
            crate::outbound::record_in_place(start.elapsed(), d.written);
        }
        if n > 0 {
            let per_socket = if in_place > 0 {
                let now = crate::sys::thread_cpu_time().saturating_sub(cpu) / in_place;
                // Smoothed: one noisy fan-out does not flip the room.
                if per_socket.is_zero() {
                    now
                } else {
                    (per_socket * 3 + now) / 4
                }
            } else {
                per_socket
            };
            self.pace.set((Some(start), per_socket));
        }
        if let Some(first) = self.edges.first() {
            let encoded =
                first
                    .edge
                    .encode_deliver(key, frame, exclude, except_user, ack_id, serial);
            for r in &self.edges {
                match r.edge.send_deliver(&encoded) {
                    Sent::Queued => {
                        d.queued += 1;
                        d.edges.push(r.edge.ack_key());
                    }
                    Sent::Held => d.edges.push(r.edge.ack_key()),
                    Sent::Down => d.edges_down += 1,
                }
            }
        }
        d
    }

    /// Remove every socket of edge `edge` (its link is gone for good);
    /// returns the users who had no other socket left.
    /// Drop an edge's sockets: the members gone with them (and whether each
    /// was featured).
    pub fn purge_edge(&mut self, edge: u64) -> Vec<(Arc<str>, bool)> {
        let gone: Vec<ConnId> = self
            .subscribers
            .iter()
            .filter(|(_, e)| e.to.edge_id() == Some(edge))
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.leave_member(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Outbound;

    fn sub(id: u64) -> (Subscriber, Arc<Outbound>) {
        let out = Arc::new(Outbound::new(100, 100_000));
        (
            Subscriber {
                id: ConnId(id),
                to: Target::Local(out.clone()),
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
            room.join(a1, member("alice"), None, 10, false),
            Joined::Ok { new_member: true }
        );
        assert_eq!(
            room.join(a2, member("alice"), None, 10, false),
            Joined::Ok { new_member: false }
        );
        assert_eq!(
            room.join(b, member("bob"), None, 10, false),
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
            room.join(sub(1).0, member("a"), None, 1, false),
            Joined::Ok { .. }
        ));
        assert!(matches!(
            room.join(sub(2).0, member("a"), None, 1, false),
            Joined::Ok { .. }
        ));
        assert_eq!(
            room.join(sub(3).0, member("b"), None, 1, false),
            Joined::PresenceFull
        );
        assert_eq!(
            room.join(sub(1).0, member("a"), None, 1, false),
            Joined::AlreadySubscribed
        );
    }

    #[test]
    fn fan_out_excludes_and_counts() {
        let mut room = Room::default();
        let (s1, o1) = sub(1);
        let (s2, o2) = sub(2);
        room.join(s1, None, None, 0, false);
        room.join(s2, None, None, 0, true);
        let key = RoomKey {
            app: Arc::from("1"),
            channel: Arc::from("r"),
        };
        let d = room.fan_out(
            &key,
            &Frame::from_static(r#"{"a":1}"#),
            To {
                exclude: Some(ConnId(1)),
                serial: Some(7),
                direct: true,
                ..To::default()
            },
        );
        assert_eq!(d.queued, 1);
        assert!(o1.drain().frames.is_empty());
        assert_eq!(
            o2.drain().frames[0].as_str(),
            r#"{"a":1,"serial":7}"#,
            "o2 opted in"
        );
    }
}
