//! The real client address behind a load balancer: PROXY protocol v1/v2 on
//! the listener, or `X-Forwarded-For` from trusted proxies. Neither is
//! believed unless configured; per-IP limits and logs use the result.

use crate::config::Cidr;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header not received in time")]
    Timeout,
    #[error("connection closed before the PROXY protocol header")]
    Closed,
}

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;

/// Read and consume a PROXY protocol header; returns the client address it
/// names (`None` for LOCAL / UNKNOWN: use the TCP peer).
pub async fn read_header(
    stream: &mut TcpStream,
    deadline: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    tokio::time::timeout(deadline, read_header_inner(stream))
        .await
        .map_err(|_| ProxyError::Timeout)?
}

async fn read_header_inner(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    // Peek until the first bytes tell v1 from v2 (or neither).
    let mut buf = [0u8; V1_MAX];
    let n = loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|_| ProxyError::Closed)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        let enough = n >= V2_SIG.len() || buf[..n].windows(2).any(|w| w == b"\r\n");
        if !(V2_SIG.starts_with(&buf[..n.min(12)]) || b"PROXY ".starts_with(&buf[..n.min(6)])) {
            return Err(ProxyError::Missing);
        }
        if enough {
            break n;
        }
        stream.readable().await.map_err(|_| ProxyError::Closed)?;
    };
    if buf[..n].starts_with(V2_SIG) {
        let mut head = [0u8; 16];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|_| ProxyError::Closed)?;
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|_| ProxyError::Closed)?;
        return parse_v2(&head, &body);
    }
    // v1: a text line of at most 107 bytes ending in CRLF.
    let end = loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|_| ProxyError::Closed)?;
        if let Some(i) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            break i + 2;
        }
        if n >= V1_MAX {
            return Err(ProxyError::Malformed("v1 line longer than 107 bytes"));
        }
        stream.readable().await.map_err(|_| ProxyError::Closed)?;
    };
    let mut line = vec![0u8; end];
    stream
        .read_exact(&mut line)
        .await
        .map_err(|_| ProxyError::Closed)?;
    parse_v1(&line)
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
