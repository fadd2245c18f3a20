//! The websocket reader (`session::ws_reader::WsReader`) on an in-memory
//! socket whose reads return the input in input-chosen chunks (one byte,
//! a few, several KiB, `Pending` between them). Must never panic or hang;
//! every message is within its bound; and what it reads does not depend on
//! how the bytes were cut: the same messages and the same error for the
//! input's schedule, all at once and one byte at a time. With the input's
//! flag for it, the reader has permessage-deflate negotiated: frames may
//! carry RSV1, and some payloads are real deflate streams (compressed here
//! with flate2), so inflating, its bound and its errors are reached.
#![no_main]

mod common;

use common::{block_on, masked, ChunkedReader, Input, Schedule};
use futures_util::StreamExt;
use herdgate::session::ws_reader::WsReader;
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::Message;

/// What one run reads: the limits, whether deflate was negotiated, the
/// read schedule and the bytes.
pub struct Case {
    max_frame: usize,
    max_message: usize,
    fail: bool,
    inflate: bool,
    sizes: Vec<u8>,
    bytes: Vec<u8>,
}

/// Input → a [`Case`].
pub fn decode(data: &[u8]) -> Case {
    let mut input = Input(data);
    let flags = input.byte();
    let max_frame = input.u16() as usize;
    let max_message = input.u16() as usize;
    let sizes = input.sizes();
    let inflate = flags & 4 != 0;
    let bytes = if flags & 2 != 0 {
        frames(&mut input, inflate)
    } else {
        input.0.to_vec()
    };
    Case {
        max_frame,
        max_message,
        fail: flags & 1 != 0,
        inflate,
        sizes,
        bytes,
    }
}

/// `payload` as a permessage-deflate message: a sync-flushed raw deflate
/// stream without its 00 00 ff ff tail.
fn deflated(payload: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(payload).expect("in memory");
    e.flush().expect("in memory");
    let mut z = e.get_ref().clone();
    z.truncate(z.len().saturating_sub(4));
    z
}

/// A stream of well-formed masked frames (so the fuzzer reaches the
/// message logic), with raw bytes where the input says so; with `inflate`,
/// RSV1 where the input's 0x40 says so, and a payload deflated first when
/// its length is odd (so both real and broken deflate data are read).
fn frames(input: &mut Input, inflate: bool) -> Vec<u8> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let d = input.byte();
        let mut len = input.byte() as usize;
        if len == 255 {
            len = input.u16() as usize;
        }
        let payload = input.take(len);
        if d & 0x30 != 0 {
            out.extend_from_slice(payload); // raw
        } else {
            let rsv1 = inflate && d & 0x40 != 0;
            let z;
            let body = if rsv1 && len % 2 == 1 {
                z = deflated(payload);
                &z[..]
            } else {
                payload
            };
            let mut frame = masked(d & 0x80 != 0, d & 0x0F, body, [d, len as u8, 0x5a, 0xa5]);
            if rsv1 {
                frame[0] |= 0x40;
            }
            out.extend(frame);
        }
    }
    out
}

/// Everything the reader yields, errors as their Debug text; after the
/// end or an error, the stream must stay ended.
fn read_all(c: &Case, sizes: Vec<u8>) -> Vec<Result<Message, String>> {
    let (bytes, fail, max_frame, max_message) = (&c.bytes, c.fail, c.max_frame, c.max_message);
    let reader = ChunkedReader::new(bytes.to_vec(), Schedule::new(sizes), fail);
    let mut r = WsReader::new(reader, max_frame, max_message);
    if c.inflate {
        r = r.with_inflate();
    }
    let mut got = Vec::new();
    let limit = 4 * bytes.len() + 64;
    loop {
        let item = block_on(r.next(), limit).expect("the reader hangs on input that is all there");
        match item {
            None => break,
            Some(Ok(m)) => {
                match &m {
                    Message::Text(t) => assert!(
                        t.len() <= max_message,
                        "text of {} > {max_message}",
                        t.len()
                    ),
                    Message::Binary(b) => assert!(
                        b.len() <= max_message,
                        "binary of {} > {max_message}",
                        b.len()
                    ),
                    Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
                    Message::Close(Some(c)) => assert!(c.reason.len() <= 123),
                    Message::Close(None) => {}
                    Message::Frame(_) => panic!("a raw frame is never yielded"),
                }
                got.push(Ok(m));
            }
            Some(Err(e)) => {
                got.push(Err(format!("{e:?}")));
                break;
            }
        }
        assert!(got.len() <= bytes.len(), "more messages than bytes");
    }
    let after = block_on(r.next(), limit).expect("an ended reader hangs");
    assert!(
        after.is_none(),
        "the reader yields after its end: {after:?}"
    );
    got
}

fuzz_target!(|data: &[u8]| {
    let case = decode(data);
    let scheduled = read_all(&case, case.sizes.clone());
    let whole = read_all(&case, Vec::new());
    assert_eq!(scheduled, whole, "chunked vs all at once");
    let bytewise = read_all(&case, vec![1, 0]);
    assert_eq!(bytewise, whole, "one byte at a time vs all at once");
});
