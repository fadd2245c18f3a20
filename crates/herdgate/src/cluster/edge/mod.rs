//! The edge role: client sockets and the HTTP API, no rooms of its own.
//!
//! The edge routes room X to `owner(X, view)` — its applied membership view
//! ([`View`]) — and to nothing else: it never skips a worker because its
//! own link to it is down. If that link is down, X is **unavailable at
//! this edge**: API publishes get 503, client events are dropped (counted),
//! new subscriptions get `pusher:subscription_error` (503), and X's sockets
//! are told `herdgate:status {"room":"unavailable"}` (then `ready`). Rooms
//! move only when the view changes ([`handover`]).
//!
//! The parts: [`links`] keeps one link per worker of the view; [`rooms`]
//! holds the edge's sockets per room on per-core actors and fans out what
//! the owners send; [`pending`] matches answers to requests; [`handover`]
//! applies each new view (re-register moved rooms, wait for the old owners'
//! `Sealed`, acknowledge the view).
//!
//! **Fencing.** A `Deliver` for room X from worker W is accepted only if W
//! owns X in the applied view, or owned it in a view W has not sealed yet
//! (W's frames before its `Sealed` may still be for rooms it lost). Anything
//! else is dropped and counted (`herdgate_deliver_fenced_total`): no edge
//! ever delivers a room from two owners.

mod handover;
mod links;
mod pending;
mod rooms;

use super::link::{LinkTx, Msg, Refusal, Reply, SendError};
use super::membership::Membership;
use super::view::{NodeId, View};
use crate::op::{Answer, Ask, Join, Scope, Tell};
use crate::outbound::Outbound;
use crate::protocol::Frame;
use crate::types::{ConnId, Resume, RoomKey, RouteError, Shed};
use arc_swap::ArcSwap;
use bytes::Bytes;
use links::WorkerLink;
use pending::Pending;
use rooms::{LocalRooms, LocalSub, RoomCmd};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How long a subscription waits for its owner's answer.
const REGISTER_WAIT: Duration = Duration::from_secs(2);
/// Views kept for fencing: a worker's frames are judged by the views it may
/// not have sealed yet.
const HISTORY: usize = 16;

/// Re-judge the freeze a few times per heartbeat, until the edge is gone.
async fn freeze_checks(edge: std::sync::Weak<Edge>) {
    while let Some(e) = edge.upgrade() {
        e.check_freeze();
        let every = (e.heartbeat / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        drop(e);
        tokio::time::sleep(every).await;
    }
}

/// What an edge needs to start.
pub struct EdgeConfig {
    pub id: NodeId,
    pub membership: Membership,
    pub heartbeat: Duration,
    pub handover_timeout: Duration,
    pub tls: Option<super::tls::LinkTls>,
    pub secret: String,
    pub link_queue_bytes: usize,
    pub rooms_actors: usize,
}

pub struct Edge {
    id: NodeId,
    membership: Membership,
    /// The view this edge routes by (applied in order by [`handover`]).
    view: ArcSwap<View>,
    /// The last views applied, newest last, for fencing.
    history: Mutex<VecDeque<Arc<View>>>,
    links: RwLock<HashMap<NodeId, Arc<WorkerLink>>>,
    rooms: LocalRooms,
    pending: Pending,
    heartbeat: Duration,
    handover_timeout: Duration,
    tls: Option<Arc<super::tls::LinkTls>>,
    secret: String,
    link_queue_bytes: usize,
    /// Set while the whole cluster lost etcd: the view stays current
    /// although the watch is down ([`freeze`](super::membership::freeze)).
    frozen: std::sync::atomic::AtomicBool,
    /// When this frozen edge heard from etcd again (0: it has not).
    regained_at: std::sync::atomic::AtomicU64,
}

impl Edge {
    pub fn start(cfg: EdgeConfig) -> Arc<Edge> {
        let edge = Arc::new(Edge {
            id: cfg.id,
            view: ArcSwap::from_pointee(View::empty()),
            history: Mutex::new(VecDeque::new()),
            membership: cfg.membership,
            links: RwLock::new(HashMap::new()),
            rooms: LocalRooms::start(cfg.rooms_actors),
            pending: Pending::default(),
            heartbeat: cfg.heartbeat,
            handover_timeout: cfg.handover_timeout,
            tls: cfg.tls.map(Arc::new),
            secret: cfg.secret,
            link_queue_bytes: cfg.link_queue_bytes,
            frozen: std::sync::atomic::AtomicBool::new(false),
            regained_at: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(handover::run(edge.clone()));
        if !edge.membership.is_static() {
            tokio::spawn(freeze_checks(Arc::downgrade(&edge)));
        }
        edge
    }

    /// The view this edge routes by.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Whether this edge can follow the cluster (false: its view is stale).
    pub fn is_current(&self) -> bool {
        !self.membership.stale.load(Ordering::Acquire) || self.is_frozen()
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    fn heartbeat_msg(&self, sent: u64, echo: u64) -> Msg {
        Msg::Heartbeat {
            digest: self.view().digest,
            etcd_lost: self.membership.contact.is_lost(),
            sent,
            echo,
        }
    }

    /// Freeze or thaw by what the linked workers say.
    fn check_freeze(&self) {
        let view = self.view();
        let said: Vec<_> = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|l| l.is_up())
            .filter_map(|l| *l.says.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        use super::membership::freeze;
        let contact = &self.membership.contact;
        let own_lost = contact.is_lost();
        let (at, fresh) = (super::membership::boot_nanos(), self.heartbeat * 3);
        if own_lost {
            self.regained_at.store(0, Ordering::Relaxed);
        }
        let was = self.is_frozen();
        let stale = self.membership.stale.load(Ordering::Acquire);
        let may = if freeze::edge_may_freeze(own_lost, &view, &said, at, fresh) {
            true
        } else if was && !own_lost && stale {
            // etcd answers again, the watch is not back yet: stay frozen
            // (for at most a keepalive round) while the workers still hold
            // this membership.
            let since = match self.regained_at.load(Ordering::Relaxed) {
                0 => {
                    self.regained_at.store(at, Ordering::Relaxed);
                    at
                }
                t => t,
            };
            let peers: Vec<_> = said.iter().copied().map(Some).collect();
            Duration::from_nanos(at.saturating_sub(since)) < contact.lost_after()
                && freeze::still_same(&view, &peers, at, fresh)
        } else {
            false
        };
        if self.frozen.swap(may, Ordering::AcqRel) != may {
            metrics::gauge!("herdgate_frozen").set(if may { 1.0 } else { 0.0 });
            if may {
                tracing::warn!(
                    rev = view.rev,
                    "etcd is lost to this edge and every worker it reaches: routing by the frozen membership"
                );
            } else {
                tracing::warn!("membership no longer frozen");
            }
        }
    }

    fn link(&self, node: &str) -> Option<Arc<WorkerLink>> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// The room's owner and its link, if it can be reached now.
    fn route(&self, room: &RoomKey) -> Result<(Arc<WorkerLink>, LinkTx), RouteError> {
        if !self.is_current() {
            return Err(RouteError::Unavailable);
        }
        let view = self.view.load();
        let owner = view.owner(room).ok_or(RouteError::Unavailable)?;
        let link = self.link(owner).ok_or(RouteError::Unavailable)?;
        let tx = link.tx().ok_or(RouteError::Unavailable)?;
        Ok((link, tx))
    }

    /// Fencing: whether `worker` may deliver `room` here now.
    fn accepts(&self, worker: &WorkerLink, room: &RoomKey) -> bool {
        let view = self.view.load();
        if view.owner(room) == Some(&worker.node) {
            return true;
        }
        if view.worker(&worker.node).is_none() {
            return false; // not in the view: nothing it sends counts
        }
        let sealed = worker.sealed_rev.load(Ordering::Acquire);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|v| v.rev > sealed && v.owner(room) == Some(&worker.node))
    }

    /// Send a request and wait for its answer.
    async fn request(
        &self,
        tx: &LinkTx,
        make: impl FnOnce(u64) -> Msg,
        wait: Duration,
    ) -> Result<Reply, RouteError> {
        let (id, rx) = self.pending.request();
        let sent = tokio::time::timeout(wait, tx.send(&make(id))).await;
        let result = match sent {
            Ok(Ok(())) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                _ => Err(RouteError::Busy),
            },
            _ => Err(RouteError::Unavailable),
        };
        self.pending.cancel(id);
        result
    }

    /// Take a place for a socket of this edge at the owner: a
    /// subscription, a sign-in, a watch. `Ok(false)`: refused.
    pub async fn join(
        &self,
        join: Join,
        conn: ConnId,
        out: Arc<Outbound>,
    ) -> Result<bool, RouteError> {
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
                let sub = LocalSub {
                    out,
                    member,
                    user,
                    max_members: max_members as usize,
                    resume: resume.is_some(),
                };
                self.subscribe(room, conn, sub, shed, resume, granted).await
            }
            Join::SignIn { room, max, .. } => self.sign_in(room, conn, out, max).await,
            Join::Watch { app, users, .. } => {
                self.watch(&app, &users, conn, out).await;
                Ok(true)
            }
        }
    }

    /// Subscribe a socket: registered with the room's owner, recorded here
    /// once the owner confirmed it. `Ok(false)`: refused (its
    /// `subscription_error` reached the socket).
    async fn subscribe(
        &self,
        room: RoomKey,
        conn: ConnId,
        sub: LocalSub,
        shed: Shed,
        resume: Option<Resume>,
        granted: Option<u64>,
    ) -> Result<bool, RouteError> {
        let (_, tx) = self.route(&room)?;
        let id = self.pending.register(room.clone(), conn);
        let msg = Msg::Join {
            id,
            rev: self.view.load().rev,
            conn,
            join: Join::Room {
                room: room.clone(),
                member: sub.member.clone(),
                user: sub.user.clone(),
                granted,
                max_members: sub.max_members as u32,
                shed: Shed {
                    member_events_max: shed.member_events_max,
                    silent: false,
                    announce: false,
                },
                resume,
            },
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        self.rooms
            .send(
                &room,
                RoomCmd::Join {
                    room: room.clone(),
                    conn,
                    sub,
                    done,
                },
            )
            .await;
        let result = async {
            tokio::time::timeout(REGISTER_WAIT, tx.send(&msg))
                .await
                .map_err(|_| RouteError::Unavailable)?
                .map_err(|_| RouteError::Unavailable)?;
            match tokio::time::timeout(REGISTER_WAIT, answer).await {
                Ok(Ok(ok)) => Ok(ok),
                _ => Err(RouteError::Unavailable),
            }
        }
        .await;
        if result.is_err() {
            self.pending.cancel(id);
            self.rooms
                .send(
                    &room,
                    RoomCmd::Leave {
                        room: room.clone(),
                        conn,
                    },
                )
                .await;
            // The owner may have registered it after all: undo there too.
            if let Ok((_, tx)) = self.route(&room) {
                let undo = Tell::Leave {
                    room: room.clone(),
                    conn,
                    shed: Shed::default(),
                };
                let _ = tx.try_send(&Msg::Tell(undo));
            }
        }
        result
    }

    /// Forget here what a socket let go of, then tell the room's owner.
    pub async fn tell(&self, tell: Tell) {
        let here = match &tell {
            Tell::Leave { room, conn, .. } => RoomCmd::Leave {
                room: room.clone(),
                conn: *conn,
            },
            Tell::SignOut { room, conn } => RoomCmd::SignOut {
                room: room.clone(),
                conn: *conn,
            },
            Tell::Unwatch { room, conn } => RoomCmd::Unwatch {
                room: room.clone(),
                conn: *conn,
            },
            Tell::Identify { room, conn, user } => RoomCmd::Identify {
                room: room.clone(),
                conn: *conn,
                user: user.clone(),
            },
        };
        self.rooms.send(tell.room(), here).await;
        let room = tell.room().clone();
        self.tell_owner(&room, Msg::Tell(tell)).await;
    }

    /// Hand an event to the room's owner. An acknowledged publish (`wait`:
    /// the HTTP API answers 200 for it) succeeds only once the owner says
    /// every subscribed edge confirmed receipt; a client event just goes.
    pub async fn publish(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        wait: Option<Duration>,
    ) -> Result<(), RouteError> {
        self.publish_keyed(room, frame, exclude, coalesce, wait, None)
            .await
    }

    /// Publish to every room of `items` (each acknowledged): every owner
    /// must be reachable before anything is sent, so an unreachable or
    /// moving room refuses the whole publish. An owner that refuses after
    /// another accepted (a move at that instant) leaves it partial: the
    /// answer is 503, and a retry with the same idempotency key reaches only
    /// the rooms that did not get it.
    pub async fn publish_all(
        &self,
        items: Vec<crate::worker::Item>,
        deadline: tokio::time::Instant,
    ) -> Result<(), RouteError> {
        for it in &items {
            self.route(&it.room)?;
        }
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let sends = items.into_iter().map(|it| {
            self.publish_keyed(
                it.room,
                it.frame,
                it.exclude,
                it.coalesce,
                Some(wait),
                it.idem,
            )
        });
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }

    async fn publish_keyed(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        wait: Option<Duration>,
        idem: Option<u64>,
    ) -> Result<(), RouteError> {
        let refused = |why: &'static str| {
            metrics::counter!("herdgate_link_publish_refused_total", "reason" => why).increment(1);
        };
        let (_, tx) = self
            .route(&room)
            .inspect_err(|_| refused("owner_unreachable"))?;
        let make = |id, wait_ms| Msg::Publish {
            id,
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            frame: Bytes::from(frame.clone()),
            exclude: exclude.map(|c| c.0),
            coalesce_ms: coalesce.map(|d| d.as_millis() as u64),
            wait_ms,
            rev: self.view.load().rev,
            idem,
        };
        let Some(wait) = wait else {
            return match tx.try_send(&make(0, 0)) {
                Ok(()) => Ok(()),
                Err(SendError::Full) | Err(SendError::Closed) => Err(RouteError::Busy),
            };
        };
        let wait_ms = wait.as_millis() as u32;
        match self.request(&tx, |id| make(id, wait_ms), wait).await? {
            Reply::Published => Ok(()),
            Reply::Refused { reason, .. } => {
                refused(reason.label());
                Err(match reason {
                    Refusal::Sealed | Refusal::NotOwner | Refusal::Fenced => {
                        RouteError::Unavailable
                    }
                    Refusal::Busy | Refusal::Nack => RouteError::Busy,
                })
            }
            _ => Err(RouteError::Busy),
        }
    }

    /// Ask the room's owner or, for a listing, every worker of the view
    /// that owns rooms, page by page. A worker that owns rooms and cannot
    /// be reached makes the answer unavailable rather than silently partial.
    pub async fn ask(&self, ask: Ask, wait: Duration) -> Result<Answer, RouteError> {
        let links: Vec<LinkTx> = match ask.scope() {
            Scope::Room(room) => vec![self.route(room)?.1],
            Scope::Every => {
                if !self.is_current() {
                    return Err(RouteError::Unavailable);
                }
                let view = self.view();
                let owners = view.workers.iter().filter(|(_, w)| w.vnodes > 0);
                owners
                    .map(|(node, _)| self.link(node).and_then(|l| l.tx()))
                    .collect::<Option<_>>()
                    .ok_or(RouteError::Unavailable)?
            }
        };
        let mut all: Option<Answer> = None;
        for tx in links {
            let (mut after, mut last): (Option<String>, Option<String>) = (None, None);
            loop {
                let make = |id| Msg::Ask {
                    id,
                    ask: ask.clone(),
                    after: after.take(),
                };
                let (answer, next) = match self.request(&tx, make, wait).await? {
                    Reply::Answer { answer, next } => (answer, next),
                    Reply::Refused { .. } => return Err(RouteError::Unavailable),
                    _ => return Err(RouteError::Busy),
                };
                match &mut all {
                    Some(a) => a.merge(answer),
                    None => all = Some(answer),
                }
                match next {
                    // Pages move forward through a sorted list; a worker
                    // that says otherwise is not followed round in circles.
                    Some(n) if last.as_ref().is_none_or(|l| n > *l) => {
                        last = Some(n.clone());
                        after = Some(n);
                    }
                    Some(_) => return Err(RouteError::Busy),
                    None => break,
                }
            }
        }
        // A view with no worker owning anything lists nothing.
        let mut all = all.unwrap_or(Answer::Rooms(Vec::new()));
        all.settle();
        Ok(all)
    }

    /// Sign a socket in at the user's owner; `Ok(false)` when the user
    /// already has `max` (> 0) signed-in sockets (nothing is recorded).
    async fn sign_in(
        &self,
        room: RoomKey,
        conn: ConnId,
        out: Arc<Outbound>,
        max: u32,
    ) -> Result<bool, RouteError> {
        let (_, tx) = self.route(&room)?;
        self.rooms
            .send(
                &room,
                RoomCmd::SignIn {
                    room: room.clone(),
                    conn,
                    out,
                },
            )
            .await;
        let rev = self.view.load().rev;
        let join = Join::SignIn {
            room: room.clone(),
            max,
            silent: false,
        };
        let make = |id| Msg::Join {
            id,
            rev,
            conn,
            join,
        };
        let answer = self.request(&tx, make, REGISTER_WAIT).await;
        let ok = match answer {
            Ok(Reply::Registered { ok }) => Ok(ok),
            Ok(_) => Err(RouteError::Unavailable),
            Err(e) => Err(e),
        };
        if !matches!(ok, Ok(true)) {
            self.rooms
                .send(
                    &room,
                    RoomCmd::SignOut {
                        room: room.clone(),
                        conn,
                    },
                )
                .await;
            if ok.is_err() {
                // The owner may have recorded it after all: undo there too.
                let _ = tx.try_send(&Msg::Tell(Tell::SignOut {
                    room: room.clone(),
                    conn,
                }));
            }
        }
        ok
    }

    /// Watch `users` for socket `conn`: recorded here (so the owners'
    /// notices reach the socket, and the watch moves with each user's
    /// room), then registered with each owner, one message per owner.
    async fn watch(&self, app: &Arc<str>, users: &[Arc<str>], conn: ConnId, out: Arc<Outbound>) {
        let view = self.view();
        let mut by_owner: HashMap<NodeId, Vec<Arc<str>>> = HashMap::new();
        for u in users {
            let room = RoomKey::user(app, u);
            self.rooms
                .send(
                    &room,
                    RoomCmd::Watch {
                        room: room.clone(),
                        conn,
                        out: out.clone(),
                    },
                )
                .await;
            if let Some(owner) = view.owner(&room) {
                by_owner.entry(owner.clone()).or_default().push(u.clone());
            }
        }
        for (owner, users) in by_owner {
            // An owner out of reach gets the watch when its link comes back
            // (links register all they own on connect).
            if let Some(tx) = self.link(&owner).and_then(|l| l.tx()) {
                let msg = Msg::Join {
                    id: 0,
                    rev: view.rev,
                    conn,
                    join: Join::Watch {
                        app: app.clone(),
                        users,
                        announce: true,
                    },
                };
                let _ = tokio::time::timeout(REGISTER_WAIT, tx.send(&msg)).await;
            }
        }
    }

    /// Tell `room`'s owner something it may miss: forgetting is recorded
    /// here first, and an owner out of reach learns it from the
    /// registrations its link replays (or drops the edge's state with it).
    /// Tell the room's current owner that `conn` left, without waiting (a
    /// full link queue drops it: the link's policy then closes and replays
    /// the link, which registers only what the edge still holds).
    pub(super) fn leave_current_owner(&self, room: &RoomKey, conn: ConnId) {
        if let Ok((_, tx)) = self.route(room) {
            let _ = tx.try_send(&Msg::Tell(Tell::Leave {
                room: room.clone(),
                conn,
                shed: Shed::default(),
            }));
        }
    }

    async fn tell_owner(&self, room: &RoomKey, msg: Msg) {
        if let Ok((_, tx)) = self.route(room) {
            let _ = tokio::time::timeout(REGISTER_WAIT, tx.send(&msg)).await;
        }
    }

    /// Leave the membership (etcd: revoke its lease, so its key goes at
    /// once), waiting at most `within`. Called once its sockets are closed:
    /// until its lease ran out, a worker draining meanwhile would wait for
    /// this gone edge at every handover barrier (`handover_timeout`), and
    /// publishes to the moving rooms would be refused meanwhile.
    pub async fn leave(&self, within: Duration) {
        let Some(control) = &self.membership.control else {
            return; // static membership: nothing registered
        };
        let (done, left) = tokio::sync::oneshot::channel();
        let leave = super::membership::Control::Leave { done };
        if control.send(leave).await.is_ok() {
            let _ = tokio::time::timeout(within, left).await;
        }
    }

    /// Drop views no worker of the current view can still be judged by
    /// (older than every live worker's last `Sealed`).
    fn prune_history(&self) {
        let view = self.view();
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        let oldest_unsealed = view
            .workers
            .keys()
            .filter_map(|w| links.get(w))
            .map(|l| l.sealed_rev.load(Ordering::Acquire))
            .min()
            .unwrap_or(view.rev);
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        while h.len() > 1 && h.front().is_some_and(|v| v.rev <= oldest_unsealed) {
            h.pop_front();
        }
    }

    /// Frames waiting on the fullest link, or commands in the fullest rooms actor.
    pub fn max_queue_depth(&self) -> usize {
        let links = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|l| l.tx().map(|t| t.depth()))
            .max()
            .unwrap_or(0);
        links.max(self.rooms.max_depth())
    }

    /// The membership view and each worker's link, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let view = self.view();
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        let workers: Vec<serde_json::Value> = view
            .workers
            .iter()
            .map(|(id, w)| {
                let l = links.get(id);
                serde_json::json!({
                    "id": &**id,
                    "addr": w.addr,
                    "vnodes": w.vnodes,
                    "state": w.state,
                    "incarnation": w.incarnation,
                    "link": l.map_or("none", |l| if l.is_up() { "up" } else { "down" }),
                    "sealed_rev": l.map(|l| l.sealed_rev.load(Ordering::Relaxed)),
                    "open_rev": l.map(|l| l.open_rev.load(Ordering::Relaxed)),
                })
            })
            .collect();
        serde_json::json!({
            "node_id": &*self.id,
            "rev": view.rev,
            "digest": format!("{:016x}", view.digest),
            "current": self.is_current(),
            "frozen": self.is_frozen(),
            "etcd_lost": self.membership.contact.is_lost(),
            "static": self.membership.is_static(),
            "workers": workers,
            "edges": view.edges.iter().map(|e| &**e).collect::<Vec<_>>(),
            "requests_waiting": self.pending.len(),
        })
    }
}
