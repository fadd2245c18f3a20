//! TLS ticket keys kept in etcd, for edges whose cluster uses it
//! (`tls.ticket_keys_in_etcd`): the same keys on every edge, made and
//! rotated by the edges themselves, no file to distribute.
//!
//! Why: a client dropped by one edge should resume its TLS session on any
//! other (see [`crate::tls::tickets`]); with etcd already holding the
//! cluster's membership, the keys can live next to it.
//!
//! One key, `<p>/tls/ticket_keys`, holds `{"keys":[{"key":hex,"from":unix}]}`,
//! newest first. Every edge reads it every [`POLL`] and puts in force: the
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
//! reach etcd. Secret material: anyone who can read the cluster's etcd
//! prefix can open the tickets (docs/SECURITY.md "TLS session tickets").
//! The keys are never logged.

use crate::config::EtcdConfig;
use crate::tls::tickets::{SharedTickets, MAX_KEYS};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
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

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub keys: Vec<StoredKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// 64 hex digits.
    pub key: String,
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

/// The keys' place in etcd.
pub fn key_path(prefix: &str) -> String {
    format!("{prefix}/tls/ticket_keys")
}

/// Keep `tickets` on the cluster's keys until `stop`.
pub fn spawn(
    cfg: &EtcdConfig,
    tickets: Arc<SharedTickets>,
    lifetime: Duration,
    stop: CancellationToken,
) {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.request_timeout.get())
            .with_timeout(cfg.request_timeout.get());
        let mut client = None;
        let mut installed = None;
        loop {
            if client.is_none() {
                client = Client::connect(&cfg.endpoints, Some(options.clone()))
                    .await
                    .ok();
            }
            if let Some(c) = &mut client {
                let now = crate::clock::unix_now().as_secs();
                match sync(c, &cfg.prefix, now, lifetime.as_secs()).await {
                    Ok(stored) => {
                        if installed.as_ref() != Some(&stored) {
                            let keys = in_force(&stored, now);
                            tickets.set_keys(&keys);
                            tracing::info!(keys = keys.len(), "TLS ticket keys from etcd in force");
                            installed = Some(stored);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS ticket keys: etcd not reachable; the keys in force stay");
                        client = None;
                    }
                }
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
) -> Result<Stored, KeysError> {
    let mut client = Client::connect(endpoints, None).await?;
    sync(&mut client, prefix, now, lifetime).await
}

/// Read the keys, write the first one or a rotation if due, and answer
/// the keys as they now stand in etcd.
pub async fn sync(
    client: &mut Client,
    prefix: &str,
    now: u64,
    lifetime: u64,
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
    let mut make = new_key;
    let Some(next) = plan(&stored, now, lifetime, &mut make)? else {
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
    // Another edge wrote first: theirs stands.
    for op in r.op_responses() {
        if let TxnOpResponse::Get(g) = op {
            if let Some(kv) = g.kvs().first() {
                return Ok(serde_json::from_slice(kv.value()).unwrap_or_default());
            }
        }
    }
    Ok(stored)
}

fn new_key() -> Result<String, KeysError> {
    let mut k = [0u8; 32];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| KeysError::Random)?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the list should become at `now`, if anything changes: a first
/// key; a new key `LEAD` ahead once the newest has sealed for `lifetime`;
/// keys retired more than `lifetime` ago dropped.
pub fn plan(
    stored: &Stored,
    now: u64,
    lifetime: u64,
    make: &mut dyn FnMut() -> Result<String, KeysError>,
) -> Result<Option<Stored>, KeysError> {
    let valid: Vec<StoredKey> = stored
        .keys
        .iter()
        .filter(|k| parse(&k.key).is_some())
        .cloned()
        .collect();
    let mut keys = valid.clone();
    if keys.is_empty() {
        keys.push(StoredKey {
            key: make()?,
            from: now,
        });
    } else if keys[0].from <= now && keys[0].from + lifetime <= now + LEAD.as_secs() {
        keys.insert(
            0,
            StoredKey {
                key: make()?,
                from: now + LEAD.as_secs(),
            },
        );
    }
    // A key retired (its successor sealing) more than a lifetime ago
    // opens nothing any more.
    let mut kept = vec![keys[0].clone()];
    for pair in keys.windows(2) {
        let retired = pair[0].from;
        if retired + lifetime > now && kept.len() < MAX_KEYS {
            kept.push(pair[1].clone());
        }
    }
    let next = Stored { keys: kept };
    Ok((next.keys != stored.keys).then_some(next))
}

/// The keys to put in force at `now`: the newest whose time has come
/// first (it seals), then every other (they open).
pub fn in_force(stored: &Stored, now: u64) -> Vec<[u8; 32]> {
    let keys: Vec<(u64, [u8; 32])> = stored
        .keys
        .iter()
        .filter_map(|k| Some((k.from, parse(&k.key)?)))
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

fn parse(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut() -> Result<String, KeysError> {
        let mut n = 0u8;
        move || {
            n += 1;
            Ok(format!("{n:02x}").repeat(32))
        }
    }

    /// The life of the keys: a first one; a successor written `LEAD`
    /// ahead once the first has sealed for a lifetime, opening at once and
    /// sealing from its time; the old one dropped a lifetime after it
    /// retired; nothing written while nothing is due.
    #[test]
    fn keys_are_made_rotated_ahead_and_dropped_after_a_lifetime() {
        let life = 3600;
        let lead = LEAD.as_secs();
        let mut make = counter();
        let first = plan(&Stored::default(), 1000, life, &mut make)
            .unwrap()
            .unwrap();
        assert_eq!(first.keys.len(), 1);
        assert_eq!(first.keys[0].from, 1000);
        assert_eq!(
            plan(&first, 1000 + life - lead - 1, life, &mut make).unwrap(),
            None
        );
        let rotated = plan(&first, 1000 + life - lead, life, &mut make)
            .unwrap()
            .unwrap();
        assert_eq!(rotated.keys.len(), 2);
        let from = rotated.keys[0].from;
        assert_eq!(from, 1000 + life);
        // Before its time the new key only opens; from it on it seals.
        let before = in_force(&rotated, from - 1);
        assert_eq!(before[0], parse(&first.keys[0].key).unwrap());
        assert_eq!(before.len(), 2);
        let after = in_force(&rotated, from);
        assert_eq!(after[0], parse(&rotated.keys[0].key).unwrap());
        // No second new key while one waits for its time.
        assert_eq!(plan(&rotated, from - 1, life, &mut make).unwrap(), None);
        // The old key retired at `from`: dropped a lifetime later.
        assert_eq!(
            plan(&rotated, from + life - lead - 1, life, &mut make).unwrap(),
            None
        );
        let later = plan(&rotated, from + life, life, &mut make)
            .unwrap()
            .unwrap();
        assert!(later.keys.iter().all(|k| k.key != first.keys[0].key));
        // Garbage in etcd is replaced, never put in force.
        let junk = Stored {
            keys: vec![StoredKey {
                key: "zz".into(),
                from: 0,
            }],
        };
        assert!(in_force(&junk, 10).is_empty());
        let fixed = plan(&junk, 10, life, &mut make).unwrap().unwrap();
        assert_eq!(fixed.keys.len(), 1);
        assert!(parse(&fixed.keys[0].key).is_some());
    }
}
