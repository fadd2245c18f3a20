//! The HTTP API's request check: query parsing, percent-decoding, the string
//! to sign and `verify`. The input is `METHOD\nPATH\nQUERY\nBODY` (the body
//! is everything after the third newline and may hold anything). Must never
//! panic, whatever the pieces hold.
#![no_main]

use herdgate::apps::{App, Apps};
use herdgate::auth;
use herdgate::config::AppConfig;
use herdgate::http::sign;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, LazyLock};

/// The Pusher docs' example app; seeds are signed for it at `NOW`. Built
/// through `Apps` so that new `App` fields do not break this target.
static APP: LazyLock<Arc<App>> = LazyLock::new(|| {
    let config = AppConfig {
        id: "3".into(),
        key: "278d425bdf160c739803".into(),
        secret: "7ad3773142a6692b25b8".into(),
        ..Default::default()
    };
    Apps::new(&[config]).by_id("3").expect("configured").clone()
});
const NOW: i64 = 1353088179;

fuzz_target!(|bytes: &[u8]| {
    let mut parts = bytes.splitn(4, |&b| b == b'\n');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();

    // The API also percent-decodes path segments.
    for seg in path.split('/') {
        let decoded = sign::percent_decode(seg);
        if !seg.contains('%') {
            assert_eq!(decoded, seg);
        }
        assert!(decoded.len() <= seg.len() * 3);
    }
    let params = sign::parse_query(&query);
    let to_sign = sign::string_to_sign(&method, &path, &params);
    assert!(to_sign.starts_with(&format!("{method}\n{path}\n")));

    let verdict = sign::verify(&method, &path, &params, body, &APP, NOW);
    // A fuzzer cannot forge HMAC-SHA256: only a seed signed with the secret
    // can pass, and then the signed string must match the given signature.
    if verdict.is_ok() {
        let sig = params
            .iter()
            .find(|(k, _)| k == "auth_signature")
            .map(|(_, v)| v.as_str())
            .unwrap();
        assert!(sig.eq_ignore_ascii_case(&auth::sign(&APP.secret, &to_sign)));
    }

    // Re-signed with the secret, the same request must pass unless one of the
    // other checks (key, timestamp, version, body_md5) refuses it.
    let mut resigned: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .cloned()
        .collect();
    let sig = auth::sign(&APP.secret, &sign::string_to_sign(&method, &path, &resigned));
    resigned.push(("auth_signature".into(), sig));
    if let Err(e) = sign::verify(&method, &path, &resigned, body, &APP, NOW) {
        assert!(!e.to_string().contains("invalid signature"), "{e}");
    }
});
