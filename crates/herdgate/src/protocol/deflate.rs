//! permessage-deflate (RFC 7692), compressed once per broadcast.
//!
//! Why without context takeover, both ways: a deflate window kept per
//! socket costs tens of KiB for the socket's whole life and makes every
//! delivery a compression of its own. herdgate answers every accepted offer
//! with `server_no_context_takeover` and `client_no_context_takeover`, so
//! each message is compressed on its own: a room's event is compressed
//! once ([`super::Frame::wire`] keeps the result beside the text) and every
//! socket that negotiated the extension gets the same bytes, and a client's
//! message is inflated on its own, with no state kept between messages.
//!
//! What is negotiated ([`negotiate`]): the first offer of
//! `permessage-deflate` whose parameters are valid and can be met. herdgate
//! compresses with a 32 KiB window only (the deflate implementation it uses
//! has no smaller one), so an offer with `server_max_window_bits` below 15
//! is declined; any `client_max_window_bits` is fine (a smaller window is
//! always inflated by a 32 KiB one).
//!
//! Bounds: a compressed message is kept only when smaller than its text,
//! so a frame holds at most twice its text; messages under
//! `compression.min_bytes` go plain (RFC 7692 §6: per message); inflating
//! stops at the socket's `max_message_bytes` (an oversized result is
//! answered 1009, like an oversized plain message).

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The tail every sync-flushed deflate stream ends with, removed on the
/// wire and put back before inflating (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// How a socket that negotiated the extension gets its frames: messages
/// from `min_bytes` on are compressed at `level`. Node-wide settings
/// (`[compression]`), copied into each such socket's writer and its
/// in-place handle: packed into four bytes (and `Option<Deflate>` too), so
/// that neither grows and an idle socket costs what it did without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate(std::num::NonZeroU32);

impl Deflate {
    /// The largest `min_bytes` (`compression.min_bytes` is checked against it).
    pub const MAX_MIN_BYTES: u32 = crate::config::MAX_COMPRESSION_MIN_BYTES;

    /// `min_bytes` is capped at [`Self::MAX_MIN_BYTES`], `level` at 9.
    pub fn new(min_bytes: u32, level: u8) -> Deflate {
        let packed =
            (1 << 31) | (u32::from(level.min(9)) << 24) | min_bytes.min(Self::MAX_MIN_BYTES);
        Deflate(std::num::NonZeroU32::new(packed).expect("bit 31 is set"))
    }

    pub fn min_bytes(self) -> u32 {
        self.0.get() & Self::MAX_MIN_BYTES
    }

    pub fn level(self) -> u8 {
        ((self.0.get() >> 24) & 0x0f) as u8
    }
}

/// The answer to a client's offers: the `Sec-WebSocket-Extensions` value
/// to send back, or `None` to decline them all.
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    for header in offers {
        for offer in split_outside_quotes(header, ',') {
            if let Some(answer) = accept(offer) {
                return Some(answer);
            }
        }
    }
    None
}

/// One offer (`name; param; param=value`), if herdgate can accept it.
fn accept(offer: &str) -> Option<&'static str> {
    let mut parts = split_outside_quotes(offer, ';');
    if !parts.next()?.trim().eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits_15 = false;
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p.trim(), None),
        };
        let i = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                match value.and_then(window_bits) {
                    Some(15) => server_bits_15 = true,
                    // Valid but smaller than the window we compress with:
                    // decline (§7.1.2.1), let the next offer be tried.
                    Some(_) => return None,
                    None => return None,
                }
                2
            }
            "client_max_window_bits" => {
                if value.is_some() && value.and_then(window_bits).is_none() {
                    return None;
                }
                3
            }
            // An unknown parameter, or a value where none is allowed.
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None; // a parameter given twice makes the offer invalid (§7)
        }
    }
    Some(if server_bits_15 {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"
    } else {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    })
}

/// A window size parameter: 8 to 15, digits only (§7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (8..=15).contains(&n).then_some(n)
}

fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let mut out = Vec::new();
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out.into_iter()
}

thread_local! {
    /// One compressor per thread and level, reset between messages (a
    /// fresh one allocates and clears its tables: far more than a reset).
    static COMPRESSOR: RefCell<Option<(u8, Compress)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// `herdgate_compression_bytes_total{stage}`: text compressed, and what it
/// became. Once per compression (a broadcast is compressed once for all).
fn count(before: usize, after: usize) {
    static C: std::sync::OnceLock<(metrics::Counter, metrics::Counter)> =
        std::sync::OnceLock::new();
    let (i, o) = C.get_or_init(|| {
        (
            metrics::counter!("herdgate_compression_bytes_total", "stage" => "in"),
            metrics::counter!("herdgate_compression_bytes_total", "stage" => "out"),
        )
    });
    i.increment(before as u64);
    o.increment(after as u64);
}

/// `text` deflated as one message with no context (the trailing
/// `00 00 ff ff` removed), or `None` when that is not smaller.
pub fn compress(text: &[u8], level: u8) -> Option<Bytes> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let c = match &mut *cell {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            slot => {
                let fresh = Compress::new(Compression::new(u32::from(level.min(9))), false);
                &mut slot.insert((level, fresh)).1
            }
        };
        // Room for the text and the deflate overhead, so the loop ends
        // after one round for anything that compresses at all.
        let mut out = Vec::with_capacity(text.len() + text.len() / 16 + 64);
        let in_at = c.total_in();
        loop {
            let done = (c.total_in() - in_at) as usize;
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = (c.total_in(), out.len());
            c.compress_vec(&text[done..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = (c.total_in() - in_at) as usize;
            if done == text.len() && out.len() < out.capacity() && out.ends_with(&TAIL) {
                break;
            }
            if (c.total_in(), out.len()) == before && out.len() < out.capacity() {
                return None; // no progress with room to make it: send it plain
            }
        }
        out.truncate(out.len() - TAIL.len());
        count(text.len(), out.len());
        (out.len() < text.len()).then(|| Bytes::from(out))
    })
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("inflated message is over {max} bytes")]
    TooLong { max: usize },
    #[error("invalid deflate data")]
    Invalid,
}

/// A client's compressed message inflated, if it is at most `max` bytes.
pub fn inflate(mut payload: Vec<u8>, max: usize) -> Result<Vec<u8>, InflateError> {
    payload.extend_from_slice(&TAIL);
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let d = match &mut *cell {
            Some(d) => {
                d.reset(false);
                d
            }
            slot => slot.insert(Decompress::new(false)),
        };
        let mut out: Vec<u8> =
            Vec::with_capacity((payload.len() * 4).max(64).min(max.saturating_add(1)));
        loop {
            if out.len() == out.capacity() {
                // Grow, but never past `max` + 1: one byte over it is
                // enough to know the message is too long.
                out.reserve_exact(out.capacity().min(max.saturating_add(1) - out.len()).max(1));
            }
            let (in_before, out_before) = (d.total_in(), out.len());
            let status = d
                .decompress_vec(
                    &payload[in_before as usize..],
                    &mut out,
                    FlushDecompress::Sync,
                )
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max {
                return Err(InflateError::TooLong { max });
            }
            let all_read = d.total_in() as usize == payload.len();
            if status == Status::StreamEnd || (all_read && out.len() < out.capacity()) {
                break;
            }
            if d.total_in() == in_before && out.len() == out_before && out.len() < out.capacity() {
                return Err(InflateError::Invalid); // no progress with room to make it
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    /// Every idle socket holds two of these (its writer's and its in-place
    /// handle's): they must not grow a socket.
    #[test]
    fn settings_fit_in_four_bytes_and_keep_their_values() {
        assert_eq!(std::mem::size_of::<Option<Deflate>>(), 4);
        let d = Deflate::new(256, 6);
        assert_eq!((d.min_bytes(), d.level()), (256, 6));
        let d = Deflate::new(u32::MAX, 200);
        assert_eq!((d.min_bytes(), d.level()), (Deflate::MAX_MIN_BYTES, 9));
        assert_eq!(Deflate::new(0, 1).min_bytes(), 0);
    }

    #[test]
    fn offers_browsers_and_node_make_are_accepted() {
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"]),
            Some(PLAIN)
        );
        assert_eq!(negotiate(["permessage-deflate"]), Some(PLAIN));
        assert_eq!(
            negotiate([
                "permessage-deflate; client_max_window_bits=10; server_no_context_takeover"
            ]),
            Some(PLAIN)
        );
        assert_eq!(
            negotiate(["Permessage-Deflate; server_max_window_bits=15"]),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"
            )
        );
    }

    #[test]
    fn offers_that_cannot_be_met_are_declined_and_the_next_tried() {
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=10"]),
            None
        );
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=10, permessage-deflate"]),
            Some(PLAIN),
            "the fallback offer"
        );
        assert_eq!(
            negotiate(["x-webkit-deflate-frame", "permessage-deflate"]),
            Some(PLAIN),
            "across header lines"
        );
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; mystery",
            "deflate-frame",
            "",
        ] {
            assert_eq!(negotiate([bad]), None, "{bad:?}");
        }
    }

    /// An independent inflater (flate2's streaming reader over the
    /// compressed bytes with the tail put back) reads what we compress.
    #[test]
    fn compressed_messages_inflate_to_the_text() {
        use std::io::Read;
        let text = format!(
            r#"{{"event":"score","channel":"match-1","data":"{}"}}"#,
            r#"{\"home\":1,\"away\":2,\"minute\":44}"#.repeat(40)
        );
        for level in [1, 6, 9] {
            let z = compress(text.as_bytes(), level).expect("repetitive JSON compresses");
            assert!(
                z.len() * 3 < text.len(),
                "level {level}: {} of {}",
                z.len(),
                text.len()
            );
            let mut wire = z.to_vec();
            // The tail back, then an empty final block so the stream ends.
            wire.extend_from_slice(&TAIL);
            wire.extend_from_slice(&[0x03, 0x00]);
            let mut back = String::new();
            flate2::read::DeflateDecoder::new(&wire[..])
                .read_to_string(&mut back)
                .unwrap();
            assert_eq!(back, text);
            assert_eq!(inflate(z.to_vec(), 1 << 20).unwrap(), text.as_bytes());
        }
        assert_eq!(compress(b"ab", 6), None, "not smaller: sent plain");
        // Reset between messages: a second message does not refer to the first.
        let a = compress(text.as_bytes(), 6).unwrap();
        let b = compress(text.as_bytes(), 6).unwrap();
        assert_eq!(a, b, "no context carried over");
    }

    #[test]
    fn a_bomb_stops_at_the_bound_and_garbage_is_refused() {
        let zeros = vec![b'0'; 8 << 20];
        let z = compress(&zeros, 9).unwrap();
        assert!(z.len() < 16 << 10, "8 MiB of zeros is {} bytes", z.len());
        assert_eq!(
            inflate(z.to_vec(), 64 << 10),
            Err(InflateError::TooLong { max: 64 << 10 })
        );
        assert_eq!(
            inflate(z.to_vec(), 8 << 20).unwrap().len(),
            8 << 20,
            "exactly at the bound"
        );
        assert_eq!(inflate(vec![0xff; 40], 1 << 20), Err(InflateError::Invalid));
        assert_eq!(inflate(Vec::new(), 10).unwrap(), b"", "an empty message");
    }
}
