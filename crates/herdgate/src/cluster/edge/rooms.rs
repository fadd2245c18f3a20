//! The edge's own sockets per room, on one actor per core.
//!
//! A room's owner sends the edge one copy of each event; the edge fans it
//! out to its sockets in the room. The rooms are split over actors by room
//! hash (as the in-process workers are), so an edge uses every core, and a
//! fan-out holds no lock: each actor alone touches its rooms.
//!
//! Everything that must keep link order goes through the actor of the room
//! in that order: a registration is *pending* here until its owner confirms
//! it (`Confirm`), deliveries for the room queue behind it, and only a
//! confirmed socket receives them.

use crate::outbound::{CloseOrder, Outbound};
use crate::protocol::Frame;
use crate::ring::room_hash;
use crate::types::{ConnId, Member, RoomKey};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Commands waiting in one rooms actor.
const MAILBOX: usize = 65_536;

/// A socket as the edge keeps it, with what a re-registration needs.
#[derive(Clone)]
pub(super) struct LocalSub {
    pub out: Arc<Outbound>,
    pub member: Option<Member>,
    /// Outside presence channels, the user it was signed in as (whom a
    /// moderator's removal names).
    pub user: Option<Arc<str>>,
    pub max_members: usize,
    /// Opted in to resume: its events carry their serial.
    pub resume: bool,
}

/// One registration to send again (a room moved, a link came back).
pub(super) enum Again {
    Sub {
        room: RoomKey,
        conn: ConnId,
        sub: LocalSub,
    },
    SignIn {
        room: RoomKey,
        conn: ConnId,
    },
    Watch {
        room: RoomKey,
        conn: ConnId,
    },
}

/// How the room stands at this edge, as its sockets were told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RoomState {
    Ready,
    /// Moving to another owner: publishes wait for its `Open`.
    Moving,
    /// Its owner cannot be reached from here.
    Unavailable,
}

impl RoomState {
    fn word(self) -> &'static str {
        match self {
            RoomState::Ready => "ready",
            RoomState::Moving => "moving",
            RoomState::Unavailable => "unavailable",
        }
    }
}

/// Receipts of acknowledged deliveries, batched per link.
pub(super) trait Receipts: Send + Sync {
    fn receipt(&self, ack_id: u64, ok: bool);
}

pub(super) type Pred = Arc<dyn Fn(&RoomKey) -> bool + Send + Sync>;

pub(super) enum RoomCmd {
    Join {
        room: RoomKey,
        conn: ConnId,
        sub: LocalSub,
        done: oneshot::Sender<bool>,
    },
    /// The owner's answer; `error`: what to tell the socket when the owner
    /// could not even decide (it said nothing to it).
    Confirm {
        room: RoomKey,
        conn: ConnId,
        ok: bool,
        error: Option<Frame>,
    },
    Leave {
        room: RoomKey,
        conn: ConnId,
    },
    Deliver {
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        except_user: Option<String>,
        receipt: Option<(Arc<dyn Receipts>, u64)>,
        serial: Option<u64>,
    },
    DeliverTo {
        room: RoomKey,
        conn: ConnId,
        frame: Frame,
    },
    SignIn {
        room: RoomKey,
        conn: ConnId,
        out: Arc<Outbound>,
    },
    SignOut {
        room: RoomKey,
        conn: ConnId,
    },
    /// A socket watches the user of `room` (their user channel).
    Watch {
        room: RoomKey,
        conn: ConnId,
        out: Arc<Outbound>,
    },
    Unwatch {
        room: RoomKey,
        conn: ConnId,
    },
    CloseUser {
        room: RoomKey,
        conn: ConnId,
        code: u16,
    },
    /// The socket signed in as `user` (kept for its re-registrations).
    Identify {
        room: RoomKey,
        conn: ConnId,
        user: Arc<str>,
    },
    /// The owner took the socket out of the room (a moderator): forgotten
    /// here, and told with `notice`.
    Removed {
        room: RoomKey,
        conn: ConnId,
        notice: Frame,
    },
    /// Every confirmed registration (and sign-in) of the rooms `pred` picks.
    Collect {
        pred: Pred,
        reply: oneshot::Sender<Vec<Again>>,
    },
    /// Tell the sockets of the rooms `pred` picks (and that are not in it
    /// already) the room's new state.
    SetState {
        pred: Pred,
        state: RoomState,
    },
}

#[derive(Default)]
struct LocalRoom {
    subs: HashMap<ConnId, LocalSub>,
    pending: HashMap<ConnId, (LocalSub, oneshot::Sender<bool>)>,
    state: Option<RoomState>,
}

#[derive(Default)]
struct Shard {
    rooms: HashMap<RoomKey, LocalRoom>,
    users: HashMap<RoomKey, HashMap<ConnId, Arc<Outbound>>>,
    /// Sockets of this edge watching the user of each user channel.
    watchers: HashMap<RoomKey, HashMap<ConnId, Arc<Outbound>>>,
}

pub(super) struct LocalRooms {
    shards: Vec<mpsc::Sender<RoomCmd>>,
}

impl LocalRooms {
    pub fn start(n: usize) -> LocalRooms {
        let shards = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(MAILBOX);
                tokio::spawn(Shard::default().run(rx));
                tx
            })
            .collect();
        LocalRooms { shards }
    }

    fn shard(&self, room: &RoomKey) -> &mpsc::Sender<RoomCmd> {
        &self.shards[(room_hash(&room.app, &room.channel) % self.shards.len() as u64) as usize]
    }

    /// Queue a command for the room's actor, waiting for mailbox space.
    pub async fn send(&self, room: &RoomKey, cmd: RoomCmd) {
        let _ = self.shard(room).send(cmd).await;
    }

    /// Queue a command for every actor (`make` builds one per actor).
    pub async fn broadcast(&self, make: impl Fn() -> RoomCmd) {
        for s in &self.shards {
            let _ = s.send(make()).await;
        }
    }

    /// Every registration of the rooms `pred` picks, from every actor.
    pub async fn collect(&self, pred: Pred) -> Vec<Again> {
        let mut out = Vec::new();
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            let cmd = RoomCmd::Collect {
                pred: pred.clone(),
                reply: tx,
            };
            if s.send(cmd).await.is_ok() {
                out.extend(rx.await.unwrap_or_default());
            }
        }
        out
    }

    pub fn max_depth(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.max_capacity() - s.capacity())
            .max()
            .unwrap_or(0)
    }
}

impl Shard {
    async fn run(mut self, mut rx: mpsc::Receiver<RoomCmd>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: RoomCmd) {
        match cmd {
            RoomCmd::Join {
                room,
                conn,
                sub,
                done,
            } => {
                self.rooms
                    .entry(room)
                    .or_default()
                    .pending
                    .insert(conn, (sub, done));
            }
            RoomCmd::Confirm {
                room,
                conn,
                ok,
                error,
            } => {
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                if let Some((sub, done)) = r.pending.remove(&conn) {
                    if let Some(frame) = error {
                        sub.out.push(&frame);
                    }
                    if ok {
                        r.subs.insert(conn, sub);
                    }
                    let _ = done.send(ok);
                }
                self.drop_if_empty(&room);
            }
            RoomCmd::Leave { room, conn } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.subs.remove(&conn);
                    r.pending.remove(&conn);
                }
                self.drop_if_empty(&room);
            }
            RoomCmd::Deliver {
                room,
                frame,
                exclude,
                except_user,
                receipt,
                serial,
            } => {
                let mut n = 0u64;
                let mut numbered: Option<Frame> = None;
                if let Some(r) = self.rooms.get(&room) {
                    for (conn, s) in &r.subs {
                        let user = s.member.as_ref().map(|m| &*m.user_id);
                        if Some(*conn) != exclude
                            && (except_user.is_none() || user != except_user.as_deref())
                        {
                            let f = match serial {
                                Some(n) if s.resume => numbered
                                    .get_or_insert_with(|| crate::protocol::with_serial(&frame, n)),
                                _ => &frame,
                            };
                            s.out.push_shared(f);
                            n += 1;
                        }
                    }
                }
                metrics::counter!("herdgate_messages_delivered_total").increment(n);
                // Delivered here means: in every subscribed socket's queue
                // (a room with no socket left here has nothing to deliver).
                if let Some((to, id)) = receipt {
                    to.receipt(id, true);
                }
            }
            RoomCmd::DeliverTo { room, conn, frame } => {
                // A registration's answer reaches the socket while it is
                // still pending: it is queued before the confirmation.
                let sub = self.rooms.get(&room).and_then(|r| {
                    r.subs
                        .get(&conn)
                        .or(r.pending.get(&conn).map(|(s, _)| s))
                        .map(|s| &s.out)
                });
                // Or a watched user came online or went offline: the
                // watcher need not be in the user's room on this edge
                // (which exists when that user is subscribed here).
                let to = sub.or_else(|| self.watchers.get(&room).and_then(|w| w.get(&conn)));
                if let Some(out) = to {
                    out.push(&frame);
                }
            }
            RoomCmd::Watch { room, conn, out } => {
                self.watchers.entry(room).or_default().insert(conn, out);
            }
            RoomCmd::Unwatch { room, conn } => {
                if let Some(w) = self.watchers.get_mut(&room) {
                    w.remove(&conn);
                    if w.is_empty() {
                        self.watchers.remove(&room);
                    }
                }
            }
            RoomCmd::SignIn { room, conn, out } => {
                self.users.entry(room).or_default().insert(conn, out);
            }
            RoomCmd::SignOut { room, conn } => {
                if let Some(u) = self.users.get_mut(&room) {
                    u.remove(&conn);
                    if u.is_empty() {
                        self.users.remove(&room);
                    }
                }
            }
            RoomCmd::Identify { room, conn, user } => {
                if let Some(s) = self
                    .rooms
                    .get_mut(&room)
                    .and_then(|r| r.subs.get_mut(&conn))
                {
                    s.user = Some(user);
                }
            }
            RoomCmd::Removed { room, conn, notice } => {
                if let Some(sub) = self.rooms.get_mut(&room).and_then(|r| r.subs.remove(&conn)) {
                    sub.out.push(&notice);
                }
                self.drop_if_empty(&room);
            }
            RoomCmd::CloseUser { room, conn, code } => {
                if let Some(out) = self.users.get(&room).and_then(|u| u.get(&conn)) {
                    out.close(CloseOrder {
                        code,
                        reason: "connection terminated by the app",
                    });
                }
            }
            RoomCmd::Collect { pred, reply } => {
                let mut out = Vec::new();
                for (room, r) in &self.rooms {
                    if pred(room) {
                        out.extend(r.subs.iter().map(|(conn, sub)| Again::Sub {
                            room: room.clone(),
                            conn: *conn,
                            sub: sub.clone(),
                        }));
                    }
                }
                for (room, u) in &self.users {
                    if pred(room) {
                        out.extend(u.keys().map(|conn| Again::SignIn {
                            room: room.clone(),
                            conn: *conn,
                        }));
                    }
                }
                for (room, w) in &self.watchers {
                    if pred(room) {
                        out.extend(w.keys().map(|conn| Again::Watch {
                            room: room.clone(),
                            conn: *conn,
                        }));
                    }
                }
                let _ = reply.send(out);
            }
            RoomCmd::SetState { pred, state } => {
                for (room, r) in self.rooms.iter_mut() {
                    let was = r.state.unwrap_or(RoomState::Ready);
                    if was == state || !pred(room) {
                        continue;
                    }
                    r.state = Some(state);
                    let frame = status_frame(&room.channel, state);
                    for s in r.subs.values() {
                        s.out.push(&frame);
                    }
                }
            }
        }
    }

    fn drop_if_empty(&mut self, room: &RoomKey) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.subs.is_empty() && r.pending.is_empty())
        {
            self.rooms.remove(room);
        }
    }
}

/// `herdgate:status` on a channel: `{"room":"moving"|"unavailable"|"ready"}`.
pub(super) fn status_frame(channel: &str, state: RoomState) -> Frame {
    crate::protocol::event(
        "herdgate:status",
        Some(channel),
        &format!(r#"{{"room":"{}"}}"#, state.word()),
    )
}
