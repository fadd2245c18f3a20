//! Pusher signatures, computed by the load tool itself.
//!
//! The tool holds the app secret, so it plays both the app backend (signing private/presence
//! channel auth, which pusher-js would fetch from an auth endpoint) and the server SDK
//! (signing HTTP API calls). Both are HMAC-SHA256 in lowercase hex, keyed by the secret; the
//! exact strings signed are in the protocol crib and pinned by the tests below.

use md5::{Digest, Md5};

/// Lowercase hex HMAC-SHA256 of `msg` keyed by `secret`.
pub fn hmac_hex(secret: &str, msg: &str) -> String {
    herdgate::auth::sign(secret, msg)
}

/// The `auth` field of a private/presence subscribe: `KEY:hex(hmac(secret, "socket_id:channel[:channel_data]"))`.
/// `channel_data` must be the exact bytes that are sent in the subscribe frame.
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let msg = herdgate::auth::channel_string(socket_id, channel, channel_data);
    format!("{key}:{}", hmac_hex(secret, &msg))
}

/// Lowercase hex MD5 of a request body.
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// The full query string of a signed HTTP API request:
/// `auth_key`, `auth_timestamp`, `auth_version=1.0`, `body_md5` (non-empty bodies only) and any
/// `extra` parameters, followed by `auth_signature` = HMAC of `METHOD\nPATH\nSORTED_QUERY`.
/// Values are used verbatim (callers pass URL-safe values; the signature is over unescaped text).
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

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
            hmac_hex(SECRET, r#"1234.1234::user::{"id":"12345"}"#),
            "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
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
