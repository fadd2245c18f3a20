//! Realtime workers: each owns a share of the rooms, placed by the ring.
//!
//! A worker is an actor: one task, one bounded mailbox, state that no other
//! task touches, so there is no lock shared across workers and no store on
//! the hot path. Everything a worker is asked arrives as a [`Command`]; a
//! remote worker (over a network link) accepts the same commands, which is
//! why subscribers are identified by [`ConnId`] and frames are already-encoded
//! bytes.

mod pool;
mod room;
mod target;

pub use pool::Pool;
pub use room::Delivery;
pub use target::{RemoteEdge, Target};

use crate::outbound::{CloseOrder, Outbound};
use crate::protocol::{self, Frame};
use crate::types::{ConnId, Member, RoomInfo, RoomKey, Shed};
use room::{Joined, Room};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A socket, as the rooms know it: its id and its outbound queue.
#[derive(Clone)]
pub struct Subscriber {
    pub id: ConnId,
    pub to: Target,
}

impl Subscriber {
    /// A socket of this process.
    pub fn local(id: ConnId, out: Arc<Outbound>) -> Subscriber {
        Subscriber {
            id,
            to: Target::Local(out),
        }
    }
}

pub enum Command {
    /// `max_members` caps distinct users in a presence room: the limit in
    /// force where the socket subscribed, so a reload applies without
    /// touching the workers.
    Subscribe {
        room: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
        /// Told whether the socket is subscribed (refused: its
        /// `subscription_error` was queued to it first).
        reply: Option<oneshot::Sender<bool>>,
    },
    Unsubscribe {
        room: RoomKey,
        id: ConnId,
        shed: Shed,
    },
    /// With `coalesce`, only the latest frame per room is sent, once per
    /// interval. With `ack`, the edges it went to are told (they confirm
    /// receipt of `ack.0`); a coalesced publish is not acknowledged.
    Publish {
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        ack: Option<(u64, oneshot::Sender<Delivery>)>,
    },
    Query {
        room: RoomKey,
        reply: oneshot::Sender<RoomInfo>,
    },
    Users {
        room: RoomKey,
        reply: oneshot::Sender<Vec<String>>,
    },
    List {
        app: Arc<str>,
        prefix: String,
        reply: oneshot::Sender<Vec<(String, RoomInfo)>>,
    },
    /// A socket signed in as a user; `room` is that user's `#server-to-user-` channel.
    SignIn {
        room: RoomKey,
        sub: Subscriber,
    },
    SignOut {
        room: RoomKey,
        id: ConnId,
    },
    /// Close every socket signed in as the user (HTTP API terminate_connections).
    Terminate {
        room: RoomKey,
    },
    /// Drop every socket of an edge. Its link gone for good (`silent:
    /// false`): members held only by it are removed with member_removed to
    /// the rest. The edge reconnected (`silent: true`): it is about to
    /// register again what it still has here, so nothing is announced.
    PurgeEdge {
        edge: u64,
        silent: bool,
    },
    /// Drop, silently, every room (and sign-in registry) `keep` says no to:
    /// rooms this worker no longer owns (a cluster view changed). Replies
    /// with the number dropped, after every earlier command.
    Retain {
        keep: Arc<dyn Fn(&RoomKey) -> bool + Send + Sync>,
        done: oneshot::Sender<usize>,
    },
}

pub type Mailbox = mpsc::Sender<Command>;

/// Start one worker; it runs until every sender is dropped.
fn spawn(index: usize, mailbox: usize) -> Mailbox {
    let (tx, rx) = mpsc::channel(mailbox);
    let worker = Worker {
        index,
        rooms: HashMap::new(),
        users: HashMap::new(),
        coalesced: HashMap::new(),
    };
    tokio::spawn(worker.run(rx));
    tx
}

struct Worker {
    index: usize,
    rooms: HashMap<RoomKey, Room>,
    /// Signed-in sockets per user, keyed like the user's channel.
    users: HashMap<RoomKey, HashMap<ConnId, Target>>,
    /// Coalesced publishes waiting for their interval: the latest frame per room.
    /// Bounded by the number of rooms (one entry each).
    coalesced: HashMap<RoomKey, (Instant, Frame, Option<ConnId>)>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        tracing::debug!(worker = self.index, "worker started");
        loop {
            let next_flush = self.coalesced.values().map(|(at, _, _)| *at).min();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                _ = sleep_until_opt(next_flush) => self.flush_coalesced(Instant::now()),
            }
        }
        tracing::debug!(worker = self.index, "worker stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                room,
                sub,
                member,
                max_members,
                shed,
                reply,
            } => {
                let ok = self.subscribe(room, sub, member, max_members, shed);
                if let Some(r) = reply {
                    let _ = r.send(ok);
                }
            }
            Command::Unsubscribe { room, id, shed } => self.unsubscribe(room, id, shed),
            Command::Publish {
                room,
                frame,
                exclude,
                coalesce: None,
                ack,
            } => {
                let (ack_id, reply) = match ack {
                    Some((id, reply)) => (id, Some(reply)),
                    None => (0, None),
                };
                let d = match self.rooms.get(&room) {
                    Some(r) => r.fan_out(&room, &frame, exclude, None, ack_id),
                    None => Delivery::default(),
                };
                record(&d);
                if let Some(reply) = reply {
                    let _ = reply.send(d);
                }
            }
            Command::Publish {
                room,
                frame,
                exclude,
                coalesce: Some(every),
                ack,
            } => {
                if let Some((_, reply)) = ack {
                    // Coalesced events are sent later, latest wins: there is
                    // no per-event receipt to wait for.
                    let _ = reply.send(Delivery::default());
                }
                if !self.rooms.contains_key(&room) {
                    return;
                }
                crate::overload::shed("coalesced");
                let due = Instant::now() + every;
                match self.coalesced.get_mut(&room) {
                    // Keep the flush time of the first waiting frame; replace the frame.
                    Some(entry) => (entry.1, entry.2) = (frame, exclude),
                    None => {
                        self.coalesced.insert(room, (due, frame, exclude));
                    }
                }
            }
            Command::Query { room, reply } => {
                let _ = reply.send(self.rooms.get(&room).map(info).unwrap_or_default());
            }
            Command::Users { room, reply } => {
                let users = self
                    .rooms
                    .get(&room)
                    .map(|r| r.user_ids().map(String::from).collect());
                let _ = reply.send(users.unwrap_or_default());
            }
            Command::List { app, prefix, reply } => {
                let list = self
                    .rooms
                    .iter()
                    .filter(|(k, _)| k.app == app && k.channel.starts_with(&prefix))
                    .map(|(k, r)| (k.channel.to_string(), info(r)))
                    .collect();
                let _ = reply.send(list);
            }
            Command::SignIn { room, sub } => {
                self.users.entry(room).or_default().insert(sub.id, sub.to);
            }
            Command::SignOut { room, id } => {
                if let Some(socks) = self.users.get_mut(&room) {
                    socks.remove(&id);
                    if socks.is_empty() {
                        self.users.remove(&room);
                    }
                }
            }
            Command::Terminate { room } => {
                let order = CloseOrder {
                    code: protocol::codes::UNAUTHORIZED,
                    reason: "connection terminated by the app",
                };
                for (id, to) in self.users.get(&room).into_iter().flat_map(|s| s.iter()) {
                    to.close(&room, *id, order);
                }
            }
            Command::PurgeEdge { edge, silent } => self.purge_edge(edge, silent),
            Command::Retain { keep, done } => {
                let before = self.rooms.len() + self.users.len();
                let mut dropped_subs = 0usize;
                self.rooms.retain(|k, r| {
                    let kept = keep(k);
                    if !kept {
                        dropped_subs += r.subscription_count();
                    }
                    kept
                });
                self.users.retain(|k, _| keep(k));
                self.coalesced.retain(|k, _| keep(k));
                let dropped = before - self.rooms.len() - self.users.len();
                metrics::gauge!("herdgate_subscriptions").decrement(dropped_subs as f64);
                let _ = done.send(dropped);
            }
        }
    }

    fn flush_coalesced(&mut self, now: Instant) {
        let due: Vec<RoomKey> = self
            .coalesced
            .iter()
            .filter(|(_, (at, _, _))| *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let (Some((_, frame, exclude)), Some(room)) =
                (self.coalesced.remove(&key), self.rooms.get(&key))
            {
                record(&room.fan_out(&key, &frame, exclude, None, 0));
            }
        }
    }

    /// Whether the socket is subscribed afterwards.
    fn subscribe(
        &mut self,
        key: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
    ) -> bool {
        let id = sub.id;
        let to = sub.to.clone();
        let user = member.as_ref().map(|m| m.user_id.clone());
        let is_new_room = !self.rooms.contains_key(&key);
        let room = self.rooms.entry(key.clone()).or_default();
        match room.join(sub, member, max_members) {
            Joined::AlreadySubscribed => true,
            Joined::PresenceFull => {
                to.push_one(
                    &key,
                    id,
                    &protocol::subscription_error(
                        &key.channel,
                        "LimitReached",
                        "presence channel has reached its member limit",
                        403,
                    ),
                );
                if is_new_room {
                    self.rooms.remove(&key);
                }
                false
            }
            Joined::Ok { new_member } => {
                if is_new_room {
                    metrics::gauge!("herdgate_channels").increment(1.0);
                }
                metrics::gauge!("herdgate_subscriptions").increment(1.0);
                match user {
                    Some(user) => {
                        if !shed.silent {
                            room.push_to(&key, id, &room.presence_frame(&key.channel));
                        }
                        if new_member
                            && (!shed.silent || shed.announce)
                            && member_events_allowed(room, shed)
                        {
                            let added = protocol::member_added(
                                &key.channel,
                                &user,
                                room.member_info(&user),
                            );
                            record(&room.fan_out(&key, &added, None, Some(&user), 0));
                        }
                    }
                    None => {
                        if !shed.silent {
                            room.push_to(&key, id, &protocol::subscription_succeeded(&key.channel));
                        }
                    }
                }
                true
            }
        }
    }

    fn unsubscribe(&mut self, key: RoomKey, id: ConnId, shed: Shed) {
        let Some(room) = self.rooms.get_mut(&key) else {
            return;
        };
        let before = room.subscription_count();
        // The room's size as the member leaves (counting them) decides, as on joining.
        let announce =
            !shed.silent && room.user_count() <= shed.member_events_max.unwrap_or(usize::MAX);
        let gone_user = room.leave(id);
        if room.subscription_count() < before {
            metrics::gauge!("herdgate_subscriptions").decrement(1.0);
        }
        if let Some(user) = gone_user {
            if announce {
                record(&room.fan_out(
                    &key,
                    &protocol::member_removed(&key.channel, &user),
                    None,
                    None,
                    0,
                ));
            } else {
                crate::overload::shed("presence_member_event");
            }
        }
        if room.is_empty() {
            self.rooms.remove(&key);
            self.coalesced.remove(&key);
            metrics::gauge!("herdgate_channels").decrement(1.0);
        }
    }
}

impl Worker {
    fn purge_edge(&mut self, edge: u64, silent: bool) {
        let mut emptied = Vec::new();
        for (key, room) in self.rooms.iter_mut() {
            let before = room.subscription_count();
            let gone = room.purge_edge(edge);
            for user in gone.into_iter().filter(|_| !silent) {
                record(&room.fan_out(
                    key,
                    &protocol::member_removed(&key.channel, &user),
                    None,
                    None,
                    0,
                ));
            }
            metrics::gauge!("herdgate_subscriptions")
                .decrement((before - room.subscription_count()) as f64);
            if room.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.rooms.remove(&key);
            self.coalesced.remove(&key);
            metrics::gauge!("herdgate_channels").decrement(1.0);
        }
        self.users.retain(|_, socks| {
            socks.retain(|_, to| to.edge_id() != Some(edge));
            !socks.is_empty()
        });
    }
}

fn member_events_allowed(room: &Room, shed: Shed) -> bool {
    match shed.member_events_max {
        Some(max) if room.user_count() > max => {
            crate::overload::shed("presence_member_event");
            false
        }
        _ => true,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn info(r: &Room) -> RoomInfo {
    RoomInfo {
        subscription_count: r.subscription_count(),
        user_count: r.user_count(),
    }
}

fn record(d: &Delivery) {
    if d.queued > 0 {
        metrics::counter!("herdgate_messages_delivered_total").increment(d.queued);
    }
    if d.overflowed > 0 {
        metrics::counter!("herdgate_outbound_overflows_total").increment(d.overflowed);
    }
}
