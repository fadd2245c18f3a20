//! Direct writes: a room writes a frame into an idle plain-TCP socket itself.
//!
//! Why: at low event rates every delivery is one `write(2)` whatever we do,
//! and waking the socket's task to make it costs about half as much again
//! as the write: the wakeup, the scheduler, a poll of the session loop, two
//! locks on the queue. When a socket's writer is idle and its queue empty,
//! a room's fan-out ([`super::Outbound::push_direct`]) writes the frame in
//! place, non-blocking; only what the kernel does not take (the socket is
//! full, or took part of the frame) is queued for the socket's writer as
//! before, which then starts where the kernel stopped. Nothing waits: a full socket answers
//! `WouldBlock` at once.
//!
//! With a write window, the room's worker writes what the window held the
//! same way when it ends (`write_frames`: several frames, one write).
//!
//! The socket is shared for this: the session reads and writes it through
//! [`SharedTcp`] as it would a `TcpStream`, and its queue holds a
//! [`DirectSocket`] to the same stream while the session allows it. Only
//! plain TCP qualifies; a TLS socket's record layer belongs to its session.
//!
//! `unsafe` here: two lines, the same. The descriptor is kept beside the queue's state
//! as a raw fd (one cache line less per socket of a fan-out than asking the
//! stream for it), so borrowing it back for [`crate::sys::send_nonblocking`]
//! is [`BorrowedFd::borrow_raw`], sound because the `DirectSocket` that
//! holds the fd also holds the stream that owns it. The `send` itself is
//! in [`crate::sys`], inlined.
#![allow(unsafe_code)]

use crate::protocol::deflate::Deflate;
use crate::protocol::{wsframe, Frame};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream whose writes can also be made by its outbound queue.
pub struct SharedTcp(Arc<TcpStream>);

impl SharedTcp {
    pub fn new(stream: TcpStream) -> SharedTcp {
        SharedTcp(Arc::new(stream))
    }

    /// A handle for the socket's outbound queue.
    pub fn handle(&self) -> DirectSocket {
        DirectSocket {
            fd: self.0.as_raw_fd(),
            stream: self.0.clone(),
            deflate: None,
        }
    }
    /// Until the reactor has seen the socket writable (large frames are
    /// written through its readiness, which starts unknown).
    #[cfg(test)]
    pub(crate) async fn writable(&self) {
        self.0.writable().await.unwrap();
    }
}

/// What a direct write did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wrote {
    /// All of it: nothing to queue.
    All,
    /// The first `n` bytes (header included): queue the frame, the writer
    /// starts after them.
    Part(usize),
    /// Nothing (the socket is full, or failed: the writer will find out).
    Nothing,
}

/// A socket's stream as its outbound queue sees it.
///
/// Small frames are written with a plain `send(2)` on the descriptor, kept
/// next to the queue's state so a fan-out touches one less cache line per
/// socket than tokio's readiness check would. The reactor is not told:
/// when the kernel refuses, the writer's own attempt finds the socket full
/// and waits for the reactor as usual (edge-triggered readiness is only
/// ever cleared by an attempt that failed).
#[derive(Clone)]
pub struct DirectSocket {
    /// The descriptor of `stream`, open for as long as `stream` is held.
    fd: std::os::fd::RawFd,
    stream: Arc<TcpStream>,
    /// As the socket's writer has it: frames go compressed when set.
    deflate: Option<Deflate>,
}

impl DirectSocket {
    /// Writes made in place send what the socket's writer would: frames
    /// compressed with `deflate` when it was negotiated.
    pub fn with_deflate(mut self, deflate: Option<Deflate>) -> DirectSocket {
        self.deflate = deflate;
        self
    }

    /// Write one text frame without waiting.
    pub(super) fn write_frame(&self, frame: &Frame) -> Wrote {
        let (bits, payload) = frame.wire(self.deflate);
        let mut head = [0u8; 10];
        let h = wsframe::header(wsframe::OP_TEXT | bits, payload.len(), &mut head);
        let total = h + payload.len();
        let result = if total <= COPY_MAX {
            // A small frame is copied next to its header: one plain
            // write(2) costs the kernel less than a two-part writev.
            let mut buf = [0u8; COPY_MAX];
            buf[..h].copy_from_slice(&head[..h]);
            buf[h..total].copy_from_slice(payload);
            // SAFETY: `fd` is `stream`'s descriptor, which stays open while
            // `self.stream` is held, and `self` is borrowed for the call.
            let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
            crate::sys::send_nonblocking(fd, &buf[..total])
        } else {
            self.stream
                .try_write_vectored(&[IoSlice::new(&head[..h]), IoSlice::new(payload)])
        };
        match result {
            Ok(n) if n == total => Wrote::All,
            Ok(0) | Err(_) => Wrote::Nothing,
            Ok(n) => Wrote::Part(n),
        }
    }
}

/// Frames up to this size (header included) are written from one buffer.
const COPY_MAX: usize = 1024;

/// Held frames up to this many bytes in all go out from one buffer.
const COPY_BATCH: usize = 4096;

/// At most this many frames go in one vectored write of a held queue
/// (two buffers each, well under the kernel's `IOV_MAX` of 1024).
pub(super) const BATCH: usize = 64;

impl DirectSocket {
    /// Write the first frames of `frames` (up to [`BATCH`]) without
    /// waiting, in one vectored write: how many were tried, their lengths
    /// on the wire (header included) in `lens`, and the bytes the kernel
    /// took.
    pub(super) fn write_frames(
        &self,
        frames: &std::collections::VecDeque<Frame>,
        lens: &mut [usize; BATCH],
    ) -> (usize, io::Result<usize>) {
        let k = frames.len().min(BATCH);
        let mut heads = [[0u8; 10]; BATCH];
        let mut head_lens = [0usize; BATCH];
        let mut payloads: [&[u8]; BATCH] = [&[]; BATCH];
        for (i, frame) in frames.iter().take(k).enumerate() {
            let (bits, payload) = frame.wire(self.deflate);
            head_lens[i] = wsframe::header(wsframe::OP_TEXT | bits, payload.len(), &mut heads[i]);
            payloads[i] = payload;
            lens[i] = head_lens[i] + payload.len();
        }
        let total: usize = lens[..k].iter().sum();
        if total <= COPY_BATCH {
            // Small frames are copied into one buffer, as in `write_frame`:
            // one plain send(2) costs the kernel less than a writev of
            // two parts per frame.
            let mut buf = [0u8; COPY_BATCH];
            let mut at = 0;
            for i in 0..k {
                buf[at..at + head_lens[i]].copy_from_slice(&heads[i][..head_lens[i]]);
                at += head_lens[i];
                buf[at..at + payloads[i].len()].copy_from_slice(payloads[i]);
                at += payloads[i].len();
            }
            // SAFETY: as in `write_frame`: `fd` is `stream`'s descriptor,
            // open while `self.stream` is held, and `self` is borrowed.
            let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
            return (k, crate::sys::send_nonblocking(fd, &buf[..total]));
        }
        let mut iov = [IoSlice::new(&[]); 2 * BATCH];
        for i in 0..k {
            iov[2 * i] = IoSlice::new(&heads[i][..head_lens[i]]);
            iov[2 * i + 1] = IoSlice::new(payloads[i]);
        }
        (k, self.stream.try_write_vectored(&iov[..2 * k]))
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl SharedTcp {
    /// Wait until the socket is writable, then `write` without blocking.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(crate::sys::shutdown_write(&*self.0))
    }
}

/// A server socket, shared, and its client, on loopback (for tests).
#[cfg(test)]
pub(crate) async fn loopback_pair() -> (SharedTcp, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    (SharedTcp::new(server), client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every socket's queue holds one (while plain and idle): compression
    /// must not have made it bigger than a descriptor and a pointer.
    #[test]
    fn a_direct_socket_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Option<DirectSocket>>(), 16);
    }

    #[tokio::test]
    async fn reads_writes_and_shuts_down_like_a_stream() {
        let (mut s, mut c) = loopback_pair().await;
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        s.write_all(b"back").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"back", "EOF after the shutdown");
    }

    #[tokio::test]
    async fn a_direct_write_is_a_whole_frame_then_nothing_when_full() {
        let (s, mut c) = loopback_pair().await;
        let d = s.handle();
        // Readiness is learned from the reactor: wait for it once.
        s.0.writable().await.unwrap();
        assert_eq!(d.write_frame(&Frame::from_static("hi")), Wrote::All);
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, &[0x81, 2, b'h', b'i']);
        // Fill the socket: the writes stop with a partial frame or nothing, never block.
        let big = Frame::from("x".repeat(64 * 1024));
        let mut wrote = 0usize;
        loop {
            match d.write_frame(&big) {
                Wrote::All => wrote += 1,
                Wrote::Part(n) => {
                    assert!(n > 0 && n < 64 * 1024 + 10);
                    break;
                }
                Wrote::Nothing => break,
            }
            assert!(wrote < 10_000, "a peer that never reads fills the socket");
        }
    }
}
