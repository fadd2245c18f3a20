//! A certificate's notAfter, read with x509-parser (run on every
//! certificate file at start and on reload). Must never panic or loop,
//! whatever the file holds; a date it returns is a plausible instant.
#![no_main]

use herdgate::tls::der::not_after;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Some(t) = not_after(bytes) {
        // Years 1950..=9999 as UTCTime/GeneralizedTime allow.
        assert!((-631_152_000..=253_402_300_799).contains(&t), "{t}");
    }
});
