//! Optional mutual TLS on the edge ↔ worker link: every node presents a
//! certificate signed by the cluster's CA and accepts only peers that do.
//! Edges check a worker's certificate against the host of its address in
//! `cluster.workers` (so worker certificates carry that IP or name).
//! Workers check that an edge's certificate names the edge id its `Hello`
//! claims (a DNS name in its subject alternative names): any certificate of
//! the cluster's CA could otherwise claim any edge id, and a new link of an
//! edge replaces its old one.

use crate::config::LinkTlsConfig;
use crate::tls::TlsError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A link's byte stream: plain TCP or TLS.
pub trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkIo for T {}

pub struct LinkTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn err(path: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("{path}: {e}"))
}

impl LinkTls {
    pub fn load(c: &LinkTlsConfig) -> Result<LinkTls, TlsError> {
        // Same checks as the public listener: chain, key match, expiry.
        crate::tls::load_certified_key(c.cert.as_ref(), c.key.as_ref())?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| err(&c.cert, e))?;
        let key = || PrivateKeyDer::from_pem_file(&c.key).map_err(|e| err(&c.key, e));
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&c.ca).map_err(|e| err(&c.ca, e))? {
            roots
                .add(ca.map_err(|e| err(&c.ca, e))?)
                .map_err(|e| err(&c.ca, e))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| err(&c.ca, e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| err(&c.cert, e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| err(&c.cert, e))?;
        Ok(LinkTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// Accept a link; the stream and the peer's (verified) certificate.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(Box<dyn LinkIo>, Option<CertificateDer<'static>>)> {
        let stream = self.acceptor.accept(tcp).await?;
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        Ok((Box::new(stream), cert))
    }

    /// Connect to the worker at `addr` (`host:port`), checking its certificate against `host`.
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<Box<dyn LinkIo>> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(|c| c == '[' || c == ']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Box::new(self.connector.connect(name, tcp).await?))
    }
}

/// Whether `cert` (already verified against the cluster's CA) names `id`
/// among its DNS subject alternative names.
pub fn names(cert: &CertificateDer<'_>, id: &str) -> bool {
    let Ok(name) = ServerName::try_from(id) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}
