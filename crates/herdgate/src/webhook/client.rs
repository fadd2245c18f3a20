//! A small HTTP/1.1 client for webhook POSTs: one kept-alive connection per
//! webhook (plain TCP or rustls), reopened after any failure. A webhook is
//! one backend URL, sent to in order, so one connection is all it needs.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use tokio::net::TcpStream;

/// Response bodies are read (so the connection can be reused) up to this.
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("bad host name for TLS")]
    Name,
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("response body over {MAX_RESPONSE} bytes")]
    TooLarge,
}

/// TLS settings for https webhooks: the CAs in `ca` (a PEM file), or the
/// system's roots when `ca` is empty.
pub fn tls_config(ca: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert); // a system store may hold some certs rustls refuses
        }
    } else {
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
            let cert = cert.map_err(|e| format!("{ca}: {e}"))?;
            roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{ca}: no certificate in it"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One open connection to a webhook's host.
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
}

async fn connect(uri: &Uri, tls: &Arc<rustls::ClientConfig>) -> Result<Conn, ClientError> {
    let host = uri.host().unwrap_or_default();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // An IPv6 literal comes bracketed in a URI.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(ClientError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let send = if https {
        let name = ServerName::try_from(bare.to_string()).map_err(|_| ClientError::Name)?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(ClientError::Tls)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        send
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        send
    };
    Ok(Conn { send })
}

/// POST `body` to `uri` over `conn` (opened or reopened as needed); the
/// response status. On any error the connection is dropped.
pub async fn post(
    conn: &mut Option<Conn>,
    uri: &Uri,
    tls: &Arc<rustls::ClientConfig>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ClientError> {
    let result = async {
        if conn.as_mut().is_none_or(|c| c.send.is_closed()) {
            *conn = Some(connect(uri, tls).await?);
        }
        let c = conn.as_mut().expect("just opened");
        c.send.ready().await?;
        let mut req = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
            .body(Full::new(body))
            .expect("a valid request");
        *req.headers_mut() = headers.clone();
        let resp = c.send.send_request(req).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut read = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                read += data.len();
                if read > MAX_RESPONSE {
                    return Err(ClientError::TooLarge);
                }
            }
        }
        Ok(status)
    }
    .await;
    if result.is_err() {
        *conn = None;
    }
    result
}
