//! The server's frame writer (`session::websocket::WsWriter`) on a socket
//! whose writes take input-chosen byte counts (one byte, a few, several
//! KiB, `Pending` as for `WouldBlock`; vectored or not). Frames are queued,
//! handed over part-written as a room's in-place write leaves them
//! (`outbound::direct`: the first bytes already on the wire, the writer
//! starts after them), pongs interleave, and a close ends it. What came
//! out, read back by tungstenite as the client, must be exactly the text
//! frames queued, in order, each pong between whole frames (the newest
//! of those not yet started), and the close last, with nothing after it.
#![no_main]

mod common;

use bytes::Bytes;
use common::{block_on, Input, Schedule};
use herdgate::protocol::Frame;
use herdgate::session::transport::Transport;
use herdgate::session::websocket::WsWriter;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
use tokio_tungstenite::tungstenite::Message;

/// The socket: appends to `out` what the schedule lets through.
struct Sink {
    out: Rc<RefCell<Vec<u8>>>,
    schedule: Schedule,
    vectored: bool,
    calls: usize,
}

/// Writes taken exactly as the schedule says; after them, at least 4 KiB
/// each (the copying writer gathers up to 16 KiB per write, so a long run
/// of one-byte writes through a large frame would only cost time).
const EXACT_WRITES: usize = 256;

impl Sink {
    fn allow(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        self.calls += 1;
        let n = self.schedule.next();
        if n.is_none() {
            cx.waker().wake_by_ref();
        }
        n.map(|n| {
            if self.calls > EXACT_WRITES {
                n.max(4096)
            } else {
                n
            }
        })
    }
}

impl AsyncWrite for Sink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(n) = self.allow(cx) else {
            return Poll::Pending;
        };
        let n = n.min(buf.len());
        self.out.borrow_mut().extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // As writev(2): across the slices, up to the count allowed.
        let Some(mut n) = self.allow(cx) else {
            return Poll::Pending;
        };
        let mut wrote = 0;
        for b in bufs {
            let k = n.min(b.len());
            self.out.borrow_mut().extend_from_slice(&b[..k]);
            wrote += k;
            n -= k;
            if n == 0 {
                break;
            }
        }
        Poll::Ready(Ok(wrote))
    }
    fn is_write_vectored(&self) -> bool {
        self.vectored
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An unmasked server text frame, encoded independently of herdgate.
fn encoded(text: &str) -> Vec<u8> {
    let len = text.len();
    let mut out = vec![0x81];
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(text.as_bytes());
    out
}

/// Payload bytes one input may queue in large frames.
const LARGE_BUDGET: usize = 200_000;

fn frame(input: &mut Input, n: usize, budget: &mut usize) -> Frame {
    static FILL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let fill = FILL.get_or_init(|| {
        (0..80_000u32)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect()
    });
    let s = input.byte() as usize;
    let mut len = match s {
        0..=199 => s,
        200..=249 => (s - 200) * 1500,
        _ => 65_530 + (s - 250) * 3, // around the 16-bit length's end
    };
    if len > 200 {
        if *budget < len {
            len %= 200;
        } else {
            *budget -= len;
        }
    }
    let mut text = format!("{n}:");
    let more = len.saturating_sub(text.len());
    text.push_str(&fill[..more]);
    Frame::from(text)
}

/// The client's socket: reads what the writer wrote.
struct Wire(io::Cursor<Vec<u8>>);
impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.byte();
    let sizes = input.sizes();
    let out = Rc::new(RefCell::new(Vec::new()));
    let mut w = WsWriter::new(Sink {
        out: out.clone(),
        schedule: Schedule::new(sizes),
        vectored: flags & 1 != 0,
        calls: 0,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut sent: Vec<Frame> = Vec::new();
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    // The writer finished all it had: a room may write in place again.
    let mut idle = true;
    let mut ops = 0;
    let mut budget = LARGE_BUDGET;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        match input.byte() % 5 {
            0 => {
                let k = 1 + input.byte() as usize % 4;
                let frames: VecDeque<Frame> = (0..k)
                    .map(|i| frame(&mut input, sent.len() + i, &mut budget))
                    .collect();
                sent.extend(frames.iter().cloned());
                w.enqueue(frames);
                idle = false;
            }
            1 if idle && !w.is_busy() => {
                // A room wrote the first bytes of a frame in place.
                let k = 1 + input.byte() as usize % 3;
                let frames: VecDeque<Frame> = (0..k)
                    .map(|i| frame(&mut input, sent.len() + i, &mut budget))
                    .collect();
                let whole = encoded(frames[0].as_str());
                let cut = input.u16() as usize % whole.len();
                out.borrow_mut().extend_from_slice(&whole[..cut]);
                sent.extend(frames.iter().cloned());
                w.enqueue_partial(frames, cut);
                idle = false;
            }
            2 => {
                let n = input.byte() as usize % 126;
                let p = input.take(n).to_vec();
                pongs.push(p.clone());
                w.pong(Bytes::from(p));
                idle = false;
            }
            _ => {
                let polls = 1 + input.byte() as usize % 8;
                for _ in 0..polls {
                    match w.poll_send(&mut cx) {
                        Poll::Ready(Ok(())) => {
                            assert!(!w.is_busy(), "sent, yet busy");
                            idle = true;
                            break;
                        }
                        Poll::Ready(Err(e)) => panic!("the sink never fails: {e}"),
                        Poll::Pending => {}
                    }
                }
            }
        }
    }
    let code = 4000 + input.u16() % 1000;
    let n = input.byte() as usize % 124;
    let reason: String = input
        .take(n)
        .iter()
        .map(|b| (b'a' + b % 26) as char)
        .collect();
    let total: usize = sent.iter().map(|f| f.len() + 10).sum::<usize>() + 200 * (pongs.len() + 2);
    block_on(w.close(code, &reason), 4 * total + 64)
        .expect("the writer hangs on a socket that takes bytes")
        .expect("the sink never fails");
    assert!(!w.is_busy());

    let out = std::mem::take(&mut *out.borrow_mut());
    let mut client = WebSocket::from_raw_socket(Wire(io::Cursor::new(out)), Role::Client, None);
    let mut texts = Vec::new();
    let mut seen_pongs = Vec::new();
    loop {
        match client.read().expect("the client reads every frame") {
            Message::Text(t) => texts.push(t),
            Message::Pong(p) => seen_pongs.push(p.to_vec()),
            Message::Close(Some(c)) => {
                assert_eq!(
                    (u16::from(c.code), c.reason.as_str()),
                    (code, reason.as_str())
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let wire = client.get_ref();
    assert_eq!(
        wire.0.position() as usize,
        wire.0.get_ref().len(),
        "bytes after the close"
    );
    assert!(texts == sent, "text frames whole and in order");
    // Pongs: in order, each one issued (a newer one may replace one not started).
    let mut i = 0;
    for p in &seen_pongs {
        while i < pongs.len() && &pongs[i] != p {
            i += 1;
        }
        assert!(i < pongs.len(), "a pong never issued, or out of order");
        i += 1;
    }
    if let Some(last) = pongs.last() {
        assert_eq!(seen_pongs.last(), Some(last), "the newest pong is sent");
    }
});
