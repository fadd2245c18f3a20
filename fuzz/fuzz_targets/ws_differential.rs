//! The same client byte stream read by herdgate's websocket reader
//! (`session::ws_reader::WsReader`) and by tungstenite's own (a server
//! `WebSocket` with the same `max_frame_size` / `max_message_size`): the
//! same messages, then the same end — judged as the session judges it
//! (`session::map_ws_error`): close 1009 for a capacity error, 1007 for
//! invalid UTF-8, 1002 for a protocol error, and the peer gone otherwise.
//!
//! Where the two legitimately differ the outcome is normalised, never the
//! input skipped (each case is described in fuzz/README.md):
//! 1. the end of the stream: tungstenite reports it as an error
//!    (`ResetWithoutClosingHandshake`, or `ConnectionClosed` after a
//!    close), herdgate as the end;
//! 2. herdgate refuses a frame on its header (reserved bits, opcode,
//!    control-frame rules, no mask, a 2^63 length, over `max_frame`) as
//!    soon as the header bytes are there; tungstenite first reads the whole
//!    header or payload, and reports a frame over `max_frame` (length
//!    checked first) as a capacity error. Expected then: what tungstenite
//!    reads from the bytes before that frame, then herdgate's verdict;
//! 3. tungstenite checks a fragmented text message's UTF-8 at every
//!    fragment, herdgate once, when the message is complete: after the
//!    fragment that made it invalid herdgate may still yield control
//!    frames and end in any way, but never that message.
#![no_main]

mod common;

use common::{block_on, masked, ChunkedReader, Input, Schedule};
use futures_util::StreamExt;
use herdgate::session::ws_reader::WsReader;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// How a reader's stream ended, as the session maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The peer gone: the end of the stream, a close, an I/O error.
    Gone,
    Close(u16),
}

fn classify(e: &Error) -> End {
    match e {
        Error::Capacity(_) => End::Close(1009),
        Error::Utf8(_) => End::Close(1007),
        // Normalisation 1: the end of the stream.
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        Error::Protocol(_) => End::Close(1002),
        _ => End::Gone,
    }
}

type Outcome = (Vec<Message>, End);

fn herdgate(bytes: &[u8], sizes: &[u8], max_frame: usize, max_message: usize) -> Outcome {
    let reader = ChunkedReader::new(bytes.to_vec(), Schedule::new(sizes.to_vec()), false);
    let mut r = WsReader::new(reader, max_frame, max_message);
    let mut got = Vec::new();
    loop {
        match block_on(r.next(), 4 * bytes.len() + 64).expect("herdgate's reader hangs") {
            None => return (got, End::Gone),
            Some(Ok(m)) => got.push(m),
            Some(Err(e)) => return (got, classify(&e)),
        }
    }
}

/// A blocking in-memory socket for tungstenite: reads in the schedule's
/// sizes, writes (its pongs and close replies) go nowhere.
struct SyncIo {
    data: Vec<u8>,
    at: usize,
    schedule: Schedule,
}

impl Read for SyncIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.schedule.next().unwrap_or(1);
        let n = n.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for SyncIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tungstenite(bytes: &[u8], sizes: &[u8], max_frame: usize, max_message: usize) -> Outcome {
    let io = SyncIo {
        data: bytes.to_vec(),
        at: 0,
        schedule: Schedule::new(sizes.to_vec()),
    };
    let config = WebSocketConfig::default()
        .max_frame_size(Some(max_frame))
        .max_message_size(Some(max_message));
    let mut ws = WebSocket::from_raw_socket(io, Role::Server, Some(config));
    let mut got = Vec::new();
    loop {
        match ws.read() {
            Ok(m) => {
                let close = m.is_close();
                got.push(m);
                if close {
                    // herdgate reads nothing after a close either.
                    return (got, End::Gone);
                }
            }
            Err(e) => return (got, classify(&e)),
        }
        assert!(got.len() <= bytes.len());
    }
}

/// Normalisation 2: where herdgate refuses a frame on its header (as far
/// as it has arrived), and with what: the frame's offset and the verdict.
fn header_verdict(bytes: &[u8], max_frame: usize) -> Option<(usize, End)> {
    let mut at = 0;
    loop {
        let b = &bytes[at..];
        if b.len() < 2 {
            return None;
        }
        let (b0, b1) = (b[0], b[1]);
        let opcode = b0 & 0x0F;
        let fin = b0 & 0x80 != 0;
        let control = opcode >= 8;
        let len7 = b1 & 0x7F;
        if b0 & 0x70 != 0
            || (3..=7).contains(&opcode)
            || opcode >= 0xB
            || (control && (!fin || len7 > 125))
            || b1 & 0x80 == 0
        {
            return Some((at, End::Close(1002)));
        }
        let (len, head) = match len7 {
            126 if b.len() < 4 => return None,
            126 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
            127 if b.len() < 10 => return None,
            127 => (u64::from_be_bytes(b[2..10].try_into().unwrap()), 10),
            n => (n as u64, 2),
        };
        if len >> 63 != 0 {
            return Some((at, End::Close(1002)));
        }
        if len > max_frame as u64 {
            return Some((at, End::Close(1009)));
        }
        let total = head + 4 + len as usize;
        if b.len() < total {
            return None;
        }
        at += total;
    }
}

/// Normalisation 3: the offset of the first non-final fragment after which
/// the text message in progress can no longer be valid UTF-8 (only frames
/// before `end`, all complete and with valid headers).
fn invalid_text_fragment(bytes: &[u8], end: usize) -> Option<usize> {
    let mut at = 0;
    let mut text: Option<Vec<u8>> = None;
    let mut binary = false;
    while at < end {
        let b = &bytes[at..];
        let (b0, b1) = (b[0], b[1]);
        let (len, head) = match b1 & 0x7F {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let mask = &b[head..head + 4];
        let payload: Vec<u8> = b[head + 4..head + 4 + len]
            .iter()
            .enumerate()
            .map(|(i, x)| x ^ mask[i % 4])
            .collect();
        let fin = b0 & 0x80 != 0;
        match b0 & 0x0F {
            1 if !fin && text.is_none() && !binary => text = Some(payload),
            2 if !fin => binary = true,
            0 if text.is_some() => text.as_mut().unwrap().extend_from_slice(&payload),
            0 if fin => binary = false,
            _ => {}
        }
        if b0 & 0x0F <= 2 {
            if let Some(t) = &text {
                if !fin && std::str::from_utf8(t).is_err_and(|e| e.error_len().is_some()) {
                    return Some(at);
                }
            }
            if fin {
                text = None;
            }
        }
        at += head + 4 + len;
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.byte();
    let max_frame = input.u16() as usize;
    let max_message = input.u16() as usize;
    let sizes = input.sizes();
    let bytes = if flags & 2 != 0 {
        let mut out = Vec::new();
        while !input.is_empty() {
            let d = input.byte();
            let mut len = input.byte() as usize;
            if len == 255 {
                len = input.u16() as usize;
            }
            let payload = input.take(len);
            if d & 0x70 != 0 {
                out.extend_from_slice(payload);
            } else {
                out.extend(masked(
                    d & 0x80 != 0,
                    d & 0x0F,
                    payload,
                    [d, len as u8, 0x5a, 0xa5],
                ));
            }
        }
        out
    } else {
        input.0.to_vec()
    };

    let got = herdgate(&bytes, &sizes, max_frame, max_message);
    let (cut, expected) = match header_verdict(&bytes, max_frame) {
        None => (
            bytes.len(),
            tungstenite(&bytes, &sizes, max_frame, max_message),
        ),
        Some((at, verdict)) => {
            let (messages, end) = tungstenite(&bytes[..at], &sizes, max_frame, max_message);
            let closed = messages.last().is_some_and(|m| m.is_close());
            if end == End::Gone && !closed {
                (at, (messages, verdict))
            } else {
                (at, (messages, end))
            }
        }
    };
    if got == expected {
        return;
    }
    if expected.1 == End::Close(1007) {
        if let Some(j) = invalid_text_fragment(&bytes, cut) {
            let (before, end) = tungstenite(&bytes[..j], &sizes, max_frame, max_message);
            if end == End::Gone && before == expected.0 {
                let (messages, _) = &got;
                assert!(
                    messages.len() >= before.len() && messages[..before.len()] == before[..],
                    "normalised (UTF-8 per fragment): herdgate {got:?}, tungstenite {expected:?}"
                );
                let rest = &messages[before.len()..];
                assert!(
                    rest.iter().all(|m| matches!(
                        m,
                        Message::Ping(_) | Message::Pong(_) | Message::Close(_)
                    )),
                    "herdgate yielded a data message after an invalid fragment: {got:?}"
                );
                return;
            }
        }
    }
    panic!("herdgate {got:?}\n tungstenite (normalised) {expected:?}");
});
