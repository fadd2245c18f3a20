//! Inputs from fuzzing (fuzz/, see fuzz/README.md): crashes the fuzzers found,
//! minimised, and the nastiest seeds, fed to the same functions as the fuzz
//! targets. Each must give its answer (Ok or Err) without panicking.

use herdgate::apps::{App, Apps};
use herdgate::config::{AppConfig, Config};
use herdgate::http::{sign, ApiError};
use herdgate::protocol::{
    self, names, ChannelData, SigninData, SubscribeData, UnsubscribeData, UserData,
};
use herdgate::types::ConnId;
use std::sync::Arc;

const KEY: &str = "278d425bdf160c739803";
const NOW: i64 = 1353088179;

fn app() -> Arc<App> {
    let config = AppConfig {
        id: "3".into(),
        key: KEY.into(),
        secret: "7ad3773142a6692b25b8".into(),
        ..Default::default()
    };
    Apps::new(&[config]).by_id("3").unwrap().clone()
}

fn verify_query(query: &str) -> Result<(), ApiError> {
    let params = sign::parse_query(query);
    sign::verify("GET", "/apps/3/channels", &params, b"", &app(), NOW)
}

fn unauthorized_containing(r: Result<(), ApiError>, text: &str) {
    match r {
        Err(ApiError::Unauthorized(m)) => assert!(m.contains(text), "{m:?} lacks {text:?}"),
        other => panic!("expected Unauthorized({text:?}..), got {other:?}"),
    }
}

// Crash found by the api_request target (minimised with `cargo fuzz tmin`):
// `(now - ts).abs()` overflowed ("attempt to subtract with overflow") for an
// auth_timestamp near i64::MIN, before the signature was checked, so anyone
// who knows an app's public key could make a debug build panic.
#[test]
fn api_timestamp_i64_min_is_refused_without_overflow() {
    let q = format!("auth_key={KEY}&auth_timestamp=-9223372036854775808&auth_signature=00");
    unauthorized_containing(verify_query(&q), "600 s from server time");
}

#[test]
fn api_timestamp_extremes_are_refused() {
    for ts in [i64::MIN + 1, i64::MAX, i64::MAX - 1, NOW - 601, NOW + 601] {
        let q = format!("auth_key={KEY}&auth_timestamp={ts}&auth_signature=00");
        unauthorized_containing(verify_query(&q), "600 s from server time");
    }
    // Just inside the window the next check (the signature) decides.
    for ts in [NOW - 600, NOW + 600] {
        let q = format!("auth_key={KEY}&auth_timestamp={ts}&auth_signature=00");
        unauthorized_containing(verify_query(&q), "invalid signature");
    }
    for ts in [
        "99999999999999999999",
        "-9223372036854775809",
        "1e3",
        "",
        "0x10",
        " 1",
    ] {
        let q = format!("auth_key={KEY}&auth_timestamp={ts}&auth_signature=00");
        unauthorized_containing(verify_query(&q), "not a number");
    }
}

#[test]
fn percent_decode_keeps_malformed_escapes() {
    assert_eq!(sign::percent_decode("%"), "%");
    assert_eq!(sign::percent_decode("%%%"), "%%%");
    assert_eq!(sign::percent_decode("%4"), "%4");
    assert_eq!(sign::percent_decode("%%41"), "%A");
    assert_eq!(sign::percent_decode("%zz%4g"), "%zz%4g");
    assert_eq!(sign::percent_decode("%00"), "\0");
    // Invalid UTF-8 after decoding becomes U+FFFD rather than an error.
    assert_eq!(sign::percent_decode("%E2%82"), "\u{FFFD}");
    assert_eq!(sign::percent_decode("%FF%fe"), "\u{FFFD}\u{FFFD}");
    assert_eq!(sign::percent_decode("%E2%82%AC"), "€");
    // Multi-byte characters next to a '%' are not split.
    assert_eq!(sign::percent_decode("%é"), "%é");
    assert_eq!(sign::percent_decode("é%"), "é%");
}

#[test]
fn nasty_queries_parse_and_are_refused() {
    let q = "&&=&%%%&=x&AUTH_KEY=278d425bdf160c739803&auth_key&auth_signature=%";
    let params = sign::parse_query(q);
    assert_eq!(
        params,
        [
            ("", ""),
            ("%%%", ""),
            ("", "x"),
            ("auth_key", KEY),
            ("auth_key", ""),
            ("auth_signature", "%"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    // Parameter names are lowercased, as the signature has them: AUTH_KEY
    // is read as auth_key (the first one), and the timestamp is missing.
    unauthorized_containing(verify_query(q), "auth_timestamp");
    // NUL bytes and a binary body: refused, no panic.
    let params = sign::parse_query(&format!(
        "auth_key={KEY}&auth_timestamp={NOW}&auth_version=1.0\0&auth_signature=%00"
    ));
    let r = sign::verify("P\0ST", "/apps/3/\0", &params, b"\0\xff", &app(), NOW);
    unauthorized_containing(r, "auth_version");
    let s = sign::string_to_sign("P\0ST", "/\n", &params);
    assert!(s.starts_with("P\0ST\n/\n\nauth_key="), "{s:?}");
}

#[test]
fn deeply_nested_json_is_skipped_without_recursion() {
    // Raw `data` and `user_info` are skipped by serde_json's iterative
    // `ignore_value` (no recursion limit, no stack growth): any depth parses,
    // and the message size limits are what bound it.
    for depth in [200, 100_000] {
        let data = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let frame = format!(r#"{{"event":"pusher:subscribe","data":{data}}}"#);
        let f = protocol::parse_frame(&frame).unwrap();
        assert_eq!(f.data.unwrap().get().len(), 2 * depth);
        assert!(protocol::parse_data::<SubscribeData>("pusher:subscribe", f.data).is_err());
        let inner = format!(r#"{{"user_id":"1","user_info":{data}}}"#);
        let cd = serde_json::from_str::<ChannelData>(&inner).unwrap();
        assert_eq!(cd.user_info.unwrap().get().len(), 2 * depth);
    }
    // Decoded values stop at serde_json's recursion limit (128) instead.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
}

#[test]
fn string_encoded_data_nesting() {
    // Data that is a JSON string holding a JSON string (not an object): error.
    let f = protocol::parse_frame(
        r#"{"event":"pusher:subscribe","data":"\"{\\\"channel\\\":\\\"a\\\"}\""}"#,
    )
    .unwrap();
    assert!(protocol::parse_data::<SubscribeData>("pusher:subscribe", f.data).is_err());
    // A string that is not JSON at all.
    let f = protocol::parse_frame(r#"{"event":"pusher:unsubscribe","data":"nope"}"#).unwrap();
    assert!(protocol::parse_data::<UnsubscribeData>("pusher:unsubscribe", f.data).is_err());
    // A lone surrogate passes the raw frame parse but not the decoding of `data`.
    let f = protocol::parse_frame(
        r#"{"event":"pusher:signin","data":{"auth":"\u0000","user_data":"\ud800"}}"#,
    )
    .unwrap();
    assert!(protocol::parse_data::<SigninData>("pusher:signin", f.data).is_err());
    // Escaped NUL decodes; the user id check refuses it.
    let f = protocol::parse_frame(r#"{"event":"pusher:signin","data":{"auth":"\u0000","user_data":"{\"id\":\"a\\u0000b\"}"}}"#)
        .unwrap();
    let d: SigninData = protocol::parse_data("pusher:signin", f.data).unwrap();
    assert_eq!(d.auth, "\0");
    let id = serde_json::from_str::<UserData>(&d.user_data)
        .unwrap()
        .id
        .into_string();
    assert_eq!(id, "a\0b");
    assert!(names::check_user_id(&id).is_err());
}

#[test]
fn huge_numeric_user_ids() {
    // Out of f64 range: an error, not infinity.
    assert!(serde_json::from_str::<ChannelData>(r#"{"user_id":1e400}"#).is_err());
    assert!(serde_json::from_str::<UserData>(r#"{"id":-1e99999}"#).is_err());
    // Beyond u64 a number would become a lossy f64 (distinct ids colliding):
    // it is refused instead.
    let id = serde_json::from_str::<UserData>(r#"{"id":123456789012345678901234567890}"#)
        .unwrap()
        .id
        .into_string();
    assert!(names::check_user_id(&id).is_err());
    let id = serde_json::from_str::<UserData>(r#"{"id":18446744073709551615}"#)
        .unwrap()
        .id
        .into_string();
    assert_eq!(id, "18446744073709551615");
}

#[test]
fn names_with_nul_and_multibyte() {
    assert!(names::check_channel("a\0b").is_err());
    assert!(names::check_channel("#server-to-user-a\0").is_err());
    assert!(names::check_channel("#server-to-user-\u{2028}").is_err());
    assert_eq!(
        names::check_channel("#server-to-user-é"),
        Ok(names::ChannelKind::User)
    );
    // 164 bytes, not characters.
    assert!(names::check_channel(&"é".repeat(83)).is_err());
    assert!(names::check_user_id(&"é".repeat(101)).is_err());
    assert!(names::check_user_id(&"é".repeat(100)).is_ok());
    // Event names may not carry control characters to other clients.
    assert!(names::check_event_name("client-\0").is_err());
    assert!(names::check_event_name(&"é".repeat(101)).is_err());
}

#[test]
fn socket_ids() {
    assert_eq!(
        ConnId::parse("4294967295.4294967295"),
        Some(ConnId(u64::MAX))
    );
    assert_eq!(ConnId::parse("01.002"), Some(ConnId((1 << 32) | 2)));
    for bad in [
        "4294967296.0",
        "0.4294967296",
        "99999999999.1",
        "+1.2",
        "1.-2",
        "1.2.3",
        ".1",
        "1.",
        "١.1",
        "1\0.2",
        "",
    ] {
        assert_eq!(ConnId::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn config_deeply_nested_inline_tables_are_errors() {
    for depth in [200, 100_000] {
        let text = format!(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n[server]\nx = {}1{}\n",
            "{a = ".repeat(depth),
            "}".repeat(depth)
        );
        let err = Config::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("configuration error"), "{err}");
        let text = format!("x = {}1{}\n", "[".repeat(depth), "]".repeat(depth));
        assert!(Config::from_toml_str(&text).is_err());
    }
}

#[test]
fn config_nasty_values_are_errors() {
    let text = "[server]\nlisten = \"0.0.0.0:1\u{e9}\n";
    let err = Config::from_toml_str(text).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    let text = r#"
[server]
activity_timeout = "99999999999999999999h"
[limits]
max_payload_bytes = 18446744073709551615
[[apps]]
id = "1"
key = "k"
secret = "s"
"#;
    assert!(Config::from_toml_str(text).is_err());
    let text = r#"
[tls]
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
[[apps]]
id = "1"
key = "k"
secret = "s"
"#;
    let err = herdgate::parse_config(text).unwrap_err().to_string();
    assert!(err.contains("tls.cert"), "{err}");
    // NUL in strings and keys.
    assert!(Config::from_toml_str("[log]\nlevel = \"\\u0000\"\n").is_err());
    assert!(Config::from_toml_str("\"\\u0000\" = 1\n").is_err());
}

#[test]
fn certificate_dates_with_signs_or_out_of_range_fields_are_no_date() {
    // A certificate whose notAfter the fuzzer rewrote to a signed, year-126
    // GeneralizedTime: no date (before the fix: year 126, so "expired").
    let der = include_bytes!("../../../../fuzz/regressions/cert_date/signed_year.der");
    assert_eq!(herdgate::tls::der::not_after(der), None);
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

// Found by the config target (an out-of-memory, not a crash): a `log.level`
// whose field filter held `(a+)+…` was compiled as a regular expression
// into an automaton exponential in its length — over 2 GiB to check the
// config. Field values are now plain text.
#[test]
fn a_log_filter_never_compiles_a_regular_expression() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/regressions/config/regex_log_filter.toml"
    ))
    .unwrap();
    let before = peak_rss_kib();
    let errors = match Config::from_toml_str(&text) {
        Err(herdgate::config::LoadError::Invalid(e)) => e,
        other => panic!("expected errors, got {other:?}"),
    };
    assert!(errors.iter().any(|e| e.key == "log.format"), "{errors:?}");
    assert!(
        !errors.iter().any(|e| e.key == "log.level"),
        "the filter itself is valid: {errors:?}"
    );
    let grown = peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "checking it took {grown} KiB more memory"
    );
}

// Found by the ws_reader and ws_differential targets: a text or binary
// message sent whole in one frame was checked against `max_frame` only, so
// a reader whose `max_message` is below its `max_frame` yielded it (and an
// invalid one was refused as UTF-8, 1007, where tungstenite says 1009).
// Now it is refused as too long, like a fragmented message over the bound.
#[tokio::test]
async fn ws_one_frame_message_over_max_message_is_refused() {
    use futures_util::StreamExt;
    use herdgate::session::ws_reader::WsReader;
    use tokio_tungstenite::tungstenite::Error;
    for (opcode, payload) in [
        (0x81u8, &b"hello world"[..]),
        (0x82, b"hello world"),
        (0x81, b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5"),
    ] {
        // A masked client frame with a zero mask: the payload as it is.
        let mut frame = vec![opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        let mut r = WsReader::new(&frame[..], 100, 10);
        match r.next().await {
            Some(Err(Error::Capacity(_))) => {}
            other => panic!("{opcode:#x}: expected a capacity error, got {other:?}"),
        }
        assert!(r.next().await.is_none(), "nothing after the error");
        // Within both bounds the same frame reads.
        let mut r = WsReader::new(&frame[..], 100, 11);
        assert_eq!(
            r.next().await.is_some_and(|m| m.is_ok()),
            opcode == 0x82 || payload.is_ascii()
        );
    }
}

// Found by the tls_stream target: after a record that fails to decrypt,
// the read returns the error and queues rustls's alert; a second read on
// the failed stream queued the alert again, which made rustls process the
// same bad record anew and send a second fatal alert (a rustls debug
// assertion in debug builds, a duplicate alert on the wire in release).
// The alert is now taken once.
#[tokio::test]
async fn tls_reading_again_after_a_bad_record_sends_no_second_alert() {
    use herdgate::tls::stream::TlsStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = herdgate_testkit::pki::Pki::new();
    let (cert, key, _) = pki.leaf("leaf", false);
    let store = Arc::new(herdgate::tls::CertStore::load(&cert, &key).unwrap());
    let config = herdgate::tls::server_config(store).unwrap();
    let (c, s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(TlsStream::accept(config, s));
    let cfg = herdgate_testkit::tls_client_config(&pki.ca_der, &[&rustls::version::TLS13]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, c)
        .await
        .unwrap();
    let mut server = server.await.unwrap().unwrap();
    // Application data the server cannot decrypt, written under the TLS layer.
    let mut bad = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    bad.extend_from_slice(&[0u8; 32]);
    client.get_mut().0.write_all(&bad).await.unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        let err = server
            .read(&mut buf)
            .await
            .expect_err("a bad record is an error");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }
}
