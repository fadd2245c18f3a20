//! The real client address behind a load balancer: PROXY protocol v1/v2 on
//! the listener, or `X-Forwarded-For` from trusted proxies. Neither is
//! believed unless configured; per-IP limits and logs use the result.
//!
//! The header is parsed by the `ppp` crate, partial headers included. Two
//! parts stay here, on purpose: the read loop ([`read_header`]: ppp parses
//! bytes, it does not read a socket), and the bounds ppp does not set —
//! a v2 header is at most [`V2_MAX_BODY`] bytes past its 16-byte head (ppp
//! takes the length field's 64 KiB, which a client could make us buffer
//! per connection), a first byte that is neither header's is
//! [`ProxyError::Missing`] at once (ppp would report a v1 UTF-8 error), and
//! a v1 line is framed here (up to CRLF, at most 107 bytes) before ppp
//! parses it (see [`parse_header`] for why).

use crate::config::Cidr;
use ppp::PartialResult;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("connection closed before the PROXY protocol header")]
    Closed,
}

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;
/// Largest v2 address block accepted (addresses plus TLVs such as a cloud
/// load balancer's endpoint id); a longer header is malformed.
pub const V2_MAX_BODY: usize = 512;
const BUF: usize = 16 + V2_MAX_BODY;

/// What the bytes received so far say about a PROXY protocol header.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// Not complete yet: read more.
    Partial,
    /// A complete header of `len` bytes naming `client` (`None` for LOCAL /
    /// UNKNOWN: use the TCP peer).
    Complete {
        client: Option<SocketAddr>,
        len: usize,
    },
}

/// Look at the first bytes of a connection (pure: the fuzz target's entry point).
pub fn parse_header(bytes: &[u8]) -> Result<Header, ProxyError> {
    let prefix_ok = |sig: &[u8]| sig.starts_with(&bytes[..bytes.len().min(sig.len())]);
    if !(prefix_ok(V2_SIG) || prefix_ok(b"PROXY ")) {
        return Err(ProxyError::Missing);
    }
    if bytes.is_empty() {
        return Ok(Header::Partial);
    }
    // A v2 signature still arriving is v2 too (ppp answers Incomplete):
    // read as v1, its leading CRLF would end an empty line.
    if prefix_ok(V2_SIG) {
        if bytes.len() >= 16 && u16::from_be_bytes([bytes[14], bytes[15]]) as usize > V2_MAX_BODY {
            return Err(ProxyError::Malformed("v2 header longer than 528 bytes"));
        }
        return match ppp::v2::Header::try_from(bytes) {
            Ok(h) => Ok(Header::Complete {
                client: v2_client(&h)?,
                len: h.len(),
            }),
            Err(e) if e.is_incomplete() => Ok(Header::Partial),
            Err(e) => Err(ProxyError::Malformed(v2_error(&e))),
        };
    }
    // v1 is handed to ppp a whole line at a time: its own partial
    // detection calls a line cut right after its last space ("... 51000 ")
    // malformed, where more bytes would have made it whole (found by
    // `headers_split_anywhere_parse_the_same` below).
    match bytes[..bytes.len().min(V1_MAX)]
        .windows(2)
        .position(|w| w == b"\r\n")
    {
        Some(i) => match ppp::v1::Header::try_from(&bytes[..i + 2]) {
            Ok(h) if h.header.len() == i + 2 => Ok(Header::Complete {
                client: v1_client(&h.addresses),
                len: i + 2,
            }),
            Ok(_) => Err(ProxyError::Malformed("v1 fields")),
            Err(e) => Err(ProxyError::Malformed(v1_error(&e))),
        },
        None if bytes.len() >= V1_MAX => {
            Err(ProxyError::Malformed("v1 line longer than 107 bytes"))
        }
        None => Ok(Header::Partial),
    }
}

fn v1_client(a: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_client(h: &ppp::v2::Header<'_>) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v2::{Addresses, Command};
    if h.command == Command::Local {
        return Ok(None); // health checks from the balancer itself
    }
    match h.addresses {
        Addresses::IPv4(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::IPv6(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::Unspecified => Ok(None),
        Addresses::Unix(_) => Err(ProxyError::Malformed("v2 address family or length")),
    }
}

/// ppp's verdict in this module's words (the log line of a refused header).
fn v1_error(e: &ppp::v1::BinaryParseError) -> &'static str {
    use ppp::v1::{BinaryParseError as B, ParseError as P};
    match e {
        B::InvalidUtf8(_) => "v1 not ASCII",
        B::Parse(P::HeaderTooLong) => "v1 line longer than 107 bytes",
        B::Parse(P::InvalidSourceAddress(_) | P::InvalidDestinationAddress(_)) => "v1 address",
        B::Parse(P::InvalidSourcePort(_) | P::InvalidDestinationPort(_)) => "v1 port",
        B::Parse(P::InvalidSuffix) => "v1 without CRLF",
        B::Parse(_) => "v1 fields",
    }
}

fn v2_error(e: &ppp::v2::ParseError) -> &'static str {
    use ppp::v2::ParseError as P;
    match e {
        P::Prefix | P::Version(_) => "v2 signature or version",
        P::Command(_) => "v2 command",
        P::AddressFamily(_) | P::InvalidAddresses(..) => "v2 address family or length",
        P::Protocol(_) => "v2 protocol",
        _ => "v2 header",
    }
}

/// Read and consume a PROXY protocol header. Returns the client address it
/// names (`None`: use the TCP peer) and the bytes read past the header (the
/// start of the TLS or HTTP stream), which the caller must replay
/// ([`Rewind`]). Reads into a buffer and parses what arrived, so a client
/// that stalls mid-header costs a parked task, not a spinning one; the
/// caller bounds the wait.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyError> {
    let mut buf = vec![0u8; BUF];
    let mut filled = 0;
    loop {
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(|_| ProxyError::Closed)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        filled += n;
        if let Header::Complete { client, len } = parse_header(&buf[..filled])? {
            buf.truncate(filled);
            buf.drain(..len);
            return Ok((client, buf));
        }
        if filled == buf.len() {
            return Err(ProxyError::Malformed("header does not end"));
        }
    }
}

/// A stream that first replays bytes already read from it (what followed a
/// PROXY header), then reads on.
pub struct Rewind<T> {
    pre: bytes::Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(pre: Vec<u8>, inner: T) -> Rewind<T> {
        Rewind {
            pre: bytes::Bytes::from(pre),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            bytes::Buf::advance(&mut self.pre, n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The client address for a request from `peer`: if `peer` is a trusted
/// proxy, the right-most `X-Forwarded-For` entry that is not itself trusted
/// (entries to its left were written by the client and prove nothing).
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let Some(xff) = xff else { return peer };
    let mut last = peer;
    for entry in xff.rsplit(',').map(str::trim) {
        match entry.parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => last = ip,
            Ok(ip) => return ip,
            Err(_) => return last,
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client a whole header names.
    fn parse_v1(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        match parse_header(bytes)? {
            Header::Complete { client, len } => {
                assert_eq!(len, bytes.len());
                Ok(client)
            }
            Header::Partial => Err(ProxyError::Malformed("partial")),
        }
    }

    fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        parse_v1(&[&head[..], body].concat())
    }

    #[test]
    fn v1() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"),
            Ok(Some("203.0.113.7:51000".parse().unwrap()))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 ::1 51000 443\r\n"),
            Ok(Some("[2001:db8::1]:51000".parse().unwrap()))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn headers_split_anywhere_parse_the_same() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET /";
        let line = v1.len() - 5;
        for cut in 0..v1.len() {
            let r = parse_header(&v1[..cut]).unwrap();
            if cut < line {
                assert_eq!(r, Header::Partial, "cut at {cut}");
            } else {
                assert_eq!(
                    r,
                    Header::Complete {
                        client: Some("203.0.113.7:51000".parse().unwrap()),
                        len: line
                    }
                );
            }
        }
        assert_eq!(parse_header(b"GET / HTTP/1.1"), Err(ProxyError::Missing));
        assert_eq!(
            parse_header(b"\x16\x03\x01"),
            Err(ProxyError::Missing),
            "TLS without PROXY"
        );
        assert!(parse_header(&[b"PROXY ".as_slice(), &[b'x'; 200]].concat()).is_err());
        // v2, with a TLV after the addresses.
        let mut v2 = V2_SIG.to_vec();
        v2.extend([
            0x21, 0x11, 0, 17, 203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x01, 0xbb,
        ]);
        v2.extend([0x04, 0, 2, 0xab, 0xcd, b'G']);
        let whole = v2.len() - 1;
        for cut in 0..v2.len() {
            let r = parse_header(&v2[..cut]).unwrap();
            if cut < whole {
                assert_eq!(r, Header::Partial, "cut at {cut}");
            } else {
                assert_eq!(
                    r,
                    Header::Complete {
                        client: Some("203.0.113.7:51000".parse().unwrap()),
                        len: whole
                    }
                );
            }
        }
        let mut big = V2_SIG.to_vec();
        big.extend([0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse_header(&big), Err(ProxyError::Malformed(_))));
    }

    #[tokio::test]
    async fn read_header_returns_what_follows_and_waits_without_spinning() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let r = read_header(&mut server).await;
            (r, server)
        });
        use tokio::io::AsyncWriteExt;
        client.write_all(b"PRO").await.unwrap();
        // A stalled partial header parks the reader: it is still waiting.
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        client
            .write_all(b"XY TCP4 1.2.3.4 5.6.7.8 1000 443\r\nhello")
            .await
            .unwrap();
        let (r, server) = reader.await.unwrap();
        let (addr, rest) = r.unwrap();
        assert_eq!(addr, Some("1.2.3.4:1000".parse().unwrap()));
        let mut replay = Rewind::new(rest, server);
        let mut got = [0u8; 5];
        replay.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn v2() {
        let mut head = [0u8; 16];
        head[..12].copy_from_slice(V2_SIG);
        head[12] = 0x21; // v2, PROXY
        head[13] = 0x11; // INET, STREAM
        let body = [203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x01, 0xbb];
        head[15] = body.len() as u8;
        assert_eq!(
            parse_v2(&head, &body),
            Ok(Some("203.0.113.7:51000".parse().unwrap()))
        );
        head[12] = 0x20; // LOCAL
        assert_eq!(parse_v2(&head, &body), Ok(None));
        head[12] = 0x31; // version 3
        assert!(parse_v2(&head, &body).is_err());
        head[12] = 0x21;
        head[15] = 4;
        assert!(parse_v2(&head, &body[..4]).is_err(), "short body");
        head[15] = 12;
        assert_eq!(
            parse_header(&[&head[..], &body[..4]].concat()),
            Ok(Header::Partial),
            "body still arriving"
        );
        head[13] = 0x31; // AF_UNIX: not a client address
        head[15] = 216;
        assert!(parse_v2(&head, &[0; 216]).is_err());
    }

    #[test]
    fn cidrs_and_forwarded_for() {
        let trusted: Vec<Cidr> = ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(trusted[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!trusted[0].contains("11.1.2.3".parse().unwrap()));
        assert!(trusted[1].contains("2001:db8::5".parse().unwrap()));
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: its header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), Some("1.1.1.1"), &trusted),
            ip("198.51.100.1")
        );
        // Trusted peer: right-most untrusted entry; a spoofed left part is ignored.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                Some("6.6.6.6, 203.0.113.7, 10.0.0.9"),
                &trusted
            ),
            ip("203.0.113.7")
        );
        assert_eq!(client_ip(ip("10.0.0.2"), None, &trusted), ip("10.0.0.2"));
        assert_eq!(
            client_ip(ip("10.0.0.2"), Some("garbage"), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), Some("1.1.1.1"), &[]),
            ip("10.0.0.2"),
            "nothing trusted unless configured"
        );
    }
}
