//! HTTP fallback sessions (pusher-js `xhr_streaming` and `xhr_polling`):
//! the pipe between a session task and the HTTP requests that carry it.
//!
//! A fallback session is an ordinary session (same loop, queue, limits,
//! timers and metrics as a websocket) whose transport is this pipe instead
//! of a socket. What the session writes waits in the pipe's outbox until a
//! *receive* request (the long-lived streaming response, or the next poll)
//! takes it; while nothing takes it the session's writer is stalled, so the
//! session's own write deadline closes a client that stopped polling. What
//! the client sends (`xhr_send`) goes to the session through a bounded
//! channel.
//!
//! At most one receive request is attached at a time: a new one supersedes
//! the previous (pusher-js reopens its stream when its buffer grows past
//! 256 KiB, and a poll may overtake the end of the last one).

use crate::admission::{IpPlace, PerIp};
use crate::protocol::Frame;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::sync::{mpsc, Notify};

/// Messages from the client waiting for the session, per session.
pub const TO_SESSION: usize = 64;
/// `xhr_send` requests of one session in flight at once; more get 429
/// (pusher-js sends one at a time).
pub const MAX_SENDS: u32 = 4;

pub struct Pipe {
    inner: Mutex<Inner>,
    /// Wakes the receive request attached to the pipe.
    ready: Notify,
    /// Client → session (`xhr_send`, then [`ToSession::Gone`]).
    pub to_session: mpsc::Sender<ToSession>,
    /// The client that opened the session (by [`crate::admission::ip_key`]):
    /// the session id is chosen by the client and guessable, so requests
    /// from any other address are refused.
    pub owner: IpAddr,
    /// `xhr_send` requests in flight.
    sends: AtomicU32,
}

/// One `xhr_send` in flight on a pipe; counted down on drop.
pub struct Sending<'a>(&'a Pipe);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sends.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What reaches the session from its client.
#[derive(Debug)]
pub enum ToSession {
    Text(String),
    /// No receive request for [`DETACHED_MAX`]: the client is gone.
    Gone,
}

/// A session with no receive request attached for this long has lost its
/// client (pusher-js polls again at once, and holds its stream open).
pub const DETACHED_MAX: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Inner {
    outbox: VecDeque<Frame>,
    /// The session's writer, waiting for the outbox to be taken.
    writer: Option<Waker>,
    closed: Option<(u16, String)>,
    /// The receive request attached now (each attach counts one up).
    attached: u64,
    /// `o` (open) was sent: later receive requests must not send it again.
    opened: bool,
    /// Receive requests in flight.
    active: u32,
    /// The close (`c[…]`) went to a receive request.
    close_taken: bool,
}

/// What a receive request finds in the pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    Frames(Vec<Frame>),
    /// The session ended: the last frames, then the close to send.
    Closed(Vec<Frame>, u16, String),
    /// Another receive request took over.
    Superseded,
    Empty,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipe {
    /// A pipe opened by `owner`, and the receiving end of what the client sends.
    pub fn new(owner: IpAddr) -> (Arc<Pipe>, mpsc::Receiver<ToSession>) {
        let (tx, rx) = mpsc::channel(TO_SESSION);
        let pipe = Arc::new(Pipe {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            to_session: tx,
            owner: crate::admission::ip_key(owner),
            sends: AtomicU32::new(0),
        });
        (pipe, rx)
    }

    /// Whether `ip` is the address that opened the session.
    pub fn owned_by(&self, ip: IpAddr) -> bool {
        crate::admission::ip_key(ip) == self.owner
    }

    /// Count one more `xhr_send` in flight, unless [`MAX_SENDS`] are.
    pub fn start_send(&self) -> Option<Sending<'_>> {
        self.sends
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SENDS).then_some(n + 1)
            })
            .ok()
            .map(|_| Sending(self))
    }

    // ---- the session's side

    pub fn is_busy(&self) -> bool {
        !lock(&self.inner).outbox.is_empty()
    }

    pub fn push(&self, frames: VecDeque<Frame>) {
        lock(&self.inner).outbox.extend(frames);
        self.ready.notify_waiters();
    }

    /// Ready once every frame pushed was taken by a receive request.
    pub fn poll_taken(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = lock(&self.inner);
        if inner.outbox.is_empty() {
            Poll::Ready(())
        } else {
            inner.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    pub fn close(&self, code: u16, reason: &str) {
        lock(&self.inner).closed = Some((code, reason.to_string()));
        self.ready.notify_waiters();
    }

    // ---- the receive requests' side

    /// Attach a receive request: its id, and whether it is the first one
    /// (which sends `o`). The previous request, if any, is superseded.
    pub fn attach(&self) -> (u64, bool) {
        let mut inner = lock(&self.inner);
        inner.attached += 1;
        inner.active += 1;
        let first = !inner.opened;
        inner.opened = true;
        let id = inner.attached;
        drop(inner);
        // Wake the request being superseded.
        self.ready.notify_waiters();
        (id, first)
    }

    /// Take what is waiting, for the request `id`.
    pub fn take(&self, id: u64) -> Taken {
        let mut inner = lock(&self.inner);
        if inner.attached != id {
            return Taken::Superseded;
        }
        let frames: Vec<Frame> = inner.outbox.drain(..).collect();
        if !frames.is_empty() {
            if let Some(w) = inner.writer.take() {
                w.wake();
            }
        }
        match inner.closed.clone() {
            Some((code, reason)) => {
                inner.close_taken = true;
                drop(inner);
                self.ready.notify_waiters();
                Taken::Closed(frames, code, reason)
            }
            None if frames.is_empty() => Taken::Empty,
            None => Taken::Frames(frames),
        }
    }

    /// The receive request `id` ended; `true` if it was the last one attached.
    pub fn detach(&self, id: u64) -> bool {
        let mut inner = lock(&self.inner);
        inner.active = inner.active.saturating_sub(1);
        inner.active == 0 && inner.attached == id
    }

    /// No receive request came since `id` ended, none is in flight.
    pub fn abandoned_since(&self, id: u64) -> bool {
        let inner = lock(&self.inner);
        inner.active == 0 && inner.attached == id && inner.closed.is_none()
    }

    /// The session closed it and no receive request has carried the close yet.
    pub fn close_pending(&self) -> bool {
        let inner = lock(&self.inner);
        inner.closed.is_some() && !inner.close_taken
    }

    /// Whether `id` is still the attached receive request.
    pub fn is_current(&self, id: u64) -> bool {
        lock(&self.inner).attached == id
    }

    /// Resolves when something may have changed (frames, close,
    /// supersession). Enable it (`Notified::enable`) before looking at the
    /// pipe, so that a change between the look and the wait is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }
}

/// The open fallback sessions of this node, by `{key}/{server}/{session}`,
/// at most `max`, and at most `max_per_ip` per client address (the session
/// is refused beyond: 503).
#[derive(Default)]
pub struct Pipes {
    map: Mutex<HashMap<String, Arc<Pipe>>>,
    per_ip: Arc<PerIp>,
}

/// Why a session's pipe was not inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Node,
    PerIp,
}

impl Pipes {
    pub fn get(&self, id: &str) -> Option<Arc<Pipe>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Insert a new session's pipe, unless `max` are open (or `id` is
    /// taken), or its owner holds `max_per_ip`. The place returned is the
    /// owner's until the session ends.
    pub fn insert(
        &self,
        id: String,
        pipe: Arc<Pipe>,
        max: usize,
        max_per_ip: usize,
    ) -> Result<IpPlace, Full> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= max || map.contains_key(&id) {
            return Err(Full::Node);
        }
        let place = self
            .per_ip
            .try_take(pipe.owner, max_per_ip)
            .ok_or(Full::PerIp)?;
        map.insert(id, pipe);
        metrics::gauge!("herdgate_http_sessions").set(map.len() as f64);
        Ok(place)
    }

    pub fn remove(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
        metrics::gauge!("herdgate_http_sessions").set(map.len() as f64);
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_receive_request_supersedes_the_last_and_open_is_sent_once() {
        let (p, _rx) = Pipe::new(IP);
        let (a, first) = p.attach();
        assert!(first);
        p.push([Frame::from_static("x")].into());
        let (b, first) = p.attach();
        assert!(!first, "o only once per session");
        assert_eq!(p.take(a), Taken::Superseded);
        assert_eq!(p.take(b), Taken::Frames(vec![Frame::from_static("x")]));
        assert_eq!(p.take(b), Taken::Empty);
        p.close(4200, "bye");
        assert_eq!(p.take(b), Taken::Closed(vec![], 4200, "bye".into()));
    }

    #[test]
    fn the_writer_is_stalled_until_a_request_takes_the_frames() {
        let (p, _rx) = Pipe::new(IP);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(p.poll_taken(&mut cx).is_ready());
        p.push([Frame::from_static("x")].into());
        assert!(p.poll_taken(&mut cx).is_pending());
        let (id, _) = p.attach();
        p.take(id);
        assert!(p.poll_taken(&mut cx).is_ready());
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn sessions_are_capped() {
        let pipes = Pipes::default();
        let a = pipes.insert("a".into(), Pipe::new(IP).0, 1, 9).unwrap();
        let over = pipes.insert("b".into(), Pipe::new(IP).0, 1, 9);
        assert_eq!(over.err(), Some(Full::Node), "over the cap");
        pipes.remove("a");
        drop(a);
        assert!(pipes.insert("b".into(), Pipe::new(IP).0, 1, 9).is_ok());
    }

    #[test]
    fn sessions_are_capped_per_ip_and_bound_to_it() {
        let pipes = Pipes::default();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        let _a = pipes.insert("a".into(), Pipe::new(IP).0, 9, 1).unwrap();
        let b = pipes.insert("b".into(), Pipe::new(IP).0, 9, 1);
        assert_eq!(b.err(), Some(Full::PerIp));
        assert!(pipes.insert("c".into(), Pipe::new(other).0, 9, 1).is_ok());
        let p = pipes.get("a").unwrap();
        assert!(p.owned_by(IP) && !p.owned_by(other));
        let sends: Vec<_> = (0..MAX_SENDS).map(|_| p.start_send().unwrap()).collect();
        assert!(p.start_send().is_none(), "at most MAX_SENDS at once");
        drop(sends);
        assert!(p.start_send().is_some());
    }
}
