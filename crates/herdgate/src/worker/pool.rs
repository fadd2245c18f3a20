//! The in-process workers: one actor per core, each owning the rooms the
//! ring gives it. A standalone node's router and a cluster worker node both
//! drive rooms through this.

use super::{
    spawn, Command, Decided, Delivery, LoadProbe, Mailbox, Policies, Subscriber, WebhookTaps,
};
use crate::op::{Answer, Ask, Join, Scope, Tell};
use crate::protocol::Frame;
use crate::ring::{Ring, DEFAULT_VNODES};
use crate::types::{ConnId, RoomKey, RouteError};
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

    /// Take a place for a socket and wait for the owner's decision:
    /// `Ok(false)` when refused (a subscription's `subscription_error` is
    /// queued to the socket first). A join nobody answers (a silent
    /// re-homing, a watch) is `Ok(true)` once queued.
    pub async fn join(&self, join: Join, sub: Subscriber) -> Result<bool, RouteError> {
        if !join.answered() {
            self.join_start(join, sub, None).await?;
            return Ok(true);
        }
        let (tx, rx) = oneshot::channel();
        let reply: Decided = Box::new(move |ok| {
            let _ = tx.send(ok);
        });
        self.join_start(join, sub, Some(reply)).await?;
        rx.await.map_err(|_| RouteError::Gone)
    }

    /// Queue a join in order, waiting for mailbox space; the owner calls
    /// `reply` once it has decided, in order with everything it sends (a
    /// link handler answers its edge from there, so the answer precedes the
    /// room's next events on the link). A watch goes to each owning worker,
    /// one message each.
    pub async fn join_start(
        &self,
        join: Join,
        sub: Subscriber,
        reply: Option<Decided>,
    ) -> Result<(), RouteError> {
        let Join::Watch {
            app,
            users,
            announce,
        } = join
        else {
            let owner = self.owner(join.room().expect("a room or a sign-in has a room"));
            let cmd = Command::Join { join, sub, reply };
            return owner.send(cmd).await.map_err(|_| RouteError::Gone);
        };
        let mut by_worker: Vec<Vec<Arc<str>>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        for u in users {
            by_worker[self.owner_index(&RoomKey::user(&app, &u))].push(u);
        }
        for (w, users) in by_worker.into_iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let join = Join::Watch {
                app: app.clone(),
                users,
                announce,
            };
            let cmd = Command::Join {
                join,
                sub: sub.clone(),
                reply: None,
            };
            self.workers[w]
                .send(cmd)
                .await
                .map_err(|_| RouteError::Gone)?;
        }
        if let Some(reply) = reply {
            reply(true);
        }
        Ok(())
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
