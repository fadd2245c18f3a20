//! The read side of a server websocket (RFC 6455 §5), holding no buffer
//! while the client is quiet.
//!
//! Why not tungstenite's reader: it keeps a read buffer for the socket's
//! whole life (and its high-water capacity after a large message), two
//! waker proxies and its protocol state — about a kilobyte per idle socket,
//! a third of what an idle herdgate socket costs. Pusher clients send a few
//! small messages and then mostly nothing, so this reader reads into the
//! stack and keeps bytes on the heap only while a frame is incomplete (or a
//! second one arrived with it), and gives that memory back as soon as the
//! frames are taken.
//!
//! What it checks, as tungstenite did (and answers with the same errors, so
//! the session's close codes are unchanged): frames from a client must be
//! masked; no reserved bits, except RSV1 on the first frame of a data
//! message once permessage-deflate is negotiated ([`WsReader::with_inflate`]:
//! such a message is inflated whole, its result bounded by
//! `max_message_size` too); known opcodes
//! only; control frames unfragmented and at most 125 bytes; continuation
//! frames only inside a fragmented message and data frames never inside
//! one; every frame and message within `max_frame_size` /
//! `max_message_size`; text is UTF-8; a close carries nothing, or a code and
//! a UTF-8 reason (a code not allowed on the wire reads as 1002). After a
//! close, or at the end of the stream, it yields nothing more.

use bytes::Bytes;
use futures_util::Stream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::Message;

/// Bytes read from the socket per read, into the stack.
const READ_CHUNK: usize = 4096;

use crate::protocol::wsframe::{OP_BINARY, OP_CLOSE, OP_CONTINUE, OP_PING, OP_PONG, OP_TEXT};

pub struct WsReader<R> {
    io: R,
    /// Read but not yet taken: an incomplete frame, or frames after the
    /// one just returned. Empty (no allocation) while the client is quiet.
    pending: Vec<u8>,
    /// Where the untaken bytes of `pending` start: frames are taken by
    /// moving this, so many small frames read at once cost one copy of
    /// the rest, not one per frame.
    pending_at: usize,
    /// A fragmented message in progress (boxed: rare, and the reader lives
    /// as long as the socket).
    message: Option<Box<Partial>>,
    max_frame: usize,
    max_message: usize,
    /// What `message` is counted against, node-wide.
    budget: Option<std::sync::Arc<crate::ratelimit::FragmentBudget>>,
    /// A close was read, the stream ended, or an error was returned.
    done: bool,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    inflate: bool,
}

/// A fragmented message so far.
struct Partial {
    text: bool,
    /// Its first frame had RSV1: inflate it once whole.
    compressed: bool,
    payload: Vec<u8>,
}

/// A compressed message inflates to at most this many times its size on
/// the wire, plus [`INFLATE_SLACK`] (and never past `max_message_size`):
/// JSON compresses 3–20×, so honest messages stay far below it, while a
/// client cannot make each 40-byte frame cost the server a whole
/// `max_message_size` of inflating and parsing. Past it: 1009, as a bomb.
pub const MAX_INFLATE_RATIO: usize = 128;
pub const INFLATE_SLACK: usize = 4096;

/// The reason of a [`Error::Utf8`] that is really compressed data that
/// does not inflate (both are closed 1007, invalid payload data).
pub const INVALID_DEFLATE: &str = "invalid compressed data";

impl<R> Drop for WsReader<R> {
    fn drop(&mut self) {
        self.drop_message();
    }
}

impl<R> WsReader<R> {
    /// Count unfinished messages against `budget`.
    pub fn with_budget(mut self, budget: std::sync::Arc<crate::ratelimit::FragmentBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    fn hold(&self, n: usize) -> Result<(), Error> {
        match &self.budget {
            Some(b) => b.try_hold(n).map_err(|(size, max)| too_long(size, max)),
            None => Ok(()),
        }
    }

    /// Forget the unfinished message, giving its bytes back.
    fn drop_message(&mut self) {
        if let (Some(m), Some(b)) = (self.message.take(), &self.budget) {
            b.release(m.payload.len());
        }
    }

    /// permessage-deflate was negotiated: take compressed messages.
    pub fn with_inflate(mut self) -> Self {
        self.inflate = true;
        self
    }

    /// A whole message's payload: inflated first if it was compressed.
    fn complete(&self, text: bool, compressed: bool, payload: Vec<u8>) -> Result<Message, Error> {
        if !compressed {
            return complete(text, payload);
        }
        let wire = payload.len();
        // Bounded by max_message, and by a ratio: a few bytes on the wire
        // must not buy a whole max_message of inflating and parsing each.
        let bound = self.max_message.min(
            MAX_INFLATE_RATIO
                .saturating_mul(wire)
                .saturating_add(INFLATE_SLACK),
        );
        match crate::protocol::deflate::inflate(payload, bound) {
            Ok(plain) => complete(text, plain),
            Err(crate::protocol::deflate::InflateError::TooLong { max }) => {
                Err(too_long(max.saturating_add(1).max(wire), max))
            }
            Err(crate::protocol::deflate::InflateError::Invalid) => {
                Err(Error::Utf8(INVALID_DEFLATE.into()))
            }
        }
    }
}

/// One complete frame at the front of a buffer.
struct Head {
    fin: bool,
    /// RSV1 (only allowed where [`WsReader::with_inflate`] said so).
    compressed: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header bytes, then payload bytes.
    header: usize,
    len: usize,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    pub fn new(io: R, max_frame: usize, max_message: usize) -> WsReader<R> {
        WsReader {
            io,
            pending: Vec::new(),
            pending_at: 0,
            message: None,
            max_frame,
            max_message,
            budget: None,
            done: false,
            inflate: false,
        }
    }

    /// Take one frame from the front of `buf`, if it is all there; what it
    /// means (a message, or nothing yet) and how many bytes it used.
    fn take(&mut self, buf: &[u8]) -> Result<Option<(usize, Option<Message>)>, Error> {
        let Some(h) = parse_head(buf, self.max_frame, self.inflate)? else {
            return Ok(None);
        };
        let used = h.header + h.len;
        let mut payload = buf[h.header..used].to_vec();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= h.mask[i % 4];
        }
        let message = match h.opcode {
            OP_PING => Some(Message::Ping(Bytes::from(payload))),
            OP_PONG => Some(Message::Pong(Bytes::from(payload))),
            OP_CLOSE => {
                self.done = true;
                Some(Message::Close(close_frame(payload)?))
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    let data = if h.opcode == OP_TEXT {
                        Data::Text
                    } else {
                        Data::Binary
                    };
                    return Err(ProtocolError::ExpectedFragment(data).into());
                }
                let text = h.opcode == OP_TEXT;
                // A whole message in one frame is bounded like a fragmented one.
                check_size(payload.len(), self.max_message)?;
                if h.fin {
                    Some(self.complete(text, h.compressed, payload)?)
                } else {
                    self.hold(payload.len())?;
                    self.message = Some(Box::new(Partial {
                        text,
                        compressed: h.compressed,
                        payload,
                    }));
                    None
                }
            }
            OP_CONTINUE => {
                if h.compressed {
                    // RSV1 belongs on a message's first frame only (§6.1).
                    return Err(ProtocolError::NonZeroReservedBits.into());
                }
                let Some(held) = self.message.as_ref().map(|m| m.payload.len()) else {
                    return Err(ProtocolError::UnexpectedContinueFrame.into());
                };
                check_size(held + payload.len(), self.max_message)?;
                self.hold(payload.len())?;
                if let Some(m) = &mut self.message {
                    m.payload.extend_from_slice(&payload);
                }
                if h.fin {
                    let m = *self.message.take().expect("checked above");
                    if let Some(b) = &self.budget {
                        b.release(m.payload.len());
                    }
                    Some(self.complete(m.text, m.compressed, m.payload)?)
                } else {
                    None
                }
            }
            _ => unreachable!("parse_head refuses other opcodes"),
        };
        Ok(Some((used, message)))
    }

    /// The next message from what is already read, if there is one.
    fn next_pending(&mut self) -> Result<Option<Message>, Error> {
        while self.pending_at < self.pending.len() {
            let pending = std::mem::take(&mut self.pending);
            let step = self.take(&pending[self.pending_at..]);
            self.pending = pending;
            match step? {
                None => break,
                Some((used, message)) => {
                    self.pending_at += used;
                    if message.is_some() {
                        if self.pending_at == self.pending.len() {
                            self.clear_pending();
                        }
                        return Ok(message);
                    }
                }
            }
        }
        // An incomplete frame (or nothing) is left: a fresh copy of it, so
        // the buffer never keeps a burst's capacity.
        if self.pending_at > 0 {
            self.pending = self.pending[self.pending_at..].to_vec();
            self.pending_at = 0;
        }
        Ok(None)
    }

    fn clear_pending(&mut self) {
        self.pending = Vec::new();
        self.pending_at = 0;
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(m) = self.next_pending().transpose() {
                return Poll::Ready(Some(m));
            }
            let mut stack = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut stack);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)).map_err(Error::Io)?;
            let read = rb.filled();
            if read.is_empty() {
                // The peer went away, with or without a close.
                self.done = true;
                return Poll::Ready(None);
            }
            if !self.pending.is_empty() {
                debug_assert_eq!(self.pending_at, 0, "next_pending compacts first");
                // Bytes are appended only behind an incomplete frame, whose
                // size parse_head has checked: one frame and a chunk at most.
                let bound = self.max_frame.saturating_add(14 + READ_CHUNK);
                if self.pending.len() + read.len() > bound {
                    return Poll::Ready(Some(Err(too_long(self.pending.len(), bound))));
                }
                self.pending.extend_from_slice(read);
                continue;
            }
            // The common case: whole frames in what was just read, taken
            // straight from the stack; only a remainder goes to the heap.
            let mut at = 0;
            while at < read.len() {
                match self.take(&read[at..])? {
                    None => break,
                    Some((used, message)) => {
                        at += used;
                        if let Some(m) = message {
                            if at < read.len() && !self.done {
                                self.pending = read[at..].to_vec();
                            }
                            return Poll::Ready(Some(Ok(m)));
                        }
                    }
                }
            }
            if at < read.len() {
                self.pending = read[at..].to_vec();
            }
        }
    }
}

impl<R: AsyncRead + Unpin> Stream for WsReader<R> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = this.poll_message(cx);
        if matches!(next, Poll::Ready(Some(Err(_)))) {
            this.done = true;
        }
        if this.done {
            // Nothing more will be read: whatever followed is dropped.
            this.clear_pending();
            this.drop_message();
        }
        next
    }
}

/// The header of the frame at the front of `buf`, once the whole frame is there.
fn parse_head(buf: &[u8], max_frame: usize, inflate: bool) -> Result<Option<Head>, Error> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let compressed = b0 & 0x40 != 0;
    // RSV2 and RSV3 never; RSV1 only with deflate, on a data frame (a
    // continuation's RSV1 is refused by the caller, which knows the message).
    let rsv1_ok = inflate && matches!(opcode, OP_TEXT | OP_BINARY | OP_CONTINUE);
    if b0 & 0x30 != 0 || (compressed && !rsv1_ok) {
        return Err(ProtocolError::NonZeroReservedBits.into());
    }
    match opcode {
        OP_CONTINUE | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame.into());
            }
            if b1 & 0x7F > 125 {
                return Err(ProtocolError::ControlFrameTooBig.into());
            }
        }
        3..=7 => return Err(ProtocolError::UnknownDataFrameType(opcode).into()),
        _ => return Err(ProtocolError::UnknownControlFrameType(opcode).into()),
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::UnmaskedFrameFromClient.into());
    }
    let (len, at) =
        match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if n >> 63 != 0 {
                    return Err(ProtocolError::InvalidHeader(Box::new(
                        http::HeaderName::from_static("payload-length"),
                    ))
                    .into());
                }
                (n, 10)
            }
            n => (n as u64, 2),
        };
    if len > max_frame as u64 {
        return Err(too_long(
            usize::try_from(len).unwrap_or(usize::MAX),
            max_frame,
        ));
    }
    let len = len as usize;
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    let header = at + 4;
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some(Head {
        fin,
        compressed,
        opcode,
        mask,
        header,
        len,
    }))
}

fn check_size(size: usize, max_message: usize) -> Result<(), Error> {
    if size > max_message {
        return Err(too_long(size, max_message));
    }
    Ok(())
}

fn too_long(size: usize, max_size: usize) -> Error {
    Error::Capacity(CapacityError::MessageTooLong { size, max_size })
}

fn complete(text: bool, payload: Vec<u8>) -> Result<Message, Error> {
    if !text {
        return Ok(Message::Binary(Bytes::from(payload)));
    }
    match String::from_utf8(payload) {
        Ok(s) => Ok(Message::Text(Utf8Bytes::from(s))),
        Err(e) => Err(Error::Utf8(e.to_string())),
    }
}

fn close_frame(payload: Vec<u8>) -> Result<Option<CloseFrame>, Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::InvalidCloseSequence.into()),
        _ => {
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            let reason =
                String::from_utf8(payload[2..].to_vec()).map_err(|e| Error::Utf8(e.to_string()))?;
            Ok(Some(if code.is_allowed() {
                CloseFrame {
                    code,
                    reason: Utf8Bytes::from(reason),
                }
            } else {
                CloseFrame {
                    code: CloseCode::Protocol,
                    reason: Utf8Bytes::from_static("Protocol violation"),
                }
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    /// A client frame, masked, encoded here independently of the reader.
    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
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
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// What the reader makes of `bytes`, written in chunks of `chunk`.
    async fn read_all(bytes: Vec<u8>, chunk: usize, max: usize) -> Vec<Result<Message, Error>> {
        read_with(bytes, chunk, max, false).await
    }

    /// What a reader that negotiated permessage-deflate makes of `bytes`.
    async fn read_inflating(bytes: Vec<u8>, max: usize) -> Vec<Result<Message, Error>> {
        read_with(bytes, 4096, max, true).await
    }

    async fn read_with(
        bytes: Vec<u8>,
        chunk: usize,
        max: usize,
        inflate: bool,
    ) -> Vec<Result<Message, Error>> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for part in bytes.chunks(chunk.max(1)) {
                a.write_all(part).await.unwrap();
            }
        });
        let mut r = WsReader::new(b, max, max);
        if inflate {
            r = r.with_inflate();
        }
        let mut got = Vec::new();
        while let Some(m) = r.next().await {
            let err = m.is_err();
            got.push(m);
            if err {
                break;
            }
        }
        writer.await.unwrap();
        assert!(
            r.pending.capacity() == 0 && r.message.is_none(),
            "nothing kept at the end"
        );
        got
    }

    /// A message deflated as RFC 7692 says (its 00 00 ff ff tail removed),
    /// by flate2's writer rather than herdgate's compressor.
    fn deflated(text: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(text).unwrap();
        e.flush().unwrap(); // a sync flush: ends with 00 00 ff ff
        let mut z = e.get_ref().clone();
        assert!(z.ends_with(&[0, 0, 0xff, 0xff]));
        z.truncate(z.len() - 4);
        z
    }

    #[tokio::test]
    async fn compressed_messages_are_read_only_when_negotiated() {
        let text =
            r#"{"event":"client-x","channel":"private-a","data":{"n":"aaaaaaaaaaaaaaaaaaaaaa"}}"#;
        let z = deflated(text.as_bytes());
        let whole = masked(true, 0x40 | OP_TEXT, &z);
        let got = read_inflating(
            [whole.clone(), masked(true, OP_TEXT, b"plain")].concat(),
            1 << 16,
        )
        .await;
        assert_eq!(
            texts(&got),
            [text, "plain"],
            "compressed and plain messages mix"
        );
        // Fragmented: RSV1 on the first frame only.
        let (head, tail) = z.split_at(z.len() / 2);
        let frags = [
            masked(false, 0x40 | OP_TEXT, head),
            masked(true, OP_CONTINUE, tail),
        ]
        .concat();
        assert_eq!(texts(&read_inflating(frags, 1 << 16).await), [text]);
        // RSV1 on a continuation, on a control frame, or without deflate: 1002.
        let bad_cont = [
            masked(false, 0x40 | OP_TEXT, head),
            masked(true, 0x40 | OP_CONTINUE, tail),
        ]
        .concat();
        let ping = masked(true, 0x40 | OP_PING, b"");
        for (bytes, inflating) in [(bad_cont, true), (ping, true), (whole, false)] {
            let got = if inflating {
                read_inflating(bytes, 1 << 16).await
            } else {
                read_all(bytes, 4096, 1 << 16).await
            };
            assert!(
                matches!(
                    got.last(),
                    Some(Err(Error::Protocol(ProtocolError::NonZeroReservedBits)))
                ),
                "{got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_deflate_bomb_is_too_long_and_garbage_is_invalid() {
        let bomb = deflated(&vec![b'a'; 4 << 20]);
        assert!(bomb.len() < 8 << 10);
        let got = read_inflating(masked(true, 0x40 | OP_TEXT, &bomb), 1 << 16).await;
        assert!(
            matches!(got.last(), Some(Err(Error::Capacity(_)))),
            "a 4 MiB result of an 8 KiB frame is over the 64 KiB bound: {got:?}"
        );
        let got = read_inflating(masked(true, 0x40 | OP_TEXT, &[0xff; 32]), 1 << 16).await;
        assert!(
            matches!(got.last(), Some(Err(Error::Utf8(r))) if r == INVALID_DEFLATE),
            "{got:?}"
        );
        // Within max_message but past the ratio: 30 KB from a few dozen bytes.
        let dense = deflated(&vec![b'a'; 30_000]);
        assert!(MAX_INFLATE_RATIO * dense.len() + INFLATE_SLACK < 30_000);
        let got = read_inflating(masked(true, 0x40 | OP_TEXT, &dense), 1 << 16).await;
        assert!(
            matches!(got.last(), Some(Err(Error::Capacity(_)))),
            "{got:?}"
        );
        // Honest JSON of the same size compresses far less, and is read.
        let json: String = (0..400)
            .map(|i| {
                format!(
                    r#"{{"id":{i},"name":"user-{}","score":{}}},"#,
                    i * 7919 % 1000,
                    i * 31 % 97
                )
            })
            .collect();
        let z = deflated(json.as_bytes());
        let got = read_inflating(masked(true, 0x40 | OP_TEXT, &z), 1 << 16).await;
        assert_eq!(texts(&got), [json]);
    }

    fn texts(got: &[Result<Message, Error>]) -> Vec<String> {
        got.iter()
            .filter_map(|m| match m {
                Ok(Message::Text(t)) => Some(t.as_str().to_string()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn reads_what_a_tungstenite_client_sends() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let big = "é".repeat(40_000);
        let sent = big.clone();
        let client = tokio::spawn(async move {
            let mut ws = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
            ws.send(Message::text("hello")).await.unwrap();
            ws.send(Message::text(sent)).await.unwrap();
            ws.send(Message::Ping(Bytes::from_static(b"p")))
                .await
                .unwrap();
            ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
            ws.close(None).await.unwrap();
        });
        let mut r = WsReader::new(b, 1 << 20, 1 << 20);
        let mut got = Vec::new();
        while let Some(m) = r.next().await {
            got.push(m.unwrap());
            if r.pending.is_empty() {
                assert_eq!(r.pending.capacity(), 0, "no buffer kept between messages");
            }
        }
        client.await.unwrap();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], Message::text("hello"));
        assert_eq!(got[1], Message::text(big));
        assert_eq!(got[2], Message::Ping(Bytes::from_static(b"p")));
        assert_eq!(got[3], Message::binary(vec![1, 2, 3]));
        assert!(matches!(&got[4], Message::Close(_)));
    }

    #[tokio::test]
    async fn frames_split_anywhere_or_packed_together_read_the_same() {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for i in 0..50 {
            let t = format!("{i}:{}", "x".repeat(i * 37));
            bytes.extend(masked(true, OP_TEXT, t.as_bytes()));
            want.push(t);
        }
        // A fragmented message with a ping between its fragments.
        bytes.extend(masked(false, OP_TEXT, b"frag"));
        bytes.extend(masked(true, OP_PING, b"mid"));
        bytes.extend(masked(false, OP_CONTINUE, b"men"));
        bytes.extend(masked(true, OP_CONTINUE, b"ted"));
        want.push("fragmented".into());
        bytes.extend(masked(true, OP_CLOSE, &[0x03, 0xE8, b'o', b'k']));
        bytes.extend(masked(true, OP_TEXT, b"after the close: never read"));
        for chunk in [1, 3, 7, 100, 4096, 1 << 20] {
            let got = read_all(bytes.clone(), chunk, 1 << 20).await;
            assert_eq!(texts(&got), want, "chunk {chunk}");
            assert!(got
                .iter()
                .any(|m| matches!(m, Ok(Message::Ping(p)) if &p[..] == b"mid")));
            match got.last() {
                Some(Ok(Message::Close(Some(c)))) => {
                    assert_eq!(u16::from(c.code), 1000);
                    assert_eq!(c.reason.as_str(), "ok");
                }
                other => panic!("chunk {chunk}: ended with {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn bad_frames_are_refused_as_tungstenite_did() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let mut rsv = masked(true, OP_TEXT, b"x");
        rsv[0] |= 0x40;
        type Case = (&'static str, Vec<u8>, fn(&Error) -> bool);
        let cases: Vec<Case> = vec![
            ("unmasked", unmasked, |e| {
                matches!(e, Error::Protocol(ProtocolError::UnmaskedFrameFromClient))
            }),
            ("reserved bit", rsv, |e| {
                matches!(e, Error::Protocol(ProtocolError::NonZeroReservedBits))
            }),
            ("data opcode 3", masked(true, 3, b""), |e| {
                matches!(e, Error::Protocol(ProtocolError::UnknownDataFrameType(3)))
            }),
            ("control opcode 11", masked(true, 0xB, b""), |e| {
                matches!(
                    e,
                    Error::Protocol(ProtocolError::UnknownControlFrameType(0xB))
                )
            }),
            ("fragmented ping", masked(false, OP_PING, b""), |e| {
                matches!(e, Error::Protocol(ProtocolError::FragmentedControlFrame))
            }),
            ("126-byte ping", masked(true, OP_PING, &[0; 126]), |e| {
                matches!(e, Error::Protocol(ProtocolError::ControlFrameTooBig))
            }),
            ("lone continuation", masked(true, OP_CONTINUE, b"x"), |e| {
                matches!(e, Error::Protocol(ProtocolError::UnexpectedContinueFrame))
            }),
            (
                "text inside a fragmented message",
                [masked(false, OP_TEXT, b"a"), masked(true, OP_TEXT, b"b")].concat(),
                |e| matches!(e, Error::Protocol(ProtocolError::ExpectedFragment(_))),
            ),
            (
                "frame over the limit",
                masked(true, OP_TEXT, &[b'a'; 1001]),
                |e| matches!(e, Error::Capacity(_)),
            ),
            (
                "message over the limit in fragments",
                [
                    masked(false, OP_TEXT, &[b'a'; 600]),
                    masked(true, OP_CONTINUE, &[b'a'; 600]),
                ]
                .concat(),
                |e| matches!(e, Error::Capacity(_)),
            ),
            ("invalid UTF-8", masked(true, OP_TEXT, &[0xC3, 0x28]), |e| {
                matches!(e, Error::Utf8(_))
            }),
            ("one-byte close", masked(true, OP_CLOSE, &[3]), |e| {
                matches!(e, Error::Protocol(ProtocolError::InvalidCloseSequence))
            }),
            (
                "close reason not UTF-8",
                masked(true, OP_CLOSE, &[3, 0xE8, 0xFF]),
                |e| matches!(e, Error::Utf8(_)),
            ),
            (
                "a 2^63 length",
                [vec![0x81, 0xFF], vec![0x80; 8], vec![0; 4]].concat(),
                |e| matches!(e, Error::Protocol(_)),
            ),
        ];
        for (name, bytes, is) in cases {
            let got = read_all(bytes, 2, 1000).await;
            match got.last() {
                Some(Err(e)) => assert!(is(e), "{name}: got {e:?}"),
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
        // A close with a code not allowed on the wire reads as 1002.
        let got = read_all(masked(true, OP_CLOSE, &1005u16.to_be_bytes()), 2, 1000).await;
        assert!(
            matches!(&got[..], [Ok(Message::Close(Some(c)))] if u16::from(c.code) == 1002),
            "{got:?}"
        );
        // An empty close, then nothing.
        let got = read_all(masked(true, OP_CLOSE, b""), 2, 1000).await;
        assert!(matches!(&got[..], [Ok(Message::Close(None))]), "{got:?}");
        // The stream ending mid-frame is the end, not a message.
        let mut cut = masked(true, OP_TEXT, b"never finished");
        cut.truncate(9);
        assert!(read_all(cut, 2, 1000).await.is_empty());
    }
}
