//! TLS ticket keys kept in etcd, for edges whose cluster uses it
//! (`tls.ticket_keys_in_etcd`): the same keys on every edge, made and
//! rotated by the edges themselves, no file to distribute.
//!
//! Why: a client dropped by one edge should resume its TLS session on any
//! other (see [`crate::tls::tickets`]); with etcd already holding the
//! cluster's membership, the keys can live next to it.
//!
//! One key, `<p>/tls/ticket_keys`, holds `{"keys":[{"sealed":hex,"from":unix}]}`,
//! newest first. Each ticket key is stored sealed (ChaCha20-Poly1305, the
//! `from` as associated data) under a key derived from `cluster.secret`:
//! reading etcd, or the network to it, gives nobody the ticket keys, and
//! writing etcd cannot put a key in force. An entry an edge cannot open
//! (sealed under another `cluster.secret`, during a rotation of it) is kept
//! for others and never used; each side keeps keys of its own. Every edge reads it every [`POLL`] and puts in force: the
//! newest key whose `from` has come seals, every listed key opens. The
//! first edge to find it absent writes one key; an edge that finds the
//! newest key older than the rotation period (the ticket lifetime) adds a
//! new one whose `from` is [`LEAD`] ahead, so every edge opens its tickets
//! before any seals with it. A key stops sealing when the next one starts
//! and is dropped one ticket lifetime later (its tickets have expired by
//! then). Writes are compare-and-swap on the key's revision: two edges
//! rotating at once make one new key, never two lists.
//!
//! Bounded: at most [`MAX_KEYS`] keys (a list that would grow past it
//! drops its oldest); one read per edge per [`POLL`], a write at most once
//! per rotation. etcd unreachable: the keys in force stay, and resumption
//! keeps working until they are rotated out on the edges that can still
//! reach etcd. An entry whose `from` lies beyond the next rotation's lead
//! (a forged one, or an edge's clock far ahead) is dropped, never used.
//! The keys are never logged (docs/SECURITY.md "TLS session tickets").

use crate::config::EtcdConfig;
use crate::tls::tickets::{SharedTickets, MAX_KEYS};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often each edge reads the keys.
pub const POLL: Duration = Duration::from_secs(10);
/// How far ahead of sealing a new key is written: every edge reads it
/// (two polls and some) before any seals with it.
pub const LEAD: Duration = Duration::from_secs(30);
/// Clocks of edges this far apart still agree on which key seals.
const SKEW: u64 = 60;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub keys: Vec<StoredKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// Hex of nonce ‖ the key sealed under the [`Vault`].
    pub sealed: String,
    /// Seals from this Unix second on.
    pub from: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("no randomness for a new ticket key")]
    Random,
}

/// Seals ticket keys for etcd under a key derived from `cluster.secret`.
pub struct Vault(LessSafeKey);

impl Vault {
    pub fn new(cluster_secret: &str) -> Vault {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"herdgate-ticket-keys-v1")
            .extract(cluster_secret.as_bytes());
        let okm = prk
            .expand(&[b"seal"], &CHACHA20_POLY1305)
            .expect("HKDF output of one AEAD key");
        Vault(LessSafeKey::new(UnboundKey::from(okm)))
    }

    fn seal(&self, key: &[u8; 32], from: u64) -> Result<StoredKey, KeysError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeysError::Random)?;
        let mut body = key.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(from.to_be_bytes()),
                &mut body,
            )
            .map_err(|_| KeysError::Random)?;
        let hex: String = nonce
            .iter()
            .chain(&body)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(StoredKey { sealed: hex, from })
    }

    /// The ticket key of `k`, if it was sealed under this vault's secret
    /// and its `from` is as sealed.
    fn open(&self, k: &StoredKey) -> Option<[u8; 32]> {
        let bytes = unhex(&k.sealed)?;
        if bytes.len() != NONCE_LEN + 32 + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let mut body = sealed.to_vec();
        let plain = self
            .0
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(k.from.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        plain.try_into().ok()
    }

    /// A new random ticket key, sealed, sealing from `from`.
    fn make(&self, from: u64) -> Result<StoredKey, KeysError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| KeysError::Random)?;
        self.seal(&k, from)
    }
}

/// The keys' place in etcd.
pub fn key_path(prefix: &str) -> String {
    format!("{prefix}/tls/ticket_keys")
}

/// Keep `tickets` on the cluster's keys until `stop`.
pub fn spawn(
    cfg: &EtcdConfig,
    cluster_secret: &str,
    tickets: Arc<SharedTickets>,
    lifetime: Duration,
    stop: CancellationToken,
) {
    let cfg = cfg.clone();
    let vault = Vault::new(cluster_secret);
    tokio::spawn(async move {
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.request_timeout.get())
            .with_timeout(cfg.request_timeout.get());
        let mut client = None;
        let mut installed: Option<Vec<[u8; 32]>> = None;
        let mut stored = Stored::default();
        loop {
            if client.is_none() {
                client = Client::connect(&cfg.endpoints, Some(options.clone()))
                    .await
                    .ok();
            }
            let now = crate::clock::unix_now().as_secs();
            if let Some(c) = &mut client {
                match sync(c, &cfg.prefix, now, lifetime.as_secs(), &vault).await {
                    Ok(s) => stored = s,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS ticket keys: etcd not reachable; the keys in force stay");
                        client = None;
                    }
                }
            }
            // Judged on every poll, not only when the list changes: a key
            // written ahead starts sealing when its time comes.
            let keys = in_force(&stored, now, &vault);
            if installed.as_ref() != Some(&keys) && !keys.is_empty() {
                tickets.set_keys(&keys);
                tracing::info!(keys = keys.len(), "TLS ticket keys from etcd in force");
                installed = Some(keys);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// One [`sync`] over a connection of its own (for tests and tools).
pub async fn sync_at(
    endpoints: &[String],
    prefix: &str,
    now: u64,
    lifetime: u64,
    vault: &Vault,
) -> Result<Stored, KeysError> {
    let mut client = Client::connect(endpoints, None).await?;
    sync(&mut client, prefix, now, lifetime, vault).await
}

/// Read the keys, write the first one or a rotation if due, and answer
/// the keys as they now stand in etcd.
pub async fn sync(
    client: &mut Client,
    prefix: &str,
    now: u64,
    lifetime: u64,
    vault: &Vault,
) -> Result<Stored, KeysError> {
    let path = key_path(prefix);
    let got = client.get(path.as_str(), None).await?;
    let (stored, revision) = match got.kvs().first() {
        Some(kv) => (
            serde_json::from_slice::<Stored>(kv.value()).unwrap_or_default(),
            kv.mod_revision(),
        ),
        None => (Stored::default(), 0),
    };
    let Some(next) = plan(&stored, now, lifetime, vault)? else {
        return Ok(stored);
    };
    let compare = if revision == 0 {
        Compare::create_revision(path.as_str(), CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(path.as_str(), CompareOp::Equal, revision)
    };
    let value = serde_json::to_string(&next).expect("keys serialize");
    let txn = Txn::new()
        .when(vec![compare])
        .and_then(vec![TxnOp::put(path.as_str(), value, None)])
        .or_else(vec![TxnOp::get(path.as_str(), None)]);
    let r = client.txn(txn).await?;
    if r.succeeded() {
        return Ok(next);
    }
    // Another edge wrote first: theirs stands (judged like any list).
    for op in r.op_responses() {
        if let TxnOpResponse::Get(g) = op {
            if let Some(kv) = g.kvs().first() {
                return Ok(serde_json::from_slice(kv.value()).unwrap_or_default());
            }
        }
    }
    Ok(stored)
}

/// The entries worth looking at, at `now`: none whose `from` lies beyond
/// the next rotation's lead (and clock skew), newest first.
fn sane(stored: &Stored, now: u64) -> Vec<StoredKey> {
    let horizon = now.saturating_add(LEAD.as_secs() + SKEW);
    let mut keys: Vec<StoredKey> = stored
        .keys
        .iter()
        .filter(|k| k.from <= horizon)
        .cloned()
        .collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.from));
    keys
}

/// What the list should become at `now`, if anything changes: a first key
/// of ours; a new one `LEAD` ahead once our newest has sealed for
/// `lifetime`; keys of ours retired more than `lifetime` ago, entries we
/// cannot open older than two lifetimes, and entries from the far future
/// dropped; at most `MAX_KEYS`, the newest.
pub fn plan(
    stored: &Stored,
    now: u64,
    lifetime: u64,
    vault: &Vault,
) -> Result<Option<Stored>, KeysError> {
    let mut keys = sane(stored, now);
    let newest_mine = keys
        .iter()
        .find(|k| vault.open(k).is_some())
        .map(|k| k.from);
    match newest_mine {
        None => keys.insert(0, vault.make(now)?),
        Some(from) if from <= now && from.saturating_add(lifetime) <= now + LEAD.as_secs() => {
            keys.insert(0, vault.make(now + LEAD.as_secs())?)
        }
        Some(_) => {}
    }
    // Our keys retire when the next newer of ours takes over.
    let mut kept = Vec::with_capacity(keys.len());
    let mut successor: Option<u64> = None;
    for k in keys {
        let keep = if vault.open(&k).is_some() {
            let keep = successor.is_none_or(|s| s.min(now).saturating_add(lifetime) > now);
            successor = Some(k.from);
            keep
        } else {
            k.from.saturating_add(2 * lifetime) > now
        };
        if keep && kept.len() < MAX_KEYS {
            kept.push(k);
        }
    }
    let next = Stored { keys: kept };
    Ok((next.keys != stored.keys).then_some(next))
}

/// The keys to put in force at `now`: of ours, the newest whose time has
/// come first (it seals), then every other (they open).
pub fn in_force(stored: &Stored, now: u64, vault: &Vault) -> Vec<[u8; 32]> {
    let keys: Vec<(u64, [u8; 32])> = sane(stored, now)
        .iter()
        .filter_map(|k| Some((k.from, vault.open(k)?)))
        .take(MAX_KEYS)
        .collect();
    let sealing = keys.iter().position(|(from, _)| *from <= now);
    let mut out = Vec::with_capacity(keys.len());
    if let Some(i) = sealing {
        out.push(keys[i].1);
    }
    out.extend(
        keys.iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != sealing)
            .map(|(_, (_, k))| *k),
    );
    out
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The life of the keys: a first one; a successor written `LEAD`
    /// ahead once the first has sealed for a lifetime, opening at once and
    /// sealing from its time; the old one dropped a lifetime after it
    /// retired; nothing written while nothing is due.
    #[test]
    fn keys_are_made_rotated_ahead_and_dropped_after_a_lifetime() {
        let v = Vault::new("cluster-secret-0123456789");
        let life = 3600;
        let lead = LEAD.as_secs();
        let first = plan(&Stored::default(), 1000, life, &v).unwrap().unwrap();
        assert_eq!(first.keys.len(), 1);
        assert_eq!(first.keys[0].from, 1000);
        let k1 = v.open(&first.keys[0]).unwrap();
        assert_eq!(
            plan(&first, 1000 + life - lead - 1, life, &v).unwrap(),
            None
        );
        let rotated = plan(&first, 1000 + life - lead, life, &v).unwrap().unwrap();
        assert_eq!(rotated.keys.len(), 2);
        let from = rotated.keys[0].from;
        assert_eq!(from, 1000 + life);
        let k2 = v.open(&rotated.keys[0]).unwrap();
        // Before its time the new key only opens; from it on it seals.
        assert_eq!(in_force(&rotated, from - 1, &v), vec![k1, k2]);
        assert_eq!(in_force(&rotated, from, &v), vec![k2, k1]);
        // No second new key while one waits for its time.
        assert_eq!(plan(&rotated, from - 1, life, &v).unwrap(), None);
        // The old key retired at `from`: kept a lifetime after.
        assert_eq!(
            plan(&rotated, from + life - lead - 1, life, &v).unwrap(),
            None
        );
        let later = plan(&rotated, from + life, life, &v).unwrap().unwrap();
        assert!(later.keys.iter().all(|k| v.open(k) != Some(k1)));
        assert!(later.keys.iter().any(|k| v.open(k) == Some(k2)));
    }

    /// What etcd holds cannot put a key in force: entries sealed under
    /// another secret are kept for their owners but never used, forged or
    /// damaged ones neither, and an entry from the far future (a forged
    /// `from`, or an edge's clock years ahead) is dropped, not sealed with,
    /// and does not stop rotation.
    #[test]
    fn entries_we_cannot_open_or_from_the_far_future_are_never_used() {
        let v = Vault::new("cluster-secret-0123456789");
        let other = Vault::new("another-secret-0123456789");
        let theirs = other.make(1000).unwrap();
        let stored = Stored {
            keys: vec![theirs.clone()],
        };
        assert!(in_force(&stored, 1000, &v).is_empty());
        let mine = plan(&stored, 1000, 3600, &v).unwrap().unwrap();
        assert_eq!(mine.keys.len(), 2, "ours added, theirs kept");
        assert!(mine.keys.contains(&theirs));
        assert_eq!(in_force(&mine, 1000, &v).len(), 1);
        // A `from` changed after sealing opens nothing.
        let mut moved = mine.keys[0].clone();
        moved.from += 1;
        assert_eq!(v.open(&moved), None);
        // Far-future entries, even sealed by us, are dropped.
        let future = v.make(u64::MAX).unwrap();
        let with_future = Stored {
            keys: vec![future.clone(), mine.keys[0].clone()],
        };
        assert_eq!(in_force(&with_future, 1000, &v).len(), 1);
        let cleaned = plan(&with_future, 1000, 3600, &v).unwrap().unwrap();
        assert!(!cleaned.keys.contains(&future));
        // Rotation still happens for a list that held one.
        let rotated = plan(&cleaned, 1000 + 3600, 3600, &v).unwrap().unwrap();
        assert_eq!(
            rotated.keys.iter().filter(|k| v.open(k).is_some()).count(),
            2
        );
        // Theirs goes two lifetimes after its time.
        let gone = plan(&rotated, 1000 + 2 * 3600, 3600, &v).unwrap().unwrap();
        assert!(!gone.keys.contains(&theirs));
        // Never more than MAX_KEYS.
        let many = Stored {
            keys: (0..50).map(|i| other.make(1000 + i).unwrap()).collect(),
        };
        let capped = plan(&many, 1100, 3600, &v).unwrap().unwrap();
        assert_eq!(capped.keys.len(), MAX_KEYS);
        assert!(
            v.open(&capped.keys[0]).is_some(),
            "ours, the newest, is kept"
        );
    }
}
