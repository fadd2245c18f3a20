//! The in-process workers: one actor per core, each owning the rooms the
//! ring gives it. A standalone node's router and a cluster worker node both
//! drive rooms through this.

use super::{
    spawn, Command, Delivery, LoadProbe, Mailbox, Policies, Since, Subscriber, WebhookTaps,
};
use crate::protocol::Frame;
use crate::ring::{Ring, DEFAULT_VNODES};
use crate::types::{ConnId, Member, Resume, RoomInfo, RoomKey, RouteError, Shed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::oneshot;

pub struct Pool {
    ring: Ring,
    workers: Vec<Mailbox>,
    /// The apps' features as the rooms apply them; swapped on reload.
    pub policies: Policies,
}

/// One room's share of an atomic publish ([`Pool::publish_all`]).
pub struct Item {
    pub room: RoomKey,
    pub frame: Frame,
    pub exclude: Option<ConnId>,
    pub coalesce: Option<Duration>,
    pub idem: Option<u64>,
}

impl Pool {
    /// Start `n` workers with mailboxes of `mailbox` commands each (and,
    /// with `taps`, the room owners' webhook events). `load` is the node's
    /// load state, by which the rooms shed history.
    pub fn start(
        n: usize,
        mailbox: usize,
        taps: Option<WebhookTaps>,
        policies: Policies,
        load: LoadProbe,
    ) -> Pool {
        Pool {
            ring: Ring::new(n, DEFAULT_VNODES),
            workers: (0..n)
                .map(|i| spawn(i, mailbox, taps.clone(), policies.clone(), load.clone()))
                .collect(),
            policies,
        }
    }

    fn owner_index(&self, room: &RoomKey) -> usize {
        self.ring.owner(&room.app, &room.channel)
    }

    /// Publish to every room of `items`, or to none: mailbox space is
    /// reserved in every owner (in worker order, so two publishers never
    /// wait on each other) before anything is sent; if any stays full past
    /// `deadline` nothing was published.
    pub async fn publish_all(
        &self,
        items: Vec<Item>,
        deadline: tokio::time::Instant,
    ) -> Result<(), RouteError> {
        let mut by_worker: Vec<Vec<Item>> = (0..self.workers.len()).map(|_| Vec::new()).collect();
        for it in items {
            let w = self.owner_index(&it.room);
            by_worker[w].push(it);
        }
        let mut permits = Vec::new();
        for (w, items) in by_worker.iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            match tokio::time::timeout_at(deadline, self.workers[w].reserve_many(items.len())).await
            {
                Ok(Ok(p)) => permits.push(p),
                Ok(Err(_)) => return Err(RouteError::Gone),
                Err(_) => return Err(RouteError::Busy),
            }
        }
        for (permit, items) in permits
            .into_iter()
            .zip(by_worker.into_iter().filter(|i| !i.is_empty()))
        {
            for (p, it) in permit.zip(items) {
                p.send(Command::Publish {
                    room: it.room,
                    frame: it.frame,
                    exclude: it.exclude,
                    coalesce: it.coalesce,
                    ack: None,
                    client: false,
                    idem: it.idem,
                });
            }
        }
        Ok(())
    }

    /// Commands waiting in the fullest mailbox.
    pub fn max_mailbox_depth(&self) -> usize {
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
            Err(SendTimeoutError::Timeout(_)) => Err(RouteError::Busy),
            Err(SendTimeoutError::Closed(_)) => Err(RouteError::Gone),
        }
    }

    /// Whether the socket is subscribed (refused: its `subscription_error`
    /// is queued to it). A silent registration is not answered: `Ok(true)`.
    pub async fn subscribe(
        &self,
        room: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
        resume: Option<Resume>,
    ) -> Result<bool, RouteError> {
        if shed.silent {
            self.subscribe_start(room, sub, member, max_members, shed, resume, None)
                .await?;
            return Ok(true);
        }
        let (tx, rx) = oneshot::channel();
        let answer: super::Answer = Box::new(move |ok| {
            let _ = tx.send(ok);
        });
        self.subscribe_start(room, sub, member, max_members, shed, resume, Some(answer))
            .await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    /// Queue a subscription in order; the room calls `answer` once it has
    /// decided, in order with everything it sends (a link handler answers
    /// its edge from there, so the answer precedes the room's next events
    /// on the link).
    #[allow(clippy::too_many_arguments)]
    pub async fn subscribe_start(
        &self,
        room: RoomKey,
        sub: Subscriber,
        member: Option<Member>,
        max_members: usize,
        shed: Shed,
        resume: Option<Resume>,
        answer: Option<super::Answer>,
    ) -> Result<(), RouteError> {
        let tx = answer;
        let cmd = Command::Subscribe {
            room: room.clone(),
            sub,
            member,
            max_members,
            shed,
            resume,
            reply: tx,
        };
        self.send(&room, cmd).await
    }

    pub async fn unsubscribe(
        &self,
        room: RoomKey,
        id: ConnId,
        shed: Shed,
    ) -> Result<(), RouteError> {
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
        self.send(&room.clone(), client_event(room, frame, sender))
            .await
    }

    /// A client event from a link (its handler does not wait past `wait`).
    pub async fn client_event_within(
        &self,
        room: RoomKey,
        frame: Frame,
        sender: ConnId,
        wait: Duration,
    ) -> Result<(), RouteError> {
        self.send_within(&room.clone(), client_event(room, frame, sender), wait)
            .await
    }

    /// Every webhook event waiting out its debounce, sent now (shutdown).
    pub async fn flush_webhooks(&self) {
        for w in &self.workers {
            let (done, rx) = oneshot::channel();
            if w.send(Command::FlushWebhooks { done }).await.is_ok() {
                let _ = rx.await;
            }
        }
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
        let cmd = Command::Publish {
            room: room.clone(),
            frame,
            exclude,
            coalesce,
            ack: None,
            client: false,
            idem: None,
        };
        self.send_within(&room, cmd, wait).await
    }

    /// Queue a publish whose remote deliveries will be confirmed; the
    /// receiver gets what the fan-out did (the edges it went to, with
    /// `ack_id`) once it is done.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_tracked(
        &self,
        room: RoomKey,
        frame: Frame,
        exclude: Option<ConnId>,
        coalesce: Option<Duration>,
        idem: Option<u64>,
        ack_id: u64,
        wait: Duration,
    ) -> Result<oneshot::Receiver<Delivery>, RouteError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Publish {
            room: room.clone(),
            frame,
            exclude,
            coalesce,
            ack: Some((ack_id, tx)),
            client: false,
            idem,
        };
        self.send_within(&room, cmd, wait).await?;
        Ok(rx)
    }

    /// Resolves once every command queued before it was handled.
    pub async fn barrier(&self) {
        self.retain(Arc::new(|_| true)).await;
    }

    /// Drop, in every worker, the rooms `keep` refuses; returns how many,
    /// once every earlier command was handled.
    pub async fn retain(&self, keep: Arc<dyn Fn(&RoomKey) -> bool + Send + Sync>) -> usize {
        let mut dropped = 0;
        for w in &self.workers {
            let (done, rx) = oneshot::channel();
            if w.send(Command::Retain {
                keep: keep.clone(),
                done,
            })
            .await
            .is_ok()
            {
                dropped += rx.await.unwrap_or(0);
            }
        }
        dropped
    }

    /// A channel's history after `since` (in `epoch`, if given).
    pub async fn history(
        &self,
        room: RoomKey,
        since: u64,
        epoch: Option<String>,
        limit: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Since, RouteError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::History {
            room: room.clone(),
            since,
            epoch,
            limit,
            max_bytes,
            reply: tx,
        };
        self.send_within(&room, cmd, wait).await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    pub async fn query(&self, room: RoomKey, wait: Duration) -> Result<RoomInfo, RouteError> {
        let (tx, rx) = oneshot::channel();
        self.send_within(&room.clone(), Command::Query { room, reply: tx }, wait)
            .await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    pub async fn users(&self, room: RoomKey, wait: Duration) -> Result<Vec<String>, RouteError> {
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

    /// Sign a socket in; `Ok(false)` when the user already has `max` (> 0)
    /// signed-in sockets.
    pub async fn sign_in(
        &self,
        app: &Arc<str>,
        user: &str,
        sub: Subscriber,
        max: usize,
    ) -> Result<bool, RouteError> {
        match self.sign_in_start(app, user, sub, max, false, true).await? {
            Some(rx) => rx.await.map_err(|_| RouteError::Gone),
            None => Ok(true),
        }
    }

    /// Queue a sign-in in order; where its answer comes (if `answer`).
    pub async fn sign_in_start(
        &self,
        app: &Arc<str>,
        user: &str,
        sub: Subscriber,
        max: usize,
        silent: bool,
        answer: bool,
    ) -> Result<Option<oneshot::Receiver<bool>>, RouteError> {
        let room = RoomKey::user(app, user);
        let (tx, rx) = if answer {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let cmd = Command::SignIn {
            room: room.clone(),
            sub,
            max,
            silent,
            reply: tx,
        };
        self.send(&room, cmd).await?;
        Ok(rx)
    }

    /// `sub` watches `users`: one Watch per owning worker, each telling
    /// the socket at once (with `announce`) who of its users is online.
    pub async fn watch_all(
        &self,
        app: &Arc<str>,
        users: &[Arc<str>],
        sub: Subscriber,
        announce: bool,
    ) -> Result<(), RouteError> {
        let mut by_worker: Vec<Vec<RoomKey>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        for u in users {
            let room = RoomKey::user(app, u);
            by_worker[self.owner_index(&room)].push(room);
        }
        for (w, rooms) in by_worker.into_iter().enumerate() {
            if rooms.is_empty() {
                continue;
            }
            let cmd = Command::Watch {
                rooms,
                sub: sub.clone(),
                announce,
            };
            self.workers[w]
                .send(cmd)
                .await
                .map_err(|_| RouteError::Gone)?;
        }
        Ok(())
    }

    pub async fn unwatch(&self, app: &Arc<str>, user: &str, id: ConnId) -> Result<(), RouteError> {
        let room = RoomKey::user(app, user);
        self.send(&room.clone(), Command::Unwatch { room, id })
            .await
    }

    /// A cache channel's cached `data` and seconds left.
    pub async fn cache_info(
        &self,
        room: RoomKey,
        wait: Duration,
    ) -> Result<Option<(String, u64)>, RouteError> {
        let (tx, rx) = oneshot::channel();
        self.send_within(&room.clone(), Command::CacheInfo { room, reply: tx }, wait)
            .await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    pub async fn sign_out(&self, app: &Arc<str>, user: &str, id: ConnId) -> Result<(), RouteError> {
        let room = RoomKey::user(app, user);
        self.send(&room.clone(), Command::SignOut { room, id })
            .await
    }

    pub async fn terminate(
        &self,
        app: &Arc<str>,
        user: &str,
        wait: Duration,
    ) -> Result<(), RouteError> {
        let room = RoomKey::user(app, user);
        self.send_within(&room.clone(), Command::Terminate { room }, wait)
            .await
    }

    /// Drop every socket of an edge, in every worker (`silent`: see
    /// [`Command::PurgeEdge`]).
    pub async fn purge_edge(&self, edge: u64, silent: bool) {
        for w in &self.workers {
            let _ = w.send(Command::PurgeEdge { edge, silent }).await;
        }
    }
}

/// A client event from `sender`: never echoed to it, never cached.
fn client_event(room: RoomKey, frame: Frame, sender: ConnId) -> Command {
    Command::Publish {
        room,
        frame,
        exclude: Some(sender),
        coalesce: None,
        ack: None,
        client: true,
        idem: None,
    }
}
