//! The in-process workers: one actor per core, each owning the rooms the
//! ring gives it. A standalone node's router and a cluster worker node both
//! drive rooms through this.

use super::{spawn, Command, Delivery, LoadProbe, Mailbox, Policies, Subscriber, WebhookTaps};
use crate::op::{Answer, Ask, Scope, Tell};
use crate::protocol::Frame;
use crate::ring::{Ring, DEFAULT_VNODES};
use crate::types::{ConnId, Member, Resume, RoomKey, RouteError, Shed};
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
        let answer: super::Decided = Box::new(move |ok| {
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
        answer: Option<super::Decided>,
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

    /// Tell the room's owner what a socket let go of, waiting for mailbox
    /// space (a session's or a link reader's own task waits).
    pub async fn tell(&self, tell: Tell) -> Result<(), RouteError> {
        let owner = self.owner(tell.room());
        owner
            .send(Command::Tell(tell))
            .await
            .map_err(|_| RouteError::Gone)
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

    /// Ask the room's owner or, for [`Scope::Every`], every worker (their
    /// answers merged); `Busy` when a mailbox stays full past `wait`.
    pub async fn ask(&self, ask: Ask, wait: Duration) -> Result<Answer, RouteError> {
        let owners: Vec<&Mailbox> = match ask.scope() {
            Scope::Room(room) => vec![self.owner(room)],
            Scope::Every => self.workers.iter().collect(),
        };
        let mut replies = Vec::with_capacity(owners.len());
        for w in owners {
            let (reply, rx) = oneshot::channel();
            let cmd = Command::Ask {
                ask: ask.clone(),
                reply,
            };
            match w.send_timeout(cmd, wait).await {
                Ok(()) => replies.push(rx),
                Err(SendTimeoutError::Timeout(_)) => return Err(RouteError::Busy),
                Err(SendTimeoutError::Closed(_)) => return Err(RouteError::Gone),
            }
        }
        let mut answer: Option<Answer> = None;
        for rx in replies {
            let a = rx.await.map_err(|_| RouteError::Gone)?;
            match &mut answer {
                Some(all) => all.merge(a),
                None => answer = Some(a),
            }
        }
        let mut answer = answer.ok_or(RouteError::Gone)?;
        answer.settle();
        Ok(answer)
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
