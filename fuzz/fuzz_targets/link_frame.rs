//! The cluster link's framing and message decoder: what a peer (or anything
//! that reaches the link port) sends. Must never panic or allocate beyond
//! the frame; every message that decodes encodes back to a frame that
//! decodes to the same message.
#![no_main]

use bytes::BytesMut;
use herdgate::cluster::link::{codec, decode, encode, frame_bytes};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|bytes: &[u8]| {
    let mut c = codec();
    let mut buf = BytesMut::from(bytes);
    // Frames as the link reads them: stop at the first framing error (the
    // link closes there) or when the rest is an incomplete frame.
    while let Ok(Some(frame)) = c.decode(&mut buf) {
        if let Ok(msg) = decode(&frame) {
            let again = decode(&encode(&msg)).expect("an encoded message decodes");
            assert_eq!(again, msg, "decode(encode(m)) == m");
            let framed = frame_bytes(std::slice::from_ref(&msg));
            let mut c2 = codec();
            let mut b2 = framed.clone();
            let f2 = c2.decode(&mut b2).expect("own frame").expect("complete");
            assert_eq!(decode(&f2).expect("decodes"), msg);
        }
    }
    // The same bytes as one message without framing.
    let _ = decode(bytes);
});
