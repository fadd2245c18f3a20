//! Auth grants: a reconnecting client takes its private and presence
//! channels (and signs in) again without the app's auth endpoint
//! (docs/PROTOCOL.md "Auth grants", docs/SECURITY.md "Auth grants").
//!
//! Pure: minting and checking take the app's credentials, the time, the
//! socket and the node's verification budget as values.
//!
//! A grant is `base64url(payload ‖ HMAC-SHA256(K, payload))`, `K` derived
//! from the app's secret and id with HKDF-SHA256, so only the app's current
//! secret mints or opens it, and one app's grant means nothing to another.
//! It names the client's ECDSA P-256 public key; presenting it takes a
//! signature under the matching private key over the new socket's id, so a
//! grant copied from a log or a URL is useless without that key (which the
//! plugin makes non-extractable).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::{digest, hkdf, hmac, signature};

/// How a grant is presented in a subscription's (or sign-in's) `auth`.
pub const PREFIX: &str = "hg-grant.v1:";
/// A grant issued this far in the future (clock steps between edges) is
/// still taken.
const SKEW_SECS: u64 = 60;
const VERSION: u8 = 1;
const KEY_LEN: usize = 65;
const HASH_LEN: usize = 32;
const MAC_LEN: usize = 32;
const SIG_LEN: usize = 64;
/// Channel names and user ids are bounded far below this by the protocol;
/// a longer one gets no grant.
const MAX_FIELD: usize = 255;
/// The longest `auth` a grant presentation may be, checked before any
/// decoding: a payload with two fields of [`MAX_FIELD`], its MAC and a
/// signature, in base64.
pub const MAX_PRESENTED: usize = PREFIX.len()
    + 4 * (2 + 24 + KEY_LEN + 2 + 2 * MAX_FIELD + HASH_LEN + MAC_LEN) / 3
    + 4
    + 1
    + 4 * SIG_LEN / 3
    + 4;

/// What a grant lets its holder take again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A private, private-encrypted or presence channel.
    Channel = 1,
    /// A sign-in (`pusher:signin`).
    SignIn = 2,
}

/// A grant's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub kind: Kind,
    /// Unix seconds: when the app's endpoint authorized the subscription
    /// that the first grant of this line came from. Renewals keep it, so
    /// no chain of grants outlives `auth_grant_max_age` past the app's
    /// last word.
    pub authorized: u64,
    /// Unix seconds.
    pub issued: u64,
    pub expires: u64,
    /// The client's public key: an uncompressed P-256 point.
    pub key: [u8; KEY_LEN],
    /// The channel (empty for a sign-in).
    pub name: String,
    /// SHA-256 of the `channel_data` (or `user_data`) authorized; of the
    /// empty string when there was none.
    pub data_hash: [u8; HASH_LEN],
    /// The user the socket was signed in as when the grant was made (empty
    /// if none): only a socket signed in as that user (or not at all) can
    /// take it.
    pub user: String,
}

/// Why a grant was not taken. Answered to the client as a bad signature is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a grant: bad encoding, sizes or version.
    Malformed,
    /// The MAC does not verify: forged, damaged, another app's, or minted
    /// under a secret the app no longer has.
    Forged,
    /// For another channel, or another kind (a sign-in grant for a channel).
    Mismatch,
    Expired,
    /// The `channel_data` (or `user_data`) sent is not the one granted.
    OtherData,
    /// The signature over this socket does not verify under the grant's key.
    NotTheHolder,
    /// The node's budget of signature verifications is spent: not checked.
    Busy,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Forged => "forged",
            Refused::Mismatch => "mismatch",
            Refused::Expired => "expired",
            Refused::OtherData => "other_data",
            Refused::NotTheHolder => "not_the_holder",
            Refused::Busy => "busy",
        }
    }
}

fn mac_key(app_id: &str, secret: &str) -> hmac::Key {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"herdgate grant v1").extract(secret.as_bytes());
    prk.expand(&[app_id.as_bytes()], hmac::HMAC_SHA256)
        .expect("an HMAC-SHA256 key from HKDF-SHA256")
        .into()
}

/// SHA-256 of `data`, as grants hold it.
pub fn data_hash(data: &str) -> [u8; HASH_LEN] {
    let d = digest::digest(&digest::SHA256, data.as_bytes());
    d.as_ref().try_into().expect("32 bytes")
}

/// A public key offered in a subscription's `grant.key`, if it is one
/// (base64url of an uncompressed P-256 point; the point itself is checked
/// when a signature is verified).
pub fn parse_key(b64: &str) -> Option<[u8; KEY_LEN]> {
    if b64.len() > 4 * KEY_LEN / 3 + 4 {
        return None;
    }
    let raw = B64.decode(b64).ok()?;
    (raw.len() == KEY_LEN && raw[0] == 0x04)
        .then(|| raw.try_into().ok())
        .flatten()
}

/// Mint `g` for the app: the text the client receives in `herdgate:grant`.
/// `None` when a field is too long to be granted.
pub fn mint(app_id: &str, secret: &str, g: &Grant) -> Option<String> {
    if g.name.len() > MAX_FIELD || g.user.len() > MAX_FIELD {
        return None;
    }
    let mut p =
        Vec::with_capacity(2 + 24 + KEY_LEN + 2 + g.name.len() + HASH_LEN + g.user.len() + MAC_LEN);
    p.push(VERSION);
    p.push(g.kind as u8);
    p.extend_from_slice(&g.authorized.to_be_bytes());
    p.extend_from_slice(&g.issued.to_be_bytes());
    p.extend_from_slice(&g.expires.to_be_bytes());
    p.extend_from_slice(&g.key);
    p.push(g.name.len() as u8);
    p.extend_from_slice(g.name.as_bytes());
    p.extend_from_slice(&g.data_hash);
    p.push(g.user.len() as u8);
    p.extend_from_slice(g.user.as_bytes());
    let tag = hmac::sign(&mac_key(app_id, secret), &p);
    p.extend_from_slice(tag.as_ref());
    Some(B64.encode(p))
}

/// Open a grant's text: its MAC first, then its fields.
pub fn open(app_id: &str, secret: &str, text: &str) -> Result<Grant, Refused> {
    let raw = B64.decode(text).map_err(|_| Refused::Malformed)?;
    if raw.len() < MAC_LEN {
        return Err(Refused::Malformed);
    }
    let (payload, tag) = raw.split_at(raw.len() - MAC_LEN);
    hmac::verify(&mac_key(app_id, secret), payload, tag).map_err(|_| Refused::Forged)?;
    parse(payload).ok_or(Refused::Malformed)
}

fn parse(p: &[u8]) -> Option<Grant> {
    let mut r = Reader(p);
    if r.u8()? != VERSION {
        return None;
    }
    let kind = match r.u8()? {
        1 => Kind::Channel,
        2 => Kind::SignIn,
        _ => return None,
    };
    let authorized = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let issued = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let expires = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let key: [u8; KEY_LEN] = r.take(KEY_LEN)?.try_into().ok()?;
    let n = r.u8()? as usize;
    let name = std::str::from_utf8(r.take(n)?).ok()?.to_string();
    let data_hash: [u8; HASH_LEN] = r.take(HASH_LEN)?.try_into().ok()?;
    let n = r.u8()? as usize;
    let user = std::str::from_utf8(r.take(n)?).ok()?.to_string();
    r.0.is_empty().then_some(Grant {
        kind,
        authorized,
        issued,
        expires,
        key,
        name,
        data_hash,
        user,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
}

/// What the holder signs to present grants on socket `socket_id`: one
/// signature per socket, whatever grants it presents (an ECDSA
/// verification is the one costly step of a presentation: a reconnect
/// checks it once, not once per channel). Neither field can contain the
/// separator: app keys are `[A-Za-z0-9_.-]`, the socket id is the server's
/// own `digits.digits`. The app is named by its key, the one the client
/// knows.
pub fn presentation_message(app_key: &str, socket_id: &str) -> String {
    format!("herdgate-grant-v1\n{app_key}\n{socket_id}")
}

/// A presentation's proof of holding the grant's key on this socket,
/// summed up: SHA-256 of the key and the signature. A socket remembers the
/// last one it verified, and a presentation with the same skips the
/// verification.
pub type Proven = [u8; HASH_LEN];

/// What the app's settings allow now, checked on every presentation (a
/// reload that shortens them applies to grants already out).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `auth_grant_ttl`.
    pub ttl: u64,
    /// `auth_grant_max_age`.
    pub max_age: u64,
}

/// A presentation as it arrives in `auth`.
pub struct Presented<'a> {
    pub auth: &'a str,
    pub kind: Kind,
    /// The channel (empty for a sign-in).
    pub name: &'a str,
    pub socket_id: &'a str,
    /// The `channel_data` (or `user_data`) sent with it, `""` if none.
    pub data: &'a str,
}

/// Whether `auth` is a grant presentation at all (else it is the app's
/// signature, checked as usual).
pub fn is_presentation(auth: &str) -> bool {
    auth.starts_with(PREFIX)
}

/// Check a presentation against the app's current credentials (id, key,
/// secret) at `now`: the grant it carries, if it may be taken, and its
/// proof. Cheap checks first: size, MAC, the channel, the time and the
/// data; then the signature over this socket, unless it is the one
/// `proven` on this socket already, and only if `budget` grants one more
/// verification (the node's, `limits.auth_grant_checks_per_second`).
pub fn check(
    app: (&str, &str, &str),
    p: &Presented<'_>,
    limits: Limits,
    now: u64,
    proven: Option<&Proven>,
    budget: impl FnOnce() -> bool,
) -> Result<(Grant, Proven), Refused> {
    let (app_id, app_key, secret) = app;
    if p.auth.len() > MAX_PRESENTED {
        return Err(Refused::Malformed);
    }
    let rest = p.auth.strip_prefix(PREFIX).ok_or(Refused::Malformed)?;
    let (grant, sig) = rest.split_once(':').ok_or(Refused::Malformed)?;
    let g = open(app_id, secret, grant)?;
    if g.kind != p.kind || g.name != p.name {
        return Err(Refused::Mismatch);
    }
    let ends = g
        .expires
        .min(g.issued.saturating_add(limits.ttl))
        .min(g.authorized.saturating_add(limits.max_age));
    if now >= ends || g.issued > now + SKEW_SECS || g.authorized > g.issued {
        return Err(Refused::Expired);
    }
    if g.data_hash != data_hash(p.data) {
        return Err(Refused::OtherData);
    }
    let sig = B64.decode(sig).map_err(|_| Refused::Malformed)?;
    if sig.len() != SIG_LEN {
        return Err(Refused::Malformed);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&g.key);
    ctx.update(&sig);
    let proof: Proven = ctx.finish().as_ref().try_into().expect("32 bytes");
    if proven != Some(&proof) {
        if !budget() {
            return Err(Refused::Busy);
        }
        let message = presentation_message(app_key, p.socket_id);
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &g.key)
            .verify(message.as_bytes(), &sig)
            .map_err(|_| Refused::NotTheHolder)?;
    }
    Ok((g, proof))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    const NOW: u64 = 1_800_000_000;
    const APP: (&str, &str, &str) = ("app1", "key1", "secret");
    const LIMITS: Limits = Limits {
        ttl: 300,
        max_age: 3600,
    };

    fn keypair() -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    }

    fn grant(kp: &EcdsaKeyPair, name: &str, data: &str) -> Grant {
        Grant {
            kind: Kind::Channel,
            authorized: NOW - 100,
            issued: NOW,
            expires: NOW + 300,
            key: kp.public_key().as_ref().try_into().unwrap(),
            name: name.into(),
            data_hash: data_hash(data),
            user: "u1".into(),
        }
    }

    /// The holder's presentation of grant `text` on `socket`, signed with
    /// ring over the documented message (not with this module).
    fn present(kp: &EcdsaKeyPair, text: &str, app_key: &str, socket: &str) -> String {
        let msg = format!("herdgate-grant-v1\n{app_key}\n{socket}");
        let sig = kp.sign(&SystemRandom::new(), msg.as_bytes()).unwrap();
        format!("{PREFIX}{text}:{}", B64.encode(sig.as_ref()))
    }

    fn presented<'a>(
        auth: &'a str,
        name: &'a str,
        socket: &'a str,
        data: &'a str,
    ) -> Presented<'a> {
        Presented {
            auth,
            kind: Kind::Channel,
            name,
            socket_id: socket,
            data,
        }
    }

    fn check_at(
        auth: &str,
        name: &str,
        socket: &str,
        data: &str,
        now: u64,
    ) -> Result<Grant, Refused> {
        check(
            APP,
            &presented(auth, name, socket, data),
            LIMITS,
            now,
            None,
            || true,
        )
        .map(|(g, _)| g)
    }

    #[test]
    fn the_holder_takes_its_channel_again_on_a_new_socket() {
        let kp = keypair();
        let data = r#"{"user_id":"u1"}"#;
        let g = grant(&kp, "presence-room", data);
        let text = mint("app1", "secret", &g).unwrap();
        let auth = present(&kp, &text, "key1", "123.456");
        assert_eq!(
            check_at(&auth, "presence-room", "123.456", data, NOW + 10),
            Ok(g)
        );
    }

    #[test]
    fn every_other_use_is_refused() {
        let kp = keypair();
        let data = r#"{"user_id":"u1"}"#;
        let text = mint("app1", "secret", &grant(&kp, "presence-room", data)).unwrap();
        let auth = present(&kp, &text, "key1", "1.1");
        // Another socket than the one signed for: a replayed presentation.
        assert_eq!(
            check_at(&auth, "presence-room", "1.2", data, NOW),
            Err(Refused::NotTheHolder)
        );
        // Another channel.
        assert_eq!(
            check_at(&auth, "presence-other", "1.1", data, NOW),
            Err(Refused::Mismatch)
        );
        // Other channel_data: a presence user_id swapped.
        assert_eq!(
            check_at(&auth, "presence-room", "1.1", r#"{"user_id":"admin"}"#, NOW),
            Err(Refused::OtherData)
        );
        // Expired; issued in the future.
        assert_eq!(
            check_at(&auth, "presence-room", "1.1", data, NOW + 300),
            Err(Refused::Expired)
        );
        assert_eq!(
            check_at(&auth, "presence-room", "1.1", data, NOW - SKEW_SECS - 1),
            Err(Refused::Expired)
        );
        // A reload that shortened the ttl, or the max age, applies to grants out.
        let p = presented(&auth, "presence-room", "1.1", data);
        let short = Limits {
            ttl: 60,
            max_age: 3600,
        };
        assert_eq!(
            check(APP, &p, short, NOW + 60, None, || true).map(|r| r.0),
            Err(Refused::Expired)
        );
        assert!(check(APP, &p, short, NOW + 59, None, || true).is_ok());
        let young = Limits {
            ttl: 300,
            max_age: 150,
        };
        assert_eq!(
            check(APP, &p, young, NOW + 50, None, || true).map(|r| r.0),
            Err(Refused::Expired)
        );
        // The grant stolen, presented by another key pair.
        let thief = keypair();
        let stolen = present(&thief, &text, "key1", "1.1");
        assert_eq!(
            check_at(&stolen, "presence-room", "1.1", data, NOW),
            Err(Refused::NotTheHolder)
        );
        // Another app, or the app's secret rotated, or signed for another app's key.
        let at = |app| check(app, &p, LIMITS, NOW, None, || true).map(|r| r.0);
        assert_eq!(at(("app2", "key1", "secret")), Err(Refused::Forged));
        assert_eq!(at(("app1", "key1", "rotated")), Err(Refused::Forged));
        assert_eq!(at(("app1", "key2", "secret")), Err(Refused::NotTheHolder));
        // A sign-in presentation of a channel grant.
        let p = Presented {
            kind: Kind::SignIn,
            ..presented(&auth, "presence-room", "1.1", data)
        };
        assert_eq!(
            check(APP, &p, LIMITS, NOW, None, || true).map(|r| r.0),
            Err(Refused::Mismatch)
        );
    }

    #[test]
    fn a_socket_verifies_its_holder_once() {
        let kp = keypair();
        let a = mint("app1", "secret", &grant(&kp, "private-a", "")).unwrap();
        let b = mint("app1", "secret", &grant(&kp, "private-b", "")).unwrap();
        let first = present(&kp, &a, "key1", "1.1");
        let p = presented(&first, "private-a", "1.1", "");
        let (_, proof) = check(APP, &p, LIMITS, NOW, None, || true).unwrap();
        // The same signature with the socket's next grant: the same proof,
        // not verified again.
        let sig = first.rsplit_once(':').unwrap().1;
        let next = format!("{PREFIX}{b}:{sig}");
        let p = presented(&next, "private-b", "1.1", "");
        assert_eq!(
            check(APP, &p, LIMITS, NOW, Some(&proof), || false)
                .unwrap()
                .1,
            proof
        );
        assert!(
            check(APP, &p, LIMITS, NOW, None, || true).is_ok(),
            "and it verifies"
        );
        // A proof not yet verified needs one of the node's verifications;
        // a remembered one (above) took none.
        assert_eq!(
            check(APP, &p, LIMITS, NOW, None, || false).map(|r| r.0),
            Err(Refused::Busy)
        );
        // A proof remembered for one key does not pass another key's grant
        // with the same signature.
        let thief = keypair();
        let theirs = mint("app1", "secret", &grant(&thief, "private-b", "")).unwrap();
        let forged = format!("{PREFIX}{theirs}:{sig}");
        let p = presented(&forged, "private-b", "1.1", "");
        assert_eq!(
            check(APP, &p, LIMITS, NOW, Some(&proof), || true).map(|r| r.0),
            Err(Refused::NotTheHolder)
        );
    }

    #[test]
    fn damaged_or_oversized_presentations_are_refused_without_panics() {
        let kp = keypair();
        let text = mint("app1", "secret", &grant(&kp, "private-a", "")).unwrap();
        let auth = present(&kp, &text, "key1", "1.1");
        for i in PREFIX.len()..auth.len() {
            let mut bad = auth.clone().into_bytes();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(bad).unwrap();
            assert!(
                check_at(&bad, "private-a", "1.1", "", NOW).is_err(),
                "changed at {i}"
            );
        }
        for n in 0..auth.len() {
            assert!(
                check_at(&auth[..n], "private-a", "1.1", "", NOW).is_err(),
                "cut to {n}"
            );
        }
        let huge = format!("{PREFIX}{}", "A".repeat(MAX_PRESENTED));
        assert_eq!(
            check_at(&huge, "private-a", "1.1", "", NOW),
            Err(Refused::Malformed)
        );
        // The longest grant minted fits the bound.
        let mut long = grant(&kp, &"c".repeat(MAX_FIELD), "");
        long.user = "u".repeat(MAX_FIELD);
        let text = mint("app1", "secret", &long).unwrap();
        let auth = present(&kp, &text, "key1", "1234567890.1234567890");
        assert!(
            auth.len() <= MAX_PRESENTED,
            "{} > {MAX_PRESENTED}",
            auth.len()
        );
        long.name.push('c');
        assert_eq!(mint("app1", "secret", &long), None);
    }

    #[test]
    fn offered_keys_are_uncompressed_p256_points() {
        let kp = keypair();
        let b64 = B64.encode(kp.public_key().as_ref());
        assert_eq!(
            parse_key(&b64).map(|k| k.to_vec()),
            Some(kp.public_key().as_ref().to_vec())
        );
        assert_eq!(parse_key("AAAA"), None);
        assert_eq!(parse_key(&"A".repeat(500)), None);
        assert_eq!(parse_key("not base64!"), None);
    }
}
