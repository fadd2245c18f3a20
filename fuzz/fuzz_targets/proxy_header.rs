//! The PROXY protocol v1/v2 header parser: whatever arrives first on a
//! connection. Must never panic; a complete header is never longer than the
//! input, and a complete header parses the same with nothing after it.
#![no_main]

use herdgate::realaddr::{parse_header, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match parse_header(bytes) {
        Ok(Header::Complete { client, len }) => {
            assert!(len <= bytes.len());
            assert_eq!(
                parse_header(&bytes[..len]),
                Ok(Header::Complete { client, len }),
                "a header's verdict does not depend on what follows it"
            );
        }
        Ok(Header::Partial) => {
            // More bytes are needed: any prefix is partial or an error too.
            for cut in 0..bytes.len() {
                assert!(!matches!(
                    parse_header(&bytes[..cut]),
                    Ok(Header::Complete { .. })
                ));
            }
        }
        Err(_) => {}
    }
});
