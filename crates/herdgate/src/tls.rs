//! TLS termination with rustls.
//!
//! The certificate sits behind a [`CertStore`] that rustls asks on every
//! handshake, so a reload (SIGHUP) swaps it for new handshakes while the
//! connections already up keep the session keys they negotiated. A reload
//! that fails — missing file, key that does not match the certificate,
//! certificate already expired — leaves the old certificate serving.
//!
//! Only TLS 1.2 and 1.3, ALPN `http/1.1` (websockets upgrade over HTTP/1.1).
//!
//! Public connections run over [`stream::TlsStream`] (rustls's unbuffered
//! API: nothing buffered while a client is quiet, which halves an idle TLS
//! socket); the cluster link and webhook clients use tokio-rustls.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificate chain: {reason}")]
    Certs { path: String, reason: String },
    #[error("{path}: no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCerts { path: String },
    #[error("{path}: cannot read private key (PEM PKCS#8, SEC1 or PKCS#1 expected): {reason}")]
    Key { path: String, reason: String },
    #[error("{path}: unsupported private key type: {reason}")]
    KeyType { path: String, reason: String },
    #[error("{key}: private key does not match the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("{path}: certificate expired at unix time {not_after}")]
    Expired { path: String, not_after: i64 },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Read, check and assemble a certificate chain and its private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_name = cert.display().to_string();
    let key_name = key.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Certs {
            path: cert_name.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certs {
            path: cert_name.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCerts { path: cert_name });
    };
    if let Some(not_after) = der::not_after(leaf) {
        if not_after < now_unix() {
            return Err(TlsError::Expired {
                path: cert_name,
                not_after,
            });
        }
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key_name.clone(),
        reason: e.to_string(),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        TlsError::KeyType {
            path: key_name.clone(),
            reason: e.to_string(),
        }
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_name,
        key: key_name,
    })?;
    Ok(certified)
}

fn now_unix() -> i64 {
    crate::clock::unix_now().as_secs() as i64
}

/// The certificate in force, swappable while serving.
#[derive(Debug)]
pub struct CertStore {
    paths: RwLock<(PathBuf, PathBuf)>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn load(cert: &Path, key: &Path) -> Result<CertStore, TlsError> {
        let ck = load_certified_key(cert, key)?;
        Ok(CertStore {
            paths: RwLock::new((cert.to_path_buf(), key.to_path_buf())),
            current: RwLock::new(Arc::new(ck)),
        })
    }

    /// Re-read the files; on error keep serving the old certificate.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (cert, key) = self.paths.read().unwrap_or_else(|p| p.into_inner()).clone();
        self.reload_from(&cert, &key)
    }

    /// Load from (possibly new) paths; on success they become the paths in force.
    pub fn reload_from(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let result = load_certified_key(cert, key);
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("herdgate_tls_reloads_total", "result" => outcome).increment(1);
        let ck = result?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        *self.paths.write().unwrap_or_else(|p| p.into_inner()) =
            (cert.to_path_buf(), key.to_path_buf());
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A rustls server config over `store`: TLS 1.2 + 1.3, ALPN http/1.1,
/// session tickets under per-process keys (the defaults of `[tls]`).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = base_config(store)?;
    cfg.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// [`server_config`] with session tickets as `tls` says ([`tickets`]):
/// off, per-process keys, or the shared keys of `tls.ticket_keys`, whose
/// ticketer is returned too, for reloads to rotate its keys.
pub fn server_config_for(
    store: Arc<CertStore>,
    tls: &crate::config::TlsConfig,
) -> Result<
    (
        Arc<rustls::ServerConfig>,
        Option<Arc<tickets::SharedTickets>>,
    ),
    TlsError,
> {
    if tls.session_tickets && tls.ticket_keys.is_empty() && !tls.ticket_keys_in_etcd {
        return Ok((server_config(store)?, None));
    }
    let mut cfg = base_config(store)?;
    if !tls.session_tickets {
        // No resumption at all: no tickets, and no TLS 1.2 session ids.
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        return Ok((Arc::new(cfg), None));
    }
    let lifetime = tls.ticket_lifetime.get().as_secs().min(u64::from(u32::MAX)) as u32;
    if tls.ticket_keys_in_etcd {
        // No key, so no ticket, until the cluster's keys are read.
        let shared = Arc::new(tickets::SharedTickets::new(&[], lifetime));
        tracing::info!("TLS session tickets: shared keys from etcd");
        cfg.ticketer = shared.clone();
        return Ok((Arc::new(cfg), Some(shared)));
    }
    let keys =
        tickets::load(Path::new(&tls.ticket_keys)).map_err(|e| TlsError::Config(e.to_string()))?;
    let shared = Arc::new(tickets::SharedTickets::new(&keys, lifetime));
    tracing::info!(
        path = %tls.ticket_keys,
        keys = keys.len(),
        "TLS session tickets: shared keys (a client resumes on any process holding them)"
    );
    cfg.ticketer = shared.clone();
    Ok((Arc::new(cfg), Some(shared)))
}

fn base_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No early data: a ticket resumes a session, it never carries a
    // replayable request.
    cfg.max_early_data_size = 0;
    // One ticket per TLS 1.3 handshake (rustls sends two by default): a
    // websocket client reconnects one connection at a time, and each
    // resumption brings it a fresh one.
    cfg.send_tls13_tickets = 1;
    Ok(cfg)
}

pub mod stream;
pub mod tickets;

/// A certificate's `notAfter` (checked at load and reload), read with
/// `x509-parser`. Public for the fuzz target.
pub mod der {
    /// 1950-01-01T00:00:00Z, the first instant UTCTime can say.
    const EARLIEST: i64 = -631_152_000;
    /// 9999-12-31T23:59:59Z, the last instant GeneralizedTime can say.
    const LATEST: i64 = 253_402_300_799;

    /// `notAfter` of a DER certificate as Unix seconds; `None` if the
    /// certificate does not parse or the date is outside RFC 5280's
    /// 1950..=9999 (a date no CA writes is no date: the certificate is
    /// then loaded unchecked, and rustls judges it as before).
    pub fn not_after(cert: &[u8]) -> Option<i64> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
        let t = cert.validity().not_after.timestamp();
        (EARLIEST..=LATEST).contains(&t).then_some(t)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A self-signed certificate valid until midnight (UTC) of that day.
        fn cert_until(y: i32, m: u8, d: u8) -> Vec<u8> {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(1950, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
            params.self_signed(&key).unwrap().der().to_vec()
        }

        #[test]
        fn dates() {
            // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280).
            let at = |y, m, d| not_after(&cert_until(y, m, d));
            assert_eq!(at(1970, 1, 1), Some(0));
            assert_eq!(at(2038, 1, 19), Some(2_147_472_000));
            assert_eq!(at(2049, 12, 31), Some(2_524_521_600));
            assert_eq!(at(2050, 1, 1), Some(2_524_608_000));
            assert_eq!(at(1950, 1, 1), Some(EARLIEST));
            assert_eq!(not_after(&[0x30, 0x01]), None);
            assert_eq!(not_after(&[]), None);
        }
    }
}
