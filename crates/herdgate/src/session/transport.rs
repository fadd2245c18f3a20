//! Where a session's frames go. The session loop is written against this
//! trait, not a websocket, so the same loop (timers, queue, limits) serves
//! every transport and runs on in-memory pairs in unit tests.

use crate::protocol::Frame;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll};

pub trait Transport {
    /// Frames are waiting to be written.
    fn is_busy(&self) -> bool;
    /// Take frames (in order) from the outbound queue, to be written after
    /// those already waiting.
    fn enqueue(&mut self, frames: VecDeque<Frame>);
    /// Like `enqueue`, when the first `sent` bytes of `frames[0]` (its
    /// header included) were already written by a direct write: the writer
    /// is idle then, and starts after them. Only a websocket over plain TCP
    /// is written directly.
    fn enqueue_partial(&mut self, frames: VecDeque<Frame>, sent: usize) {
        debug_assert_eq!(sent, 0, "this transport is never written directly");
        self.enqueue(frames)
    }
    /// Write what is waiting. `Ready(Ok)` once all of it is written and
    /// flushed; `Pending` while the peer is not taking bytes (the caller
    /// keeps the write deadline).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Answer a websocket ping (ignored by transports without pings).
    fn pong(&mut self, payload: Bytes);
    /// Write everything waiting, then the close with `code` and `reason`.
    /// The caller bounds how long this may take.
    #[allow(async_fn_in_trait)] // used generically, never as a trait object
    async fn close(&mut self, code: u16, reason: &str) -> io::Result<()>;
}
