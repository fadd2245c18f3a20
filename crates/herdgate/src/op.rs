//! Room operations as data: questions to a room's owner, the places a
//! socket takes there, and what it let go of.
//!
//! A question about a room (how many are in it, who, what is cached, what
//! is kept, or "close this user's sockets") used to be spelled once per hop:
//! a router method, a pool method, a worker command, an edge method, a link
//! request and a link reply, and a worker node's handler for them. Here it
//! is one variant of [`Ask`], answered by one variant of [`Answer`]. The
//! router hands an `Ask` to whichever owner holds the room: a worker of this
//! process (through its mailbox) or a remote worker (the cluster link
//! carries these values as they are). The worker answers each in one small
//! method. A new question costs one variant here, one handler in the worker
//! and one caller. A place a socket takes (a room, a sign-in, a watch) is a
//! [`Join`], decided by the owner in order with what it sends the socket;
//! what a socket lets go of is a [`Tell`]: no answer, in order with
//! everything else the socket's side sent that owner.
//!
//! A leaf module: it names rooms and frames, nothing of the layers that
//! carry it.

use crate::protocol::Frame;
use crate::types::{ConnId, Member, Resume, RoomInfo, RoomKey, RouteError, Shed};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The longest ban a moderator's removal may set (7 days): a longer one is
/// the app's to keep, refusing at its auth endpoint.
pub const MAX_BAN_SECS: u32 = 7 * 24 * 3600;

/// The most bytes of a list or history answer in one page: a history
/// answer stops there (`more`), and a link carries lists page by page.
pub const PAGE_BYTES: usize = 256 * 1024;

/// A question to a room's owner (or, for [`Ask::Rooms`], to every owner),
/// answered once, within the asker's deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ask {
    /// The room's subscription and user counts: [`Answer::Info`].
    Info { room: RoomKey },
    /// A presence room's user ids, sorted: [`Answer::Users`].
    Users { room: RoomKey },
    /// An app's occupied rooms whose channel starts with `prefix`, sorted
    /// by name: [`Answer::Rooms`]. Asked of every owner.
    Rooms { app: Arc<str>, prefix: String },
    /// A cache channel's cached `data` and seconds left: [`Answer::Cache`].
    Cache { room: RoomKey },
    /// The events after `since` (in `epoch`, if given) the owner keeps: at
    /// most `limit` of them and one page of bytes: [`Answer::History`].
    History {
        room: RoomKey,
        since: u64,
        epoch: Option<String>,
        limit: u32,
    },
    /// Close every socket signed in as the user whose `#server-to-user-`
    /// room is `room`: [`Answer::Done`].
    Terminate { room: RoomKey },
    /// Take `user` out of `room` on every socket (a moderator's removal),
    /// and with `ban_secs` > 0 refuse them the room for that long:
    /// [`Answer::Removed`], or [`Answer::BansFull`] (nothing done).
    Remove {
        room: RoomKey,
        user: Arc<str>,
        ban_secs: u32,
    },
    /// Lift `user`'s ban from `room`: [`Answer::Lifted`].
    Unban { room: RoomKey, user: Arc<str> },
    /// Refuse every join taken by a grant of `user` (as the member, or
    /// signed in) whose line `app` authorized before `before` (Unix
    /// seconds): `terminate_connections`. Asked of every owner:
    /// [`Answer::Done`].
    Revoke {
        app: Arc<str>,
        user: Arc<str>,
        before: u64,
    },
    /// Whether a grant of the user whose `#server-to-user-` room is `room`,
    /// authorized at `authorized`, was revoked (a sign-in by grant asks the
    /// user's owner first): [`Answer::Revoked`].
    Revoked { room: RoomKey, authorized: u64 },
}

/// Who answers an [`Ask`].
pub enum Scope<'a> {
    /// The room's owner.
    Room(&'a RoomKey),
    /// Every owner; their answers are [merged](Answer::merge).
    Every,
}

impl Ask {
    pub fn scope(&self) -> Scope<'_> {
        match self {
            Ask::Info { room }
            | Ask::Users { room }
            | Ask::Cache { room }
            | Ask::History { room, .. }
            | Ask::Terminate { room }
            | Ask::Remove { room, .. }
            | Ask::Unban { room, .. }
            | Ask::Revoked { room, .. } => Scope::Room(room),
            Ask::Rooms { .. } | Ask::Revoke { .. } => Scope::Every,
        }
    }

    /// For logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Ask::Info { .. } => "info",
            Ask::Users { .. } => "users",
            Ask::Rooms { .. } => "rooms",
            Ask::Cache { .. } => "cache",
            Ask::History { .. } => "history",
            Ask::Terminate { .. } => "terminate",
            Ask::Remove { .. } => "remove",
            Ask::Unban { .. } => "unban",
            Ask::Revoke { .. } => "revoke",
            Ask::Revoked { .. } => "revoked",
        }
    }
}

/// What an owner answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    Info(RoomInfo),
    Users(Vec<String>),
    Rooms(Vec<(String, RoomInfo)>),
    Cache(Option<(String, u64)>),
    History(Since),
    Done,
    /// The user's sockets taken out of the room.
    Removed {
        sockets: u32,
    },
    /// The app's ban list at this owner is full: nothing was done.
    BansFull,
    /// Whether there was a ban to lift.
    Lifted(bool),
    /// Whether the grant asked about was revoked.
    Revoked(bool),
}

/// A place a socket takes at the owner of a room (or, for a watch, of the
/// watched users' rooms). The owner decides it in order with everything it
/// sends the socket and, when asked, answers whether it was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Join {
    /// The socket subscribes to `room`. `max_members` caps a presence
    /// room's users (the limit in force where the socket subscribed). A
    /// `shed.silent` join is a re-homing: nothing is answered or announced,
    /// unless `shed.announce` (members the room does not have).
    Room {
        room: RoomKey,
        member: Option<Member>,
        /// The user the socket was signed in as when it subscribed. Outside
        /// presence channels, whom a moderator's removal or ban names (in a
        /// presence channel, the member's id).
        user: Option<Arc<str>>,
        /// Taken by an auth grant: when the app authorized the grant's line
        /// (Unix seconds), for the owner's revocations.
        granted: Option<u64>,
        max_members: u32,
        shed: Shed,
        /// Opted in to resume (docs/PROTOCOL.md "History and resume").
        resume: Option<Resume>,
    },
    /// The socket signs in as the user whose `#server-to-user-` room is
    /// `room`. `max` > 0 caps the user's signed-in sockets: beyond it the
    /// answer is `false` and nothing is recorded. `silent`: a re-homing, no
    /// watchlist transition.
    SignIn {
        room: RoomKey,
        max: u32,
        silent: bool,
    },
    /// The socket watches `users` of `app`: told every transition and,
    /// with `announce`, at once who of them is online. Never refused.
    Watch {
        app: Arc<str>,
        users: Vec<Arc<str>>,
        announce: bool,
    },
}

impl Join {
    /// The room whose owner decides it (a watch goes to each watched
    /// user's owner instead).
    pub fn room(&self) -> Option<&RoomKey> {
        match self {
            Join::Room { room, .. } | Join::SignIn { room, .. } => Some(room),
            Join::Watch { .. } => None,
        }
    }

    /// Whether the owner answers it: a re-homing subscription (silent) and
    /// a watch are never refused, so nobody waits for them.
    pub fn answered(&self) -> bool {
        match self {
            Join::Room { shed, .. } => !shed.silent,
            Join::SignIn { .. } => true,
            Join::Watch { .. } => false,
        }
    }
}

/// What a socket let go of (or, [`Tell::Identify`], who it turned out to
/// be), told to the owner of `room`; never answered.
/// The side that tells has forgotten it already, so an owner out of reach
/// learns it from the registrations a link replays when it comes back (or
/// drops the edge's state with the link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tell {
    /// Socket `conn` leaves the room; `shed` as the socket's node sheds.
    Leave {
        room: RoomKey,
        conn: ConnId,
        shed: Shed,
    },
    /// Socket `conn` signed out as the user whose `#server-to-user-` room
    /// is `room` (the user's last socket leaving makes them offline).
    SignOut { room: RoomKey, conn: ConnId },
    /// Socket `conn` stops watching the user whose room is `room`.
    Unwatch { room: RoomKey, conn: ConnId },
    /// Socket `conn`, subscribed to `room` (not a presence channel), signed
    /// in as `user` since: whom a moderator's removal names from now on,
    /// and a ban of `user` from the room applies at once.
    Identify {
        room: RoomKey,
        conn: ConnId,
        user: Arc<str>,
    },
}

impl Tell {
    pub fn room(&self) -> &RoomKey {
        match self {
            Tell::Leave { room, .. }
            | Tell::SignOut { room, .. }
            | Tell::Unwatch { room, .. }
            | Tell::Identify { room, .. } => room,
        }
    }
}

/// Events after a position, as the owner keeps them.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Since {
    /// The owner's epoch (filled by the worker).
    pub epoch: String,
    /// `(serial, frame)`, oldest first.
    #[serde(with = "frames")]
    pub events: Vec<(u64, Frame)>,
    /// Nothing after the position was lost.
    pub complete: bool,
    /// The answer stopped at a limit: more events follow the last one.
    pub more: bool,
}

/// What a caller expected is not what came back: a bug on the other side
/// of a link (or a build mismatch); the request fails as "busy".
fn unexpected(a: Answer) -> RouteError {
    tracing::debug!(answer = ?a, "an answer of the wrong kind");
    RouteError::Busy
}

impl Answer {
    pub fn info(self) -> Result<RoomInfo, RouteError> {
        match self {
            Answer::Info(i) => Ok(i),
            a => Err(unexpected(a)),
        }
    }

    pub fn users(self) -> Result<Vec<String>, RouteError> {
        match self {
            Answer::Users(u) => Ok(u),
            a => Err(unexpected(a)),
        }
    }

    pub fn rooms(self) -> Result<Vec<(String, RoomInfo)>, RouteError> {
        match self {
            Answer::Rooms(r) => Ok(r),
            a => Err(unexpected(a)),
        }
    }

    pub fn cache(self) -> Result<Option<(String, u64)>, RouteError> {
        match self {
            Answer::Cache(c) => Ok(c),
            a => Err(unexpected(a)),
        }
    }

    pub fn history(self) -> Result<Since, RouteError> {
        match self {
            Answer::History(s) => Ok(s),
            a => Err(unexpected(a)),
        }
    }

    /// A removal's outcome: `Ok(None)` when the ban list is full.
    pub fn removed(self) -> Result<Option<u32>, RouteError> {
        match self {
            Answer::Removed { sockets } => Ok(Some(sockets)),
            Answer::BansFull => Ok(None),
            a => Err(unexpected(a)),
        }
    }

    pub fn lifted(self) -> Result<bool, RouteError> {
        match self {
            Answer::Lifted(l) => Ok(l),
            a => Err(unexpected(a)),
        }
    }

    pub fn revoked(self) -> Result<bool, RouteError> {
        match self {
            Answer::Revoked(r) => Ok(r),
            a => Err(unexpected(a)),
        }
    }

    pub fn done(self) -> Result<(), RouteError> {
        match self {
            Answer::Done => Ok(()),
            a => Err(unexpected(a)),
        }
    }

    /// Add `more` (another owner's answer, or the next page) to this one.
    /// Lists are concatenated; call [`Answer::settle`] once all are in.
    pub fn merge(&mut self, more: Answer) {
        match (self, more) {
            (Answer::Users(a), Answer::Users(b)) => a.extend(b),
            (Answer::Rooms(a), Answer::Rooms(b)) => a.extend(b),
            _ => {}
        }
    }

    /// Sorted by name, each once: during a move a room may be listed by its
    /// old owner and its new one.
    pub fn settle(&mut self) {
        match self {
            Answer::Users(u) => {
                u.sort_unstable();
                u.dedup();
            }
            Answer::Rooms(r) => {
                r.sort_by(|a, b| a.0.cmp(&b.0));
                r.dedup_by(|a, b| a.0 == b.0);
            }
            _ => {}
        }
    }

    /// One page of a (sorted) list answer: the entries named after `after`,
    /// at most `max_bytes` of them by a rough wire size (always at least
    /// one), and the name the next page starts after. Other answers are one
    /// page as they are.
    pub fn page(self, after: Option<&str>, max_bytes: usize) -> (Answer, Option<String>) {
        match self {
            Answer::Users(u) => {
                let (page, next) = page(u, after, max_bytes, |u| u, |u| u.len() + 8);
                (Answer::Users(page), next)
            }
            Answer::Rooms(r) => {
                let (page, next) = page(r, after, max_bytes, |r| &r.0, |r| r.0.len() + 24);
                (Answer::Rooms(page), next)
            }
            other => (other, None),
        }
    }
}

fn page<T>(
    items: Vec<T>,
    after: Option<&str>,
    max_bytes: usize,
    name: impl Fn(&T) -> &str,
    size: impl Fn(&T) -> usize,
) -> (Vec<T>, Option<String>) {
    let mut out: Vec<T> = Vec::new();
    let mut bytes = 0;
    for item in items {
        if after.is_some_and(|a| name(&item) <= a) {
            continue;
        }
        bytes += size(&item);
        if bytes > max_bytes && !out.is_empty() {
            let next = out.last().map(|l| name(l).to_string());
            return (out, next);
        }
        out.push(item);
    }
    (out, None)
}

/// Frames travel as bytes and are checked for UTF-8 on arrival (a frame
/// that is not text is not one a socket may get).
mod frames {
    use crate::protocol::Frame;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[(u64, Frame)], s: S) -> Result<S::Ok, S::Error> {
        let as_bytes: Vec<(u64, bytes::Bytes)> = v
            .iter()
            .map(|(n, f)| (*n, bytes::Bytes::from(f.clone())))
            .collect();
        as_bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, Frame)>, D::Error> {
        let raw: Vec<(u64, bytes::Bytes)> = Vec::deserialize(d)?;
        raw.into_iter()
            .map(|(n, b)| {
                Frame::try_from(b)
                    .map(|f| (n, f))
                    .map_err(|_| D::Error::custom("a kept event that is not UTF-8"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_stay_under_the_limit_and_resume_after_the_last_name() {
        let rooms: Vec<(String, RoomInfo)> = (0..50_000)
            .map(|i| (format!("room-{i:06}"), RoomInfo::default()))
            .collect();
        let mut whole = Answer::Rooms(rooms.clone());
        whole.settle();
        let mut after: Option<String> = None;
        let mut got = Answer::Rooms(Vec::new());
        let mut pages = 0;
        loop {
            let (page, next) = whole.clone().page(after.as_deref(), 64 * 1024);
            let Answer::Rooms(p) = &page else {
                panic!("{page:?}")
            };
            assert!(!p.is_empty());
            assert!(p.iter().map(|r| r.0.len() + 24).sum::<usize>() <= 64 * 1024);
            got.merge(page);
            pages += 1;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert!(pages > 10, "{pages} pages");
        assert_eq!(got, Answer::Rooms(rooms));
    }

    #[test]
    fn one_entry_larger_than_a_page_still_goes_out() {
        let big = "u".repeat(100);
        let (page, next) = Answer::Users(vec![big.clone(), "v".into()]).page(None, 10);
        assert_eq!(page, Answer::Users(vec![big.clone()]));
        assert_eq!(next.as_deref(), Some(big.as_str()));
    }

    #[test]
    fn answers_from_several_owners_settle_sorted_and_once() {
        let info = RoomInfo {
            subscription_count: 1,
            user_count: 0,
        };
        let mut a = Answer::Rooms(vec![("b".into(), info), ("d".into(), info)]);
        a.merge(Answer::Rooms(vec![("a".into(), info), ("b".into(), info)]));
        a.settle();
        let names: Vec<String> = a.rooms().unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(names, ["a", "b", "d"]);
    }

    #[test]
    fn a_wrong_kind_of_answer_is_an_error_not_a_panic() {
        assert_eq!(Answer::Done.info(), Err(RouteError::Busy));
        assert_eq!(Answer::Users(vec![]).done(), Err(RouteError::Busy));
    }

    #[test]
    fn kept_events_travel_as_bytes_and_must_be_text() {
        let s = Since {
            epoch: "e1".into(),
            events: vec![(7, Frame::from("{\"event\":\"x\"}"))],
            complete: true,
            more: false,
        };
        let bytes = postcard::to_stdvec(&Answer::History(s.clone())).unwrap();
        assert_eq!(
            postcard::from_bytes::<Answer>(&bytes).unwrap(),
            Answer::History(s)
        );
        let mut bad = postcard::to_stdvec(&Answer::History(Since {
            events: vec![(1, Frame::from("ab"))],
            ..Since::default()
        }))
        .unwrap();
        let at = bad.len() - 4; // the frame's 2 bytes, then two bools
        bad[at] = 0xff;
        assert!(postcard::from_bytes::<Answer>(&bad).is_err());
    }
}
