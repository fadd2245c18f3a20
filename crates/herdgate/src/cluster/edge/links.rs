//! One link per worker of the view: connect, authenticate, register what
//! the worker owns here, serve, reconnect with jittered backoff.
//!
//! When a link comes up, every socket of every room the worker owns in the
//! applied view is registered again (`Restore`: the worker announces members
//! it does not know, and tells the sockets nothing), then `ViewAck`; only
//! then does the edge route to it. When it goes down, those rooms become
//! unavailable here and their sockets are told so.

use super::rooms::{Again, Pred, Receipts, RoomCmd, RoomState};
use super::Edge;
use crate::cluster::link::{
    proof, proof_ok, read_ahead, send_direct, since, write_loop, LinkError, LinkRx, LinkTx, Msg,
    RegMode, Reply, EDGE_LEASE, VERSION,
};
use crate::cluster::membership::{boot_nanos, freeze::PeerSays};
use crate::cluster::tls::LinkIo;
use crate::cluster::view::NodeId;
use crate::config::LINK_RECONNECT_CAP;
use crate::op::Join;
use crate::protocol::Frame;
use crate::types::{ConnId, Resume, RoomKey, Shed};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Receipts are sent when this many wait, or after this long.
const RECEIPT_BATCH: usize = 256;
const RECEIPT_DELAY: Duration = Duration::from_millis(1);

pub(super) struct WorkerLink {
    pub node: NodeId,
    pub addr: String,
    tx: Mutex<Option<LinkTx>>,
    /// The newest `Sealed` from the worker (cumulative).
    pub sealed_rev: AtomicU64,
    /// The newest `Open` from the worker (cumulative).
    pub open_rev: AtomicU64,
    incarnation: AtomicI64,
    /// Woken on `Sealed`, `Open`, up and down.
    pub changed: Notify,
    /// Cancelled when the worker left the view: the link ends for good.
    pub retired: CancellationToken,
    receipts: Mutex<Vec<(u64, bool)>>,
    receipts_waiting: Notify,
    /// The worker's last heartbeat (its witness statement, see `freeze`).
    pub says: Mutex<Option<PeerSays>>,
    /// The newest `sent` of the worker's heartbeats on this connection,
    /// echoed back in ours.
    peer_sent: AtomicU64,
}

impl WorkerLink {
    pub fn new(node: NodeId, addr: String) -> WorkerLink {
        WorkerLink {
            node,
            addr,
            tx: Mutex::new(None),
            sealed_rev: AtomicU64::new(0),
            open_rev: AtomicU64::new(0),
            incarnation: AtomicI64::new(0),
            changed: Notify::new(),
            retired: CancellationToken::new(),
            receipts: Mutex::new(Vec::new()),
            receipts_waiting: Notify::new(),
            says: Mutex::new(None),
            peer_sent: AtomicU64::new(0),
        }
    }

    /// The link's queue, while it is up.
    pub fn tx(&self) -> Option<LinkTx> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|t| !t.is_closed())
    }

    pub fn is_up(&self) -> bool {
        self.tx().is_some()
    }

    fn set_tx(&self, tx: Option<LinkTx>) {
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
        self.changed.notify_waiters();
    }
}

impl Receipts for WorkerLink {
    fn receipt(&self, ack_id: u64, ok: bool) {
        let mut r = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        r.push((ack_id, ok));
        drop(r);
        self.receipts_waiting.notify_one();
    }
}

/// The frame that registers `again` with a worker: nothing is answered.
/// A re-homed subscription is silent (its members are known), a restored
/// one announces members the room does not have; a re-homed sign-in is
/// silent (the user was online already); a restored watch is told the
/// current state (the link may have missed transitions).
pub(super) fn again_msg(again: &Again, mode: RegMode, rev: u64) -> Msg {
    let (conn, join) = match again {
        Again::Sub { room, conn, sub } => (
            *conn,
            Join::Room {
                room: room.clone(),
                member: sub.member.clone(),
                user: sub.user.clone(),
                // A re-registration: the owner that took it checked it.
                granted: None,
                max_members: sub.max_members as u32,
                shed: Shed {
                    member_events_max: None,
                    silent: true,
                    announce: mode == RegMode::Restore,
                },
                // Re-homed: it goes on getting serials, nothing is replayed.
                resume: sub.resume.then_some(Resume {
                    since: None,
                    max_bytes: 0,
                    max_events: 0,
                }),
            },
        ),
        Again::SignIn { room, conn } => (
            *conn,
            Join::SignIn {
                room: room.clone(),
                max: 0,
                silent: mode != RegMode::Restore,
            },
        ),
        Again::Watch { room, conn } => (
            *conn,
            Join::Watch {
                app: room.app.clone(),
                users: vec![Arc::from(room.user_id())],
                // A link that comes back (`Restore`) may have missed
                // transitions, or the first state of a watch made while it
                // was down: the owner tells the current one (a sign-in
                // restored after it is not silent, so a too-early "offline"
                // is corrected). A re-home stays quiet: its sign-ins are silent.
                announce: mode == RegMode::Restore,
            },
        ),
    };
    Msg::Join {
        id: 0,
        rev,
        conn,
        join,
    }
}

/// Rooms `node` owns in the edge's applied view.
fn owned_by(edge: &Edge, node: &NodeId) -> Pred {
    let (view, node) = (edge.view(), node.clone());
    Arc::new(move |k| view.owner(k) == Some(&node))
}

/// Keep one worker's link up until the worker leaves the view.
pub(super) async fn run(edge: Arc<Edge>, link: Arc<WorkerLink>) {
    let mut backoff = Duration::from_millis(100);
    while !link.retired.is_cancelled() {
        match serve(&edge, &link).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(worker = %link.node, error = %e, "link attempt failed"),
        }
        let jitter = backoff.mul_f64(0.5 + rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(jitter) => {}
            _ = link.retired.cancelled() => return,
        }
        backoff = (backoff * 2).min(LINK_RECONNECT_CAP);
    }
}

async fn serve(edge: &Arc<Edge>, link: &Arc<WorkerLink>) -> Result<(), LinkError> {
    let hb = edge.heartbeat;
    let stream = tokio::time::timeout(hb * 4, tokio::net::TcpStream::connect(&link.addr))
        .await
        .map_err(|_| LinkError::Timeout)??;
    let _ = stream.set_nodelay(true);
    let io: Box<dyn LinkIo> = match &edge.tls {
        Some(tls) => tokio::time::timeout(hb * 4, tls.connect(&link.addr, stream))
            .await
            .map_err(|_| LinkError::Timeout)??,
        None => Box::new(stream),
    };
    let (r, mut w) = tokio::io::split(io);
    let mut rx = LinkRx::new(r);
    let challenge = tokio::time::timeout(hb * 4, rx.recv())
        .await
        .map_err(|_| LinkError::Timeout)??;
    let Msg::Challenge { nonce } = challenge else {
        return Err(LinkError::Refused(format!(
            "expected a challenge, got {challenge:?}"
        )));
    };
    let ours: [u8; 16] = rand::random();
    let hello = Msg::Hello {
        version: VERSION,
        edge: edge.id.to_string(),
        rev: edge.view().rev,
        heartbeat_ms: hb.as_millis() as u32,
        nonce: ours,
        proof: (!edge.secret.is_empty()).then(|| proof(&edge.secret, "edge", &nonce, &edge.id)),
    };
    let hello_sent = tokio::time::Instant::now();
    send_direct(&mut w, &hello).await?;
    let answer = tokio::time::timeout(hb * 4, rx.recv())
        .await
        .map_err(|_| LinkError::Timeout)??;
    let (worker, incarnation, heartbeat) = match answer {
        Msg::HelloAck {
            version: VERSION,
            worker,
            incarnation,
            heartbeat_ms,
            proof: p,
            ..
        } => {
            if !edge.secret.is_empty()
                && !p.is_some_and(|p| proof_ok(&edge.secret, "worker", &ours, &worker, &p))
            {
                metrics::counter!("herdgate_link_auth_failures_total").increment(1);
                return Err(LinkError::Refused(
                    "the worker did not prove the cluster secret".into(),
                ));
            }
            (
                worker,
                incarnation,
                Duration::from_millis(heartbeat_ms.max(10) as u64),
            )
        }
        Msg::Refuse { reason } => return Err(LinkError::Refused(reason)),
        other => return Err(LinkError::Refused(format!("unexpected {other:?}"))),
    };
    if !edge.membership.is_static() && worker != *link.node {
        return Err(LinkError::Refused(format!(
            "{} answers as {worker:?}, not {:?}",
            link.addr, link.node
        )));
    }
    if link.retired.is_cancelled() {
        return Ok(());
    }
    let previous = link.incarnation.swap(incarnation, Ordering::AcqRel);
    if previous != 0 && previous != incarnation {
        tracing::info!(worker = %link.node, incarnation, "worker restarted (new incarnation)");
        link.sealed_rev.store(0, Ordering::Release);
        link.open_rev.store(0, Ordering::Release);
    }
    let tx = LinkTx::new(edge.link_queue_bytes);
    // The link lease (docs/LINK.md "Link lease"): renewed only when the
    // worker echoes one of our heartbeats, so it runs out — and the
    // rooms' sockets are told `unavailable` — before the worker stops
    // waiting for us, whichever direction was cut. The handshake itself
    // was the first round trip.
    let lease = heartbeat * EDGE_LEASE;
    let epoch = hello_sent;
    link.peer_sent.store(0, Ordering::Release);
    let (beat_edge, beat_link) = (edge.clone(), link.clone());
    let writer = tokio::spawn(write_loop(
        w,
        tx.clone(),
        heartbeat,
        move || beat_edge.heartbeat_msg(since(epoch), beat_link.peer_sent.load(Ordering::Acquire)),
        || true,
    ));
    let flusher = tokio::spawn(flush_receipts(link.clone(), tx.clone()));
    // Register everything this worker owns here; the rooms are routed (and
    // their sockets told `ready`) once the worker says those registrations
    // are in effect, so nothing it acknowledges from then on misses them.
    let restore = tokio::spawn(restore(edge.clone(), link.clone(), tx.clone()));
    tracing::info!(worker = %link.node, "worker link connected");
    // Heartbeats are read ahead of the frames' processing (`read_ahead`),
    // so an echo renews the lease the moment it arrives.
    let lease_ms = Arc::new(AtomicU64::new(lease.as_millis() as u64));
    let (beat_edge, beat_link, beat_lease) = (edge.clone(), link.clone(), lease_ms.clone());
    let (mut frames, reader) = read_ahead(rx, heartbeat * 3, move |m| {
        if let Msg::Heartbeat { sent, echo, .. } = *m {
            beat_link.peer_sent.fetch_max(sent, Ordering::AcqRel);
            if echo > 0 {
                // `echo` is the `sent` of one of ours: proof of a round
                // trip begun then (never later than now).
                let begun = (echo - 1).min(epoch.elapsed().as_millis() as u64);
                beat_lease.fetch_max(begun + lease.as_millis() as u64, Ordering::AcqRel);
            }
        }
        on_beat(&beat_edge, &beat_link, m);
    });
    // The lease is judged every quarter heartbeat (docs/LINK.md "Link lease").
    let mut tick = tokio::time::interval(heartbeat / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = loop {
        let msg = tokio::select! {
            m = frames.recv() => m,
            _ = link.retired.cancelled() => break Ok(()),
            _ = tick.tick() => {
                if epoch.elapsed().as_millis() as u64 >= lease_ms.load(Ordering::Acquire) {
                    metrics::counter!("herdgate_link_lease_expired_total").increment(1);
                    tracing::warn!(worker = %link.node, "no heartbeat of ours echoed within the link lease: closing the link");
                    break Err(LinkError::Timeout);
                }
                if tx.is_closed() {
                    break Err(LinkError::Closed);
                }
                continue;
            }
        };
        let Some(msg) = msg else {
            // The reader ended: the worker closed, a bad frame, or silence.
            break Err(LinkError::Closed);
        };
        // A frame whose processing waits (a full room shard) must not hold
        // up the lease check: the lease wins, and the frame is dropped with
        // the link.
        let handled = tokio::select! {
            // Biased: the lease timer is armed only when a frame waits.
            biased;
            r = on_message(edge, link, msg) => r,
            _ = lease_over(epoch, &lease_ms) => {
                metrics::counter!("herdgate_link_lease_expired_total").increment(1);
                tracing::warn!(worker = %link.node, "no heartbeat of ours echoed within the link lease: closing the link");
                break Err(LinkError::Timeout);
            }
        };
        if let Err(e) = handled {
            break Err(e);
        }
        if tx.is_closed() {
            break Err(LinkError::Closed);
        }
    };
    // Stopped before the link is unrouted: a restore finishing on another
    // thread could otherwise route the link and set rooms ready after the
    // `unavailable` below.
    restore.abort();
    let _ = restore.await;
    link.set_tx(None);
    tx.close();
    writer.abort();
    flusher.abort();
    metrics::gauge!("herdgate_link_up", "worker" => link.node.to_string()).set(0.0);
    if !link.retired.is_cancelled() {
        tracing::warn!(worker = %link.node, "worker link lost; its rooms are unavailable here until it returns");
        edge.rooms
            .broadcast(|| RoomCmd::SetState {
                pred: owned_by(edge, &link.node),
                state: RoomState::Unavailable,
            })
            .await;
    }
    // Only now does the connection close: the read half, which the reader
    // hands back when it ends (or holds while it runs), goes last. A worker
    // that sees our end close may stop waiting for us at once, so our
    // sockets are told first.
    reader.abort();
    let read_half = reader.await.ok();
    drop(read_half);
    ended
}

/// Resolves once the link lease (`lease_ms` after `epoch`) has run out,
/// checked every few milliseconds.
async fn lease_over(epoch: tokio::time::Instant, lease_ms: &AtomicU64) {
    loop {
        let end = epoch + Duration::from_millis(lease_ms.load(Ordering::Acquire));
        if tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep_until(end).await;
    }
}

/// Register again every socket of the rooms `link`'s worker owns here, then
/// acknowledge the view, then wait for the worker to say it all took effect;
/// only then route to it and tell the rooms' sockets they are ready.
async fn restore(edge: Arc<Edge>, link: Arc<WorkerLink>, tx: LinkTx) {
    let mut registered;
    loop {
        let view = edge.view();
        let again = edge.rooms.collect(owned_by(&edge, &link.node)).await;
        for a in &again {
            if tx
                .send(&again_msg(a, RegMode::Restore, view.rev))
                .await
                .is_err()
            {
                return;
            }
        }
        registered = again.len();
        let _ = tx.send(&Msg::ViewAck { rev: view.rev }).await;
        let (id, answer) = edge.pending.request();
        let synced = tx.send(&Msg::Sync { id }).await.is_ok()
            && tokio::time::timeout(edge.handover_timeout * 4, answer)
                .await
                .is_ok_and(|r| r.is_ok());
        edge.pending.cancel(id);
        if !synced {
            tracing::warn!(worker = %link.node, "link restore not confirmed; closing it");
            tx.close();
            return;
        }
        // A view applied meanwhile skipped this link (it was not routed
        // yet): register again for the view in force now.
        if edge.view().rev == view.rev {
            break;
        }
    }
    link.set_tx(Some(tx.clone()));
    edge.rooms
        .broadcast(|| RoomCmd::SetState {
            pred: owned_by(&edge, &link.node),
            state: RoomState::Ready,
        })
        .await;
    tracing::info!(worker = %link.node, registered, "worker link up");
    metrics::gauge!("herdgate_link_up", "worker" => link.node.to_string()).set(1.0);
}

/// Send receipts in batches: at most every millisecond, or per 256.
async fn flush_receipts(link: Arc<WorkerLink>, tx: LinkTx) {
    loop {
        link.receipts_waiting.notified().await;
        let full = link
            .receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            >= RECEIPT_BATCH;
        if !full {
            tokio::time::sleep(RECEIPT_DELAY).await;
        }
        let ids = std::mem::take(&mut *link.receipts.lock().unwrap_or_else(|p| p.into_inner()));
        if !ids.is_empty() && tx.send(&Msg::DeliverAck { ids }).await.is_err() {
            return;
        }
    }
}

fn key(app: String, channel: String) -> RoomKey {
    RoomKey {
        app: Arc::from(app),
        channel: Arc::from(channel),
    }
}

/// A worker's heartbeat, the moment it is read: its witness statement.
fn on_beat(edge: &Edge, link: &WorkerLink, msg: &Msg) {
    let Msg::Heartbeat {
        digest, etcd_lost, ..
    } = *msg
    else {
        return;
    };
    *link.says.lock().unwrap_or_else(|p| p.into_inner()) = Some(PeerSays {
        digest,
        etcd_lost,
        at: boot_nanos(),
    });
    if edge.is_frozen() && (!etcd_lost || digest != edge.view().digest) {
        edge.check_freeze(); // a worker hears from etcd again: at once
    }
}

async fn on_message(edge: &Arc<Edge>, link: &Arc<WorkerLink>, msg: Msg) -> Result<(), LinkError> {
    match msg {
        // Read ahead of processing (`read_ahead`): never queued here.
        Msg::Heartbeat { .. } => on_beat(edge, link, &msg),
        Msg::Deliver {
            app,
            channel,
            frame,
            exclude,
            except_user,
            ack_id,
            serial,
        } => {
            let room = key(app, channel);
            let frame = Frame::try_from(frame).ok();
            let Some(frame) = frame.filter(|_| edge.accepts(link, &room)) else {
                metrics::counter!("herdgate_deliver_fenced_total", "reason" => "not_owner")
                    .increment(1);
                if ack_id != 0 {
                    link.receipt(ack_id, false);
                }
                return Ok(());
            };
            let receipt = (ack_id != 0).then(|| (link.clone() as Arc<dyn Receipts>, ack_id));
            edge.rooms
                .send(
                    &room.clone(),
                    RoomCmd::Deliver {
                        room,
                        frame,
                        exclude: exclude.map(ConnId),
                        except_user,
                        receipt,
                        serial,
                    },
                )
                .await;
        }
        Msg::DeliverTo {
            app,
            channel,
            conn,
            frame,
        } => {
            let room = key(app, channel);
            if let (true, Ok(frame)) = (edge.accepts(link, &room), Frame::try_from(frame)) {
                edge.rooms
                    .send(
                        &room.clone(),
                        RoomCmd::DeliverTo {
                            room,
                            conn: ConnId(conn),
                            frame,
                        },
                    )
                    .await;
            }
        }
        Msg::Close {
            app,
            channel,
            conn,
            code,
        } => {
            let room = key(app, channel);
            if edge.accepts(link, &room) {
                edge.rooms
                    .send(
                        &room.clone(),
                        RoomCmd::CloseUser {
                            room,
                            conn: ConnId(conn),
                            code,
                        },
                    )
                    .await;
            }
        }
        Msg::Removed {
            app,
            channel,
            conn,
            frame,
        } => {
            // Taken even from a worker that no longer owns the room (the
            // removal raced a move): it only takes a place away. The
            // current owner, which the socket was registered with again
            // meanwhile, is told the socket left.
            let room = key(app, channel);
            let Ok(notice) = Frame::removal(frame) else {
                return Ok(());
            };
            let owner = edge.accepts(link, &room);
            edge.rooms
                .send(
                    &room.clone(),
                    RoomCmd::Removed {
                        room: room.clone(),
                        conn: ConnId(conn),
                        notice,
                    },
                )
                .await;
            if !owner {
                edge.leave_current_owner(&room, ConnId(conn));
            }
        }
        Msg::Reply { id, reply } => match edge.pending.take(id) {
            Some(super::pending::Waiter::Reply(tx)) => {
                let _ = tx.send(reply);
            }
            Some(super::pending::Waiter::Register { room, conn }) => {
                let ok = matches!(reply, Reply::Registered { ok: true });
                let error = match reply {
                    Reply::Registered { .. } => None,
                    _ => Some(crate::protocol::subscription_error(
                        &room.channel,
                        "Unavailable",
                        "the room is moving or unavailable; retry in a moment",
                        503,
                    )),
                };
                edge.rooms
                    .send(
                        &room.clone(),
                        RoomCmd::Confirm {
                            room,
                            conn,
                            ok,
                            error,
                        },
                    )
                    .await;
            }
            None => {} // answered after its waiter gave up
        },
        Msg::Sealed { rev } => {
            link.sealed_rev.fetch_max(rev, Ordering::AcqRel);
            link.changed.notify_waiters();
            edge.prune_history();
        }
        Msg::Open { rev } => {
            link.open_rev.fetch_max(rev, Ordering::AcqRel);
            link.changed.notify_waiters();
            edge.rooms
                .broadcast(|| RoomCmd::SetState {
                    pred: owned_by(edge, &link.node),
                    state: RoomState::Ready,
                })
                .await;
        }
        Msg::Fenced => return Err(LinkError::Refused("the worker is fenced".into())),
        other => tracing::debug!(?other, "unexpected frame from a worker"),
    }
    Ok(())
}
