//! A websocket, split: tungstenite reads (and validates) what the client
//! sends; herdgate writes its own frames.
//!
//! Why write frames ourselves: a server frame is a 2–10 byte header in
//! front of the payload (no masking), and every payload is a [`Frame`]
//! encoded once and shared by the whole room. Writing header and payload
//! with one vectored write sends the shared bytes as they are — no copy
//! into a per-socket buffer — and nothing is buffered beyond the frames
//! waiting in the socket's bounded outbound queue. tungstenite's own write
//! buffer would copy every frame and keep its high-water capacity for the
//! socket's lifetime, outside any count.
//!
//! tungstenite reads through [`ReadOnly`], whose writes go nowhere: the
//! session answers pings and closes itself, through [`WsWriter`], so the
//! only writer of the socket is the session.

use super::transport::Transport;
use crate::protocol::Frame;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PONG: u8 = 0xA;

/// Frames gathered into one vectored write (two slices each).
const BATCH: usize = 32;
/// Bytes gathered into one write when the stream cannot write vectored.
const COPY_BUF: usize = 16 * 1024;

/// The read side tungstenite gets. It must implement `AsyncWrite`; what
/// tungstenite would write on its own (automatic pong and close replies)
/// is discarded, because the session writes those through [`WsWriter`].
pub struct ReadOnly<T>(ReadHalf<T>);

impl<T: AsyncRead> AsyncRead for ReadOnly<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T> AsyncWrite for ReadOnly<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a websocket session reads from.
pub type WsReader<T> = WebSocketStream<ReadOnly<T>>;

/// Split an upgraded (server-side) stream into the session's reader and writer.
pub async fn server<T>(io: T, config: WebSocketConfig) -> (WsReader<T>, WsWriter<WriteHalf<T>>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(io);
    let reader = WebSocketStream::from_raw_socket(ReadOnly(rd), Role::Server, Some(config)).await;
    (reader, WsWriter::new(wr))
}

/// The header of an unmasked server frame: FIN + opcode, then the length.
fn header(opcode: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// One frame waiting to be written: its header, and its payload (shared).
struct Out {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl Out {
    fn new(opcode: u8, payload: Bytes) -> Out {
        let mut head = [0u8; 10];
        let head_len = header(opcode, payload.len(), &mut head) as u8;
        Out {
            head,
            head_len,
            payload,
        }
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.payload.len()
    }

    /// The unwritten parts after `sent` bytes of this frame.
    fn parts(&self, sent: usize) -> (&[u8], &[u8]) {
        let h = self.head_len as usize;
        if sent < h {
            (&self.head[sent..h], &self.payload[..])
        } else {
            (&[], &self.payload[sent - h..])
        }
    }
}

/// Writes websocket frames to one socket, and nothing else does.
///
/// Holds the frames taken from the outbound queue until they are written
/// (`queue`), a control frame (a pong answering the client's last ping, or
/// the close) and how far the frame in progress got. A control frame starts
/// only between data frames. The deque is dropped once everything is
/// written, so an idle socket keeps no buffer.
pub struct WsWriter<W> {
    io: W,
    queue: VecDeque<Frame>,
    /// The control frame being written (`sent` counts its bytes).
    control: Option<Out>,
    /// A control frame waiting for the data frame in progress to end.
    control_next: Option<Out>,
    /// Bytes of the frame in progress (`control`, else `queue[0]`) already written.
    sent: usize,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub fn new(io: W) -> WsWriter<W> {
        WsWriter {
            io,
            queue: VecDeque::new(),
            control: None,
            control_next: None,
            sent: 0,
        }
    }

    /// Between frames, a waiting control frame goes next.
    fn at_boundary(&mut self) {
        if self.control.is_none() && self.sent == 0 {
            self.control = self.control_next.take();
        }
    }

    /// Advance past `n` written bytes.
    fn advance(&mut self, mut n: usize) {
        if let Some(p) = &self.control {
            let left = p.len() - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.control = None;
            self.sent = 0;
        }
        while n > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = frame_len(front) - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.queue.pop_front();
            self.sent = 0;
        }
    }

    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.at_boundary();
        let n = if self.io.is_write_vectored() {
            let mut heads = [[0u8; 10]; BATCH];
            let mut lens = [0usize; BATCH];
            let mut slices: [IoSlice<'_>; 2 * BATCH + 2] = [IoSlice::new(&[]); 2 * BATCH + 2];
            let mut k = 0;
            let mut sent = self.sent;
            if let Some(p) = &self.control {
                let (h, b) = p.parts(sent);
                slices[0] = IoSlice::new(h);
                slices[1] = IoSlice::new(b);
                k = 2;
                sent = 0;
            }
            for (i, f) in self.queue.iter().take(BATCH).enumerate() {
                lens[i] = header(OP_TEXT, f.len(), &mut heads[i]);
            }
            for (i, f) in self.queue.iter().take(BATCH).enumerate() {
                let h = lens[i];
                let payload = f.as_bytes();
                if sent < h {
                    slices[k] = IoSlice::new(&heads[i][sent..h]);
                    slices[k + 1] = IoSlice::new(payload);
                } else {
                    slices[k] = IoSlice::new(&[]);
                    slices[k + 1] = IoSlice::new(&payload[sent - h..]);
                }
                k += 2;
                sent = 0;
            }
            ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..k]))?
        } else {
            // Gather into one buffer: each write to a TLS stream is a record.
            let mut buf = [0u8; COPY_BUF];
            let mut filled = 0;
            let mut sent = self.sent;
            let mut put = |parts: (&[u8], &[u8]), filled: &mut usize| -> bool {
                for part in [parts.0, parts.1] {
                    let n = part.len().min(COPY_BUF - *filled);
                    buf[*filled..*filled + n].copy_from_slice(&part[..n]);
                    *filled += n;
                    if n < part.len() {
                        return false;
                    }
                }
                true
            };
            let mut more = true;
            if let Some(p) = &self.control {
                more = put(p.parts(sent), &mut filled);
                sent = 0;
            }
            for f in self.queue.iter() {
                if !more {
                    break;
                }
                let mut head = [0u8; 10];
                let h = header(OP_TEXT, f.len(), &mut head);
                let payload = f.as_bytes();
                let parts: (&[u8], &[u8]) = if sent < h {
                    (&head[sent..h], payload)
                } else {
                    (&[], &payload[sent - h..])
                };
                more = put(parts, &mut filled);
                sent = 0;
            }
            ready!(Pin::new(&mut self.io).poll_write(cx, &buf[..filled]))?
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.advance(n);
        Poll::Ready(Ok(()))
    }

    /// Write one control frame after whatever is queued, then flush.
    async fn write_control(&mut self, opcode: u8, payload: Bytes) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx)).await?;
        self.control_next = Some(Out::new(opcode, payload));
        std::future::poll_fn(|cx| self.poll_send(cx)).await
    }
}

fn frame_len(f: &Frame) -> usize {
    let mut head = [0u8; 10];
    header(OP_TEXT, f.len(), &mut head) + f.len()
}

impl<W: AsyncWrite + Unpin> Transport for WsWriter<W> {
    fn is_busy(&self) -> bool {
        !self.queue.is_empty() || self.control.is_some() || self.control_next.is_some()
    }

    fn enqueue(&mut self, frames: VecDeque<Frame>) {
        if self.queue.is_empty() {
            self.queue = frames;
        } else {
            self.queue.extend(frames);
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.is_busy() {
            ready!(self.poll_write_some(cx))?;
        }
        // Written: give the deque back rather than keep a burst's capacity.
        self.queue = VecDeque::new();
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn pong(&mut self, payload: Bytes) {
        // A newer ping's pong replaces one not yet started (RFC 6455 §5.5.3).
        self.control_next = Some(Out::new(OP_PONG, payload));
    }

    async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.write_control(OP_CLOSE, Bytes::from(payload)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn headers_for_every_length_class() {
        let mut h = [0u8; 10];
        assert_eq!(header(OP_TEXT, 5, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 5]);
        assert_eq!(header(OP_TEXT, 300, &mut h), 4);
        assert_eq!(&h[..4], &[0x81, 126, 1, 44]);
        assert_eq!(header(OP_CLOSE, 70_000, &mut h), 10);
        assert_eq!(&h[..2], &[0x88, 127]);
        assert_eq!(u64::from_be_bytes(h[2..10].try_into().unwrap()), 70_000);
    }

    /// A stream that takes at most `chunk` bytes per write and says Pending
    /// every other call, so frames are cut at every possible byte.
    struct Dribble<W> {
        inner: W,
        chunk: usize,
        flip: bool,
        vectored: bool,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for Dribble<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.flip = !self.flip;
            if self.flip {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.chunk);
            Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            self.poll_write(cx, first)
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn partial_writes_keep_frames_whole_and_in_order_with_pongs_between() {
        for vectored in [true, false] {
            let (a, b) = tokio::io::duplex(1 << 20);
            let mut w = WsWriter::new(Dribble {
                inner: a,
                chunk: 3,
                flip: false,
                vectored,
            });
            let big = "x".repeat(70_000);
            let frames: Vec<Frame> = ["a", "bb", &"y".repeat(200), &big, "z"]
                .iter()
                .map(|s| Frame::from(s.to_string()))
                .collect();
            w.enqueue(frames[..3].iter().cloned().collect());
            w.pong(Bytes::from_static(b"p"));
            std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
            w.enqueue(frames[3..].iter().cloned().collect());
            std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
            w.close(4100, "bye").await.unwrap();
            let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
            let mut got = Vec::new();
            while let Some(Ok(m)) = client.next().await {
                let end = m.is_close();
                got.push(m);
                if end {
                    break;
                }
            }
            assert!(
                matches!(&got[0], Message::Pong(p) if &p[..] == b"p"),
                "{vectored}: pong first"
            );
            let texts: Vec<String> = got
                .iter()
                .filter_map(|m| m.to_text().ok().filter(|_| m.is_text()).map(String::from))
                .collect();
            let want: Vec<String> = frames.iter().map(|f| f.as_str().to_string()).collect();
            assert_eq!(texts, want, "vectored = {vectored}");
            match got.last() {
                Some(Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 4100),
                other => panic!("expected a close, got {other:?}"),
            }
            assert!(
                !w.is_busy() && w.queue.capacity() == 0,
                "nothing kept after writing"
            );
        }
    }
}
