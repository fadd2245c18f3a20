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

/// A rustls server config over `store`: TLS 1.2 + 1.3, ALPN http/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A minimal DER reader for the one field herdgate needs: a certificate's
/// `notAfter` (checked at load and reload). Public for the fuzz target.
pub mod stream;

pub mod der {
    /// One TLV: (tag, content, rest).
    fn read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    pub fn not_after(cert: &[u8]) -> Option<i64> {
        let (0x30, cert, _) = read(cert)? else {
            return None;
        };
        let (0x30, tbs, _) = read(cert)? else {
            return None;
        };
        let mut rest = tbs;
        let (tag, _, after) = read(rest)?;
        if tag == 0xa0 {
            rest = after; // explicit version
        }
        for _ in 0..3 {
            rest = read(rest)?.2; // serial, signature algorithm, issuer
        }
        let (0x30, validity, _) = read(rest)? else {
            return None;
        };
        let (_, _, validity) = read(validity)?; // notBefore
        let (tag, time, _) = read(validity)?;
        parse_time(tag, std::str::from_utf8(time).ok()?)
    }

    fn parse_time(tag: u8, s: &str) -> Option<i64> {
        // Digits only: `parse` would also take a sign ("-1"), and a date
        // out of range is no date (fuzzing found both).
        let digits = |r: std::ops::Range<usize>| {
            let d = s.get(r)?;
            d.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| d.parse::<i64>().ok())?
        };
        let (year, off) = match tag {
            0x17 => {
                let yy = digits(0..2)?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
            }
            0x18 => (digits(0..4)?, 4),
            _ => return None,
        };
        let (mo, d, h, mi, sec) = (
            digits(off..off + 2)?,
            digits(off + 2..off + 4)?,
            digits(off + 4..off + 6)?,
            digits(off + 6..off + 8)?,
            digits(off + 8..off + 10)?,
        );
        // RFC 5280 dates are 1950 onwards (UTCTime's range, then GeneralizedTime).
        if !((1950..=9999).contains(&year)
            && (1..=12).contains(&mo)
            && (1..=31).contains(&d)
            && (0..=23).contains(&h)
            && (0..=59).contains(&mi)
            && (0..=60).contains(&sec))
        {
            return None;
        }
        Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + sec)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date.
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times() {
            assert_eq!(days_from_civil(1970, 1, 1), 0);
            assert_eq!(parse_time(0x17, "700101000000Z"), Some(0));
            assert_eq!(parse_time(0x18, "20380119031408Z"), Some(2_147_483_648));
            assert_eq!(parse_time(0x17, "491231235959Z"), Some(2_524_607_999));
            assert_eq!(parse_time(0x05, "x"), None);
            // Found by fuzzing: signs and out-of-range fields are no date.
            assert_eq!(parse_time(0x18, "-9991231235959Z"), None);
            assert_eq!(parse_time(0x17, "+10101000000Z"), None);
            assert_eq!(parse_time(0x17, "701301000000Z"), None);
            assert_eq!(parse_time(0x17, "700100000000Z"), None);
            assert_eq!(parse_time(0x18, "01261231235959Z"), None);
            assert_eq!(parse_time(0x17, "700101250000Z"), None);
            assert_eq!(not_after(&[0x30, 0x01]), None);
            assert_eq!(not_after(&[]), None);
        }
    }
}
