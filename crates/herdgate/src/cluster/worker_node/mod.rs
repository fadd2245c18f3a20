//! The worker role: rooms only. Edges connect on `cluster.link_listen`; each
//! edge is a subscriber of the rooms its sockets are in, so a publish goes to
//! every subscribed edge once and the edge fans out to its own sockets.
//!
//! The worker is authoritative for the rooms it owns in its view: which
//! edges (and which of their sockets) are subscribed, presence members merged
//! across edges, occupancy. With etcd membership it serves a room only while
//!
//! * its lease is certainly valid ([`Fence`](crate::cluster::membership::Fence)),
//! * it owns the room in its view, and
//! * the room is **open**: the handover barrier passed — every edge in the
//!   view has registered its sockets of the room here ([`handover`]).
//!
//! An acknowledged publish is answered only once every edge it went to
//! confirmed receipt ([`acks`]). An edge whose link is lost keeps its place
//! for `cluster.edge_lease`; if it does not come back in time its sockets
//! are dropped and users held only by it get `member_removed`.

mod acks;
mod handover;
mod link;
pub mod scale;

use super::link::{
    proof, proof_ok, send_direct, LinkError, LinkRx, LinkTx, Msg, Refusal, Reply, PAGE_BYTES,
    VERSION,
};
use super::membership::freeze::{self, PeerSays};
use super::membership::{boot_nanos, Membership};
use super::tls::{LinkIo, LinkTls};
use super::view::{NodeId, View};
use crate::op::{Ask, Join, Scope};
use crate::protocol::Frame;
use crate::ring::room_hash;
use crate::types::{ConnId, RoomKey};
use crate::worker::{Pool, RemoteEdge, Subscriber, Target};
use link::EdgeLink;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Requests of one edge answered concurrently (queries, acknowledged
/// publishes waiting for receipts); beyond it they are refused (busy).
const INFLIGHT_PER_LINK: usize = 4096;
/// Links being set up at once; beyond it the link accept loop waits.
const HANDSHAKES: usize = 64;
/// Of those, per peer address; beyond it a new connection is closed at
/// once (a peer that is not an edge cannot hold every place).
const HANDSHAKES_PER_PEER: usize = 8;

/// How `/status` asks a worker about the cluster.
pub type StatusFn = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the worker role needs: its rooms, its link settings, its view and
/// when to stop.
pub struct WorkerNode {
    pub id: NodeId,
    pub pool: Arc<Pool>,
    pub heartbeat: Duration,
    pub edge_lease: Duration,
    pub handover_timeout: Duration,
    pub tls: Option<crate::config::LinkTlsConfig>,
    /// Shared link secret (empty: the link is mutual TLS).
    pub secret: String,
    pub membership: Membership,
    /// Bytes queued to one edge before the link is closed as too slow.
    pub link_queue_bytes: usize,
    /// Cancelled when the node stops accepting edges.
    pub closing: CancellationToken,
    /// Where to put the node's status function.
    pub status: Arc<std::sync::OnceLock<StatusFn>>,
    /// Where to put "every edge of the view is linked" (scale-out waits for it).
    pub linked: scale::Linked,
}

/// One edge node, across its reconnects.
struct EdgeState {
    /// Which connection of the edge is the current one (leases compare it).
    generation: u64,
    link: Option<Arc<EdgeLink>>,
    /// The newest view the edge said it applied (`ViewAck`).
    acked_rev: u64,
}

pub(crate) struct Node {
    id: NodeId,
    pool: Arc<Pool>,
    heartbeat: Duration,
    edge_lease: Duration,
    handover_timeout: Duration,
    secret: String,
    link_queue_bytes: usize,
    membership: Membership,
    edges: Mutex<HashMap<u64, EdgeState>>,
    acks: acks::Acks,
    /// The view as of the last passed handover barrier: a room this worker
    /// owns now but did not own in it is still sealed.
    open_view: RwLock<Arc<View>>,
    /// Woken by every `ViewAck` (the barrier waits on it).
    view_acked: Notify,
    next_id: AtomicU64,
    /// The incarnation this node has dropped every older room for: links
    /// are accepted only while it is the current one, so no registration
    /// for a new incarnation can arrive before the old state is gone.
    accepted: std::sync::atomic::AtomicI64,
    /// When this frozen worker heard from etcd again (0: it has not).
    regained_at: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Whether a publish (or query) for `room` may be served here now.
    fn serving(&self, room: &RoomKey) -> Result<(), Refusal> {
        if !self.membership.fence.is_valid() {
            return Err(Refusal::Fenced);
        }
        if self.membership.is_static() {
            return Ok(()); // static workers serve what edges send them
        }
        let view = self.membership.current();
        if view.owner(room) != Some(&self.id) {
            return Err(Refusal::NotOwner);
        }
        let open = self.open_view.read().unwrap_or_else(|p| p.into_inner());
        if open.owner(room) != Some(&self.id) {
            return Err(Refusal::Sealed);
        }
        Ok(())
    }

    /// Whether a registration for `room` belongs here (its owner in the
    /// view, sealed or not): one for a room that moved away is dropped, so
    /// a late edge cannot leave a ghost room behind.
    fn owns(&self, room: &RoomKey) -> bool {
        self.membership.is_static() || self.membership.current().owner(room) == Some(&self.id)
    }

    /// Wait (briefly) for this node's view to reach `rev`, when a peer shows
    /// a newer one: the frame was decided on a view this node is about to get.
    async fn catch_up(&self, rev: u64) {
        if self.membership.is_static() || self.membership.current().rev >= rev {
            return;
        }
        let mut view = self.membership.view.clone();
        let _ = tokio::time::timeout(self.handover_timeout, async {
            while view.borrow_and_update().rev < rev {
                if view.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn heartbeat_msg(&self, sent: u64, echo: u64) -> Msg {
        Msg::Heartbeat {
            digest: self.membership.current().digest,
            etcd_lost: self.membership.contact.is_lost(),
            sent,
            echo,
        }
    }

    /// Freeze or thaw the fence by what the edges of the view say
    /// ([`freeze`](super::membership::freeze)).
    fn check_freeze(&self) {
        let fence = &self.membership.fence;
        let view = self.membership.current();
        let links: HashMap<String, Option<PeerSays>> = self
            .links()
            .into_iter()
            .map(|l| (l.name.clone(), *lock(&l.says)))
            .collect();
        let contact = &self.membership.contact;
        let own_lost = contact.is_lost();
        let (at, fresh) = (boot_nanos(), self.heartbeat * 3);
        let was = fence.is_frozen();
        if own_lost {
            self.regained_at.store(0, Ordering::Relaxed);
        }
        let may = if fence.lease_valid() && !own_lost {
            false // renewed: the lease decides again
        } else if freeze::worker_may_freeze(
            own_lost,
            &view,
            |e| links.get(e).copied().flatten(),
            at,
            fresh,
        ) {
            true
        } else if was && !own_lost {
            // etcd answers again, the renewal is not in yet: stay frozen
            // (for at most a keepalive round) while every edge still holds
            // this membership — thawing now would fence a worker whose
            // lease etcd is about to confirm.
            let since = match self.regained_at.load(Ordering::Relaxed) {
                0 => {
                    self.regained_at.store(at, Ordering::Relaxed);
                    at
                }
                t => t,
            };
            let peers: Vec<Option<PeerSays>> = view
                .edges
                .iter()
                .map(|e| links.get(&**e).copied().flatten())
                .collect();
            Duration::from_nanos(at.saturating_sub(since)) < contact.lost_after()
                && freeze::still_same(&view, &peers, at, fresh)
        } else {
            false
        };
        let now = fence.set_frozen(may);
        metrics::gauge!("herdgate_fenced").set(if fence.is_valid() { 0.0 } else { 1.0 });
        metrics::gauge!("herdgate_lease_valid_seconds").set(
            fence
                .remaining()
                .min(Duration::from_secs(3600))
                .as_secs_f64(),
        );
        if now != was {
            metrics::gauge!("herdgate_frozen").set(if now { 1.0 } else { 0.0 });
            if now {
                tracing::warn!(
                    rev = view.rev,
                    "etcd is lost to every edge of the view and to this worker: serving on the frozen membership"
                );
            } else {
                tracing::warn!(
                    "membership no longer frozen (etcd answers, or an edge disagrees): the lease decides again"
                );
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let view = self.membership.current();
        let open = self.open_view.read().unwrap_or_else(|p| p.into_inner()).rev;
        let edges = lock(&self.edges);
        serde_json::json!({
            "node_id": &*self.id,
            "static": self.membership.is_static(),
            "rev": view.rev,
            "digest": format!("{:016x}", view.digest),
            "open_rev": open,
            "fenced": !self.membership.fence.is_valid(),
            "frozen": self.membership.fence.is_frozen(),
            "etcd_lost": self.membership.contact.is_lost(),
            "lease_valid_seconds": self.membership.fence.remaining().min(Duration::from_secs(3600)).as_secs_f64(),
            "incarnation": *self.membership.incarnation.borrow(),
            "workers": view.workers.iter().map(|(id, w)| serde_json::json!({
                "id": &**id, "addr": w.addr, "vnodes": w.vnodes, "state": w.state, "incarnation": w.incarnation,
            })).collect::<Vec<_>>(),
            "view_edges": view.edges.iter().map(|e| &**e).collect::<Vec<_>>(),
            "edges": edges.values().map(|e| serde_json::json!({
                "link": if e.link.is_some() { "up" } else { "down" },
                "name": e.link.as_ref().map(|l| l.name.clone()),
                "acked_rev": e.acked_rev,
            })).collect::<Vec<_>>(),
        })
    }

    /// Every edge of the view has a live link here.
    fn all_edges_linked(&self) -> bool {
        let view = self.membership.current();
        let edges = lock(&self.edges);
        view.edges.iter().all(|name| {
            edges
                .get(&room_hash(name, ""))
                .is_some_and(|e| e.link.is_some())
        })
    }

    fn links(&self) -> Vec<Arc<EdgeLink>> {
        lock(&self.edges)
            .values()
            .filter_map(|e| e.link.clone())
            .collect()
    }

    /// Edges of the view that have not acknowledged `rev` on a live link:
    /// connected or not, an edge in the view is waited for (it may be
    /// connecting right now), up to the handover timeout.
    fn waiting_for(&self, view: &View) -> Vec<NodeId> {
        let edges = lock(&self.edges);
        view.edges
            .iter()
            .filter(|name| {
                let id = room_hash(name, "");
                !edges
                    .get(&id)
                    .is_some_and(|e| e.link.is_some() && e.acked_rev >= view.rev)
            })
            .cloned()
            .collect()
    }
}

pub async fn serve(listener: TcpListener, cfg: WorkerNode) {
    let tls = match cfg.tls.as_ref().map(LinkTls::load) {
        Some(Ok(t)) => Some(Arc::new(t)),
        Some(Err(e)) => {
            // Validated at start; a file changed since. Refuse every link rather than run in clear.
            tracing::error!(error = %e, "link TLS unusable; refusing edges");
            return;
        }
        None => None,
    };
    let initial = cfg.membership.current();
    let node = Arc::new(Node {
        id: cfg.id,
        pool: cfg.pool,
        heartbeat: cfg.heartbeat,
        edge_lease: cfg.edge_lease,
        handover_timeout: cfg.handover_timeout,
        secret: cfg.secret,
        link_queue_bytes: cfg.link_queue_bytes,
        membership: cfg.membership,
        edges: Mutex::new(HashMap::new()),
        acks: acks::Acks::default(),
        open_view: RwLock::new(initial),
        view_acked: Notify::new(),
        next_id: AtomicU64::new(1),
        accepted: std::sync::atomic::AtomicI64::new(0),
        regained_at: AtomicU64::new(0),
    });
    if !node.membership.is_static() {
        tokio::spawn(handover::run(node.clone(), cfg.closing.clone()));
        tokio::spawn(freeze_checks(Arc::downgrade(&node)));
    }
    let weak = Arc::downgrade(&node);
    let _ = cfg.status.set(Box::new(move || {
        weak.upgrade()
            .map_or(serde_json::Value::Null, |n| n.status())
    }));
    let weak = Arc::downgrade(&node);
    let _ = cfg.linked.set(Box::new(move || {
        weak.upgrade().is_some_and(|n| n.all_edges_linked())
    }));
    let permits = Arc::new(Semaphore::new(HANDSHAKES));
    let per_peer = Arc::new(crate::admission::PerIp::default());
    let stop = cfg.closing.clone();
    crate::accept::run(
        listener,
        stop,
        "link",
        move || permits.clone().acquire_owned(),
        |stream, peer, permit| {
            let Some(place) = per_peer.try_take(peer.ip(), HANDSHAKES_PER_PEER) else {
                metrics::counter!("herdgate_link_auth_failures_total").increment(1);
                tracing::debug!(%peer, "too many link handshakes from this address");
                return;
            };
            let _ = stream.set_nodelay(true);
            let (node, tls) = (node.clone(), tls.clone());
            tokio::spawn(async move {
                // One deadline before the peer is authenticated: TLS and Hello.
                let deadline = tokio::time::Instant::now() + node.heartbeat * 4;
                let (io, cert): (Box<dyn LinkIo>, _) = match tls {
                    Some(tls) => match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                        Ok(Ok(accepted)) => accepted,
                        Ok(Err(e)) => {
                            return tracing::warn!(%peer, error = %e, "link TLS handshake refused")
                        }
                        Err(_) => return tracing::warn!(%peer, "link TLS handshake timed out"),
                    },
                    None => (Box::new(stream), None),
                };
                let handshake = handshake(&node, io, cert, deadline).await;
                drop(place);
                match handshake {
                    Ok((rx, w, edge, heartbeat)) => {
                        drop(permit);
                        edge_connection(node, rx, w, edge, heartbeat).await
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "link refused"),
                }
            });
        },
    )
    .await;
}

/// Re-judge the freeze a few times per heartbeat, so that it is decided
/// before the lease (renewed every `keepalive_interval`) could run out;
/// until the node is gone (a draining node is judged too).
async fn freeze_checks(node: std::sync::Weak<Node>) {
    while let Some(n) = node.upgrade() {
        n.check_freeze();
        let every = (n.heartbeat / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        drop(n);
        tokio::time::sleep(every).await;
    }
}

type Reader = LinkRx<tokio::io::ReadHalf<Box<dyn LinkIo>>>;
type Writer = tokio::io::WriteHalf<Box<dyn LinkIo>>;

/// Challenge, hello (with the edge's proof of the secret), answer (with
/// ours). The heartbeat both ends use is the larger of the two asked.
async fn handshake(
    node: &Node,
    io: Box<dyn LinkIo>,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
    deadline: tokio::time::Instant,
) -> Result<(Reader, Writer, String, Duration), LinkError> {
    let (r, mut w) = tokio::io::split(io);
    let mut rx = LinkRx::new(r);
    let nonce: [u8; 16] = rand::random();
    tokio::time::timeout_at(deadline, send_direct(&mut w, &Msg::Challenge { nonce }))
        .await
        .map_err(|_| LinkError::Timeout)??;
    let hello = tokio::time::timeout_at(deadline, rx.recv())
        .await
        .map_err(|_| LinkError::Timeout)??;
    let Msg::Hello {
        version,
        edge,
        rev,
        heartbeat_ms,
        nonce: edge_nonce,
        proof: edge_proof,
    } = hello
    else {
        return Err(LinkError::Refused("no hello".into()));
    };
    let refuse = |reason: &str| LinkError::Refused(format!("edge {edge:?}: {reason}"));
    if version != VERSION {
        let _ = send_direct(
            &mut w,
            &Msg::Refuse {
                reason: format!("link version {version}, this worker speaks {VERSION}"),
            },
        )
        .await;
        return Err(refuse("wrong link version"));
    }
    if !node.secret.is_empty()
        && !edge_proof.is_some_and(|p| proof_ok(&node.secret, "edge", &nonce, &edge, &p))
    {
        metrics::counter!("herdgate_link_auth_failures_total").increment(1);
        let _ = send_direct(
            &mut w,
            &Msg::Refuse {
                reason: "not authenticated".into(),
            },
        )
        .await;
        return Err(refuse("bad proof of the cluster secret"));
    }
    // Mutual TLS: the certificate must name the edge it claims to be.
    if cert
        .as_ref()
        .is_some_and(|c| !crate::cluster::tls::names(c, &edge))
    {
        metrics::counter!("herdgate_link_auth_failures_total").increment(1);
        let _ = send_direct(
            &mut w,
            &Msg::Refuse {
                reason: "the certificate does not name this edge id".into(),
            },
        )
        .await;
        return Err(refuse(
            "its certificate does not name it (subject alternative name)",
        ));
    }
    if !node.membership.fence.is_valid() {
        let _ = send_direct(
            &mut w,
            &Msg::Refuse {
                reason: "fenced".into(),
            },
        )
        .await;
        return Err(refuse("this worker is fenced"));
    }
    if *node.membership.incarnation.borrow() != node.accepted.load(Ordering::Acquire) {
        let reason = "starting".to_string();
        let _ = send_direct(&mut w, &Msg::Refuse { reason }).await;
        return Err(refuse("this worker is still setting up its incarnation"));
    }
    node.catch_up(rev).await;
    let heartbeat = node
        .heartbeat
        .max(Duration::from_millis(heartbeat_ms.max(10) as u64));
    let ack = Msg::HelloAck {
        version: VERSION,
        worker: node.id.to_string(),
        incarnation: *node.membership.incarnation.borrow(),
        rev: node.membership.current().rev,
        heartbeat_ms: heartbeat.as_millis() as u32,
        proof: (!node.secret.is_empty())
            .then(|| proof(&node.secret, "worker", &edge_nonce, &node.id)),
    };
    send_direct(&mut w, &ack).await?;
    Ok((rx, w, edge, heartbeat))
}

async fn edge_connection(
    node: Arc<Node>,
    rx: Reader,
    w: Writer,
    name: String,
    heartbeat: Duration,
) {
    let id = room_hash(&name, "");
    let tx = LinkTx::new(node.link_queue_bytes);
    let link = Arc::new(EdgeLink::new(id, name.clone(), tx.clone(), heartbeat));
    let (generation, replaced) = {
        let mut edges = lock(&node.edges);
        let e = edges.entry(id).or_insert(EdgeState {
            generation: 0,
            link: None,
            acked_rev: 0,
        });
        e.generation += 1;
        let replaced = e.link.replace(link.clone());
        e.acked_rev = 0;
        (e.generation, replaced)
    };
    // A new connection proves the edge gave up the old one (it tells its
    // sockets `unavailable` before it reconnects): what waits for the old
    // one stops waiting.
    if let Some(old) = replaced {
        old.tx.close();
        old.released.store(true, Ordering::Release);
        node.acks.edge_gone(old.ack_key);
    }
    if generation > 1 {
        // The edge comes back within its lease. What it registered here
        // before may be stale (it re-registers every room it has here, and
        // those commands queue behind this one): drop it quietly.
        node.pool.purge_edge(id, true).await;
    }
    tracing::info!(edge = %name, "edge connected");
    metrics::gauge!("herdgate_link_edges").increment(1.0);
    let (fence_node, beat_node, beat_link) = (node.clone(), node.clone(), link.clone());
    let epoch = tokio::time::Instant::now();
    let writer = tokio::spawn(super::link::write_loop(
        w,
        tx.clone(),
        heartbeat,
        move || {
            beat_node.heartbeat_msg(
                super::link::since(epoch),
                beat_link.peer_sent.load(Ordering::Acquire),
            )
        },
        move || fence_node.membership.fence.is_valid(),
    ));
    let inflight = Arc::new(Semaphore::new(INFLIGHT_PER_LINK));
    // WORKER_SILENCE missed heartbeats and the edge is gone (its own lease
    // ran out before: see `link::EDGE_LEASE`).
    let (beat_node, beat_link) = (node.clone(), link.clone());
    let (mut frames, reader) =
        super::link::read_ahead(rx, heartbeat * super::link::WORKER_SILENCE, move |m| {
            on_beat(&beat_node, &beat_link, m)
        });
    loop {
        let msg = tokio::select! {
            m = frames.recv() => m,
            _ = writer_closed(&tx) => break,
        };
        match msg {
            Some(msg) => handle(&node, msg, &link, &inflight).await,
            None => break,
        }
    }
    reader.abort();
    let peer_closed = match reader.await {
        // The edge ended the stream cleanly (it tells its sockets before
        // it does, or its process died with them): it no longer believes
        // in this link.
        Ok((super::link::ReadEnd::PeerClosed, _)) => true,
        Ok((super::link::ReadEnd::Failed(e), _)) => {
            // A reset, a bad frame: the edge may not know.
            tracing::debug!(edge = %name, error = %e, "edge link read failed");
            false
        }
        Ok((super::link::ReadEnd::Silent, _)) => {
            tracing::debug!(edge = %name, "edge silent for WORKER_SILENCE heartbeats");
            false
        }
        _ => false,
    };
    tx.close();
    writer.abort();
    metrics::gauge!("herdgate_link_edges").decrement(1.0);
    if let Some(e) = lock(&node.edges)
        .get_mut(&id)
        .filter(|e| e.generation == generation)
    {
        e.link = None;
    }
    node.view_acked.notify_waiters(); // the barrier stops waiting for it
                                      // Acknowledged publishes stop waiting for this connection once the
                                      // edge has surely given it up: its link lease, renewed only by our
                                      // echoes of its heartbeats, has run out by `held_until` — however the
                                      // link was lost (silence, a closed queue, a read error), the edge's
                                      // sockets were told `unavailable` by then. Never before: a one-way
                                      // partition leaves the edge believing the link is up until its lease
                                      // ends. (A newer connection of the same edge is waited for as usual.)
                                      // An edge that closed its end itself gave the link up already.
    if peer_closed {
        link.released.store(true, Ordering::Release);
        node.acks.edge_gone(link.ack_key);
    } else {
        let (acks_node, held, until) = (node.clone(), link.clone(), link.held_until());
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            held.released.store(true, Ordering::Release);
            acks_node.acks.edge_gone(held.ack_key);
        });
    }
    tracing::warn!(edge = %name, "edge link lost; its sockets stay for the lease");
    let lease = node.edge_lease;
    tokio::spawn(async move {
        tokio::time::sleep(lease).await;
        // Expired only if the edge has not connected again meanwhile; the
        // entry goes with it, so the map holds only edges seen within a lease.
        let expired = {
            let mut edges = lock(&node.edges);
            let expired = edges
                .get(&id)
                .is_some_and(|e| e.generation == generation && e.link.is_none());
            if expired {
                edges.remove(&id);
            }
            expired
        };
        if expired {
            tracing::warn!(edge = %name, "edge lease expired: dropping its sockets");
            node.pool.purge_edge(id, false).await;
        }
    });
}

/// Resolves when the link's queue was closed (overflow, fence, shutdown).
async fn writer_closed(tx: &LinkTx) {
    while !tx.is_closed() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key(app: String, channel: String) -> RoomKey {
    RoomKey {
        app: Arc::from(app),
        channel: Arc::from(channel),
    }
}

fn reply(link: &EdgeLink, id: u64, reply: Reply) {
    link.send_msg(&Msg::Reply { id, reply });
}

fn refused(link: &EdgeLink, id: u64, reason: Refusal) {
    metrics::counter!("herdgate_link_publish_refused_total", "reason" => reason.label())
        .increment(1);
    reply(
        link,
        id,
        Reply::Refused {
            reason,
            retry_after_ms: 1000,
        },
    );
}

/// An edge's heartbeat, the moment it is read: echo it, and record its
/// witness statement.
fn on_beat(node: &Node, link: &EdgeLink, msg: &Msg) {
    let Msg::Heartbeat {
        digest,
        etcd_lost,
        sent,
        ..
    } = *msg
    else {
        return;
    };
    link.heartbeat_from_edge(sent);
    *lock(&link.says) = Some(PeerSays {
        digest,
        etcd_lost,
        at: boot_nanos(),
    });
    if node.membership.fence.is_frozen()
        && (!etcd_lost || digest != node.membership.current().digest)
    {
        node.check_freeze(); // an edge hears from etcd again: judge at once
    }
}

/// Handle one frame from an edge. Whatever must stay in link order
/// (registrations, publishes) is queued to the rooms here, in order;
/// whatever waits for an answer waits in a task of its own, so one slow
/// request never holds up the frames behind it.
async fn handle(node: &Arc<Node>, msg: Msg, link: &Arc<EdgeLink>, inflight: &Arc<Semaphore>) {
    let target = || Target::Edge(link.clone() as Arc<dyn RemoteEdge>);
    match msg {
        // Read ahead of processing (`read_ahead`): never queued here.
        Msg::Heartbeat { .. } => on_beat(node, link, &msg),
        Msg::Join {
            id,
            rev,
            conn,
            join,
        } => {
            node.catch_up(rev).await;
            let join = match join {
                Join::Watch {
                    app,
                    users,
                    announce,
                } => {
                    // The users it owns; the edge sent the rest elsewhere.
                    let users = users
                        .into_iter()
                        .filter(|u| node.owns(&RoomKey::user(&app, u)))
                        .collect();
                    Join::Watch {
                        app,
                        users,
                        announce,
                    }
                }
                Join::Room { ref room, .. } | Join::SignIn { ref room, .. } if !node.owns(room) => {
                    if id != 0 {
                        refused(link, id, Refusal::NotOwner);
                    }
                    return;
                }
                Join::Room {
                    room,
                    member,
                    user,
                    granted,
                    max_members,
                    mut shed,
                    resume,
                } => {
                    // A restored socket's member is news, unless the room is
                    // being rebuilt from every edge's registrations right now.
                    shed.announce &= node.serving(&room).is_ok();
                    Join::Room {
                        room,
                        member,
                        user,
                        granted,
                        max_members,
                        shed,
                        resume,
                    }
                }
                join @ Join::SignIn { .. } => join,
            };
            let sub = Subscriber {
                id: conn,
                to: target(),
            };
            // Answered by the owner as it decides, so the answer is on the
            // link after what the room sent the socket and before the room's
            // next events (which the edge gives confirmed sockets only).
            let answer: Option<crate::worker::Decided> = (id != 0).then(|| {
                let link = link.clone();
                Box::new(move |ok| reply(&link, id, Reply::Registered { ok })) as _
            });
            if node.pool.join_start(join, sub, answer).await.is_err() && id != 0 {
                refused(link, id, Refusal::Busy);
            }
        }
        Msg::Tell(tell) => {
            let _ = node.pool.tell(tell).await;
        }
        Msg::Publish {
            id,
            app,
            channel,
            frame,
            exclude,
            coalesce_ms,
            wait_ms,
            rev,
            idem,
        } => {
            let room = key(app, channel);
            node.catch_up(rev).await;
            let Ok(frame) = Frame::try_from(frame) else {
                // Not UTF-8: not a frame a socket may get.
                if id != 0 {
                    refused(link, id, Refusal::Nack);
                }
                return;
            };
            if let Err(reason) = node.serving(&room) {
                if id != 0 {
                    refused(link, id, reason);
                } else {
                    metrics::counter!("herdgate_client_events_dropped_total", "reason" => reason.label())
                        .increment(1);
                }
                return;
            }
            let coalesce = coalesce_ms.map(Duration::from_millis);
            let exclude = exclude.map(ConnId);
            if id == 0 {
                // A client event (from `exclude`): acknowledged to nobody.
                let _ = match exclude {
                    Some(sender) => {
                        node.pool
                            .client_event_within(room, frame, sender, Duration::from_secs(1))
                            .await
                    }
                    None => {
                        node.pool
                            .publish(room, frame, None, coalesce, Duration::from_secs(1))
                            .await
                    }
                };
                return;
            }
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                return refused(link, id, Refusal::Busy);
            };
            // Answer within the edge's own wait, so a late answer never
            // follows a 503 the client already got.
            let wait =
                Duration::from_millis(wait_ms as u64).saturating_sub(Duration::from_millis(50));
            let ack_id = node.next_id.fetch_add(1, Ordering::Relaxed);
            let waiting = node.acks.expect(ack_id);
            match node
                .pool
                .publish_tracked(room, frame, exclude, coalesce, idem, ack_id, wait)
                .await
            {
                Ok(delivery) => {
                    let (node, link) = (node.clone(), link.clone());
                    tokio::spawn(async move {
                        let outcome =
                            acks::confirm(&node.acks, ack_id, waiting, delivery, wait).await;
                        match outcome {
                            Ok(()) => reply(&link, id, Reply::Published),
                            Err(reason) => refused(&link, id, reason),
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    node.acks.forget(ack_id);
                    refused(link, id, Refusal::Busy);
                }
            }
        }
        Msg::DeliverAck { ids } => node.acks.receipts(link.ack_key, &ids),
        Msg::Sync { id } => {
            let (node, link) = (node.clone(), link.clone());
            tokio::spawn(async move {
                node.pool.barrier().await;
                reply(&link, id, Reply::Done);
            });
        }
        Msg::ViewAck { rev } => {
            if let Some(e) = lock(&node.edges).get_mut(&link.id) {
                e.acked_rev = e.acked_rev.max(rev);
            }
            node.view_acked.notify_waiters();
        }
        Msg::Ask { id, ask, after } => {
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                return refused(link, id, Refusal::Busy);
            };
            let (node, link) = (node.clone(), link.clone());
            tokio::spawn(async move {
                answer(&node, id, ask, after, &link).await;
                drop(permit);
            });
        }
        other => tracing::debug!(?other, "unexpected frame from an edge"),
    }
}

const API_WAIT: Duration = Duration::from_secs(1);

/// Answer a question, one page of it: asked of a room, only by its owner
/// while it serves it; asked of every worker (a listing), by each while its
/// lease holds (a room still here after a move, sealed away and not yet
/// dropped, may be listed by its new owner too: the edge lists it once).
async fn answer(node: &Node, id: u64, ask: Ask, after: Option<String>, link: &EdgeLink) {
    let serving = match ask.scope() {
        Scope::Room(room) => node.serving(room),
        Scope::Every if node.membership.fence.is_valid() => Ok(()),
        Scope::Every => Err(Refusal::Fenced),
    };
    if let Err(reason) = serving {
        return refused(link, id, reason);
    }
    match node.pool.ask(ask, API_WAIT).await {
        Ok(answer) => {
            let (answer, next) = answer.page(after.as_deref(), PAGE_BYTES);
            reply(link, id, Reply::Answer { answer, next });
        }
        Err(_) => refused(link, id, Refusal::Busy),
    }
}
