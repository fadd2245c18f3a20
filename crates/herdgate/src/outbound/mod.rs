//! One socket's outbound queue: bounded in frames and bytes, one writer.
//!
//! Producers (the room workers fanning out, the session answering its own
//! client) only ever `push`, which takes a short uncontended lock and never
//! waits. When a push would exceed either bound the socket is a slow
//! consumer: the queue is emptied and marked closed with 4100, and the
//! session's writer sends that close. The room never waits for anyone.
//!
//! The writer takes the whole queue at once (`drain`), which leaves an empty
//! `VecDeque` without an allocation behind: memory taken by a burst is given
//! back as soon as the burst is written. Taken frames stay counted — against
//! the socket's bounds and process-wide — until the writer says they are
//! written (`written`), so a stalled socket holds at most its bounds in all.
//!
//! Queued bytes are also counted process-wide (`OUTBOUND_BYTES`, sharded per
//! thread so fan-out on many cores does not contend) for the load monitor.

mod counter;

pub use counter::{ShardedCounter, OUTBOUND_BYTES};

use crate::protocol::{codes, Frame};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push overflowed the queue; the socket is now being closed.
    Overflow,
    /// The socket was already closing; the frame was dropped.
    Closed,
}

/// Why the writer must close the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseOrder {
    pub code: u16,
    pub reason: &'static str,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Frame>,
    bytes: usize,
    /// Taken by the writer, not yet written: frames and bytes.
    in_flight: (usize, usize),
    close: Option<CloseOrder>,
    /// When the oldest queued frame arrived (for the delivery-delay histogram).
    oldest: Option<std::time::Instant>,
}

pub struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    max_frames: usize,
    max_bytes: usize,
}

impl Outbound {
    pub fn new(max_frames: usize, max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_frames,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single push/clear), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, frame: &Frame) -> Push {
        let mut s = self.lock();
        if s.close.is_some() {
            return Push::Closed;
        }
        let len = frame.len();
        if s.queue.len() + s.in_flight.0 >= self.max_frames
            || s.bytes + s.in_flight.1 + len > self.max_bytes
        {
            s.close = Some(CloseOrder {
                code: codes::OVER_CAPACITY,
                reason: "slow consumer: outbound queue full",
            });
            s.queue = VecDeque::new();
            OUTBOUND_BYTES.add(-(s.bytes as i64));
            s.bytes = 0;
            drop(s);
            self.notify.notify_one();
            return Push::Overflow;
        }
        let was_empty = s.queue.is_empty();
        if was_empty {
            s.oldest = Some(std::time::Instant::now());
        }
        s.queue.push_back(frame.clone());
        s.bytes += len;
        OUTBOUND_BYTES.add(len as i64);
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Ask the writer to close the socket after what is already queued.
    pub fn close(&self, order: CloseOrder) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(order);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Take everything queued, and the close order if there is one.
    pub fn drain(&self) -> (VecDeque<Frame>, Option<CloseOrder>) {
        let (frames, close, _) = self.drain_timed();
        (frames, close)
    }

    /// Like `drain`, with the time the oldest of the frames was queued.
    pub fn drain_timed(
        &self,
    ) -> (
        VecDeque<Frame>,
        Option<CloseOrder>,
        Option<std::time::Instant>,
    ) {
        let mut s = self.lock();
        let (frames, bytes) = (s.queue.len(), s.bytes);
        s.in_flight.0 += frames;
        s.in_flight.1 += bytes;
        s.bytes = 0;
        (std::mem::take(&mut s.queue), s.close, s.oldest.take())
    }

    /// Everything taken so far has been written: it no longer counts.
    pub fn written(&self) {
        let mut s = self.lock();
        OUTBOUND_BYTES.add(-(s.in_flight.1 as i64));
        s.in_flight = (0, 0);
    }

    /// Resolves when something was pushed or a close was ordered since the last drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Room left before the bounds: `(frames, bytes)`.
    pub fn room(&self) -> (usize, usize) {
        let s = self.lock();
        (
            self.max_frames
                .saturating_sub(s.queue.len() + s.in_flight.0),
            self.max_bytes.saturating_sub(s.bytes + s.in_flight.1),
        )
    }

    /// Bytes queued or being written.
    pub fn queued_bytes(&self) -> usize {
        let s = self.lock();
        s.bytes + s.in_flight.1
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let s = self.lock();
        OUTBOUND_BYTES.add(-((s.bytes + s.in_flight.1) as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &'static str) -> Frame {
        Frame::from_static(s)
    }

    #[test]
    fn bounded_by_frames() {
        let q = Outbound::new(2, 1000);
        assert_eq!(q.push(&f("a")), Push::Queued);
        assert_eq!(q.push(&f("b")), Push::Queued);
        assert_eq!(q.push(&f("c")), Push::Overflow);
        assert_eq!(q.push(&f("d")), Push::Closed);
        let (frames, close) = q.drain();
        assert!(frames.is_empty(), "an overflowing queue is emptied");
        assert_eq!(close.unwrap().code, codes::OVER_CAPACITY);
    }

    #[test]
    fn bounded_by_bytes() {
        let q = Outbound::new(100, 5);
        assert_eq!(q.push(&f("abc")), Push::Queued);
        assert_eq!(q.queued_bytes(), 3);
        assert_eq!(q.push(&f("abc")), Push::Overflow);
    }

    #[test]
    fn drain_resets_and_keeps_order() {
        let q = Outbound::new(3, 100);
        q.push(&f("1"));
        q.push(&f("2"));
        let (frames, close) = q.drain();
        assert_eq!(
            frames.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(close.is_none());
        assert_eq!(q.queued_bytes(), 2, "taken, not yet written: still counted");
        assert_eq!(q.push(&f("x")), Push::Queued);
        assert_eq!(
            q.push(&f("y")),
            Push::Overflow,
            "two in flight + one queued = 3"
        );
        let q = Outbound::new(3, 100);
        q.push(&f("1"));
        q.drain();
        q.written();
        assert_eq!(q.queued_bytes(), 0);
        for _ in 0..3 {
            assert_eq!(q.push(&f("x")), Push::Queued);
        }
    }

    #[tokio::test]
    async fn push_wakes_writer_even_if_it_was_not_waiting_yet() {
        let q = Outbound::new(3, 100);
        q.push(&f("1"));
        tokio::time::timeout(std::time::Duration::from_secs(5), q.ready())
            .await
            .expect("a push before ready() leaves a permit");
    }
}
