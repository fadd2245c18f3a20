//! `--deflate`: what the server's text frames cost on the wire, and
//! permessage-deflate for a websocket library that has none.
//!
//! tungstenite reads no compressed frames, so [`Wire`] sits between the
//! socket and it: it passes the HTTP response head through, then takes each
//! whole server frame, counts its bytes as they came (`wire_bytes`,
//! `wire_frames`: text frames only), and hands tungstenite the same frame
//! with a compressed payload inflated (RFC 7692, no context: the server
//! answered `server_no_context_takeover`) and RSV1 cleared. Writes pass
//! through; the client sends nothing compressed.

use crate::net::Conn;
use flate2::{Decompress, FlushDecompress};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest frame (on the wire, and inflated) this client takes: a server
/// sending more is an error, not memory.
const MAX_FRAME: usize = 16 << 20;

/// The offer sent when compression is asked for (what browsers send).
pub const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Text frames received on the wire: how many, and their bytes (header included).
#[derive(Default)]
pub struct WireCount {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Wire {
    inner: Conn,
    count: Arc<WireCount>,
    /// Read from the socket, not yet made into `ready`.
    raw: Vec<u8>,
    /// Ready for tungstenite, from `ready_at`.
    ready: Vec<u8>,
    ready_at: usize,
    head_done: bool,
    /// The server keeps no window between messages (it answered
    /// `server_no_context_takeover`): each message is inflated afresh.
    /// Otherwise one inflater runs across them all.
    no_context: bool,
    inflater: Option<Box<Decompress>>,
}

impl Wire {
    pub fn new(inner: Conn, count: Arc<WireCount>) -> Wire {
        Wire {
            inner,
            count,
            raw: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            head_done: false,
            no_context: false,
            inflater: None,
        }
    }

    /// Move what is complete in `raw` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        if !self.head_done {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Ok(());
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
            self.no_context = head.contains("server_no_context_takeover");
            self.ready.extend(self.raw.drain(..end + 4));
            self.head_done = true;
        }
        loop {
            let b = &self.raw;
            if b.len() < 2 {
                return Ok(());
            }
            let (mut len, mut at) = ((b[1] & 0x7f) as usize, 2);
            if len == 126 {
                if b.len() < 4 {
                    return Ok(());
                }
                len = u16::from_be_bytes([b[2], b[3]]) as usize;
                at = 4;
            } else if len == 127 {
                if b.len() < 10 {
                    return Ok(());
                }
                len = u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize;
                at = 10;
            }
            if len > MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame over 16 MiB",
                ));
            }
            if b.len() < at + len {
                return Ok(());
            }
            let b0 = b[0];
            if b0 & 0x0f == 0x1 {
                self.count.frames.fetch_add(1, Relaxed);
                self.count.bytes.fetch_add((at + len) as u64, Relaxed);
            }
            if b0 & 0x40 == 0 {
                self.ready.extend(self.raw.drain(..at + len));
                continue;
            }
            let mut z = self.raw[at..at + len].to_vec();
            self.raw.drain(..at + len);
            z.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let d = self
                .inflater
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            if self.no_context {
                d.reset(false);
            }
            let start = d.total_in();
            let mut out = Vec::with_capacity(z.len() * 8);
            loop {
                let read = (d.total_in() - start) as usize;
                if out.len() == out.capacity() {
                    if out.len() > MAX_FRAME {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "inflated over 16 MiB",
                        ));
                    }
                    out.reserve(out.capacity());
                }
                d.decompress_vec(&z[read..], &mut out, FlushDecompress::Sync)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if (d.total_in() - start) as usize == z.len() && out.len() < out.capacity() {
                    break;
                }
            }
            let n = out.len();
            self.ready.push(b0 & !0x40);
            if n < 126 {
                self.ready.push(n as u8);
            } else if n <= 0xffff {
                self.ready.push(126);
                self.ready.extend_from_slice(&(n as u16).to_be_bytes());
            } else {
                self.ready.push(127);
                self.ready.extend_from_slice(&(n as u64).to_be_bytes());
            }
            self.ready.extend_from_slice(&out);
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_at < this.ready.len() {
                let n = (this.ready.len() - this.ready_at).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready = Vec::new();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.raw.extend_from_slice(rb.filled());
                    this.process()?;
                }
                other => return other,
            }
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A compressed frame (as a server sends it) comes out plain, a plain
    /// one unchanged, and both are counted as they were on the wire.
    #[tokio::test]
    async fn compressed_frames_come_out_plain_and_are_counted_as_sent() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let text = "{\"event\":\"e\",\"data\":\"".to_string() + &"abc".repeat(200) + "\"}";
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.flush().unwrap();
        let mut z = e.get_ref().clone();
        z.truncate(z.len() - 4);
        let mut sent = b"HTTP/1.1 101 OK\r\n\r\n".to_vec();
        sent.extend_from_slice(&[0xc1, z.len() as u8]);
        sent.extend_from_slice(&z);
        sent.extend_from_slice(&[0x81, 2, b'h', b'i']);
        server.write_all(&sent).await.unwrap();
        drop(server);
        let count = Arc::new(WireCount::default());
        let mut w = Wire::new(Conn::Plain(client), count.clone());
        let mut got = Vec::new();
        w.read_to_end(&mut got).await.unwrap();
        let mut want = b"HTTP/1.1 101 OK\r\n\r\n".to_vec();
        want.extend_from_slice(&[0x81, 126]);
        want.extend_from_slice(&(text.len() as u16).to_be_bytes());
        want.extend_from_slice(text.as_bytes());
        want.extend_from_slice(&[0x81, 2, b'h', b'i']);
        assert_eq!(got, want);
        assert_eq!(count.frames.load(Relaxed), 2);
        assert_eq!(count.bytes.load(Relaxed), (2 + z.len() + 4) as u64);
    }
}
