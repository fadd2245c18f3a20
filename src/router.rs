//! The router: which worker owns a room, and how to reach it.
//!
//! Sessions and the HTTP API talk to rooms only through this type; whether
//! the owner runs in this process (standalone) or behind a network link (an
//! edge of a cluster, see `cluster::edge`) is the router's business, not theirs.

use crate::protocol::names::USER_CHANNEL_PREFIX;
use crate::protocol::Frame;
use crate::ring::{Ring, DEFAULT_VNODES};
use crate::worker::{self, Command, ConnId, Mailbox, Member, RoomInfo, RoomKey, Shed, Subscriber};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The owner's mailbox stayed full past the deadline: back off and retry.
    #[error("realtime worker is overloaded")]
    Busy,
    /// The owner went away (shutting down).
    #[error("realtime worker is gone")]
    Gone,
}

pub struct Router {
    ring: Ring,
    workers: Vec<Mailbox>,
    /// Set on an edge: rooms live on remote workers.
    edge: Option<Arc<crate::cluster::edge::Edge>>,
}

impl Router {
    /// Start `n` in-process workers.
    pub fn local(n: usize, mailbox: usize) -> Router {
        let workers = (0..n).map(|i| worker::spawn(i, mailbox)).collect();
        Router {
            ring: Ring::new(n, DEFAULT_VNODES),
            workers,
            edge: None,
        }
    }

    /// An edge's router: every room is owned by a remote worker.
    pub fn edge(edge: Arc<crate::cluster::edge::Edge>) -> Router {
        Router {
            ring: Ring::new(1, 1),
            workers: Vec::new(),
            edge: Some(edge),
        }
    }

    /// The cluster edge behind this router, if this node is an edge.
    pub fn cluster_edge(&self) -> Option<&Arc<crate::cluster::edge::Edge>> {
        self.edge.as_ref()
    }

    /// Drop every socket of an edge, in every worker (`silent`: see
    /// [`Command::PurgeEdge`]).
    pub async fn purge_edge(&self, edge: u64, silent: bool) {
        for w in &self.workers {
            let _ = w.send(Command::PurgeEdge { edge, silent }).await;
        }
    }

    /// Commands waiting in the fullest worker mailbox.
    pub fn max_mailbox_depth(&self) -> usize {
        if let Some(e) = &self.edge {
            return e.max_queue_depth();
        }
        self.workers
            .iter()
            .map(|w| w.max_capacity() - w.capacity())
            .max()
            .unwrap_or(0)
    }

    fn owner(&self, room: &RoomKey) -> &Mailbox {
        &self.workers[self.ring.owner(&room.app, &room.channel)]
    }

    /// Send, waiting for mailbox space: for sessions, whose own task may wait.
    async fn send(&self, room: &RoomKey, cmd: Command) -> Result<(), RouteError> {
        self.owner(room)
            .send(cmd)
            .await
            .map_err(|_| RouteError::Gone)
    }

    /// Send with a deadline: for the HTTP API, which answers 503 rather than hang.
    async fn send_within(
        &self,
        room: &RoomKey,
        cmd: Command,
        wait: Duration,
    ) -> Result<(), RouteError> {
        match self.owner(room).send_timeout(cmd, wait).await {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => Err(RouteError::Busy),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => Err(RouteError::Gone),
        }
    }

    pub async fn subscribe(
        &self,
        room: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
    ) -> Result<(), RouteError> {
        if let Some(e) = &self.edge {
            let worker::Target::Local(out) = sub.to else {
                return Err(RouteError::Gone);
            };
            return e.subscribe(room, sub.id, out, member, max_members, shed);
        }
        let cmd = Command::Subscribe {
            room: room.clone(),
            sub,
            member,
            max_members,
            shed,
        };
        self.send(&room, cmd).await
    }

    pub async fn unsubscribe(
        &self,
        room: RoomKey,
        id: ConnId,
        shed: Shed,
    ) -> Result<(), RouteError> {
        if let Some(e) = &self.edge {
            return e.unsubscribe(room, id, shed);
        }
        self.send(&room.clone(), Command::Unsubscribe { room, id, shed })
            .await
    }

    /// A client event: the sender's own task waits for mailbox space.
    pub async fn client_event(
        &self,
        room: RoomKey,
        frame: Frame,
        sender: ConnId,
    ) -> Result<(), RouteError> {
        if let Some(e) = &self.edge {
            // A client event lost to a moving room is dropped, not a reason
            // to close the sender's socket.
            if e.publish(room, frame, Some(sender), None, None)
                .await
                .is_err()
            {
                metrics::counter!("herdgate_client_events_dropped_total", "reason" => "owner_unreachable").increment(1);
            }
            return Ok(());
        }
        let cmd = Command::Publish {
            room: room.clone(),
            frame,
            exclude: Some(sender),
            coalesce: None,
        };
        self.send(&room, cmd).await
    }

    /// An HTTP API publish; `coalesce` when the load state sheds this channel's events.
    pub async fn publish(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        wait: Duration,
    ) -> Result<(), RouteError> {
        if let Some(e) = &self.edge {
            return e.publish(room, frame, exclude, coalesce, Some(wait)).await;
        }
        let cmd = Command::Publish {
            room: room.clone(),
            frame,
            exclude,
            coalesce,
        };
        self.send_within(&room, cmd, wait).await
    }

    pub async fn query(&self, room: RoomKey, wait: Duration) -> Result<RoomInfo, RouteError> {
        if let Some(e) = &self.edge {
            return e.query(room, wait).await;
        }
        let (tx, rx) = oneshot::channel();
        self.send_within(&room.clone(), Command::Query { room, reply: tx }, wait)
            .await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    pub async fn users(&self, room: RoomKey, wait: Duration) -> Result<Vec<String>, RouteError> {
        if let Some(e) = &self.edge {
            return e.users(room, wait).await;
        }
        let (tx, rx) = oneshot::channel();
        self.send_within(&room.clone(), Command::Users { room, reply: tx }, wait)
            .await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    /// Occupied channels of an app whose names start with `prefix`, from every worker.
    pub async fn list(
        &self,
        app: &Arc<str>,
        prefix: &str,
        wait: Duration,
    ) -> Result<Vec<(String, RoomInfo)>, RouteError> {
        if let Some(e) = &self.edge {
            return e.list(app, prefix, wait).await;
        }
        let mut replies = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            let cmd = Command::List {
                app: app.clone(),
                prefix: prefix.to_string(),
                reply: tx,
            };
            w.send_timeout(cmd, wait)
                .await
                .map_err(|_| RouteError::Busy)?;
            replies.push(rx);
        }
        let mut all = Vec::new();
        for rx in replies {
            all.extend(rx.await.map_err(|_| RouteError::Gone)?);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    pub async fn sign_in(
        &self,
        app: &Arc<str>,
        user: &str,
        sub: Subscriber,
    ) -> Result<(), RouteError> {
        let room = user_room(app, user);
        if let Some(e) = &self.edge {
            let worker::Target::Local(out) = sub.to else {
                return Err(RouteError::Gone);
            };
            return e.sign_in(room, user, sub.id, out);
        }
        self.send(&room.clone(), Command::SignIn { room, sub })
            .await
    }

    pub async fn sign_out(&self, app: &Arc<str>, user: &str, id: ConnId) -> Result<(), RouteError> {
        let room = user_room(app, user);
        if let Some(e) = &self.edge {
            return e.sign_out(room, user, id);
        }
        self.send(&room.clone(), Command::SignOut { room, id })
            .await
    }

    pub async fn terminate(
        &self,
        app: &Arc<str>,
        user: &str,
        wait: Duration,
    ) -> Result<(), RouteError> {
        let room = user_room(app, user);
        if let Some(e) = &self.edge {
            return e.terminate(room, user);
        }
        self.send_within(&room.clone(), Command::Terminate { room }, wait)
            .await
    }
}

fn user_room(app: &Arc<str>, user: &str) -> RoomKey {
    RoomKey {
        app: app.clone(),
        channel: Arc::from(format!("{USER_CHANNEL_PREFIX}{user}")),
    }
}
