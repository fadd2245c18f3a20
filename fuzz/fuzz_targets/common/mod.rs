//! Shared by the byte-stream targets: input splitting, an in-memory socket
//! whose reads and writes take input-chosen sizes, and polling without a
//! runtime (a no-op waker: every `Pending` is simply polled again).
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// Reads bytes off the front of the fuzzer's input.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A schedule of read or write sizes: a count, then one byte each.
    pub fn sizes(&mut self) -> Vec<u8> {
        let n = (self.byte() % 16) as usize;
        self.take(n).to_vec()
    }
}

/// What one schedule entry means: `None` is "not now" (`Pending`, as a
/// socket answers `WouldBlock`), else a byte count from 1 to 8 KiB.
pub fn size_of(v: u8) -> Option<usize> {
    match v {
        0 => None,
        1..=127 => Some(v as usize),
        _ => Some((v as usize - 127) * 64),
    }
}

/// Cycles through a schedule of sizes; an empty schedule is "all at once".
#[derive(Clone)]
pub struct Schedule {
    sizes: Vec<u8>,
    at: usize,
    /// The last answer was `Pending`: never two in a row (no livelock).
    waited: bool,
    /// After this many answers, at least `floor` bytes each (large
    /// transfers in one-byte steps would only cost time).
    exact: usize,
    floor: usize,
}

impl Schedule {
    pub fn new(sizes: Vec<u8>) -> Schedule {
        Schedule::with_floor(sizes, usize::MAX, 1)
    }
    pub fn with_floor(sizes: Vec<u8>, exact: usize, floor: usize) -> Schedule {
        Schedule {
            sizes,
            at: 0,
            waited: false,
            exact,
            floor,
        }
    }
    /// `None`: answer `Pending` this time.
    pub fn next(&mut self) -> Option<usize> {
        if self.sizes.is_empty() {
            return Some(usize::MAX);
        }
        if self.at >= self.exact {
            return Some(self.step().unwrap_or(1).max(self.floor));
        }
        self.step()
    }
    fn step(&mut self) -> Option<usize> {
        let v = self.sizes[self.at % self.sizes.len()];
        self.at += 1;
        match size_of(v) {
            None if !self.waited => {
                self.waited = true;
                None
            }
            None => {
                self.waited = false;
                Some(1)
            }
            Some(n) => {
                self.waited = false;
                Some(n)
            }
        }
    }
}

/// An in-memory socket's read side: `data` in chunks of the schedule's
/// sizes, `Pending` where it says so, then the end (or an error).
pub struct ChunkedReader {
    pub data: Vec<u8>,
    pub at: usize,
    pub schedule: Schedule,
    /// End with an I/O error instead of EOF.
    pub fail_at_end: bool,
}

impl ChunkedReader {
    pub fn new(data: Vec<u8>, schedule: Schedule, fail_at_end: bool) -> ChunkedReader {
        ChunkedReader {
            data,
            at: 0,
            schedule,
            fail_at_end,
        }
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(n) = self.schedule.next() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let left = self.data.len() - self.at;
        if left == 0 && self.fail_at_end {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let n = n.min(left).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A tokio runtime's context for the calling thread, entered while the
/// guard lives: code under test may create timers (`tokio::time::timeout`)
/// even though [`block_on`] polls it without a runtime. The clock is paused
/// and never advanced here, so no timer fires: a future that would wait on
/// one stays pending, and [`block_on`]'s limit catches it.
pub fn timers() -> tokio::runtime::EnterGuard<'static> {
    thread_local! {
        static RT: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a current-thread runtime"),
        ));
    }
    RT.with(|rt| rt.enter())
}

/// Poll `f` with a no-op waker until it is ready, at most `limit` times
/// (a future that stays pending on an input that is all there hangs).
pub fn block_on<F: Future>(f: F, limit: usize) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..limit {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// A client frame, masked with `mask`: FIN, opcode, payload.
pub fn masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
