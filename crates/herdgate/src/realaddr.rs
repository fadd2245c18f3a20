//! The real client address behind a load balancer: PROXY protocol v1/v2 on
//! the listener, or `X-Forwarded-For` from trusted proxies. Neither is
//! believed unless configured; per-IP limits and logs use the result.

use crate::config::Cidr;
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
    if bytes.starts_with(V2_SIG) {
        if bytes.len() < 16 {
            return Ok(Header::Partial);
        }
        let body = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        if body > V2_MAX_BODY {
            return Err(ProxyError::Malformed("v2 header longer than 528 bytes"));
        }
        if bytes.len() < 16 + body {
            return Ok(Header::Partial);
        }
        let head: &[u8; 16] = bytes[..16].try_into().expect("16 bytes");
        let client = parse_v2(head, &bytes[16..16 + body])?;
        return Ok(Header::Complete {
            client,
            len: 16 + body,
        });
    }
    if bytes.len() < 6 {
        return Ok(Header::Partial);
    }
    match bytes[..bytes.len().min(V1_MAX)]
        .windows(2)
        .position(|w| w == b"\r\n")
    {
        Some(i) => Ok(Header::Complete {
            client: parse_v1(&bytes[..i + 2])?,
            len: i + 2,
        }),
        None if bytes.len() >= V1_MAX => {
            Err(ProxyError::Malformed("v1 line longer than 107 bytes"))
        }
        None => Ok(Header::Partial),
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

pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyError::Malformed("v1 without CRLF"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if ip.is_ipv4() != (*proto == "TCP4") {
                return Err(ProxyError::Malformed("v1 address family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyError::Malformed("v1 fields")),
    }
}

pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if &head[..12] != V2_SIG || head[12] >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 signature or version"));
    }
    match head[12] & 0x0f {
        0 => return Ok(None), // LOCAL: health checks from the balancer itself
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    match head[13] >> 4 {
        1 if body.len() >= 12 => {
            let ip = IpAddr::from([body[0], body[1], body[2], body[3]]);
            Ok(Some(SocketAddr::new(
                ip,
                u16::from_be_bytes([body[8], body[9]]),
            )))
        }
        2 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::from(a),
                u16::from_be_bytes([body[32], body[33]]),
            )))
        }
        0 => Ok(None), // AF_UNSPEC
        _ => Err(ProxyError::Malformed("v2 address family or length")),
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
        assert!(parse_v2(&head, &body[..4]).is_err(), "short body");
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
