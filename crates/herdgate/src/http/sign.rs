//! HTTP API request verification, exactly as the Pusher docs specify.
//!
//! The signed string is `METHOD\nPATH\nQUERY`, where QUERY is every query
//! parameter but `auth_signature`, keys lowercased, sorted, written `k=v`
//! (values unescaped) and joined with `&`. A non-empty body must come with a
//! matching `body_md5`.
//!
//! The signature covers everything but the body (whose digest it covers
//! through `body_md5`), so a request is checked in two steps:
//! [`verify_head`] before a byte of the body is read — an unsigned client
//! cannot make the node buffer anything — and [`verify_body`] after. Timestamps more than 600 s away from the server's
//! clock are refused, which bounds how long a captured request can be replayed.

use super::ApiError;
use crate::apps::App;
use md5::{Digest, Md5};

pub const MAX_CLOCK_SKEW_SECS: i64 = 600;

/// Query parameters, percent-decoded, in the order given; keys lowercased,
/// as the signature has them (so `AUTH_KEY=` is read as it was signed).
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k).to_lowercase(), percent_decode(v))
        })
        .collect()
}

/// `%XX` decoding; malformed escapes are kept as written. `+` is left alone:
/// the SDKs sign and send values unescaped, so a `+` is a plus.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hexval(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn get<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Both steps, for a request whose body is already read.
pub fn verify(
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    app: &App,
    now: i64,
) -> Result<(), ApiError> {
    verify_head(method, path, params, app, now)?;
    verify_body(params, body)
}

/// Everything the signature covers: key, timestamp, version and the HMAC
/// over method, path and query (`body_md5` included). Needs no body.
pub fn verify_head(
    method: &str,
    path: &str,
    params: &[(String, String)],
    app: &App,
    now: i64,
) -> Result<(), ApiError> {
    let unauthorized = |m: &str| Err(ApiError::Unauthorized(m.to_string()));
    let Some(key) = get(params, "auth_key") else {
        return unauthorized("missing auth_key");
    };
    if key != app.key {
        return unauthorized("auth_key does not belong to this app");
    }
    let Some(signature) = get(params, "auth_signature") else {
        return unauthorized("missing auth_signature");
    };
    let Some(ts) = get(params, "auth_timestamp") else {
        return unauthorized("missing auth_timestamp");
    };
    let Ok(ts) = ts.parse::<i64>() else {
        return unauthorized("auth_timestamp is not a number");
    };
    // abs_diff: `now - ts` overflows for a timestamp near i64::MIN/MAX.
    if now.abs_diff(ts) > MAX_CLOCK_SKEW_SECS as u64 {
        return Err(ApiError::Unauthorized(format!(
            "auth_timestamp is more than {MAX_CLOCK_SKEW_SECS} s from server time {now}"
        )));
    }
    if let Some(v) = get(params, "auth_version") {
        if v != "1.0" {
            return unauthorized("auth_version must be 1.0");
        }
    }
    let to_sign = string_to_sign(method, path, params);
    if !crate::auth::verify_hex(&app.secret, &to_sign, signature) {
        return unauthorized("invalid signature");
    }
    Ok(())
}

/// The body against the signed `body_md5` (a non-empty body must have one).
pub fn verify_body(params: &[(String, String)], body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let expected = hex::encode(Md5::digest(body));
    match get(params, "body_md5") {
        Some(md5) if md5.eq_ignore_ascii_case(&expected) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized(
            "body_md5 does not match the body".into(),
        )),
        None => Err(ApiError::Unauthorized("missing body_md5".into())),
    }
}

pub fn string_to_sign(method: &str, path: &str, params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            enable_client_events: true,
            enabled: true,
            allowed_origins: Vec::new(),
            features: Default::default(),
        }
    }

    const BODY: &str = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
    const SIG: &str = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";

    fn query(sig: &str) -> Vec<(String, String)> {
        parse_query(&format!(
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f&auth_signature={sig}"
        ))
    }

    #[test]
    fn pusher_docs_vector() {
        assert_eq!(
            hex::encode(Md5::digest(BODY)),
            "ec365a775a4cd0599faeb73354201b6f"
        );
        let q = query(SIG);
        assert_eq!(
            string_to_sign("POST", "/apps/3/events", &q),
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        assert_eq!(
            verify(
                "POST",
                "/apps/3/events",
                &q,
                BODY.as_bytes(),
                &app(),
                1353088179
            ),
            Ok(())
        );
    }

    #[test]
    fn refusals() {
        let q = query(SIG);
        let a = app();
        let stale = verify(
            "POST",
            "/apps/3/events",
            &q,
            BODY.as_bytes(),
            &a,
            1353088179 + 601,
        );
        assert!(matches!(stale, Err(ApiError::Unauthorized(m)) if m.contains("600")));
        let ok_skew = verify(
            "POST",
            "/apps/3/events",
            &q,
            BODY.as_bytes(),
            &a,
            1353088179 - 600,
        );
        assert_eq!(ok_skew, Ok(()));
        let tampered = verify("POST", "/apps/3/events", &q, b"{}", &a, 1353088179);
        assert!(matches!(tampered, Err(ApiError::Unauthorized(m)) if m.contains("body_md5")));
        let bad_sig = verify(
            "POST",
            "/apps/3/events",
            &query(&"0".repeat(64)),
            BODY.as_bytes(),
            &a,
            1353088179,
        );
        assert!(bad_sig.is_err());
        let wrong_path = verify(
            "POST",
            "/apps/4/events",
            &q,
            BODY.as_bytes(),
            &a,
            1353088179,
        );
        assert!(wrong_path.is_err());
        assert!(verify("POST", "/apps/3/events", &[], b"", &a, 0).is_err());
    }

    #[test]
    fn query_decoding() {
        assert_eq!(percent_decode("a%2Cb%2c"), "a,b,");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(
            parse_query("AUTH_Key=K"),
            vec![("auth_key".into(), "K".into())]
        );
        assert_eq!(
            parse_query("x=1&&y&z=%41"),
            vec![
                ("x".into(), "1".into()),
                ("y".into(), "".into()),
                ("z".into(), "A".into())
            ]
        );
    }
}
