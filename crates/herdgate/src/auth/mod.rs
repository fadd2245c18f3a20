//! HMAC-SHA256 signatures as Pusher defines them: channel auth, user sign-in
//! and HTTP API requests all sign a string with the app secret and send the
//! lowercase hex digest. Verification compares in constant time.
//! [`channel`] judges a subscription with them.

pub mod channel;
pub mod grant;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Lowercase hex HMAC-SHA256 of `message` under `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time check of a hex signature (case-insensitive hex is accepted).
pub fn verify_hex(secret: &str, message: &str, signature_hex: &str) -> bool {
    let Ok(given) = hex::decode(signature_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    let expected = mac.finalize().into_bytes();
    given.len() == expected.len() && bool::from(expected.as_slice().ct_eq(&given))
}

/// The string a private or presence channel subscription signs.
pub fn channel_string(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// The string a user sign-in signs.
pub fn signin_string(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// Check an `auth` field of the form `KEY:HEXSIG` for `app_key`.
pub fn verify_token(app_key: &str, secret: &str, message: &str, auth: &str) -> bool {
    match auth.split_once(':') {
        // The key comparison is not secret; the signature comparison is.
        Some((key, sig)) => key == app_key && verify_hex(secret, message, sig),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from the Pusher authentication docs (see the protocol crib).
    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn private_channel_vector() {
        let s = channel_string("1234.1234", "private-foobar", None);
        let sig = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert_eq!(sign(SECRET, &s), sig);
        assert!(verify_token(KEY, SECRET, &s, &format!("{KEY}:{sig}")));
        assert!(!verify_token(KEY, SECRET, &s, &format!("other:{sig}")));
        assert!(!verify_token(
            KEY,
            SECRET,
            &s,
            &format!("{KEY}:{}", &sig[..63])
        ));
        assert!(!verify_token(KEY, SECRET, &s, sig));
    }

    #[test]
    fn presence_channel_vector() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let s = channel_string("1234.1234", "presence-foobar", Some(data));
        assert_eq!(
            sign(SECRET, &s),
            "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
        );
    }

    #[test]
    fn signin_vector() {
        let s = signin_string("1234.1234", r#"{"id":"12345"}"#);
        assert_eq!(
            sign(SECRET, &s),
            "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
        );
    }

    #[test]
    fn wrong_secret_or_garbage_fails() {
        let s = channel_string("1.1", "private-a", None);
        let good = sign(SECRET, &s);
        assert!(verify_hex(SECRET, &s, &good));
        assert!(verify_hex(SECRET, &s, &good.to_uppercase()));
        assert!(!verify_hex("nope", &s, &good));
        assert!(!verify_hex(SECRET, &s, "zz"));
        assert!(!verify_hex(SECRET, &s, ""));
    }
}
