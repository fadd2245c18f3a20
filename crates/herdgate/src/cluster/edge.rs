//! The edge role: client sockets and the HTTP API, no rooms of its own.
//!
//! Every edge builds the same ring from the same worker list; a room's owner
//! is the first worker in its ring order that is up, so when a worker goes
//! away only its rooms move (to their next owners) and when it returns only
//! they move back. The edge keeps its own sockets per room, registers them
//! with the owner, and fans out what the owner sends it once per room.

use super::link::{read_msg, write_msg, Msg, VERSION};
use crate::outbound::{CloseOrder, Outbound};
use crate::protocol::Frame;
use crate::ring::{NamedRing, DEFAULT_VNODES};
use crate::types::{ConnId, Member, RoomInfo, RoomKey, RouteError, Shed};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const LINK_QUEUE: usize = 65_536;
use crate::config::LINK_RECONNECT_CAP as RECONNECT_CAP;

struct LocalSub {
    out: Arc<Outbound>,
    member: Option<Member>,
    max_members: usize,
}

#[derive(Default)]
struct LocalRoom {
    /// The worker this room's sockets are registered with.
    owner: Option<usize>,
    subs: HashMap<ConnId, LocalSub>,
}

struct WorkerLink {
    addr: String,
    /// Removed from the worker list (reload): its task ends, it is never up again.
    retired: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    up: AtomicBool,
    /// Whether it was ever up: its first arrival moves no rooms that exist.
    seen: AtomicBool,
    changed: Mutex<Instant>,
}

/// The worker set: a ring over addresses, and which link serves each.
struct Members {
    ring: NamedRing,
    index: HashMap<String, usize>,
}

pub struct Edge {
    id: u64,
    /// Every link this edge ever had; a worker's index never changes.
    links: std::sync::RwLock<Vec<Arc<WorkerLink>>>,
    members: std::sync::RwLock<Members>,
    rooms: Mutex<HashMap<RoomKey, LocalRoom>>,
    users: Mutex<HashMap<RoomKey, HashMap<ConnId, Arc<Outbound>>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Msg>>>,
    next_id: AtomicU64,
    heartbeat: Duration,
    settle: Duration,
    tls: Option<Arc<super::tls::LinkTls>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Edge {
    pub fn start(
        id: u64,
        workers: &[String],
        heartbeat: Duration,
        settle: Duration,
        tls: Option<super::tls::LinkTls>,
    ) -> Arc<Edge> {
        let edge = Arc::new(Edge {
            id,
            links: std::sync::RwLock::new(Vec::new()),
            members: std::sync::RwLock::new(Members {
                ring: NamedRing::new(&[], 1),
                index: HashMap::new(),
            }),
            rooms: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            heartbeat,
            settle,
            tls: tls.map(Arc::new),
        });
        edge.set_workers(workers);
        edge
    }

    fn link(&self, i: usize) -> Arc<WorkerLink> {
        self.links.read().unwrap_or_else(|p| p.into_inner())[i].clone()
    }

    /// Put a (new) worker list in force: links to new workers start, removed
    /// workers' links end, and only the rooms whose owner changed move.
    pub fn set_workers(self: &Arc<Self>, workers: &[String]) {
        let mut started = Vec::new();
        {
            let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
            let mut index = HashMap::new();
            for addr in workers {
                let i = match links
                    .iter()
                    .position(|l| &l.addr == addr && !l.retired.load(Ordering::Acquire))
                {
                    Some(i) => i,
                    None => {
                        links.push(Arc::new(WorkerLink {
                            addr: addr.clone(),
                            retired: AtomicBool::new(false),
                            tx: Mutex::new(None),
                            up: AtomicBool::new(false),
                            seen: AtomicBool::new(false),
                            changed: Mutex::new(Instant::now() - self.settle),
                        }));
                        started.push(links.len() - 1);
                        links.len() - 1
                    }
                };
                index.insert(addr.clone(), i);
            }
            for (i, l) in links.iter().enumerate() {
                if !index.values().any(|j| *j == i) && !l.retired.swap(true, Ordering::AcqRel) {
                    l.up.store(false, Ordering::Release);
                    *lock(&l.changed) = Instant::now();
                    *lock(&l.tx) = None;
                    tracing::info!(worker = %l.addr, "worker removed from the list");
                }
            }
            *self.members.write().unwrap_or_else(|p| p.into_inner()) = Members {
                ring: NamedRing::new(workers, DEFAULT_VNODES),
                index,
            };
        }
        for i in started {
            tokio::spawn(self.clone().link_task(i));
        }
        self.rehome();
    }

    /// Links in ring order for a room: (index, link).
    fn candidates(&self, room: &RoomKey) -> Vec<usize> {
        let m = self.members.read().unwrap_or_else(|p| p.into_inner());
        m.ring
            .candidates(&room.app, &room.channel)
            .filter_map(|a| m.index.get(a).copied())
            .collect()
    }

    /// The first up worker in the room's ring order.
    fn owner(&self, room: &RoomKey) -> Option<usize> {
        self.candidates(room)
            .into_iter()
            .find(|i| self.link(*i).up.load(Ordering::Acquire))
    }

    /// While a room's ownership is settling (a worker before or at its owner
    /// changed state recently), publishes are refused rather than risk
    /// reaching only the edges that registered there already.
    fn settling(&self, room: &RoomKey) -> bool {
        for i in self.candidates(room) {
            let link = self.link(i);
            if lock(&link.changed).elapsed() < self.settle {
                return true;
            }
            if link.up.load(Ordering::Acquire) {
                return false;
            }
        }
        false
    }

    fn send_to(&self, worker: usize, msg: Msg) -> Result<(), RouteError> {
        let tx = lock(&self.link(worker).tx)
            .clone()
            .ok_or(RouteError::Busy)?;
        tx.try_send(msg).map_err(|_| RouteError::Busy)
    }

    fn send(&self, room: &RoomKey, msg: Msg) -> Result<(), RouteError> {
        let owner = self.owner(room).ok_or(RouteError::Busy)?;
        self.send_to(owner, msg)
    }

    async fn request(
        &self,
        worker: usize,
        make: impl FnOnce(u64) -> Msg,
        wait: Duration,
    ) -> Result<Msg, RouteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let sent = self.send_to(worker, make(id));
        let result = match sent {
            Ok(()) => tokio::time::timeout(wait, rx)
                .await
                .map_err(|_| RouteError::Busy)?
                .map_err(|_| RouteError::Busy),
            Err(e) => Err(e),
        };
        lock(&self.pending).remove(&id);
        result
    }

    pub fn subscribe(
        &self,
        room: RoomKey,
        conn: ConnId,
        out: Arc<Outbound>,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
    ) -> Result<(), RouteError> {
        let owner = self.owner(&room).ok_or(RouteError::Busy)?;
        let msg = subscribe_msg(
            &room,
            conn,
            member.as_ref(),
            max_members,
            shed.member_events_max,
            false,
        );
        {
            let mut rooms = lock(&self.rooms);
            let r = rooms.entry(room.clone()).or_default();
            r.owner.get_or_insert(owner);
            r.subs.insert(
                conn,
                LocalSub {
                    out,
                    member,
                    max_members,
                },
            );
        }
        self.send_to(owner, msg)
    }

    pub fn unsubscribe(&self, room: RoomKey, conn: ConnId, shed: Shed) -> Result<(), RouteError> {
        let owner = {
            let mut rooms = lock(&self.rooms);
            let Some(r) = rooms.get_mut(&room) else {
                return Ok(());
            };
            r.subs.remove(&conn);
            let owner = r.owner;
            if r.subs.is_empty() {
                rooms.remove(&room);
            }
            owner
        };
        let msg = Msg::Unsubscribe {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            events_max: shed.member_events_max.map(|m| m as u32),
            silent: false,
        };
        owner.map_or(Ok(()), |o| self.send_to(o, msg))
    }

    /// Hand an event to the room's owner. An `acknowledged` publish (the
    /// HTTP API answers 200 for it) is refused while the room settles after a
    /// move, and succeeds only once the owner confirms it reached every
    /// subscribed edge's link; a client event is acknowledged to nobody and
    /// just goes.
    pub async fn publish(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        acknowledged: Option<Duration>,
    ) -> Result<(), RouteError> {
        let refused = |e| {
            metrics::counter!("herdgate_link_publish_refused_total").increment(1);
            e
        };
        let make = |id| Msg::Publish {
            id,
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            frame: frame.as_str().to_string(),
            exclude: exclude.map(|c| c.0),
            coalesce_ms: coalesce.map(|d| d.as_millis() as u64),
        };
        let Some(wait) = acknowledged else {
            return self.send(&room, make(0));
        };
        if self.settling(&room) {
            return Err(refused(RouteError::Busy));
        }
        let owner = self.owner(&room).ok_or(RouteError::Busy).map_err(refused)?;
        match self.request(owner, make, wait).await.map_err(refused)? {
            Msg::Ack { .. } => Ok(()),
            _ => Err(refused(RouteError::Busy)),
        }
    }

    pub async fn query(&self, room: RoomKey, wait: Duration) -> Result<RoomInfo, RouteError> {
        let owner = self.owner(&room).ok_or(RouteError::Busy)?;
        let (app, channel) = (room.app.to_string(), room.channel.to_string());
        match self
            .request(owner, |id| Msg::Query { id, app, channel }, wait)
            .await?
        {
            Msg::QueryReply {
                subscriptions,
                users,
                ..
            } => Ok(RoomInfo {
                subscription_count: subscriptions as usize,
                user_count: users as usize,
            }),
            _ => Err(RouteError::Busy),
        }
    }

    pub async fn users(&self, room: RoomKey, wait: Duration) -> Result<Vec<String>, RouteError> {
        let owner = self.owner(&room).ok_or(RouteError::Busy)?;
        let (app, channel) = (room.app.to_string(), room.channel.to_string());
        match self
            .request(owner, |id| Msg::Users { id, app, channel }, wait)
            .await?
        {
            Msg::UsersReply { users, .. } => Ok(users),
            _ => Err(RouteError::Busy),
        }
    }

    pub async fn list(
        &self,
        app: &Arc<str>,
        prefix: &str,
        wait: Duration,
    ) -> Result<Vec<(String, RoomInfo)>, RouteError> {
        let mut all = Vec::new();
        let links = self.links.read().unwrap_or_else(|p| p.into_inner()).clone();
        for (i, l) in links.iter().enumerate() {
            if !l.up.load(Ordering::Acquire) {
                continue;
            }
            let (a, p) = (app.to_string(), prefix.to_string());
            if let Msg::ListReply { rooms, .. } = self
                .request(
                    i,
                    |id| Msg::List {
                        id,
                        app: a,
                        prefix: p,
                    },
                    wait,
                )
                .await?
            {
                all.extend(rooms.into_iter().map(|(n, s, u)| {
                    (
                        n,
                        RoomInfo {
                            subscription_count: s as usize,
                            user_count: u as usize,
                        },
                    )
                }));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    pub fn sign_in(
        &self,
        room: RoomKey,
        user: &str,
        conn: ConnId,
        out: Arc<Outbound>,
    ) -> Result<(), RouteError> {
        lock(&self.users)
            .entry(room.clone())
            .or_default()
            .insert(conn, out);
        self.send(
            &room,
            Msg::SignIn {
                app: room.app.to_string(),
                user: user.to_string(),
                conn: conn.0,
            },
        )
    }

    pub fn sign_out(&self, room: RoomKey, user: &str, conn: ConnId) -> Result<(), RouteError> {
        {
            let mut users = lock(&self.users);
            if let Some(s) = users.get_mut(&room) {
                s.remove(&conn);
                if s.is_empty() {
                    users.remove(&room);
                }
            }
        }
        self.send(
            &room,
            Msg::SignOut {
                app: room.app.to_string(),
                user: user.to_string(),
                conn: conn.0,
            },
        )
    }

    pub fn terminate(&self, room: RoomKey, user: &str) -> Result<(), RouteError> {
        self.send(
            &room,
            Msg::Terminate {
                app: room.app.to_string(),
                user: user.to_string(),
            },
        )
    }

    /// Frames waiting on the fullest link.
    pub fn max_queue_depth(&self) -> usize {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| {
                lock(&l.tx)
                    .as_ref()
                    .map(|t| t.max_capacity() - t.capacity())
            })
            .max()
            .unwrap_or(0)
    }

    /// Keep one worker link up: connect, hello, serve, and on loss move its
    /// rooms; reconnect with jittered backoff.
    async fn link_task(self: Arc<Self>, i: usize) {
        let mut backoff = Duration::from_millis(100);
        while !self.link(i).retired.load(Ordering::Acquire) {
            match self.clone().serve_link(i).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::debug!(worker = %self.link(i).addr, error = %e, "link attempt failed")
                }
            }
            let jitter = backoff.mul_f64(0.5 + rand::random::<f64>());
            tokio::time::sleep(jitter).await;
            // Capped low: a returning worker must be seen by every edge well
            // within the settle period (cluster.settle, docs/CLUSTER.md).
            backoff = (backoff * 2).min(RECONNECT_CAP);
        }
    }

    async fn serve_link(self: Arc<Self>, i: usize) -> Result<(), super::link::LinkError> {
        let addr = self.link(i).addr.clone();
        let stream =
            tokio::time::timeout(self.heartbeat * 4, tokio::net::TcpStream::connect(&addr))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let _ = stream.set_nodelay(true);
        let io: Box<dyn super::tls::LinkIo> = match &self.tls {
            Some(tls) => tokio::time::timeout(self.heartbeat * 4, tls.connect(&addr, stream))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??,
            None => Box::new(stream),
        };
        let (mut r, mut w) = tokio::io::split(io);
        write_msg(
            &mut w,
            &Msg::Hello {
                version: VERSION,
                edge: self.id,
            },
        )
        .await?;
        match tokio::time::timeout(self.heartbeat * 4, read_msg(&mut r)).await {
            Ok(Ok(Msg::HelloAck { version: VERSION })) => {}
            _ => return Err(std::io::Error::from(std::io::ErrorKind::InvalidData).into()),
        }
        let (tx, rx) = mpsc::channel::<Msg>(LINK_QUEUE);
        let writer = tokio::spawn(super::link::write_loop(w, rx, self.heartbeat));
        let link = self.link(i);
        if link.retired.load(Ordering::Acquire) {
            writer.abort();
            return Ok(());
        }
        *lock(&link.tx) = Some(tx);
        self.set_up(i, true);
        tracing::info!(worker = %addr, "worker link up");
        while let Ok(Ok(msg)) = tokio::time::timeout(self.heartbeat * 3, read_msg(&mut r)).await {
            if link.retired.load(Ordering::Acquire) {
                break; // removed from the list: its rooms moved already
            }
            self.on_message(msg);
        }
        writer.abort();
        *lock(&self.link(i).tx) = None;
        self.set_up(i, false);
        tracing::warn!(worker = %addr, "worker link lost; its rooms move to their next owners");
        Ok(())
    }

    fn set_up(&self, i: usize, up: bool) {
        self.link(i).up.store(up, Ordering::Release);
        if !up || self.link(i).seen.swap(true, Ordering::AcqRel) {
            *lock(&self.link(i).changed) = Instant::now();
        }
        metrics::gauge!("herdgate_link_up", "worker" => self.link(i).addr.clone()).set(if up {
            1.0
        } else {
            0.0
        });
        self.rehome();
    }

    /// Register every local room with its current owner, where that changed.
    fn rehome(&self) {
        let mut moves = Vec::new();
        let mut moved: Vec<(Arc<str>, Arc<Outbound>)> = Vec::new();
        {
            let mut rooms = lock(&self.rooms);
            for (key, room) in rooms.iter_mut() {
                let owner = self.owner(key);
                if owner == room.owner {
                    continue;
                }
                let old = std::mem::replace(&mut room.owner, owner);
                for (conn, s) in &room.subs {
                    if let Some(o) = old.filter(|o| self.link(*o).up.load(Ordering::Acquire)) {
                        let unsub = Msg::Unsubscribe {
                            app: key.app.to_string(),
                            channel: key.channel.to_string(),
                            conn: conn.0,
                            events_max: None,
                            silent: true,
                        };
                        moves.push((o, unsub));
                    }
                    if let Some(n) = owner {
                        moves.push((
                            n,
                            subscribe_msg(key, *conn, s.member.as_ref(), s.max_members, None, true),
                        ));
                    }
                    s.out.push(&room_frame(&key.channel, "moving"));
                    moved.push((key.channel.clone(), s.out.clone()));
                }
                metrics::counter!("herdgate_room_moves_total").increment(1);
            }
        }
        for (w, m) in moves {
            let _ = self.send_to(w, m);
        }
        if !moved.is_empty() {
            // Publishes resume after the settle period; say so then.
            let settle = self.settle;
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                for (channel, out) in moved {
                    out.push(&room_frame(&channel, "ready"));
                }
            });
        }
    }

    fn on_message(&self, msg: Msg) {
        let key = |app: &str, channel: &str| RoomKey {
            app: Arc::from(app),
            channel: Arc::from(channel),
        };
        match msg {
            Msg::Heartbeat => {}
            Msg::Deliver {
                app,
                channel,
                frame,
                exclude,
                except_user,
            } => {
                let frame = Frame::from(frame);
                let rooms = lock(&self.rooms);
                if let Some(r) = rooms.get(&key(&app, &channel)) {
                    let mut n = 0u64;
                    for (conn, s) in &r.subs {
                        let user = s.member.as_ref().map(|m| &*m.user_id);
                        if Some(conn.0) != exclude
                            && (except_user.is_none() || user != except_user.as_deref())
                        {
                            s.out.push(&frame);
                            n += 1;
                        }
                    }
                    metrics::counter!("herdgate_messages_delivered_total").increment(n);
                }
            }
            Msg::DeliverTo {
                app,
                channel,
                conn,
                frame,
            } => {
                if let Some(s) = lock(&self.rooms)
                    .get(&key(&app, &channel))
                    .and_then(|r| r.subs.get(&ConnId(conn)))
                {
                    s.out.push(&Frame::from(frame));
                }
            }
            Msg::Close {
                app,
                channel,
                conn,
                code,
            } => {
                if let Some(out) = lock(&self.users)
                    .get(&key(&app, &channel))
                    .and_then(|u| u.get(&ConnId(conn)))
                {
                    out.close(CloseOrder {
                        code,
                        reason: "connection terminated by the app",
                    });
                }
            }
            reply @ (Msg::Ack { .. }
            | Msg::QueryReply { .. }
            | Msg::UsersReply { .. }
            | Msg::ListReply { .. }) => {
                let id = match &reply {
                    Msg::Ack { id }
                    | Msg::QueryReply { id, .. }
                    | Msg::UsersReply { id, .. }
                    | Msg::ListReply { id, .. } => *id,
                    _ => unreachable!("matched above"),
                };
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            other => tracing::debug!(?other, "unexpected frame from a worker"),
        }
    }
}

fn subscribe_msg(
    room: &RoomKey,
    conn: ConnId,
    member: Option<&Member>,
    max_members: usize,
    events_max: Option<usize>,
    silent: bool,
) -> Msg {
    Msg::Subscribe {
        app: room.app.to_string(),
        channel: room.channel.to_string(),
        conn: conn.0,
        member: member.map(|m| {
            (
                m.user_id.to_string(),
                m.user_info.as_ref().map(|i| i.get().to_string()),
            )
        }),
        max_members: max_members as u32,
        events_max: events_max.map(|m| m as u32),
        silent,
    }
}

/// Told to the sockets of a room when it starts moving to another worker
/// (`moving`) and when publishes to it flow again (`ready`).
fn room_frame(channel: &str, state: &str) -> Frame {
    crate::protocol::event(
        "herdgate:status",
        Some(channel),
        &format!(r#"{{"room":"{state}"}}"#),
    )
}
