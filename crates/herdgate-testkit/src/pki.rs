//! A throwaway PKI for TLS tests: a CA (distinct subject from its leaves,
//! or OpenSSL-based clients take a leaf for self-signed) and leaves for
//! localhost / 127.0.0.1, written to a temp dir.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};

/// A test CA that signs leaf certificates for localhost / 127.0.0.1.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "herdgate test CA");
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Write a leaf cert + PKCS#8 key named `name`; returns (cert path, key path, cert DER).
    pub fn leaf(&self, name: &str, expired: bool) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        self.leaf_with(name, expired, &[])
    }

    /// [`Pki::leaf`], with `dns` names added to its subject alternative names
    /// (a link peer's node id).
    pub fn leaf_named(
        &self,
        name: &str,
        dns: &[&str],
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        self.leaf_with(name, false, dns)
    }

    fn leaf_with(
        &self,
        name: &str,
        expired: bool,
        dns: &[&str],
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(dns.iter().map(|d| d.to_string()));
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.der().clone())
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        let p = self.dir.path().join("ca.pem");
        std::fs::write(&p, &self.ca_pem).unwrap();
        p
    }
}

/// A `[tls]` config section for `cert` and `key`, plus `extra` lines.
pub fn tls_section(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{extra}",
        cert.display().to_string(),
        key.display().to_string()
    )
}
