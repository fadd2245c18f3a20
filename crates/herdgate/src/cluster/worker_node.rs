//! The worker role: rooms only. Edges connect on `cluster.link_listen`; each
//! edge is a subscriber of the rooms its sockets are in, so a publish goes to
//! every subscribed edge once and the edge fans out to its own sockets.
//!
//! The worker is authoritative for its rooms: which edges (and which of
//! their sockets) are subscribed, presence members merged across edges,
//! occupancy. An edge whose link is lost keeps its place for the lease
//! (`cluster.edge_lease`); if it does not come back in time its sockets are
//! dropped and users held only by it get `member_removed`, so a crashed edge
//! leaves no ghost users.

use super::link::{read_msg, write_msg, Msg, VERSION};
use super::tls::{LinkIo, LinkTls};
use crate::outbound::CloseOrder;
use crate::protocol::Frame;
use crate::types::{ConnId, Member, RoomKey, Shed};
use crate::worker::{Pool, RemoteEdge, Subscriber, Target};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames waiting to be written to one edge. Beyond it the edge is too
/// slow: its link is closed, and it reconnects and registers again.
const LINK_QUEUE: usize = 65_536;
const API_WAIT: Duration = Duration::from_secs(1);

/// One connected edge, as the rooms see it.
struct EdgeLink {
    id: u64,
    tx: mpsc::Sender<Msg>,
}

impl EdgeLink {
    fn send(&self, msg: Msg) {
        if self.tx.try_send(msg).is_err() {
            metrics::counter!("herdgate_link_overflows_total").increment(1);
        }
    }
}

impl RemoteEdge for EdgeLink {
    fn id(&self) -> u64 {
        self.id
    }
    fn deliver(
        &self,
        room: &RoomKey,
        frame: &Frame,
        exclude: Option<ConnId>,
        except_user: Option<&str>,
    ) {
        self.send(Msg::Deliver {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            frame: frame.as_str().to_string(),
            exclude: exclude.map(|c| c.0),
            except_user: except_user.map(String::from),
        });
    }
    fn deliver_to(&self, room: &RoomKey, conn: ConnId, frame: &Frame) {
        self.send(Msg::DeliverTo {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            frame: frame.as_str().to_string(),
        });
    }
    fn close(&self, room: &RoomKey, conn: ConnId, order: CloseOrder) {
        self.send(Msg::Close {
            app: room.app.to_string(),
            channel: room.channel.to_string(),
            conn: conn.0,
            code: order.code,
        });
    }
}

/// Which connection of each edge is the current one (leases compare it).
#[derive(Default)]
struct Generations(Mutex<HashMap<u64, u64>>);

/// What the worker role needs to serve edges: its rooms, its link settings
/// and when to stop.
#[derive(Clone)]
pub struct WorkerNode {
    pub pool: Arc<Pool>,
    pub heartbeat: Duration,
    pub edge_lease: Duration,
    pub tls: Option<crate::config::LinkTlsConfig>,
    /// Cancelled when the node stops accepting edges.
    pub closing: CancellationToken,
}

pub async fn serve(listener: TcpListener, node: WorkerNode) {
    let gens = Arc::new(Generations::default());
    let tls = match node.tls.as_ref().map(LinkTls::load) {
        Some(Ok(t)) => Some(Arc::new(t)),
        Some(Err(e)) => {
            // Validated at start; a file changed since. Refuse every link rather than run in clear.
            tracing::error!(error = %e, "link TLS unusable; refusing edges");
            return;
        }
        None => None,
    };
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "link accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = node.closing.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (node, gens, tls) = (node.clone(), gens.clone(), tls.clone());
        tokio::spawn(async move {
            let hb = node.heartbeat;
            let io: Box<dyn LinkIo> = match tls {
                Some(tls) => match tokio::time::timeout(hb * 4, tls.accept(stream)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        return tracing::warn!(%peer, error = %e, "link TLS handshake refused")
                    }
                    Err(_) => return tracing::warn!(%peer, "link TLS handshake timed out"),
                },
                None => Box::new(stream),
            };
            edge_connection(io, peer, node, gens).await
        });
    }
}

async fn edge_connection(
    stream: Box<dyn LinkIo>,
    peer: std::net::SocketAddr,
    node: WorkerNode,
    gens: Arc<Generations>,
) {
    let (cfg_hb, lease) = (node.heartbeat, node.edge_lease);
    let (mut r, mut w) = tokio::io::split(stream);
    let edge = match tokio::time::timeout(cfg_hb * 4, read_msg(&mut r)).await {
        Ok(Ok(Msg::Hello {
            version: VERSION,
            edge,
        })) => edge,
        other => {
            tracing::debug!(%peer, ?other, "link refused: no valid hello");
            return;
        }
    };
    let generation = {
        let mut g = gens.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(edge).or_insert(0);
        *n += 1;
        *n
    };
    if generation > 1 {
        // The edge comes back within its lease. While it was away it moved
        // its rooms elsewhere, so what it registered here before may be
        // stale: drop it quietly; the edge registers again every room whose
        // owner this worker is, and those commands queue behind this one.
        node.pool.purge_edge(edge, true).await;
    }
    tracing::info!(%peer, edge, "edge connected");
    metrics::gauge!("herdgate_link_edges").increment(1.0);
    let (tx, rx) = mpsc::channel::<Msg>(LINK_QUEUE);
    let link: Arc<EdgeLink> = Arc::new(EdgeLink {
        id: edge,
        tx: tx.clone(),
    });
    let writer = tokio::spawn(async move {
        if write_msg(&mut w, &Msg::HelloAck { version: VERSION })
            .await
            .is_ok()
        {
            super::link::write_loop(w, rx, cfg_hb).await;
        }
    });
    // Three missed heartbeats and the edge is gone.
    while let Ok(Ok(msg)) = tokio::time::timeout(cfg_hb * 3, read_msg(&mut r)).await {
        handle(msg, &link, &tx, &node.pool).await;
    }
    writer.abort();
    metrics::gauge!("herdgate_link_edges").decrement(1.0);
    tracing::warn!(edge, "edge link lost; its sockets stay for the lease");
    tokio::spawn(async move {
        tokio::time::sleep(lease).await;
        // Expired only if the edge has not connected again meanwhile; the
        // entry goes with it, so the map holds only edges seen within a lease.
        let expired = {
            let mut g = gens.0.lock().unwrap_or_else(|p| p.into_inner());
            let expired = g.get(&edge) == Some(&generation);
            if expired {
                g.remove(&edge);
            }
            expired
        };
        if expired {
            tracing::warn!(edge, "edge lease expired: dropping its sockets");
            node.pool.purge_edge(edge, false).await;
        }
    });
}

async fn handle(msg: Msg, link: &Arc<EdgeLink>, tx: &mpsc::Sender<Msg>, pool: &Pool) {
    let key = |app: String, channel: String| RoomKey {
        app: Arc::from(app),
        channel: Arc::from(channel),
    };
    let target = || Target::Edge(link.clone() as Arc<dyn RemoteEdge>);
    let reply = |m: Msg| {
        let _ = tx.try_send(m);
    };
    match msg {
        Msg::Heartbeat => {}
        Msg::Subscribe {
            app,
            channel,
            conn,
            member,
            max_members,
            events_max,
            silent,
        } => {
            let member = member.map(|(user, info)| Member {
                user_id: Arc::from(user),
                user_info: info.and_then(|i| serde_json::value::RawValue::from_string(i).ok()),
            });
            let sub = Subscriber {
                id: ConnId(conn),
                to: target(),
            };
            let shed = Shed {
                member_events_max: events_max.map(|m| m as usize),
                silent,
            };
            let _ = pool
                .subscribe(key(app, channel), sub, member, max_members as usize, shed)
                .await;
        }
        Msg::Unsubscribe {
            app,
            channel,
            conn,
            events_max,
            silent,
        } => {
            let shed = Shed {
                member_events_max: events_max.map(|m| m as usize),
                silent,
            };
            let _ = pool
                .unsubscribe(key(app, channel), ConnId(conn), shed)
                .await;
        }
        Msg::Publish {
            id,
            app,
            channel,
            frame,
            exclude,
            coalesce_ms,
        } => {
            let coalesce = coalesce_ms.map(Duration::from_millis);
            let room = key(app, channel);
            let sent = pool
                .publish(
                    room.clone(),
                    Frame::from(frame),
                    exclude.map(ConnId),
                    coalesce,
                    API_WAIT,
                )
                .await;
            if id != 0 && sent.is_ok() {
                // The room's worker handles its commands in order: once this
                // query is answered the publish has been fanned out to the edges.
                if pool.query(room, API_WAIT).await.is_ok() {
                    reply(Msg::Ack { id });
                }
            }
        }
        Msg::SignIn { app, user, conn } => {
            let _ = pool
                .sign_in(
                    &Arc::from(app),
                    &user,
                    Subscriber {
                        id: ConnId(conn),
                        to: target(),
                    },
                )
                .await;
        }
        Msg::SignOut { app, user, conn } => {
            let _ = pool.sign_out(&Arc::from(app), &user, ConnId(conn)).await;
        }
        Msg::Terminate { app, user } => {
            let _ = pool.terminate(&Arc::from(app), &user, API_WAIT).await;
        }
        Msg::Query { id, app, channel } => {
            let r = pool
                .query(key(app, channel), API_WAIT)
                .await
                .unwrap_or_default();
            reply(Msg::QueryReply {
                id,
                subscriptions: r.subscription_count as u64,
                users: r.user_count as u64,
            });
        }
        Msg::Users { id, app, channel } => {
            let users = pool
                .users(key(app, channel), API_WAIT)
                .await
                .unwrap_or_default();
            reply(Msg::UsersReply { id, users });
        }
        Msg::List { id, app, prefix } => {
            let rooms = pool
                .list(&Arc::from(app), &prefix, API_WAIT)
                .await
                .unwrap_or_default();
            let rooms = rooms
                .into_iter()
                .map(|(n, r)| (n, r.subscription_count as u64, r.user_count as u64))
                .collect();
            reply(Msg::ListReply { id, rooms });
        }
        other => tracing::debug!(?other, "unexpected frame from an edge"),
    }
}
