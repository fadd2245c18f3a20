//! Reaching the server: URL targets, source-address spreading, TCP and TLS.
//!
//! One client host can hold only ~28k connections to one server address per source address
//! (the ephemeral port range), so big runs spread their sockets over many loopback source
//! addresses (127.0.0.1, 127.0.0.2, …). Each socket is created with socket2, marked
//! `IP_BIND_ADDRESS_NO_PORT` so the kernel picks the port at `connect` time (per 4-tuple rather
//! than per bind), bound to its source address, then connected through tokio.
//!
//! TLS is done here with tokio-rustls, not inside tungstenite, so the same [`Conn`] stream
//! serves WebSocket and HTTP API traffic for both `ws://`/`http://` and `wss://`/`https://`.

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// Linux `IP_BIND_ADDRESS_NO_PORT` (level `IPPROTO_IP`).
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
/// Usable host numbers per /24: .1 ..= .254 (skip .0 and .255).
const HOSTS_PER_BLOCK: u32 = 254;
/// How many distinct source addresses [`source_ip`] can produce inside 127.0.0.0/8.
pub const MAX_SOURCE_IPS: u32 = 65_536 * HOSTS_PER_BLOCK;

/// The `i`-th source address: 127.0.0.1, …, 127.0.0.254, 127.0.1.1, … (never .0 or .255).
pub fn source_ip(i: u32) -> Ipv4Addr {
    assert!(i < MAX_SOURCE_IPS, "source address index {i} out of range");
    let block = i / HOSTS_PER_BLOCK;
    let host = (i % HOSTS_PER_BLOCK + 1) as u8;
    Ipv4Addr::new(127, (block >> 8) as u8, block as u8, host)
}

/// The disjoint slice of `total` source addresses that worker `child` of `count` uses.
/// Every worker gets at least one address, so callers make `total >= count`.
pub fn source_ip_range(total: u32, child: u32, count: u32) -> Range<u32> {
    let count = count.max(1);
    let lo = (total as u64 * child as u64 / count as u64) as u32;
    let hi = (total as u64 * (child as u64 + 1) / count as u64) as u32;
    lo..hi.max(lo + 1)
}

/// A parsed `ws[s]://` or `http[s]://` base URL, resolved once.
#[derive(Clone, Debug)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
    /// Path prefix without trailing slash ("" for none).
    pub base_path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let tls = match uri.scheme_str() {
            Some("ws") | Some("http") => false,
            Some("wss") | Some("https") => true,
            other => bail!("URL {url}: unsupported scheme {other:?} (use ws, wss, http or https)"),
        };
        let host = uri.host().ok_or_else(|| anyhow!("URL {url} has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .with_context(|| format!("cannot resolve {host}"))?
            .find(|a| a.is_ipv4())
            .or_else(|| {
                std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .ok()?
                    .next()
            })
            .ok_or_else(|| anyhow!("{host} resolves to no address"))?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Target {
            tls,
            host,
            port,
            addr,
            base_path,
        })
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }

    /// `host:port` for the Host header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Opens a TCP connection, optionally from a chosen IPv4 source address.
pub async fn tcp_connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let stream = match (src, addr.ip()) {
        (Some(ip), IpAddr::V4(_)) => {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            sock.set_nonblocking(true)?;
            crate::sys::set_opt(&sock, libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
            sock.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
            let std_stream: std::net::TcpStream = sock.into();
            TcpSocket::from_std_stream(std_stream).connect(addr).await?
        }
        _ => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A client stream, plain or TLS; boxed TLS keeps idle sockets small.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Either of them behind `--deflate`'s frame counter and inflater.
    Wire(Box<crate::wire::Wire>),
}

/// Connects to `target` (TCP, then TLS when the target is `wss`/`https`).
pub async fn connect(
    target: &Target,
    src: Option<Ipv4Addr>,
    tls: Option<&TlsConnector>,
) -> Result<Conn, ConnectError> {
    let tcp = tcp_connect(target.addr, src)
        .await
        .map_err(ConnectError::Tcp)?;
    if !target.tls {
        return Ok(Conn::Plain(tcp));
    }
    let connector = tls.ok_or_else(|| ConnectError::Tls("no TLS configuration".into()))?;
    let name =
        ServerName::try_from(target.host.clone()).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let s = connector
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    Ok(Conn::Tls(Box::new(s)))
}

#[derive(Debug)]
pub enum ConnectError {
    Tcp(io::Error),
    Tls(String),
}

impl ConnectError {
    /// Short stable label for error tables.
    pub fn label(&self) -> String {
        match self {
            ConnectError::Tcp(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => "tcp_refused".into(),
                io::ErrorKind::TimedOut => "tcp_timeout".into(),
                io::ErrorKind::ConnectionReset => "tcp_reset".into(),
                io::ErrorKind::AddrNotAvailable => "tcp_no_source_port".into(),
                _ => match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => "client_out_of_fds".into(),
                    Some(n) => format!("tcp_errno_{n}"),
                    None => format!("tcp_{:?}", e.kind()).to_lowercase(),
                },
            },
            ConnectError::Tls(_) => "tls".into(),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Tcp(e) => write!(f, "tcp: {e}"),
            ConnectError::Tls(e) => write!(f, "tls: {e}"),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Wire(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Wire(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Wire(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Wire(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Wire(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Wire(s) => s.is_write_vectored(),
        }
    }
}

/// Builds the rustls client configuration: trust `ca` (PEM) if given, else the system bundle
/// when present; `insecure` accepts any certificate (still checks handshake signatures).
pub fn tls_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let (path, required) = match ca {
            Some(p) => (p.to_path_buf(), true),
            None => ("/etc/ssl/certs/ca-certificates.crt".into(), false),
        };
        match std::fs::read(&path) {
            Ok(pem) => {
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.with_context(|| format!("bad PEM in {}", path.display()))?;
                    // System bundles may hold certificates rustls rejects; a given CA must load.
                    if let Err(e) = roots.add(cert) {
                        if required {
                            bail!("CA {}: {e}", path.display());
                        }
                    }
                }
                if required && roots.is_empty() {
                    bail!("no certificate found in {}", path.display());
                }
            }
            Err(e) if required => {
                return Err(e).with_context(|| format!("reading CA {}", path.display()))
            }
            Err(_) => {}
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    // Every simulated client is a different browser: full handshakes, no
    // session resumption (which would make the server's work look cheaper).
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate, any name; signatures are still verified so the handshake is sane.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_enumerate_loopback_skipping_0_and_255() {
        assert_eq!(source_ip(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_ip(253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_ip(254), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_ip(254 * 256), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(
            source_ip(MAX_SOURCE_IPS - 1),
            Ipv4Addr::new(127, 255, 255, 254)
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..3000 {
            let ip = source_ip(i);
            assert!(ip.is_loopback());
            let last = ip.octets()[3];
            assert!(last != 0 && last != 255);
            assert!(seen.insert(ip), "duplicate {ip}");
        }
    }

    #[test]
    fn source_ip_ranges_are_disjoint_and_cover_all() {
        for (total, count) in [(10u32, 3u32), (4, 4), (100, 7), (1, 1)] {
            let mut next = 0;
            for c in 0..count {
                let r = source_ip_range(total, c, count);
                assert_eq!(r.start, next, "total={total} count={count}");
                assert!(!r.is_empty());
                next = r.end;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn targets_parse() {
        let t = Target::parse("wss://127.0.0.1:6002/prefix/").unwrap();
        assert!(t.tls && t.is_loopback());
        assert_eq!(
            (t.port, t.base_path.as_str(), t.authority().as_str()),
            (6002, "/prefix", "127.0.0.1:6002")
        );
        let t = Target::parse("http://localhost").unwrap();
        assert!(!t.tls && t.is_loopback() && t.port == 80 && t.base_path.is_empty());
        assert!(Target::parse("ftp://x").is_err());
    }

    #[tokio::test]
    async fn connects_from_a_chosen_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tcp_connect(addr, Some(source_ip(41))), listener.accept());
        let client = client.unwrap();
        assert_eq!(
            client.local_addr().unwrap().ip(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 42))
        );
        assert_eq!(
            accepted.unwrap().1.ip(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 42))
        );
    }
}
