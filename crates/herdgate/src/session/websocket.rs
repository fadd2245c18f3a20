//! A websocket, split: [`WsReader`] reads (and validates) what the client
//! sends; herdgate writes its own frames.
//!
//! Why write frames ourselves: a server frame is a 2–10 byte header in
//! front of the payload (no masking), and every payload is a [`Frame`]
//! encoded once and shared by the whole room. Writing header and payload
//! with one vectored write sends the shared bytes as they are — no copy
//! into a per-socket buffer — and nothing is buffered beyond the frames
//! waiting in the socket's bounded outbound queue. A generic websocket
//! library's write buffer would copy every frame and keep its high-water
//! capacity for the socket's lifetime, outside any count. Why read them
//! ourselves: see [`super::ws_reader`].
//!
//! The session answers pings and closes itself, through [`WsWriter`], so
//! the only writer of the socket is the session (and, for an idle plain
//! socket, the rooms writing in place: [`crate::outbound::direct`]).

use super::transport::Transport;
use crate::protocol::deflate::Deflate;
use crate::protocol::Frame;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::protocol::wsframe::{header, OP_CLOSE, OP_PONG, OP_TEXT};

/// Frames gathered into one vectored write (two slices each).
const BATCH: usize = 32;
/// Bytes gathered into one write when the stream cannot write vectored.
const COPY_BUF: usize = 16 * 1024;

/// What a websocket session reads from.
pub type WsReader<T> = super::ws_reader::WsReader<ReadHalf<T>>;

/// Split an upgraded (server-side) stream into the session's reader and
/// writer. `config` gives the largest frame and message the reader takes;
/// an unfinished fragmented message counts against `fragments`, if given;
/// `deflate` is set when the client negotiated permessage-deflate.
pub fn server<T>(
    io: T,
    config: WebSocketConfig,
    fragments: Option<std::sync::Arc<crate::ratelimit::FragmentBudget>>,
    deflate: Option<Deflate>,
) -> (WsReader<T>, WsWriter<WriteHalf<T>>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(io);
    let mut reader = super::ws_reader::WsReader::new(
        rd,
        config.max_frame_size.unwrap_or(usize::MAX),
        config.max_message_size.unwrap_or(usize::MAX),
    );
    if let Some(b) = fragments {
        reader = reader.with_budget(b);
    }
    if deflate.is_some() {
        reader = reader.with_inflate();
    }
    let mut writer = WsWriter::new(wr);
    writer.deflate = deflate;
    (reader, writer)
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
    /// The control frame being written (`sent` counts its bytes). Boxed,
    /// like the next one: they are rare, and the writer lives as long as
    /// the socket.
    control: Option<Box<Out>>,
    /// A control frame waiting for the data frame in progress to end.
    control_next: Option<Box<Out>>,
    /// Bytes of the frame in progress (`control`, else `queue[0]`) already
    /// written. A u32 (a frame is far smaller than the socket's queue bound,
    /// itself a u32), so that it and `deflate` share eight bytes: every
    /// idle socket pays for each byte of this struct.
    sent: u32,
    /// Negotiated permessage-deflate: frames from its `min_bytes` on go
    /// compressed (each frame's shared compressed form, [`Frame::wire`]).
    deflate: Option<Deflate>,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub fn new(io: W) -> WsWriter<W> {
        WsWriter {
            io,
            queue: VecDeque::new(),
            control: None,
            control_next: None,
            sent: 0,
            deflate: None,
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
            let left = p.len() - self.sent as usize;
            if n < left {
                self.sent += n as u32;
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
            let left = frame_len(front, self.deflate) - self.sent as usize;
            if n < left {
                self.sent += n as u32;
                return;
            }
            n -= left;
            self.queue.pop_front();
            self.sent = 0;
        }
    }

    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.at_boundary();
        let deflate = self.deflate;
        let n = if self.io.is_write_vectored() {
            let mut heads = [[0u8; 10]; BATCH];
            let mut lens = [0usize; BATCH];
            let mut slices: [IoSlice<'_>; 2 * BATCH + 2] = [IoSlice::new(&[]); 2 * BATCH + 2];
            let mut k = 0;
            let mut sent = self.sent as usize;
            if let Some(p) = &self.control {
                let (h, b) = p.parts(sent);
                slices[0] = IoSlice::new(h);
                slices[1] = IoSlice::new(b);
                k = 2;
                sent = 0;
            }
            for (i, f) in self.queue.iter().take(BATCH).enumerate() {
                let (bits, payload) = f.wire(deflate);
                lens[i] = header(OP_TEXT | bits, payload.len(), &mut heads[i]);
            }
            for (i, f) in self.queue.iter().take(BATCH).enumerate() {
                let h = lens[i];
                let payload = f.wire(deflate).1;
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
            let mut sent = self.sent as usize;
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
                let (bits, payload) = f.wire(deflate);
                let h = header(OP_TEXT | bits, payload.len(), &mut head);
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
        self.control_next = Some(Box::new(Out::new(opcode, payload)));
        std::future::poll_fn(|cx| self.poll_send(cx)).await
    }
}

fn frame_len(f: &Frame, deflate: Option<Deflate>) -> usize {
    let (bits, payload) = f.wire(deflate);
    let mut head = [0u8; 10];
    header(OP_TEXT | bits, payload.len(), &mut head) + payload.len()
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

    fn enqueue_partial(&mut self, frames: VecDeque<Frame>, sent: usize) {
        if sent > 0 {
            debug_assert!(
                !self.is_busy() && self.sent == 0,
                "direct writes only reach an idle writer"
            );
            self.sent = u32::try_from(sent).expect("a frame is smaller than 4 GiB");
        }
        self.enqueue(frames)
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
        self.control_next = Some(Box::new(Out::new(OP_PONG, payload)));
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
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

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

    /// Rooms writing in place and the session's writer share one real TCP
    /// socket: frames stay whole and in order across a write the kernel
    /// took only part of, a pong, and the return to writing in place.
    #[tokio::test]
    async fn direct_writes_and_the_writer_share_a_socket_in_order() {
        use crate::outbound::{direct::loopback_pair, Outbound, Push};
        let (shared, client) = loopback_pair().await;
        let out = Outbound::new(1_000_000, 1 << 30);
        out.attach(shared.handle());
        let (_rd, wr) = tokio::io::split(shared);
        let mut w = WsWriter::new(wr);

        let mut want: Vec<String> = Vec::new();
        let mut push = |text: String| {
            let p = out.push_direct(&Frame::from(text.clone()));
            want.push(text);
            p
        };
        for i in 0..10 {
            assert_eq!(
                push(format!("small {i}")),
                Push::Written,
                "an idle socket is written in place"
            );
        }
        // The client reads nothing yet: the kernel's buffers fill, and the
        // first frame it does not take whole is queued (part-written or not).
        let big = |i: usize| format!("{i}:{}", "x".repeat(50_000));
        let mut i = 0;
        loop {
            let p = push(big(i));
            i += 1;
            if p == Push::Queued {
                break;
            }
            assert_eq!(p, Push::Written);
            assert!(i < 100_000, "the socket never filled");
        }
        for _ in 0..3 {
            assert_eq!(
                push(big(i)),
                Push::Queued,
                "behind a queued frame, never in place"
            );
            i += 1;
        }
        // A ping arrives: the session holds off direct writes, takes the
        // queue (with what the kernel already has of its first frame), pongs.
        out.hold();
        let d = out.drain();
        // The write before fitted whole, so the kernel had room for part of
        // this one (Linux takes what fits into a non-full send buffer).
        assert!(d.sent > 0, "the kernel took part of the first queued frame");
        w.enqueue_partial(d.frames, d.sent);
        w.pong(Bytes::from_static(b"p"));
        assert_eq!(push("while writing".into()), Push::Queued);

        let reader = tokio::spawn(async move {
            let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let (mut texts, mut pongs) = (Vec::new(), 0);
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => texts.push(t.as_str().to_string()),
                    Message::Pong(p) => {
                        assert_eq!(&p[..], b"p");
                        pongs += 1;
                    }
                    Message::Close(_) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            (texts, pongs)
        });
        std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
        out.written();
        let d = out.drain();
        w.enqueue_partial(d.frames, d.sent);
        std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
        out.written();
        // Idle again: back to writing in place (once the kernel has room).
        let mut last = Push::Queued;
        for _ in 0..1000 {
            let d = out.drain();
            if !d.frames.is_empty() {
                w.enqueue_partial(d.frames, d.sent);
                std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
                out.written();
            }
            last = push("after".into());
            if last == Push::Written {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            last,
            Push::Written,
            "an idle writer lets rooms write in place again"
        );
        let d = out.drain();
        w.enqueue_partial(d.frames, d.sent);
        out.detach();
        w.close(1000, "").await.unwrap();
        let (texts, pongs) = reader.await.unwrap();
        assert_eq!(pongs, 1);
        assert_eq!(texts.len(), want.len());
        assert!(texts == want, "every frame whole and in order");
    }

    /// Every socket's writer lives as long as the socket: compression must
    /// not have grown it (64 bytes over a stream handle's 8, as before it).
    #[test]
    fn the_writer_did_not_grow() {
        type W = WsWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>;
        assert_eq!(std::mem::size_of::<W>(), 64);
    }

    /// With permessage-deflate negotiated, frames from `min_bytes` on go
    /// compressed (RSV1), smaller ones plain, through writes cut at every
    /// byte, vectored (plain TCP) or gathered (TLS).
    #[tokio::test]
    async fn compressed_frames_stay_whole_through_partial_writes() {
        use tokio::io::AsyncReadExt;
        for vectored in [true, false] {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let mut w = WsWriter::new(Dribble {
                inner: a,
                chunk: 3,
                flip: false,
                vectored,
            });
            w.deflate = Some(Deflate::new(64, 6));
            let big = format!(
                "{{\"event\":\"e\",\"data\":\"{}\"}}",
                "abcdefgh".repeat(500)
            );
            let frames: Vec<Frame> = ["small", &big, &"z".repeat(100), "x"]
                .iter()
                .map(|s| Frame::from(*s))
                .collect();
            w.enqueue(frames.iter().cloned().collect());
            w.pong(Bytes::from_static(b"p"));
            std::future::poll_fn(|cx| w.poll_send(cx)).await.unwrap();
            drop(w);
            let mut raw = Vec::new();
            b.read_to_end(&mut raw).await.unwrap();
            // Parse what went out: (rsv1, opcode, payload) per frame.
            let mut got = Vec::new();
            let mut at = 0;
            while at < raw.len() {
                let (b0, mut len, mut h) = (raw[at], (raw[at + 1] & 0x7f) as usize, 2);
                if len == 126 {
                    len = u16::from_be_bytes([raw[at + 2], raw[at + 3]]) as usize;
                    h = 4;
                }
                got.push((
                    b0 & 0x40 != 0,
                    b0 & 0x0f,
                    raw[at + h..at + h + len].to_vec(),
                ));
                at += h + len;
            }
            assert_eq!(
                got[0],
                (false, OP_PONG, b"p".to_vec()),
                "vectored = {vectored}"
            );
            let texts: Vec<(bool, String)> = got[1..]
                .iter()
                .map(|(z, op, p)| {
                    assert_eq!(*op, OP_TEXT);
                    let text = if *z {
                        let mut wire = p.clone();
                        wire.extend_from_slice(&[0, 0, 0xff, 0xff, 0x03, 0x00]);
                        let mut s = String::new();
                        std::io::Read::read_to_string(
                            &mut flate2::read::DeflateDecoder::new(&wire[..]),
                            &mut s,
                        )
                        .unwrap();
                        s
                    } else {
                        String::from_utf8(p.clone()).unwrap()
                    };
                    (*z, text)
                })
                .collect();
            assert_eq!(
                texts,
                [
                    (false, "small".to_string()),
                    (true, big.clone()),
                    (true, "z".repeat(100)),
                    (false, "x".to_string())
                ],
                "vectored = {vectored}"
            );
            assert!(
                got[2].2.len() * 10 < big.len(),
                "the big frame went compressed"
            );
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
