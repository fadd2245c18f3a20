//! Pusher signatures, written from the protocol documentation and nothing
//! else: the signer herdgate's tests and the load tool use.
//!
//! Why a crate of its own: a test that signs its requests with the server's
//! own signing code cannot notice when that code stops being Pusher's
//! (both sides change together). This crate shares no code with the server
//! — not even the `hmac` crate: HMAC-SHA256 is written out below from
//! RFC 2104 — and pins every function to the published test vectors.
#![deny(unsafe_code)]

use md5::{Digest as _, Md5};
use sha2::Sha256;

const BLOCK: usize = 64;

/// HMAC-SHA256 (RFC 2104) of `msg` keyed by `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Lowercase hex HMAC-SHA256 of `msg` keyed by the app `secret`.
pub fn hmac_hex(secret: &str, msg: &str) -> String {
    hex(&hmac_sha256(secret.as_bytes(), msg.as_bytes()))
}

/// The `auth` field of a private or presence subscribe:
/// `KEY:hex(hmac(secret, "socket_id:channel[:channel_data]"))`. `channel_data`
/// must be the exact bytes sent in the subscribe frame.
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let msg = match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    };
    format!("{key}:{}", hmac_hex(secret, &msg))
}

/// The `auth` field of a `pusher:signin`: `KEY:hex(hmac(secret, "socket_id::user::user_data"))`.
pub fn signin_auth(key: &str, secret: &str, socket_id: &str, user_data: &str) -> String {
    format!(
        "{key}:{}",
        hmac_hex(secret, &format!("{socket_id}::user::{user_data}"))
    )
}

/// Lowercase hex MD5 of a request body.
pub fn body_md5(body: &[u8]) -> String {
    hex(&Md5::digest(body))
}

/// `X-Pusher-Signature` of a webhook: HMAC-SHA256 of the raw body.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    hex(&hmac_sha256(secret.as_bytes(), body))
}

/// The query string of a signed HTTP API request: `auth_key`,
/// `auth_timestamp`, `auth_version=1.0`, `body_md5` (non-empty bodies only)
/// and any `extra` parameters, sorted, then `auth_signature` = HMAC of
/// `METHOD\nPATH\nSORTED_QUERY`. Values are used verbatim: callers pass
/// URL-safe values, and the signature is over the unescaped text.
pub fn signed_query(
    method: &str,
    path: &str,
    key: &str,
    secret: &str,
    timestamp: u64,
    body: &[u8],
    extra: &[(&str, &str)],
) -> String {
    let mut params: Vec<(String, String)> = vec![
        ("auth_key".into(), key.into()),
        ("auth_timestamp".into(), timestamp.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if !body.is_empty() {
        params.push(("body_md5".into(), body_md5(body)));
    }
    params.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())),
    );
    params.sort();
    let query = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let signature = hmac_hex(secret, &format!("{method}\n{path}\n{query}"));
    format!("{query}&auth_signature={signature}")
}

/// Seconds since the Unix epoch, for `auth_timestamp`.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    //! The vectors of the protocol crib (Pusher's published examples).
    use super::*;

    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn rfc4231_case_2_and_a_long_key() {
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // RFC 4231 case 6: a 131-byte key is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn private_channel_vector() {
        assert_eq!(
            channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None),
            format!("{KEY}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4")
        );
    }

    #[test]
    fn presence_channel_vector() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        assert_eq!(
            channel_auth(KEY, SECRET, "1234.1234", "presence-foobar", Some(data)),
            format!("{KEY}:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80")
        );
    }

    #[test]
    fn sign_in_vector() {
        assert_eq!(
            signin_auth(KEY, SECRET, "1234.1234", r#"{"id":"12345"}"#),
            format!("{KEY}:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba")
        );
    }

    #[test]
    fn http_api_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let q = signed_query("POST", "/apps/3/events", KEY, SECRET, 1353088179, body, &[]);
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn extra_params_are_sorted_and_signed_without_body_md5_for_empty_body() {
        let q = signed_query(
            "GET",
            "/apps/3/channels",
            KEY,
            SECRET,
            1,
            b"",
            &[("info", "user_count")],
        );
        assert!(!q.contains("body_md5"));
        let (unsigned, sig) = q.rsplit_once("&auth_signature=").unwrap();
        assert_eq!(
            unsigned,
            format!("auth_key={KEY}&auth_timestamp=1&auth_version=1.0&info=user_count")
        );
        assert_eq!(
            sig,
            hmac_hex(SECRET, &format!("GET\n/apps/3/channels\n{unsigned}"))
        );
    }
}
