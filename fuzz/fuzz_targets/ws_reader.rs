//! The websocket reader (`session::ws_reader::WsReader`) on an in-memory
//! socket whose reads return the input in input-chosen chunks (one byte,
//! a few, several KiB, `Pending` between them). Must never panic or hang;
//! every message is within its bound; and what it reads does not depend on
//! how the bytes were cut: the same messages and the same error for the
//! input's schedule, all at once and one byte at a time.
#![no_main]

mod common;

use common::{block_on, masked, ChunkedReader, Input, Schedule};
use futures_util::StreamExt;
use herdgate::session::ws_reader::WsReader;
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::Message;

/// Input → (max_frame, max_message, fail at end, read schedule, bytes).
pub fn decode(data: &[u8]) -> (usize, usize, bool, Vec<u8>, Vec<u8>) {
    let mut input = Input(data);
    let flags = input.byte();
    let max_frame = input.u16() as usize;
    let max_message = input.u16() as usize;
    let sizes = input.sizes();
    let bytes = if flags & 2 != 0 {
        frames(&mut input)
    } else {
        input.0.to_vec()
    };
    (max_frame, max_message, flags & 1 != 0, sizes, bytes)
}

/// A stream of well-formed masked frames (so the fuzzer reaches the
/// message logic), with raw bytes where the input says so.
fn frames(input: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let d = input.byte();
        let mut len = input.byte() as usize;
        if len == 255 {
            len = input.u16() as usize;
        }
        let payload = input.take(len);
        if d & 0x70 != 0 {
            out.extend_from_slice(payload); // raw
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
}

/// Everything the reader yields, errors as their Debug text; after the
/// end or an error, the stream must stay ended.
fn read_all(
    bytes: &[u8],
    sizes: Vec<u8>,
    fail: bool,
    max_frame: usize,
    max_message: usize,
) -> Vec<Result<Message, String>> {
    let reader = ChunkedReader::new(bytes.to_vec(), Schedule::new(sizes), fail);
    let mut r = WsReader::new(reader, max_frame, max_message);
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
    let (max_frame, max_message, fail, sizes, bytes) = decode(data);
    let scheduled = read_all(&bytes, sizes, fail, max_frame, max_message);
    let whole = read_all(&bytes, Vec::new(), fail, max_frame, max_message);
    assert_eq!(scheduled, whole, "chunked vs all at once");
    let bytewise = read_all(&bytes, vec![1, 0], fail, max_frame, max_message);
    assert_eq!(bytewise, whole, "one byte at a time vs all at once");
});
