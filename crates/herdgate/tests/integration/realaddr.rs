//! Real client addresses behind load balancers: PROXY protocol v1/v2 and
//! trusted X-Forwarded-For feed the per-IP limit; neither is trusted unless
//! configured.

use herdgate_testkit::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Upgrade over `tcp` with optional extra headers; the HTTP status if refused.
async fn upgrade(s: &TestServer, tcp: TcpStream, xff: Option<&str>) -> Result<(), u16> {
    let mut req = s.ws_url(KEY).into_client_request().unwrap();
    if let Some(x) = xff {
        req.headers_mut()
            .insert("x-forwarded-for", x.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("in time")
    {
        Ok((ws, _)) => {
            std::mem::forget(ws); // keep the session open for the rest of the test
            Ok(())
        }
        Err(WsError::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("unexpected {e}"),
    }
}

async fn with_header(s: &TestServer, header: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    tcp
}

fn v2(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(src);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(443u16.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_protocol_addresses_feed_the_per_ip_limit() {
    let s = start("[server]\nproxy_protocol = true\nhandshake_timeout = \"500ms\"\n[limits]\nmax_connections_per_ip = 1").await;
    let a = b"PROXY TCP4 203.0.113.7 127.0.0.1 50000 6001\r\n";
    assert_eq!(upgrade(&s, with_header(&s, a).await, None).await, Ok(()));
    let a_again = b"PROXY TCP4 203.0.113.7 127.0.0.1 50001 6001\r\n";
    assert_eq!(
        upgrade(&s, with_header(&s, a_again).await, None).await,
        Err(503),
        "same client, per-IP cap 1"
    );
    let b = b"PROXY TCP4 203.0.113.8 127.0.0.1 50000 6001\r\n";
    assert_eq!(
        upgrade(&s, with_header(&s, b).await, None).await,
        Ok(()),
        "another client"
    );
    // v2 binary header, a third client; then that client again.
    assert_eq!(
        upgrade(
            &s,
            with_header(&s, &v2([198, 51, 100, 1], 40000)).await,
            None
        )
        .await,
        Ok(())
    );
    assert_eq!(
        upgrade(
            &s,
            with_header(&s, &v2([198, 51, 100, 1], 40001)).await,
            None
        )
        .await,
        Err(503)
    );
    // No header on a PROXY listener: dropped before any HTTP.
    let mut plain = TcpStream::connect(s.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(WAIT, plain.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer without a PROXY header");
}

#[tokio::test]
async fn forwarded_for_is_used_only_from_trusted_proxies() {
    let trusted = start(
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n[limits]\nmax_connections_per_ip = 1",
    )
    .await;
    let tcp = || TcpStream::connect(trusted.addr);
    assert_eq!(
        upgrade(&trusted, tcp().await.unwrap(), Some("203.0.113.7")).await,
        Ok(())
    );
    assert_eq!(
        upgrade(&trusted, tcp().await.unwrap(), Some("203.0.113.8")).await,
        Ok(())
    );
    assert_eq!(
        upgrade(&trusted, tcp().await.unwrap(), Some("6.6.6.6, 203.0.113.7")).await,
        Err(503),
        "right-most untrusted wins"
    );

    let untrusted = start("[limits]\nmax_connections_per_ip = 1").await;
    let tcp = || TcpStream::connect(untrusted.addr);
    assert_eq!(
        upgrade(&untrusted, tcp().await.unwrap(), Some("203.0.113.7")).await,
        Ok(())
    );
    assert_eq!(
        upgrade(&untrusted, tcp().await.unwrap(), Some("203.0.113.8")).await,
        Err(503),
        "X-Forwarded-For is ignored unless the peer is trusted"
    );
}
