//! The edge ↔ worker link, version 5: length-delimited frames (a 4-byte
//! big-endian length, then one postcard-encoded [`Msg`]) over one TCP or TLS
//! connection per edge–worker pair, every room multiplexed on it.
//! docs/LINK.md lists the frames.
//!
//! Writes go through a [`LinkTx`]: a queue bounded in **bytes**, drained by
//! one writer task that batches whatever is queued into one write. Frames
//! that must not be lost (registrations, barrier frames) wait for space;
//! best-effort frames are refused when the queue is full, and the caller
//! names the policy (a worker closes a link it cannot keep up with).

use crate::op::{Answer, Ask, Join, Tell};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

pub const VERSION: u16 = 8;
/// Largest frame accepted from a peer: an event (payloads are ≤ the message
/// limit) plus room names, or one page of a list reply, with room to spare.
pub const MAX_FRAME: usize = 1 << 20;
/// List and user replies are cut into pages of at most this many bytes of
/// names, well under [`MAX_FRAME`].
pub use crate::op::PAGE_BYTES;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// worker → edge, first frame: a nonce the edge's proof must cover.
    Challenge {
        nonce: [u8; 16],
    },
    /// edge → worker: who is connecting, with its proof of the cluster
    /// secret (none when the link is mutual TLS) and a nonce of its own.
    Hello {
        version: u16,
        edge: String,
        rev: u64,
        heartbeat_ms: u32,
        nonce: [u8; 16],
        proof: Option<[u8; 32]>,
    },
    /// worker → edge: accepted; the worker's own proof, and the heartbeat
    /// both ends use (the larger of the two asked).
    HelloAck {
        version: u16,
        worker: String,
        incarnation: i64,
        rev: u64,
        heartbeat_ms: u32,
        proof: Option<[u8; 32]>,
    },
    /// worker → edge: not accepted, and why (then the link closes).
    Refuse {
        reason: String,
    },
    /// Sent every heartbeat interval, busy or not: the sender's membership
    /// ([`View::digest`](crate::cluster::view::View::digest)) and whether it
    /// has lost etcd, the witness statements of
    /// [`freeze`](crate::cluster::membership::freeze); `sent`, the sender's
    /// clock (milliseconds since the link started, ≥ 1), and `echo`, the
    /// newest `sent` it has read from the peer (0: none yet). A worker
    /// echoes each edge heartbeat at once: an edge's link lease is renewed
    /// only by that round trip (docs/LINK.md "Link lease").
    Heartbeat {
        digest: u64,
        etcd_lost: bool,
        sent: u64,
        echo: u64,
    },

    // ---- edge → worker
    /// Socket `conn` takes a place at the owner ([`Join`]): a room, a
    /// sign-in, a watch. The worker first catches up to the sender's view
    /// `rev`. `id` ≠ 0 asks for [`Reply::Registered`], sent in order with
    /// what the owner sent the socket.
    Join {
        id: u64,
        rev: u64,
        conn: crate::types::ConnId,
        join: Join,
    },
    /// What a socket let go of (leaving a room, signing out, unwatching a
    /// user): no answer; in link order with the socket's registrations.
    Tell(Tell),
    /// An event for a room. `id` ≠ 0 (HTTP API publishes) asks for
    /// [`Reply::Published`] once every subscribed edge confirmed receipt,
    /// within `wait_ms`.
    Publish {
        id: u64,
        app: String,
        channel: String,
        frame: Bytes,
        exclude: Option<u64>,
        coalesce_ms: Option<u64>,
        wait_ms: u32,
        rev: u64,
        /// An idempotency key: the room does not send a publish whose key
        /// it has seen within its window (and answers it as done).
        idem: Option<u64>,
    },
    /// A question to the room's owner (or, for [`Ask::Rooms`], to each
    /// worker), answered with [`Reply::Answer`]. A list answer comes one
    /// page at a time: `after` is the last name of the page before.
    Ask {
        id: u64,
        ask: Ask,
        after: Option<String>,
    },
    /// "I applied the view at `rev`; my registrations for every room that
    /// moved are ahead of this frame, and every previous owner still in the
    /// view has sealed."
    ViewAck {
        rev: u64,
    },
    /// Answered (`Reply::Done`) once every frame before it is in effect at
    /// the worker's rooms: a link coming back says its rooms are ready only
    /// then.
    Sync {
        id: u64,
    },
    /// Receipt of acknowledged deliveries: `false` means not delivered
    /// (fenced, or the room is gone here).
    DeliverAck {
        ids: Vec<(u64, bool)>,
    },

    // ---- worker → edge
    /// Fan out to the edge's sockets in the room, but `exclude` and
    /// `except_user`'s. `ack_id` ≠ 0 asks for a [`Msg::DeliverAck`].
    Deliver {
        app: String,
        channel: String,
        frame: Bytes,
        exclude: Option<u64>,
        except_user: Option<String>,
        ack_id: u64,
        /// The event's history serial: sockets that opted in to resume get
        /// the frame with it.
        serial: Option<u64>,
    },
    /// To one socket (subscription answers).
    DeliverTo {
        app: String,
        channel: String,
        conn: u64,
        frame: Bytes,
    },
    /// Close one socket signed in as a user (`channel` is the user's channel).
    Close {
        app: String,
        channel: String,
        conn: u64,
        code: u16,
    },
    Reply {
        id: u64,
        reply: Reply,
    },
    /// "As of my view at `rev` I hold no room I do not own, and every frame
    /// I sent for such rooms precedes this one." Cumulative.
    Sealed {
        rev: u64,
    },
    /// "Every room I gained as of `rev` takes publishes now." Cumulative.
    Open {
        rev: u64,
    },
    /// "My lease may have expired: I serve nothing until I am sure of it."
    Fenced,
    /// worker → edge: a moderator took socket `conn` out of the room; the
    /// edge forgets its place there and sends it `frame` (the notice).
    Removed {
        app: String,
        channel: String,
        conn: u64,
        frame: Bytes,
    },
}

/// Why an edge registers a socket's places again (never on the wire: it
/// decides the [`Join`]s' `silent`/`announce` the edge sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegMode {
    /// Its room moved to this worker: nothing is announced (its members
    /// are known).
    Move,
    /// Its edge's link came back: members the room does not have are
    /// announced (unless the room is still being handed over); the socket
    /// is told nothing (it is subscribed already).
    Restore,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// A registration's outcome: `false` means refused (its
    /// `subscription_error` went to the socket first).
    Registered {
        ok: bool,
    },
    /// An acknowledged publish reached every subscribed edge.
    Published,
    /// Not done, and nothing of it counted: retry after `retry_after_ms`.
    Refused {
        reason: Refusal,
        retry_after_ms: u32,
    },
    /// One page of an [`Msg::Ask`]'s answer; `next` continues after the
    /// last name of a list.
    Answer {
        answer: Answer,
        next: Option<String>,
    },
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The room is not this worker's in its view.
    NotOwner,
    /// The room is moving here: the handover barrier has not passed.
    Sealed,
    /// This worker's lease may have expired.
    Fenced,
    /// The room's owner is too busy, or an edge did not confirm in time.
    Busy,
    /// An edge refused the delivery (not delivered there).
    Nack,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotOwner => "not_owner",
            Refusal::Sealed => "sealed",
            Refusal::Fenced => "fenced",
            Refusal::Busy => "busy",
            Refusal::Nack => "nack",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("link closed")]
    Closed,
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("handshake timed out")]
    Timeout,
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

pub fn encode(msg: &Msg) -> Bytes {
    Bytes::from(postcard::to_stdvec(msg).expect("every Msg encodes"))
}

pub fn decode(bytes: &[u8]) -> Result<Msg, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The reading half of a link: one decoded [`Msg`] at a time, frames over
/// [`MAX_FRAME`] are an error.
pub struct LinkRx<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> LinkRx<R> {
    pub fn new(r: R) -> Self {
        LinkRx {
            inner: FramedRead::new(r, codec()),
        }
    }

    pub async fn recv(&mut self) -> Result<Msg, LinkError> {
        self.recv_sized().await.map(|(m, _)| m)
    }

    /// The next frame and its size on the wire.
    pub async fn recv_sized(&mut self) -> Result<(Msg, usize), LinkError> {
        match self.inner.next().await {
            Some(Ok(frame)) => Ok((decode(&frame)?, frame.len() + 4)),
            Some(Err(e)) => Err(e.into()),
            None => Err(LinkError::Closed),
        }
    }
}

/// Frames read ahead of their processing, at most this many bytes of them
/// on the wire: past it the reader waits (and the kernel's buffers and
/// the peer's queue take the backlog, as before read-ahead).
pub const READ_AHEAD_BYTES: usize = 16 * 1024 * 1024;

/// Why a link's reader stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// The peer ended the stream cleanly: it gave the link up.
    PeerClosed,
    /// A read error, an oversized or undecodable frame: the peer may still
    /// believe in the link.
    Failed(LinkError),
    /// No frame for the silence timeout.
    Silent,
    /// The processing side went away.
    Dropped,
}

/// Read a link ahead of its processing, so that a heartbeat is seen the
/// moment it arrives, not after everything queued before it was handled
/// (a reconnect's burst of registrations): `on_beat` gets each heartbeat
/// as it is read; every other frame goes, in order, to the receiver, at
/// most [`READ_AHEAD_BYTES`] waiting (then reading waits: backpressure).
/// Ends — the receiver then closes — when the peer closes, a frame is
/// undecodable, or nothing arrives for `silence`; the task's result says
/// which, and hands the read half back: the connection stays open until
/// the caller drops it (an edge tells its sockets first).
pub fn read_ahead<R>(
    mut rx: LinkRx<R>,
    silence: Duration,
    mut on_beat: impl FnMut(&Msg) + Send + 'static,
) -> (AheadRx, tokio::task::JoinHandle<(ReadEnd, LinkRx<R>)>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    // Bounded in bytes, not frames (a frame is up to 1 MiB, a registration
    // 100 bytes): the reader waits at READ_AHEAD_BYTES.
    #[allow(clippy::disallowed_methods)]
    let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
    let bytes = Arc::new((AtomicUsize::new(0), Notify::new()));
    let counted = bytes.clone();
    let task = tokio::spawn(async move {
        let end = loop {
            let (msg, size) = match tokio::time::timeout(silence, rx.recv_sized()).await {
                Ok(Ok(m)) => m,
                Ok(Err(LinkError::Closed)) => break ReadEnd::PeerClosed,
                Ok(Err(e)) => break ReadEnd::Failed(e),
                Err(_) => break ReadEnd::Silent,
            };
            if matches!(msg, Msg::Heartbeat { .. }) {
                on_beat(&msg);
                continue;
            }
            // Wait for room (registered before looking, so a take between
            // the look and the wait is not missed).
            loop {
                let room = counted.1.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                if counted.0.load(Ordering::Acquire) < READ_AHEAD_BYTES {
                    break;
                }
                if tx.is_closed() {
                    return (ReadEnd::Dropped, rx);
                }
                room.await;
            }
            counted.0.fetch_add(size, Ordering::AcqRel);
            if tx.send((msg, size)).is_err() {
                break ReadEnd::Dropped;
            }
        };
        (end, rx)
    });
    (AheadRx { frames, bytes }, task)
}

/// The processing side of [`read_ahead`].
pub struct AheadRx {
    frames: tokio::sync::mpsc::UnboundedReceiver<(Msg, usize)>,
    bytes: Arc<(AtomicUsize, Notify)>,
}

impl AheadRx {
    /// The next frame, or `None` once the reader has ended.
    pub async fn recv(&mut self) -> Option<Msg> {
        let (msg, size) = self.frames.recv().await?;
        self.bytes.0.fetch_sub(size, Ordering::AcqRel);
        self.bytes.1.notify_one();
        Some(msg)
    }
}

/// An edge's link lease, in heartbeats: renewed only by the worker's echo
/// of one of its heartbeats (a round trip begun when that heartbeat was
/// sent), never by frames merely arriving. Three heartbeats: both sides
/// read heartbeats ahead of processing ([`read_ahead`]), but an echo still
/// waits behind one write batch and a busy host's scheduling, and a lease
/// too tight for that would close busy links (then their sockets register
/// again: more load).
pub const EDGE_LEASE: u32 = 3;
/// Heartbeats without any frame from an edge after which a worker gives
/// the link up: strictly more than [`EDGE_LEASE`] plus the edge's check.
pub const WORKER_SILENCE: u32 = 5;
/// Heartbeats after an edge's last heartbeat reached a worker by which the
/// edge's lease has surely run out — and its sockets were told
/// `unavailable` — however the link was lost: [`EDGE_LEASE`] from the
/// heartbeat's sending (which was earlier), the edge's check (a quarter
/// heartbeat), and the rest margin for the edge's telling (queued to its
/// room shards behind what they hold) and a busy host's scheduling.
/// Acknowledgements wait this long for an edge whose link the worker lost
/// without the edge ending it cleanly; waiting longer costs only 503s.
pub const LEASE_HOLD: u32 = 8;

/// A heartbeat's `sent`: milliseconds since `epoch` (the link's start), ≥ 1.
pub fn since(epoch: tokio::time::Instant) -> u64 {
    epoch.elapsed().as_millis() as u64 + 1
}

/// Write one message directly (handshake frames, before the writer runs).
pub async fn send_direct<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<(), LinkError> {
    let mut framed = FramedWrite::new(w, codec());
    framed.send(encode(msg)).await?;
    Ok(())
}

/// The sending side of a link: a queue bounded in bytes, shared by
/// everything that sends on the link, drained by [`write_loop`].
#[derive(Clone)]
pub struct LinkTx {
    inner: Arc<TxInner>,
}

struct TxInner {
    queue: Mutex<TxQueue>,
    /// A heartbeat is wanted now, not at the next interval (an echo).
    beat_now: std::sync::atomic::AtomicBool,
    /// Woken when frames are queued (writer) and when space frees (waiters).
    queued: Notify,
    space: Notify,
    max_bytes: usize,
    depth: AtomicUsize,
}

#[derive(Default)]
struct TxQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue holds `max_bytes` already.
    Full,
    /// The link is gone.
    Closed,
}

impl LinkTx {
    pub fn new(max_bytes: usize) -> LinkTx {
        LinkTx {
            inner: Arc::new(TxInner {
                queue: Mutex::new(TxQueue::default()),
                beat_now: Default::default(),
                queued: Notify::new(),
                space: Notify::new(),
                max_bytes,
                depth: AtomicUsize::new(0),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TxQueue> {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an encoded frame unless the queue is full (best effort).
    pub fn try_send_encoded(&self, frame: Bytes) -> Result<(), SendError> {
        let mut q = self.lock();
        if q.closed {
            return Err(SendError::Closed);
        }
        // One frame larger than the whole bound still goes when the queue is empty.
        if q.bytes + frame.len() > self.inner.max_bytes && !q.frames.is_empty() {
            return Err(SendError::Full);
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        self.inner.depth.store(q.frames.len(), Ordering::Relaxed);
        drop(q);
        self.inner.queued.notify_one();
        Ok(())
    }

    pub fn try_send(&self, msg: &Msg) -> Result<(), SendError> {
        self.try_send_encoded(encode(msg))
    }

    /// Queue a frame, waiting for space: for frames that must not be lost.
    pub async fn send_encoded(&self, frame: Bytes) -> Result<(), SendError> {
        loop {
            let space = self.inner.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            match self.try_send_encoded(frame.clone()) {
                Err(SendError::Full) => space.await,
                other => return other,
            }
        }
    }

    pub async fn send(&self, msg: &Msg) -> Result<(), SendError> {
        self.send_encoded(encode(msg)).await
    }

    /// Have the writer send a heartbeat at once (it goes behind what is
    /// queued, like every heartbeat).
    pub fn beat_now(&self) {
        self.inner.beat_now.store(true, Ordering::Release);
        self.inner.queued.notify_one();
    }

    /// Frames waiting to be written.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// Drop what is queued and refuse everything from now on.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.frames.clear();
        q.bytes = 0;
        self.inner.depth.store(0, Ordering::Relaxed);
        drop(q);
        self.inner.queued.notify_one();
        self.inner.space.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Take everything queued (at most `max` bytes' worth, whole frames).
    fn take(&self, max: usize) -> Option<Vec<Bytes>> {
        let mut q = self.lock();
        if q.closed {
            return None;
        }
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(f) = q.frames.front() {
            if !out.is_empty() && n + f.len() > max {
                break;
            }
            n += f.len();
            out.push(q.frames.pop_front().expect("front exists"));
        }
        q.bytes -= n;
        self.inner.depth.store(q.frames.len(), Ordering::Relaxed);
        drop(q);
        if n > 0 {
            self.inner.space.notify_waiters();
        }
        Some(out)
    }
}

/// Bytes gathered into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Write what `tx` queues, batched, and a heartbeat (`beat()`) every
/// `heartbeat`, busy or not; ends when `tx` closes or a write fails (then
/// `tx` is closed too). `before_write` runs before each batch and may veto
/// it (a fenced worker writes nothing).
pub async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    tx: LinkTx,
    heartbeat: Duration,
    beat: impl Fn() -> Msg,
    before_write: impl Fn() -> bool,
) {
    let mut framed = FramedWrite::new(w, codec());
    let mut next_beat = tokio::time::Instant::now();
    loop {
        let queued = tx.inner.queued.notified();
        tokio::pin!(queued);
        queued.as_mut().enable();
        let Some(mut batch) = tx.take(WRITE_BATCH) else {
            return;
        };
        let asked = tx.inner.beat_now.swap(false, Ordering::AcqRel);
        if batch.is_empty()
            && !asked
            && tokio::time::Instant::now() < next_beat
            && tokio::time::timeout_at(next_beat, queued).await.is_ok()
        {
            continue;
        }
        if asked || tokio::time::Instant::now() >= next_beat {
            batch.push(encode(&beat()));
            next_beat = tokio::time::Instant::now() + heartbeat;
        }
        if !before_write() {
            tx.close();
            return;
        }
        let mut ok = true;
        for f in batch {
            if framed.feed(f).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok || SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
            tx.close();
            return;
        }
    }
}

/// Proofs of the cluster secret: HMAC-SHA256 over a role tag, the peer's
/// nonce and the prover's id, so a proof is good for one handshake only.
pub fn proof(secret: &str, role: &str, nonce: &[u8; 16], id: &str) -> [u8; 32] {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(role.as_bytes());
    mac.update(nonce);
    mac.update(id.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Constant-time check of a proof.
pub fn proof_ok(secret: &str, role: &str, nonce: &[u8; 16], id: &str, given: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(proof(secret, role, nonce, id).ct_eq(given))
}

/// Frames to `BytesMut` for tests and the fuzz target.
pub fn frame_bytes(msgs: &[Msg]) -> BytesMut {
    use tokio_util::codec::Encoder;
    let mut out = BytesMut::new();
    let mut c = codec();
    for m in msgs {
        c.encode(encode(m), &mut out).expect("encodes");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each kind of frame that matters on the wire.
    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: VERSION,
                edge: "e1".into(),
                rev: 4,
                heartbeat_ms: 500,
                nonce: [7; 16],
                proof: Some([1; 32]),
            },
            Msg::Join {
                id: 3,
                rev: 3,
                conn: crate::types::ConnId(42),
                join: Join::Room {
                    room: crate::types::RoomKey {
                        app: "1".into(),
                        channel: "presence-x".into(),
                    },
                    member: Some(crate::types::Member {
                        user_id: "u".into(),
                        user_info: Some(
                            serde_json::value::RawValue::from_string("{\"n\":1}".into()).unwrap(),
                        ),
                    }),
                    user: None,
                    granted: None,
                    max_members: 100,
                    shed: crate::types::Shed::default(),
                    resume: Some(crate::types::Resume {
                        since: Some(crate::types::Position {
                            serial: 17,
                            epoch: "e9".into(),
                        }),
                        max_bytes: 65536,
                        max_events: 200,
                    }),
                },
            },
            Msg::Deliver {
                app: "1".into(),
                channel: "c".into(),
                frame: Bytes::from_static(b"{}"),
                exclude: Some(3),
                except_user: None,
                ack_id: 9,
                serial: Some(18),
            },
            Msg::Reply {
                id: 9,
                reply: Reply::Answer {
                    answer: Answer::Rooms(vec![(
                        "a".into(),
                        crate::types::RoomInfo {
                            subscription_count: 1,
                            user_count: 0,
                        },
                    )]),
                    next: Some("a".into()),
                },
            },
            Msg::Publish {
                id: 5,
                app: "1".into(),
                channel: "private-c".into(),
                frame: Bytes::from_static(b"{\"event\":\"e\"}"),
                exclude: None,
                coalesce_ms: Some(2000),
                wait_ms: 2000,
                rev: 8,
                idem: Some(0xfeed),
            },
            Msg::Join {
                id: 11,
                rev: 8,
                conn: crate::types::ConnId(42),
                join: Join::SignIn {
                    room: crate::types::RoomKey::user(&"1".into(), "u"),
                    max: 3,
                    silent: false,
                },
            },
            Msg::Join {
                id: 0,
                rev: 8,
                conn: crate::types::ConnId(42),
                join: Join::Watch {
                    app: "1".into(),
                    users: vec!["w".into(), "v".into()],
                    announce: true,
                },
            },
            Msg::DeliverAck {
                ids: vec![(9, true), (10, false)],
            },
            Msg::Reply {
                id: 5,
                reply: Reply::Refused {
                    reason: Refusal::Sealed,
                    retry_after_ms: 250,
                },
            },
            Msg::Sealed { rev: 8 },
            Msg::Fenced,
            Msg::Heartbeat {
                digest: 0x0123_4567_89ab_cdef,
                etcd_lost: true,
                sent: 1_234_567,
                echo: 1_234_000,
            },
            Msg::Ask {
                id: 12,
                ask: Ask::History {
                    room: crate::types::RoomKey {
                        app: "1".into(),
                        channel: "chat".into(),
                    },
                    since: 17,
                    epoch: Some("e9".into()),
                    limit: 100,
                },
                after: None,
            },
            Msg::Reply {
                id: 12,
                reply: Reply::Answer {
                    answer: Answer::History(crate::op::Since {
                        epoch: "e9".into(),
                        events: vec![(18, crate::protocol::Frame::from("{}"))],
                        complete: true,
                        more: false,
                    }),
                    next: None,
                },
            },
            Msg::Tell(Tell::Leave {
                room: crate::types::RoomKey {
                    app: "1".into(),
                    channel: "presence-x".into(),
                },
                conn: crate::types::ConnId(42),
                shed: crate::types::Shed {
                    member_events_max: Some(100),
                    silent: false,
                    announce: false,
                },
            }),
            Msg::Ask {
                id: 13,
                ask: Ask::Rooms {
                    app: "1".into(),
                    prefix: "presence-".into(),
                },
                after: Some("presence-a".into()),
            },
            Msg::Join {
                id: 14,
                rev: 9,
                conn: crate::types::ConnId(43),
                join: Join::Room {
                    room: crate::types::RoomKey {
                        app: "1".into(),
                        channel: "private-qa".into(),
                    },
                    member: None,
                    user: Some("u".into()),
                    granted: Some(1_796_000_000),
                    max_members: 100,
                    shed: crate::types::Shed::default(),
                    resume: None,
                },
            },
            Msg::Ask {
                id: 15,
                ask: Ask::Remove {
                    room: crate::types::RoomKey {
                        app: "1".into(),
                        channel: "presence-qa".into(),
                    },
                    user: "u".into(),
                    ban_secs: 600,
                },
                after: None,
            },
            Msg::Reply {
                id: 15,
                reply: Reply::Answer {
                    answer: Answer::Removed { sockets: 2 },
                    next: None,
                },
            },
            Msg::Removed {
                app: "1".into(),
                channel: "presence-qa".into(),
                conn: 43,
                frame: Bytes::from_static(b"{}"),
            },
            Msg::Ask {
                id: 16,
                ask: Ask::Revoke {
                    app: "1".into(),
                    user: "u".into(),
                    before: 1_796_000_005,
                },
                after: None,
            },
            Msg::Tell(Tell::Identify {
                room: crate::types::RoomKey {
                    app: "1".into(),
                    channel: "private-qa".into(),
                },
                conn: crate::types::ConnId(43),
                user: "u".into(),
            }),
            Msg::Ask {
                id: 17,
                ask: Ask::Revoked {
                    room: crate::types::RoomKey::user(&"1".into(), "u"),
                    authorized: 1_796_000_000,
                },
                after: None,
            },
        ]
    }

    /// The link's wire format is pinned: a change to it (a reordered enum
    /// variant, a new field) must come with a new [`VERSION`], because
    /// edges and workers of different builds talk during a rolling
    /// upgrade. The pinned frames are also the link fuzz target's seeds.
    /// `HERDGATE_BLESS=1` rewrites them after a deliberate change.
    #[test]
    fn the_wire_format_is_pinned_by_the_fuzz_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/link_frame");
        let bless = std::env::var_os("HERDGATE_BLESS").is_some();
        for (i, m) in samples().iter().enumerate() {
            let path = dir.join(format!("v{VERSION}-{i:02}.bin"));
            let bytes = frame_bytes(std::slice::from_ref(m));
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let pinned = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (HERDGATE_BLESS=1 writes it)", path.display()));
            assert_eq!(
                &pinned[..],
                &bytes[..],
                "{m:?} changed on the wire: bump link::VERSION"
            );
            assert_eq!(&decode(&pinned[4..]).unwrap(), m);
        }
    }

    #[tokio::test]
    async fn round_trips_and_refuses_oversized_frames() {
        let msgs = samples();
        let (a, b) = tokio::io::duplex(1 << 16);
        let tx = LinkTx::new(1 << 20);
        for m in &msgs {
            tx.try_send(m).unwrap();
        }
        let beat = || Msg::Heartbeat {
            digest: 1,
            etcd_lost: false,
            sent: 1,
            echo: 0,
        };
        let writer = tokio::spawn(write_loop(
            a,
            tx.clone(),
            Duration::from_secs(60),
            beat,
            || true,
        ));
        let mut rx = LinkRx::new(b);
        for m in &msgs {
            assert_eq!(&rx.recv().await.unwrap(), m);
        }
        tx.close();
        writer.await.unwrap();

        let (mut a, b) = tokio::io::duplex(1 << 16);
        use tokio::io::AsyncWriteExt;
        a.write_u32((MAX_FRAME + 1) as u32).await.unwrap();
        assert!(matches!(LinkRx::new(b).recv().await, Err(LinkError::Io(_))));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_waiters_get_space() {
        let tx = LinkTx::new(100);
        tx.try_send_encoded(Bytes::from(vec![0u8; 60])).unwrap();
        assert_eq!(
            tx.try_send_encoded(Bytes::from(vec![0u8; 60])),
            Err(SendError::Full)
        );
        let waiter = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_encoded(Bytes::from(vec![1u8; 60])).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits for space");
        assert_eq!(tx.take(1000).unwrap().len(), 1);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        tx.close();
        let beat = Msg::Heartbeat {
            digest: 0,
            etcd_lost: true,
            sent: 1,
            echo: 0,
        };
        assert_eq!(tx.try_send(&beat), Err(SendError::Closed));
    }

    #[test]
    fn proofs_bind_the_nonce_and_the_id() {
        let p = proof("s3cret-s3cret-s3cret", "edge", &[1; 16], "e1");
        assert!(proof_ok("s3cret-s3cret-s3cret", "edge", &[1; 16], "e1", &p));
        assert!(!proof_ok(
            "s3cret-s3cret-s3cret",
            "edge",
            &[2; 16],
            "e1",
            &p
        ));
        assert!(!proof_ok(
            "s3cret-s3cret-s3cret",
            "worker",
            &[1; 16],
            "e1",
            &p
        ));
        assert!(!proof_ok(
            "s3cret-s3cret-s3cret",
            "edge",
            &[1; 16],
            "e2",
            &p
        ));
        assert!(!proof_ok("other-secret-other", "edge", &[1; 16], "e1", &p));
    }
}
