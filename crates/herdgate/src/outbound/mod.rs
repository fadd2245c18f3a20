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
//! A room's fan-out to a plain-TCP socket whose writer is idle and whose
//! queue is empty writes the frame in place (`push_direct`, see [`direct`]):
//! it goes to the kernel from the fan-out's thread, no task is woken, and
//! only what the kernel does not take is queued. Rooms under a backlog,
//! and everything else, `push`: frames wait and are written in batches by
//! each socket's own task, on every core.
//!
//! An app with a write window (`write_delay`) holds a room's events for
//! the window the first of them opens. For a plain-TCP socket the room's
//! worker keeps the time (see [`window`]): the fan-out queues without
//! waking anyone, and when the window ends the worker writes everything
//! held in one vectored write from its own thread (`flush_held`). The
//! socket's task is not woken at all unless the kernel does not take it
//! all. A socket whose writer is busy when its window ends is handed the
//! queue, which it writes as soon as it is idle; TLS sockets keep the
//! window with their session's timer.
//!
//! Queued bytes are also counted process-wide (`OUTBOUND_BYTES`, sharded per
//! thread so fan-out on many cores does not contend) for the load monitor.

mod counter;
pub mod direct;
pub mod window;

pub use counter::{ShardedCounter, OUTBOUND_BYTES};
pub use direct::{DirectSocket, SharedTcp};
pub use window::Windows;

use crate::protocol::{codes, Frame};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// `herdgate_delivery_delay_seconds`: from a frame entering a socket's
/// queue (or its room's fan-out, when written in place) to its write. One
/// sample per write. Looked up once rather than per write.
pub fn delivery_delay() -> &'static metrics::Histogram {
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    H.get_or_init(|| metrics::histogram!("herdgate_delivery_delay_seconds"))
}

/// Record `n` writes made in place, one after another, over `took` of a
/// fan-out: their delays are spread evenly over it, so it is recorded as
/// that spread (eight points) rather than sample by sample.
pub fn record_in_place(took: std::time::Duration, n: u64) {
    const POINTS: u64 = 8;
    let h = delivery_delay();
    let t = took.as_secs_f64();
    let k = POINTS.min(n);
    for i in 0..k {
        let count = n / k + u64::from(i < n % k);
        h.record_many(t * (i as f64 + 0.5) / k as f64, count as usize);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued to wait out the socket's write window of this many ms, and
    /// nobody was told: whoever pushed must see that it is flushed when
    /// the window ends (see [`window::Windows`]), or wake the writer.
    Held(u32),
    /// Written to the socket in place (see [`direct`]): delivered, nothing queued.
    Written,
    /// This push overflowed the queue; the socket is now being closed.
    Overflow,
    /// The socket was already closing; the frame was dropped.
    Closed,
}

/// What [`Outbound::flush_held`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing was left to flush.
    Nothing,
    /// Everything held was written in place: this many frames.
    Wrote(u64),
    /// This many frames were written in place, and the rest handed to the
    /// socket's writer.
    Handed(u64),
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
    oldest: Option<tokio::time::Instant>,
    /// The socket, while its session allows direct writes.
    direct: Option<DirectSocket>,
    /// The writer is busy with something not from this queue (a pong):
    /// no direct write may interleave with it. Cleared by `written`.
    hold: bool,
    /// Something queued must not wait for the socket's write window (an
    /// answer of its own, not a room's event). Cleared by `drain`.
    urgent: bool,
    /// A removal notice is queued (a frame that [`removes`](Frame::removes),
    /// pushed as the socket's own). Cleared by `drain`.
    removal: bool,
    /// Bytes of the first queued frame a direct write already sent.
    sent: usize,
    /// The app's write window in ms (0: none), as the session last set it.
    window: u32,
    /// A worker keeps this socket's window (it was answered
    /// [`Push::Held`] and has not flushed or released it yet): no second
    /// entry is made, however often the queue empties meanwhile.
    scheduled: bool,
}

/// What the writer takes from the queue.
pub struct Drained {
    pub frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written (by a direct write).
    pub sent: usize,
    pub close: Option<CloseOrder>,
    /// When the oldest of the frames was queued.
    pub oldest: Option<tokio::time::Instant>,
    /// Some of `frames` are removal notices: the session forgets their
    /// channels.
    pub removal: bool,
}

pub struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    /// The bounds, as u32 (a socket's queue of 4 GiB is beyond any use):
    /// an idle socket pays for every byte of this struct.
    max_frames: u32,
    max_bytes: u32,
}

impl Outbound {
    pub fn new(max_frames: usize, max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_frames: u32::try_from(max_frames).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single push/clear), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a frame of the socket's own (an answer, an error, a ping):
    /// written at once, with whatever else is queued.
    pub fn push(&self, frame: &Frame) -> Push {
        self.push_with(frame, false, true, false)
    }

    /// Queue a room's event: it may wait for the socket's write window
    /// (the app's `write_delay`) to go out with the next ones.
    pub fn push_shared(&self, frame: &Frame) -> Push {
        self.push_with(frame, false, false, false)
    }

    /// Hand a frame to the socket: written in place if its writer is idle
    /// and its queue empty (plain TCP only), else queued. For room
    /// fan-outs: a socket's own replies are queued, and written in batches
    /// with whatever else is waiting (a client flooding its socket with
    /// requests it does not read the answers to fills its receive buffer
    /// far sooner with one segment per reply).
    pub fn push_direct(&self, frame: &Frame) -> Push {
        self.push_with(frame, true, false, false)
    }

    /// A room's event from a room worker that keeps write windows: as
    /// [`push_direct`](Self::push_direct) when `in_place` (else as
    /// [`push_shared`](Self::push_shared)), except that a plain-TCP socket
    /// with a write window answers [`Push::Held`] for the frame that opens
    /// the window, and is not woken for it.
    pub fn push_room(&self, frame: &Frame, in_place: bool) -> Push {
        self.push_with(frame, in_place, false, true)
    }

    fn push_with(&self, frame: &Frame, direct: bool, urgent: bool, may_hold: bool) -> Push {
        let mut s = self.lock();
        if s.close.is_some() {
            return Push::Closed;
        }
        let len = frame.len();
        if s.queue.len() + s.in_flight.0 >= self.max_frames as usize
            || s.bytes + s.in_flight.1 + len > self.max_bytes as usize
        {
            s.close = Some(CloseOrder {
                code: codes::OVER_CAPACITY,
                reason: "slow consumer: outbound queue full",
            });
            // A frame a direct write began is on the wire in part: its
            // rest must still go out, before the close, or the client reads
            // the close as the frame's payload.
            let begun = if s.sent > 0 {
                s.queue.pop_front()
            } else {
                None
            };
            s.queue = VecDeque::new();
            let kept = begun.as_ref().map_or(0, |f| f.len());
            s.queue.extend(begun);
            OUTBOUND_BYTES.add(kept as i64 - s.bytes as i64);
            s.bytes = kept;
            drop(s);
            self.notify.notify_one();
            return Push::Overflow;
        }
        let was_empty = s.queue.is_empty();
        // The worker keeps this socket's window: nobody is woken.
        let held = may_hold && s.window > 0 && s.direct.is_some();
        // The window this frame opens needs an entry at a worker, unless
        // one is pending (it flushes whatever is queued when it comes).
        let opens = held && was_empty && !s.scheduled;
        s.scheduled |= opens;
        if direct && s.window == 0 && was_empty && s.in_flight.0 == 0 && !s.hold {
            if let Some(socket) = &s.direct {
                match socket.write_frame(frame) {
                    direct::Wrote::All => return Push::Written,
                    direct::Wrote::Part(n) => s.sent = n,
                    direct::Wrote::Nothing => {}
                }
            }
        }
        if was_empty {
            s.oldest = Some(tokio::time::Instant::now());
        }
        s.queue.push_back(frame.clone());
        s.bytes += len;
        OUTBOUND_BYTES.add(len as i64);
        // The writer hears of the first frame, and of the first urgent one
        // behind frames that are waiting out a write window.
        let wake = (was_empty && !held) || (urgent && !s.urgent);
        s.urgent |= urgent;
        s.removal |= frame.removes();
        let window = s.window;
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        if opens {
            Push::Held(window)
        } else {
            Push::Queued
        }
    }

    /// Set the write window (ms, 0: none) of this socket's app: the
    /// session does on start and on a reload that changes it.
    pub fn set_window(&self, ms: u32) {
        self.lock().window = ms;
    }

    /// A [`Push::Held`] frame's window that no worker keeps: the
    /// session's timer keeps it.
    pub fn wake(&self) {
        self.lock().scheduled = false;
        self.notify.notify_one();
    }

    /// The write window that a [`Push::Held`] frame opened has ended:
    /// write what is queued now, in place, in vectored writes of up to
    /// [`direct::BATCH`] frames, if the socket's writer is idle and nothing
    /// queued is for the session to see first. What the kernel does not
    /// take, and a queue this cannot write, goes to the writer, woken for
    /// it. Never waits.
    pub fn flush_held(&self) -> Flushed {
        let mut s = self.lock();
        s.scheduled = false;
        if s.queue.is_empty() || s.close.is_some() || s.urgent {
            // Written already, or the writer was woken for it.
            return Flushed::Nothing;
        }
        let writable = s.in_flight.0 == 0 && !s.hold && s.sent == 0 && !s.removal;
        let Some(socket) = s.direct.clone().filter(|_| writable) else {
            return self.hand_over(s, 0);
        };
        let mut written = 0u64;
        let mut lens = [0usize; direct::BATCH];
        loop {
            let (k, result) = socket.write_frames(&s.queue, &mut lens);
            let mut n = match result {
                Ok(n) => n,
                Err(_) => return self.hand_over(s, written),
            };
            for &len in &lens[..k] {
                if n < len {
                    // The kernel took part of this frame: the writer
                    // starts after that part.
                    s.sent = n;
                    return self.hand_over(s, written);
                }
                n -= len;
                let frame = s.queue.pop_front().expect("k ≤ queued frames");
                s.bytes -= frame.len();
                OUTBOUND_BYTES.add(-(frame.len() as i64));
                written += 1;
            }
            if s.queue.is_empty() {
                if let Some(t) = s.oldest.take() {
                    delivery_delay().record(t.elapsed().as_secs_f64());
                }
                return Flushed::Wrote(written);
            }
        }
    }

    /// The write window that a [`Push::Held`] frame opened has ended, and
    /// the worker will not write it: the writer takes the queue now.
    pub fn release_held(&self) {
        let mut s = self.lock();
        s.scheduled = false;
        if s.queue.is_empty() || s.urgent || s.close.is_some() {
            return;
        }
        self.hand_over(s, 0);
    }

    /// The rest of a held queue goes to the writer, now.
    fn hand_over(&self, mut s: std::sync::MutexGuard<'_, State>, written: u64) -> Flushed {
        s.urgent = true;
        drop(s);
        self.notify.notify_one();
        Flushed::Handed(written)
    }

    /// The channels of the removal notices queued and not yet claimed (see
    /// [`crate::protocol::claim_removed_channel`]): a session reads them
    /// before a client message, so that what the client does next meets a
    /// socket that already forgot the channel. Nothing is taken from the
    /// queue.
    pub fn claim_queued_removals(&self) -> Vec<String> {
        let s = self.lock();
        if !s.removal {
            return Vec::new();
        }
        s.queue
            .iter()
            .filter_map(crate::protocol::claim_removed_channel)
            .collect()
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
    pub fn drain(&self) -> Drained {
        let mut s = self.lock();
        let (frames, bytes) = (s.queue.len(), s.bytes);
        s.in_flight.0 += frames;
        s.in_flight.1 += bytes;
        s.bytes = 0;
        s.urgent = false;
        Drained {
            frames: std::mem::take(&mut s.queue),
            sent: std::mem::take(&mut s.sent),
            close: s.close,
            oldest: s.oldest.take(),
            removal: std::mem::take(&mut s.removal),
        }
    }

    /// Everything taken so far has been written: it no longer counts, and
    /// the writer is idle.
    pub fn written(&self) {
        let mut s = self.lock();
        OUTBOUND_BYTES.add(-(s.in_flight.1 as i64));
        s.in_flight = (0, 0);
        s.hold = false;
    }

    /// Let pushes write to `socket` directly while the writer is idle.
    pub fn attach(&self, socket: DirectSocket) {
        self.lock().direct = Some(socket);
    }

    /// No more direct writes: the session is closing its socket (or ended).
    pub fn detach(&self) {
        let mut s = self.lock();
        s.direct = None;
        s.hold = true;
    }

    /// The writer starts something of its own (a pong): no direct writes
    /// until it says `written`.
    pub fn hold(&self) {
        self.lock().hold = true;
    }

    /// With a write window: when the writer should take the queue. `None`:
    /// now (something urgent, or a close, is queued; or nothing is);
    /// else when the oldest queued frame arrived, from which the window runs.
    pub fn held_since(&self) -> Option<tokio::time::Instant> {
        let s = self.lock();
        if s.urgent || s.close.is_some() {
            return None;
        }
        s.oldest
    }

    /// Resolves when something was pushed or a close was ordered since the last drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Room left before the bounds: `(frames, bytes)`.
    pub fn room(&self) -> (usize, usize) {
        let s = self.lock();
        (
            (self.max_frames as usize).saturating_sub(s.queue.len() + s.in_flight.0),
            (self.max_bytes as usize).saturating_sub(s.bytes + s.in_flight.1),
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
        let Drained { frames, close, .. } = q.drain();
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

    /// A removal notice is claimed once: before a client message (still
    /// queued) or as it is written, never both, so a channel the client
    /// took again in between is not forgotten a second time.
    #[test]
    fn a_removal_notice_is_claimed_once_and_still_written() {
        let q = Outbound::new(16, 1 << 20);
        q.push(&Frame::from("{\"event\":\"e\"}"));
        assert!(q.claim_queued_removals().is_empty());
        q.push(&crate::protocol::removed("private-a", 0));
        assert_eq!(q.claim_queued_removals(), ["private-a"]);
        assert!(q.claim_queued_removals().is_empty(), "claimed once");
        let d = q.drain();
        assert!(d.removal);
        assert_eq!(d.frames.len(), 2, "the notice is still written");
        assert!(d
            .frames
            .iter()
            .all(|f| crate::protocol::claim_removed_channel(f).is_none()));
        // A notice written before any client message is claimed there.
        q.push(&crate::protocol::removed("private-b", 0));
        let d = q.drain();
        let claimed: Vec<String> = d
            .frames
            .iter()
            .filter_map(crate::protocol::claim_removed_channel)
            .collect();
        assert_eq!(claimed, ["private-b"]);
    }

    #[test]
    fn drain_resets_and_keeps_order() {
        let q = Outbound::new(3, 100);
        q.push(&f("1"));
        q.push(&f("2"));
        let Drained { frames, close, .. } = q.drain();
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
    async fn an_overflow_keeps_the_frame_a_direct_write_began() {
        let (shared, _client) = direct::loopback_pair().await;
        let q = Outbound::new(1_000_000, 64 << 20);
        q.attach(shared.handle());
        shared.writable().await;
        let big = Frame::from("x".repeat(60_000));
        // The client never reads: fill until a frame is taken only in part.
        let mut pushed = 0;
        loop {
            pushed += 1;
            assert!(pushed < 10_000, "the socket never filled");
            if q.push_direct(&big) == Push::Queued {
                break;
            }
        }
        let sent = q.lock().sent;
        assert!(sent > 0, "the kernel took part of the last frame");
        // Overflow by bytes: a frame larger than what is left.
        assert_eq!(q.push(&Frame::from("y".repeat(64 << 20))), Push::Overflow);
        let d = q.drain();
        assert_eq!(d.sent, sent);
        assert_eq!(d.frames.len(), 1, "the begun frame stays, to be finished");
        assert_eq!(d.frames[0].len(), 60_000);
        assert_eq!(d.close.unwrap().code, codes::OVER_CAPACITY);
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

#[cfg(test)]
mod size {
    /// What an idle socket pays for its queue (docs/BENCHMARKS.md "Memory
    /// per socket"): the write window's fields fit in the padding.
    #[test]
    fn an_outbound_queue_stays_this_small() {
        // 176 before the window fields came (a187244), and after.
        let size = std::mem::size_of::<super::Outbound>();
        assert!(size <= 176, "an idle socket's queue grew to {size} bytes");
    }
}
