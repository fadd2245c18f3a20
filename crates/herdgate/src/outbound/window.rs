//! Write windows kept by a room worker, for the sockets its rooms hold.
//!
//! Why: with a write window (an app's `write_delay`) a socket's room events
//! wait for the window the first of them opens, then go out in one write.
//! Kept by each socket's own task, that costs two task wakes and a timer
//! per socket per window, which measured about what the writes it saves
//! cost (docs/BENCHMARKS.md "Wire cost"). A room's events reach all its
//! sockets at once, so their windows open together: the worker that fanned
//! them out notes each socket whose window it opened ([`Windows::hold`]),
//! grouped by the millisecond the window ends, and when that comes writes
//! each one's held frames in place, one vectored write per socket
//! ([`Outbound::flush_held`]), from its own thread. No socket task is woken
//! unless the kernel does not take everything.
//!
//! A flush writes for one [`SLICE`] at a time and leaves the rest due, so
//! a big room's flush holds up the worker's other rooms for no longer;
//! with commands piling up in the worker's mailbox it writes nothing and
//! wakes the due sockets' own tasks instead, which write on every core.
//!
//! Bounded: at most one entry per socket (a socket with an entry pending
//! gets no second, however often its queue empties meanwhile), at most
//! [`Windows::MAX`] in all; past that the socket's session keeps the window
//! with its own timer, as it does for TLS sockets (policy:
//! `session_timer`). A worker that ends hands every socket it kept to its
//! writer.

use super::{Flushed, Outbound};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long one turn of flushing may write in place before the worker
/// looks at its mailbox again (the rest stays due).
pub const SLICE: Duration = Duration::from_millis(5);

/// The windows a worker keeps: the sockets to flush, by the millisecond
/// (from `base`) their window ends.
pub struct Windows {
    base: Instant,
    due: RefCell<BTreeMap<u64, Vec<Arc<Outbound>>>>,
    len: Cell<usize>,
    max: usize,
}

/// What one [`Windows::flush_due`] did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flush {
    /// Sockets written in place, all they held.
    pub in_place: u64,
    /// Sockets handed to their writer (in part or in all).
    pub handed: u64,
    /// Frames written in place.
    pub frames: u64,
}

impl Default for Windows {
    fn default() -> Self {
        Windows::new()
    }
}

impl Windows {
    /// Sockets whose window one worker keeps at most.
    pub const MAX: usize = 1 << 20;

    pub fn new() -> Windows {
        Windows::with_max(Self::MAX)
    }

    fn with_max(max: usize) -> Windows {
        Windows {
            base: Instant::now(),
            due: RefCell::new(BTreeMap::new()),
            len: Cell::new(0),
            max,
        }
    }

    /// Flush `out` when its window of `ms`, opened `since`, ends (rounded
    /// up to the millisecond). `false`: full, keep it some other way.
    pub fn hold(&self, out: &Arc<Outbound>, since: Instant, ms: u32) -> bool {
        if self.len.get() >= self.max {
            return false;
        }
        let end = since.saturating_duration_since(self.base) + Duration::from_millis(u64::from(ms));
        let key = end.as_micros().div_ceil(1000) as u64;
        self.due
            .borrow_mut()
            .entry(key)
            .or_default()
            .push(out.clone());
        self.len.set(self.len.get() + 1);
        true
    }

    /// When the next window ends.
    pub fn next_due(&self) -> Option<Instant> {
        let due = self.due.borrow();
        let (&key, _) = due.first_key_value()?;
        Some(self.at(key))
    }

    fn at(&self, key: u64) -> Instant {
        self.base + Duration::from_millis(key)
    }

    /// Write what every socket whose window ended by `now` holds, for at
    /// most [`SLICE`]: the sockets left stay due, and the worker comes back
    /// for them after a look at its mailbox, so a big room's flush never
    /// holds up the worker's other rooms for long. With `in_place` false
    /// (commands pile up in the worker's mailbox) nothing is written here:
    /// every due socket is handed to its own task, and they write in
    /// parallel, on every core.
    pub fn flush_due(&self, now: Instant, in_place: bool) -> Flush {
        self.flush_within(now, in_place, SLICE)
    }

    fn flush_within(&self, now: Instant, in_place: bool, slice: Duration) -> Flush {
        let mut flush = Flush::default();
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            let (key, sockets) = {
                let mut due = self.due.borrow_mut();
                match due.first_entry() {
                    Some(e) if self.at(*e.key()) <= now => e.remove_entry(),
                    _ => break,
                }
            };
            self.len.set(self.len.get() - sockets.len());
            let mut sockets = sockets.into_iter();
            while let Some(out) = sockets.next() {
                if !in_place {
                    out.release_held();
                    flush.handed += 1;
                    continue;
                }
                match out.flush_held() {
                    Flushed::Nothing => {}
                    Flushed::Wrote(frames) => {
                        flush.in_place += 1;
                        flush.frames += frames;
                    }
                    Flushed::Handed(frames) => {
                        flush.handed += 1;
                        flush.frames += frames;
                    }
                }
                n += 1;
                if n % 64 == 0 && start.elapsed() >= slice {
                    // The slice is used up: the rest waits for the next.
                    let rest: Vec<_> = sockets.collect();
                    if !rest.is_empty() {
                        self.len.set(self.len.get() + rest.len());
                        self.due.borrow_mut().entry(key).or_default().extend(rest);
                    }
                    return flush;
                }
            }
        }
        flush
    }

    /// Hand every socket still kept here to its writer (the worker is
    /// going away).
    fn release_all(&self) {
        let due = std::mem::take(&mut *self.due.borrow_mut());
        for out in due.into_values().flatten() {
            out.release_held();
        }
        self.len.set(0);
    }

    /// Sockets whose window is kept here now.
    pub fn len(&self) -> usize {
        self.len.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }
}

impl Drop for Windows {
    /// A worker that ends (a panic, a shutdown) leaves no socket waiting
    /// for a flush that will not come.
    fn drop(&mut self) {
        self.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{direct, Push};
    use crate::protocol::Frame;
    use tokio::io::AsyncReadExt;

    /// A plain-TCP socket's queue with a window of `ms`, its server side
    /// and its client.
    async fn windowed(ms: u32) -> (Arc<Outbound>, direct::SharedTcp, tokio::net::TcpStream) {
        let (shared, client) = direct::loopback_pair().await;
        let out = Arc::new(Outbound::new(100, 1 << 20));
        out.attach(shared.handle());
        out.set_window(ms);
        (out, shared, client)
    }

    fn ev(n: u32) -> Frame {
        crate::protocol::event("e", Some("c"), &format!("{{\"n\":{n}}}"))
    }

    /// A windowed socket's room events are held without a wake, and the
    /// worker's flush writes them all, in order, in one go when the window
    /// ends; a socket of its own answer is not held back.
    #[tokio::test(start_paused = true)]
    async fn held_frames_go_out_together_when_the_window_ends() {
        let (shared, mut client) = direct::loopback_pair().await;
        let out = Arc::new(Outbound::new(100, 1 << 20));
        out.attach(shared.handle());
        out.set_window(100);
        let windows = Windows::new();
        let t0 = Instant::now();
        assert_eq!(out.push_room(&ev(1), true), Push::Held(100));
        assert!(windows.hold(&out, t0, 100));
        assert_eq!(
            out.push_room(&ev(2), true),
            Push::Queued,
            "the window is open"
        );
        assert_eq!(out.push_room(&ev(3), false), Push::Queued);
        // Nobody was woken.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), out.ready())
                .await
                .is_err(),
            "a held frame wakes nobody"
        );
        assert_eq!(windows.next_due(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(
            windows.flush_due(t0 + Duration::from_millis(99), true),
            Flush::default()
        );
        let f = windows.flush_due(t0 + Duration::from_millis(100), true);
        assert_eq!(
            f,
            Flush {
                in_place: 1,
                handed: 0,
                frames: 3
            }
        );
        assert!(windows.is_empty());
        assert_eq!(out.queued_bytes(), 0);
        let mut want = Vec::new();
        for n in 1..=3 {
            let text = ev(n);
            let mut head = [0u8; 10];
            let h = crate::protocol::wsframe::header(
                crate::protocol::wsframe::OP_TEXT,
                text.len(),
                &mut head,
            );
            want.extend_from_slice(&head[..h]);
            want.extend_from_slice(text.as_str().as_bytes());
        }
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want, "three frames, in order, whole");
        // Without a window, a room's event is written in place at once.
        out.set_window(0);
        assert_eq!(out.push_room(&ev(4), true), Push::Written);
    }

    /// What the flush cannot write in place goes to the writer: a socket
    /// whose writer is busy, or whose queue holds something the session
    /// must see first, is woken instead.
    #[tokio::test(start_paused = true)]
    async fn a_busy_writer_or_an_urgent_frame_is_handed_the_queue() {
        let (out, _shared, _client) = windowed(50).await;
        let windows = Windows::new();
        let t0 = Instant::now();
        // The writer holds a batch (a pong, say).
        out.hold();
        assert_eq!(out.push_room(&ev(1), true), Push::Held(50));
        assert!(windows.hold(&out, t0, 50));
        let f = windows.flush_due(t0 + Duration::from_millis(50), true);
        assert_eq!(f.handed, 1);
        tokio::time::timeout(Duration::from_millis(1), out.ready())
            .await
            .expect("the writer is woken for what it was handed");
        assert_eq!(out.drain().frames.len(), 1);
        out.written();
        // An answer of the socket's own behind a held event: the session
        // was woken for it and takes both; the flush leaves them.
        assert_eq!(out.push_room(&ev(2), true), Push::Held(50));
        assert!(windows.hold(&out, t0, 50));
        out.push(&ev(3));
        assert_eq!(
            windows.flush_due(t0 + Duration::from_secs(1), true),
            Flush::default()
        );
        assert_eq!(out.drain().frames.len(), 2);
    }

    /// A flush writes for one slice (checked every 64 sockets) and leaves
    /// the rest due for the next; under a backlog it writes nothing and
    /// hands every due socket to its writer.
    #[tokio::test]
    async fn a_slice_at_a_time_and_nothing_in_place_under_a_backlog() {
        let windows = Windows::new();
        let t0 = Instant::now();
        let mut keep = Vec::new();
        for _ in 0..130 {
            let (out, shared, client) = windowed(10).await;
            assert_eq!(out.push_room(&ev(1), true), Push::Held(10));
            assert!(windows.hold(&out, t0, 10));
            keep.push((out, shared, client));
        }
        let due = t0 + Duration::from_millis(11); // past the window, rounded up to the ms
        let f = windows.flush_within(due, true, Duration::from_nanos(1));
        assert_eq!((f.in_place, f.handed, f.frames), (64, 0, 64));
        assert_eq!(windows.len(), 66, "the rest stays due");
        assert!(windows.next_due().is_some_and(|d| d <= due), "and due now");
        let f = windows.flush_within(due, true, Duration::from_nanos(1));
        assert_eq!(f.in_place, 64);
        // Under a backlog: the last two go to their writers.
        let f = windows.flush_due(due, false);
        assert_eq!((f.in_place, f.handed), (0, 2));
        assert!(windows.is_empty());
        for (out, ..) in &keep[128..] {
            tokio::time::timeout(Duration::from_secs(1), out.ready())
                .await
                .expect("a socket handed over is woken");
            assert_eq!(out.drain().frames.len(), 1);
        }
    }

    /// Frames too big for one buffer go out in vectored writes of up to
    /// 64; what the kernel does not take (the client is not reading) goes
    /// to the writer, which starts where the kernel stopped, inside a
    /// frame: the client reads every frame whole, in order.
    #[tokio::test]
    async fn a_partial_vectored_write_is_finished_by_the_writer() {
        use tokio::io::AsyncWriteExt;
        let (shared, mut client) = direct::loopback_pair().await;
        let out = Arc::new(Outbound::new(10_000, 256 << 20));
        out.attach(shared.handle());
        out.set_window(10);
        shared.writable().await;
        let windows = Windows::new();
        let t0 = Instant::now();
        let big =
            |n: u32| crate::protocol::event("e", Some("c"), &format!("{n:06}{}", "x".repeat(6000)));
        let frames: Vec<Frame> = (0..3000).map(big).collect();
        assert_eq!(out.push_room(&frames[0], true), Push::Held(10));
        assert!(windows.hold(&out, t0, 10));
        for f in &frames[1..] {
            assert_eq!(out.push_room(f, true), Push::Queued);
        }
        let f = windows.flush_due(t0 + Duration::from_millis(11), true);
        assert_eq!(f.handed, 1, "18 MB do not fit the socket's buffers");
        let wrote = f.frames as usize;
        assert!(wrote > 64, "several vectored writes went out: {wrote}");
        let d = out.drain();
        assert_eq!(d.frames.len(), 3000 - wrote);
        let mut want = Vec::new();
        let wire = |f: &Frame, want: &mut Vec<u8>| {
            let mut head = [0u8; 10];
            let h = crate::protocol::wsframe::header(
                crate::protocol::wsframe::OP_TEXT,
                f.len(),
                &mut head,
            );
            want.extend_from_slice(&head[..h]);
            want.extend_from_slice(f.as_str().as_bytes());
        };
        for f in &frames {
            wire(f, &mut want);
        }
        // The client reads everything while the writer finishes.
        let total = want.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        let mut rest = Vec::new();
        for f in &d.frames {
            wire(f, &mut rest);
        }
        let mut writer = shared;
        writer.write_all(&rest[d.sent..]).await.unwrap();
        out.written();
        let got = reader.await.unwrap();
        assert!(got == want, "every frame whole and in order");
        assert_eq!(out.queued_bytes(), 0);
    }

    /// One entry per window however often the queue empties meanwhile; a
    /// full list says no (the session keeps the window); a worker that
    /// ends hands what it kept to the writers.
    #[tokio::test(start_paused = true)]
    async fn one_entry_per_socket_a_full_list_and_a_dropped_worker() {
        let (out, _shared, _client) = windowed(100).await;
        let windows = Windows::with_max(1);
        let t0 = Instant::now();
        assert_eq!(out.push_room(&ev(1), true), Push::Held(100));
        assert!(windows.hold(&out, t0, 100));
        // The session takes the queue early (an answer of its own) ...
        out.push(&ev(2));
        assert_eq!(out.drain().frames.len(), 2);
        out.written();
        // ... and the next event finds the entry still pending.
        assert_eq!(out.push_room(&ev(3), true), Push::Queued);
        assert_eq!(windows.len(), 1);
        // Full: another socket's window is not kept here.
        let (other, _shared2, _client2) = windowed(100).await;
        assert_eq!(other.push_room(&ev(1), true), Push::Held(100));
        assert!(!windows.hold(&other, t0, 100), "the list is full");
        // Dropped with an entry: its socket's writer is woken for it.
        let _ = tokio::time::timeout(Duration::from_millis(1), out.ready()).await;
        drop(windows);
        tokio::time::timeout(Duration::from_millis(1), out.ready())
            .await
            .expect("a dropped worker's sockets are handed to their writers");
        assert_eq!(out.drain().frames.len(), 1);
    }

    /// A TLS socket (no direct handle) keeps its window with its session.
    #[tokio::test]
    async fn a_socket_without_a_direct_handle_is_woken_as_before() {
        let out = Outbound::new(100, 1 << 20);
        out.set_window(100);
        assert_eq!(out.push_room(&ev(1), true), Push::Queued);
        tokio::time::timeout(Duration::from_millis(100), out.ready())
            .await
            .expect("woken");
    }
}
