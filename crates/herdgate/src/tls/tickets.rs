//! TLS session tickets that every edge of a deployment can open, so a
//! client dropped by one edge resumes its TLS session on another instead
//! of paying a full handshake (the reconnect herd's CPU bill).
//!
//! Stateless tickets (RFC 5077 / TLS 1.3 PSK tickets): the server encrypts
//! the session's state into the ticket and keeps nothing, so any process
//! holding the key can resume it. The keys come from `tls.ticket_keys`, a
//! file the operator distributes to every edge (a Kubernetes Secret, a
//! configuration-management file): one hex key of 32 bytes per line, the
//! **first** encrypts new tickets, **every** listed key opens them. Rotation
//! is file changes plus SIGHUP, in three rollouts: add the new key second
//! on every edge (all open its tickets before any seals with it); move it
//! first; after one `ticket_lifetime` (tickets the old key sealed stay
//! valid until then), drop the old key. A key removed from the file opens
//! nothing from that reload on: that is the revocation.
//!
//! Without `tls.ticket_keys` each process uses rustls's own ticketer
//! (random keys, rotated): clients resume on the same process only.
//!
//! A ticket is `key id (4) ‖ nonce (12) ‖ ChaCha20-Poly1305(issued_at (8) ‖
//! state)`. The key id and the cipher key are derived from the file's key
//! with HKDF-SHA256 (separate labels), so the id says nothing about the key.
//! `issued_at` (Unix seconds) bounds a ticket's age to `ticket_lifetime` on
//! every edge even if a key is kept longer than it should be. Nonces are
//! random (96 bits): under one key, far fewer tickets are sealed between
//! rotations than the birthday bound allows.
//!
//! 0-RTT (early data) stays off: tickets allow resumption, never replayable
//! requests (docs/SECURITY.md "TLS session tickets").
//!
//! The keys are never logged, never on the status page or `/status`; only
//! their count and the file's path are.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The most keys a file may list (the current one and those still
/// opening tickets during rotations).
pub const MAX_KEYS: usize = 8;
/// The largest ticket opened: rustls's own tickets are a few hundred
/// bytes; anything much larger is not one of ours.
const MAX_TICKET: usize = 4096;
const ID_LEN: usize = 4;
const TAG_LEN: usize = 16;
const ISSUED_LEN: usize = 8;
/// A ticket issued this far in the future (clock steps between edges) is
/// still taken.
const SKEW_SECS: u64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("{path}: cannot read ticket keys: {reason}")]
    Read { path: String, reason: String },
    #[error(
        "{path} line {line}: a ticket key is 64 hex digits (32 bytes, e.g. `openssl rand -hex 32`)"
    )]
    Malformed { path: String, line: usize },
    #[error("{path}: no ticket key (one hex key per line, the first one encrypts)")]
    Empty { path: String },
    #[error("{path}: {count} ticket keys, at most {MAX_KEYS}")]
    TooMany { path: String, count: usize },
    #[error("{path} line {line}: the same key twice")]
    Duplicate { path: String, line: usize },
}

/// One key of the file, expanded.
struct Key {
    id: [u8; ID_LEN],
    aead: LessSafeKey,
}

struct Id;
impl hkdf::KeyType for Id {
    fn len(&self) -> usize {
        ID_LEN
    }
}

impl Key {
    fn derive(secret: &[u8; 32]) -> Key {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"herdgate tls ticket v1").extract(secret);
        let mut id = [0u8; ID_LEN];
        prk.expand(&[b"key id"], Id)
            .and_then(|okm| okm.fill(&mut id))
            .expect("4 bytes from HKDF-SHA256");
        let cipher: UnboundKey = prk
            .expand(&[b"chacha20-poly1305"], &CHACHA20_POLY1305)
            .expect("a ChaCha20 key from HKDF-SHA256")
            .into();
        Key {
            id,
            aead: LessSafeKey::new(cipher),
        }
    }
}

/// Parse a key file's text: one 64-hex-digit key per line; blank lines
/// and `#` comments ignored.
pub fn parse(text: &str, path: &str) -> Result<Vec<[u8; 32]>, KeysError> {
    let mut keys: Vec<[u8; 32]> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || KeysError::Malformed {
            path: path.into(),
            line: i + 1,
        };
        if line.len() != 64 || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let mut key = [0u8; 32];
        for (j, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&line[2 * j..2 * j + 2], 16).map_err(|_| malformed())?;
        }
        // Equal keys, or (one chance in 2^32) keys whose ids collide: the
        // second would never open a ticket.
        if keys.contains(&key)
            || keys
                .iter()
                .any(|k| Key::derive(k).id == Key::derive(&key).id)
        {
            return Err(KeysError::Duplicate {
                path: path.into(),
                line: i + 1,
            });
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(KeysError::Empty { path: path.into() });
    }
    if keys.len() > MAX_KEYS {
        return Err(KeysError::TooMany {
            path: path.into(),
            count: keys.len(),
        });
    }
    Ok(keys)
}

/// Read and check a key file.
pub fn load(path: &Path) -> Result<Vec<[u8; 32]>, KeysError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    parse(&text, &name)
}

/// The ticketer over a shared key file, swappable on reload.
pub struct SharedTickets {
    keys: RwLock<Arc<Vec<Key>>>,
    lifetime_secs: u32,
    rng: SystemRandom,
}

impl fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("SharedTickets")
            .field("keys", &self.current().len())
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

impl SharedTickets {
    pub fn new(keys: &[[u8; 32]], lifetime_secs: u32) -> SharedTickets {
        SharedTickets {
            keys: RwLock::new(Arc::new(keys.iter().map(Key::derive).collect())),
            lifetime_secs,
            rng: SystemRandom::new(),
        }
    }

    /// Put new keys in force: the first seals from now on, all of them open.
    pub fn set_keys(&self, keys: &[[u8; 32]]) {
        let expanded = Arc::new(keys.iter().map(Key::derive).collect());
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = expanded;
    }

    fn current(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Seal `plain` as issued at `now` (Unix seconds).
    pub fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let keys = self.current();
        let key = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + ISSUED_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut body = Vec::with_capacity(ISSUED_LEN + plain.len() + TAG_LEN);
        body.extend_from_slice(&now.to_be_bytes());
        body.extend_from_slice(plain);
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Open a ticket at `now` (Unix seconds), or say why not.
    pub fn open(&self, ticket: &[u8], now: u64) -> Result<Vec<u8>, Refused> {
        if ticket.len() < ID_LEN + NONCE_LEN + ISSUED_LEN + TAG_LEN || ticket.len() > MAX_TICKET {
            return Err(Refused::Invalid);
        }
        let (id, rest) = ticket.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.current();
        let key = keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(Refused::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Refused::Invalid)?;
        let mut body = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(&key.id), &mut body)
            .map_err(|_| Refused::Invalid)?;
        let (issued, state) = plain.split_at(ISSUED_LEN);
        let issued = u64::from_be_bytes(issued.try_into().map_err(|_| Refused::Invalid)?);
        let age_ok = issued <= now + SKEW_SECS
            && now.saturating_sub(issued) <= u64::from(self.lifetime_secs);
        if !age_ok {
            return Err(Refused::Expired);
        }
        Ok(state.to_vec())
    }
}

/// Why a ticket was not opened (the client then gets a full handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Sealed under a key no longer (or never) in the file.
    UnknownKey,
    /// Older than `ticket_lifetime`, or issued in the future.
    Expired,
    /// Not a ticket of ours: wrong size, or it fails authentication.
    Invalid,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::UnknownKey => "unknown_key",
            Refused::Expired => "expired",
            Refused::Invalid => "invalid",
        }
    }
}

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_secs
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, crate::clock::unix_now().as_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        match self.open(cipher, crate::clock::unix_now().as_secs()) {
            Ok(plain) => Some(plain),
            Err(why) => {
                metrics::counter!("herdgate_tls_tickets_refused_total", "reason" => why.label())
                    .increment(1);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_ticket_opens_under_any_listed_key_until_its_lifetime_ends() {
        let a = SharedTickets::new(&[K1], 3600);
        let t = a.seal(b"state", NOW).unwrap();
        assert_eq!(a.open(&t, NOW).unwrap(), b"state");
        // Another process with the same file opens it.
        let b = SharedTickets::new(&[K1], 3600);
        assert_eq!(b.open(&t, NOW + 10).unwrap(), b"state");
        // Rotation: the new key first, the old one still listed.
        b.set_keys(&[K2, K1]);
        assert_eq!(b.open(&t, NOW + 10).unwrap(), b"state");
        let t2 = b.seal(b"new", NOW).unwrap();
        assert_eq!(a.open(&t2, NOW), Err(Refused::UnknownKey), "sealed by K2");
        // The old key dropped: its tickets open nowhere.
        b.set_keys(&[K2]);
        assert_eq!(b.open(&t, NOW + 10), Err(Refused::UnknownKey));
        // Past the lifetime, or from the future, even under a listed key.
        assert_eq!(a.open(&t, NOW + 3601), Err(Refused::Expired));
        assert_eq!(a.open(&t, NOW - SKEW_SECS - 1), Err(Refused::Expired));
        assert!(a.open(&t, NOW + 3600).is_ok());
    }

    #[test]
    fn a_forged_or_damaged_ticket_opens_nothing_and_panics_nowhere() {
        let a = SharedTickets::new(&[K1], 3600);
        let t = a.seal(b"state", NOW).unwrap();
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 0x01;
            assert!(a.open(&bad, NOW).is_err(), "bit flipped at {i}");
        }
        for n in 0..t.len() {
            assert!(a.open(&t[..n], NOW).is_err(), "cut to {n}");
        }
        assert_eq!(
            a.open(&vec![0u8; MAX_TICKET + 1], NOW),
            Err(Refused::Invalid)
        );
        // A ticket sealed with the same id but another key: authentication fails.
        let mut forged = SharedTickets::new(&[K2], 3600).seal(b"x", NOW).unwrap();
        forged[..ID_LEN].copy_from_slice(&t[..ID_LEN]);
        assert_eq!(a.open(&forged, NOW), Err(Refused::Invalid));
        // Nonces differ: the same state seals differently.
        assert_ne!(a.seal(b"state", NOW), a.seal(b"state", NOW));
    }

    #[test]
    fn key_files_are_checked_line_by_line() {
        let hex1 = "01".repeat(32);
        let hex2 = "02".repeat(32);
        let ok = format!("# current\n{hex1}\n\n{hex2}\n");
        assert_eq!(parse(&ok, "f").unwrap(), vec![K1, K2]);
        assert_eq!(
            parse(&format!("{hex1}\nzz{}\n", &hex2[2..]), "f"),
            Err(KeysError::Malformed {
                path: "f".into(),
                line: 2
            })
        );
        assert!(matches!(
            parse(&hex1[..62], "f"),
            Err(KeysError::Malformed { line: 1, .. })
        ));
        assert_eq!(
            parse("# none\n", "f"),
            Err(KeysError::Empty { path: "f".into() })
        );
        assert!(matches!(
            parse(&format!("{hex1}\n{hex1}\n"), "f"),
            Err(KeysError::Duplicate { line: 2, .. })
        ));
        let many: Vec<String> = (1..=9u8).map(|i| format!("{i:02x}").repeat(32)).collect();
        assert!(matches!(
            parse(&many.join("\n"), "f"),
            Err(KeysError::TooMany { count: 9, .. })
        ));
        // The Debug form never shows a key.
        let shown = format!("{:?}", SharedTickets::new(&[K1], 60));
        assert!(
            !shown.contains("01, 01") && !shown.contains(&hex1),
            "{shown}"
        );
    }
}
