//! What the internet sends, and the answer docs/PROTOCOL.md documents for it.
//!
//! Every test keeps a healthy client subscribed alongside the hostile one and,
//! once the hostile part is over, proves it still works: an event published
//! through the HTTP API reaches it (and nothing else arrived before it).
//! Timeouts are configured small (300 ms) and every wait is a deadline on the
//! server's answer, never a sleep.

use futures_util::{SinkExt, StreamExt};
use herdgate_testkit::pki::{tls_section, Pki};
use herdgate_testkit::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, Message};

/// The handshake timeouts configured in these tests.
const SHORT: Duration = Duration::from_millis(300);
/// A connection the server must drop after SHORT is dropped well within this.
const CLOSE_DEADLINE: Duration = Duration::from_secs(3);
const SHORT_HANDSHAKE: &str = "[server]\nhandshake_timeout = \"300ms\"\n";

// ---------------------------------------------------------------- helpers

/// A client subscribed to `healthy`, kept alongside the hostile traffic.
async fn healthy(s: &TestServer) -> Client {
    let mut c = s.connect().await;
    assert_eq!(
        c.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );
    c
}

/// An event published through `api` reaches `c`, and nothing arrived before it.
async fn still_healthy(api: &Api, c: &mut Client) {
    let before = c.until_marker(api, "healthy").await;
    let names: Vec<&str> = before.iter().map(|e| e.event.as_str()).collect();
    assert!(
        before.is_empty(),
        "healthy client got unexpected events: {names:?}"
    );
}

/// Wait for the server to close `tcp` (EOF or reset). Returns what it sent
/// before closing and how long it took; fails after `within`.
async fn await_close(tcp: &mut TcpStream, since: Instant, within: Duration) -> (Vec<u8>, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(since.elapsed());
        match timeout(left, tcp.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {within:?} (received {:?})",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, since.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Send one byte of a never-ending header every `every`, checking in between
/// whether the server closed. Returns the time from the first byte of the
/// request to the close.
async fn slowloris(tcp: &mut TcpStream, prefix: &[u8], every: Duration) -> Duration {
    let started = Instant::now();
    tcp.write_all(prefix).await.unwrap();
    let mut buf = [0u8; 512];
    loop {
        assert!(
            started.elapsed() < CLOSE_DEADLINE,
            "slowloris connection still open after {CLOSE_DEADLINE:?}"
        );
        if tcp.write_all(b"a").await.is_err() {
            return started.elapsed();
        }
        match timeout(every, tcp.read(&mut buf)).await {
            Err(_) => continue, // still open: send the next byte
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(n)) => panic!(
                "server answered a request head that never ended: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
    }
}

/// A raw websocket frame as a client would write it (`mask` = None: unmasked).
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = frame_header(fin, opcode, payload.len() as u64, mask);
    match mask {
        Some(k) => f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4])),
        None => f.extend_from_slice(payload),
    }
    f
}

/// Just the header of a frame claiming a payload of `len` bytes.
fn frame_header(fin: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        f.push(m | len as u8);
    } else if len <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        f.extend_from_slice(&k);
    }
    f
}

const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);
const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;

/// Write bytes straight onto the client's socket, bypassing its framing.
async fn write_raw(c: &mut Client, bytes: &[u8]) {
    let io = c.ws.get_mut();
    io.write_all(bytes).await.unwrap();
    io.flush().await.unwrap();
}

/// How the server ended a websocket: a close frame's code, or a dropped connection.
#[derive(Debug, PartialEq)]
enum Ending {
    Code(u16),
    CloseWithoutCode,
    Dropped(String),
}

/// Read until the server closes, tolerating resets; fails on anything but
/// `pusher:error` frames before the close, or after the deadline.
async fn ending(c: &mut Client) -> Ending {
    loop {
        let m = timeout(WAIT, c.ws.next())
            .await
            .expect("server ended the socket within the deadline");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return Ending::Code(u16::from(f.code)),
            Some(Ok(Message::Close(None))) => return Ending::CloseWithoutCode,
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["event"], "pusher:error", "unexpected frame {v}");
            }
            Some(Ok(_)) => {}
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                return Ending::Dropped("EOF".into())
            }
            Some(Err(e)) => return Ending::Dropped(e.to_string()),
        }
    }
}

/// Ping and read until the pong: the socket is open and answering in order.
/// Returns everything received before the pong.
async fn ping_pong(c: &mut Client) -> Vec<Event> {
    c.send(json!({"event":"pusher:ping","data":{}})).await;
    let mut before = Vec::new();
    loop {
        let e = c.next_event().await;
        if e.event == "pusher:pong" {
            return before;
        }
        before.push(e);
    }
}

/// Subscribe to `sync-{i}` and return every event that arrived before its
/// subscription_succeeded; then leave the channel again.
async fn answers_until_sync(c: &mut Client, i: usize) -> Vec<Event> {
    let sync = format!("sync-{i}");
    c.send(json!({"event":"pusher:subscribe","data":{"channel":sync}}))
        .await;
    let mut before = Vec::new();
    loop {
        let e = c.next_event().await;
        if e.event == "pusher_internal:subscription_succeeded"
            && e.channel.as_deref() == Some(sync.as_str())
        {
            c.send(json!({"event":"pusher:unsubscribe","data":{"channel":sync}}))
                .await;
            return before;
        }
        before.push(e);
    }
}

/// A test CA and one leaf for localhost, with a 300 ms TLS handshake deadline.
fn pki() -> (Pki, String) {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("localhost", false);
    let section = tls_section(&cert, &key, "handshake_timeout = \"300ms\"\n");
    (pki, section)
}

async fn healthy_tls(s: &TestServer, cfg: Arc<rustls::ClientConfig>) -> Client {
    let tls = tls_connect(cfg, TcpStream::connect(s.addr).await.unwrap())
        .await
        .expect("TLS handshake");
    let url = format!(
        "wss://localhost:{}/app/{KEY}?protocol=7&client=test&version=1.0",
        s.addr.port()
    );
    let mut c = Client::connect_on(&url, Box::new(tls)).await;
    assert_eq!(
        c.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );
    c
}

/// The bytes of a real ClientHello, as rustls would send it.
fn client_hello(cfg: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

// ------------------------------------------------------------------ 1. slowloris on the HTTP upgrade

#[tokio::test]
async fn slowloris_and_silent_connections_are_closed_after_the_handshake_timeout() {
    let s = start(SHORT_HANDSHAKE).await;
    let mut h = healthy(&s).await;

    // A request head trickled one byte every 50 ms, never finished.
    let slow = tokio::spawn({
        let addr = s.addr;
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let prefix = format!("GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            slowloris(&mut tcp, prefix.as_bytes(), Duration::from_millis(50)).await
        }
    });
    // Twenty connections that send nothing at all.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push((TcpStream::connect(s.addr).await.unwrap(), Instant::now()));
    }
    // While they are held open, the accept loop still takes new clients.
    let mut fresh = s.connect().await;
    assert_eq!(
        fresh.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );

    for (mut tcp, since) in silent {
        let (got, took) = await_close(&mut tcp, since, CLOSE_DEADLINE).await;
        assert!(got.is_empty(), "silent connection got {got:?}");
        assert!(
            took >= SHORT - Duration::from_millis(50),
            "closed too early: {took:?}"
        );
    }
    let took = slow.await.unwrap();
    assert!(
        took >= SHORT - Duration::from_millis(50),
        "slowloris closed after {took:?}, before the handshake timeout"
    );

    still_healthy(&s.api(), &mut h).await;
    fresh.expect("marker").await;
}

// ------------------------------------------------------------------ 2 + 3. TLS handshake abuse

#[tokio::test]
async fn stalled_and_partial_tls_handshakes_are_closed_after_the_tls_timeout() {
    let (pki, tls) = pki();
    let s = start(&format!("{SHORT_HANDSHAKE}{tls}")).await;
    let cfg = tls_client_config(&pki.ca_der, &[&rustls::version::TLS13]);
    let mut h = healthy_tls(&s, cfg.clone()).await;

    let hello = client_hello(cfg.clone());
    let partials: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", vec![]),
        ("record header only", b"\x16\x03\x01".to_vec()),
        ("half a ClientHello", hello[..hello.len() / 2].to_vec()),
        ("all but the last byte", hello[..hello.len() - 1].to_vec()),
    ];
    let mut waiting = Vec::new();
    for (what, bytes) in partials {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let since = Instant::now();
        tcp.write_all(&bytes).await.unwrap();
        waiting.push((what, tcp, since));
    }
    for (what, mut tcp, since) in waiting {
        let (got, took) = await_close(&mut tcp, since, CLOSE_DEADLINE).await;
        assert!(
            got.is_empty(),
            "{what}: server sent {got:?} to a stalled handshake"
        );
        assert!(
            took >= SHORT - Duration::from_millis(50),
            "{what}: closed after {took:?}, before the TLS handshake timeout"
        );
    }

    // A slowloris ClientHello: one byte every 50 ms never completes in time.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for b in &hello {
        if tcp.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match timeout(Duration::from_millis(50), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => panic!("server answered a partial ClientHello: {:?}", &buf[..n]),
        }
        assert!(
            started.elapsed() < CLOSE_DEADLINE,
            "trickled ClientHello still open"
        );
    }
    assert!(
        closed,
        "the whole trickled ClientHello got through ({} bytes)",
        hello.len()
    );
    assert!(started.elapsed() >= SHORT - Duration::from_millis(50));

    let api = Api {
        tls: Some(cfg),
        ..s.api()
    };
    still_healthy(&api, &mut h).await;
}

#[tokio::test]
async fn garbage_instead_of_tls_is_dropped() {
    let (pki, tls) = pki();
    let s = start(&tls).await;
    let cfg = tls_client_config(&pki.ca_der, &[&rustls::version::TLS13]);
    let mut h = healthy_tls(&s, cfg.clone()).await;

    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "clear-text websocket upgrade",
            format!(
                "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "clear-text API call",
            b"POST /apps/100001/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "handshake record of junk",
            [&b"\x16\x03\x01\x00\x20"[..], &[0xAB; 32]].concat(),
        ),
        (
            "SSLv2-style hello",
            b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10".to_vec(),
        ),
        ("4 KiB of zeros", vec![0u8; 4096]),
    ];
    for (what, bytes) in garbage {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let since = Instant::now();
        let _ = tcp.write_all(&bytes).await;
        // Not a timeout: a refusal well before the 10 s default TLS timeout.
        let (got, took) = await_close(&mut tcp, since, Duration::from_secs(5)).await;
        assert!(
            got.is_empty() || got[0] == 0x15,
            "{what}: expected a close or a TLS alert record, got {got:?}"
        );
        eprintln!(
            "{what}: {} after {took:?}",
            if got.is_empty() {
                "dropped without a byte".to_string()
            } else {
                format!("TLS alert {:02x?} then closed", &got[..got.len().min(7)])
            }
        );
    }

    let api = Api {
        tls: Some(cfg),
        ..s.api()
    };
    still_healthy(&api, &mut h).await;
}

// ------------------------------------------------------------------ 4. websocket frames

/// Each socket's unfinished fragmented message is bounded by
/// `max_message_bytes`; all of them together by `max_fragmented_bytes`, so
/// many sockets each pinning a message's worth cannot add up: the fragment
/// that would pass the node's budget closes its socket with 1009, the
/// others keep theirs, and a finished message gives its bytes back.
#[tokio::test]
async fn unfinished_fragments_are_bounded_node_wide() {
    let s = start("[limits]\nmax_fragmented_bytes = 20000\n").await;
    let mut h = healthy(&s).await;
    let part = vec![b'a'; 8_000];
    let mut pinning = Vec::new();
    for _ in 0..2 {
        let mut c = s.connect().await;
        write_raw(&mut c, &frame(false, TEXT, &part, MASK)).await;
        pinning.push(c);
    }
    // 16,000 held; 8,000 more would pass 20,000.
    let mut over = s.connect().await;
    write_raw(&mut over, &frame(false, TEXT, &part, MASK)).await;
    assert_eq!(
        ending(&mut over).await,
        Ending::Code(1009),
        "over the node's budget"
    );
    // A socket that finishes its message gives the bytes back (its answer —
    // the message is no JSON — says it was read): a new one fits.
    write_raw(&mut pinning[0], &frame(true, CONTINUATION, b"", MASK)).await;
    let e = pinning[0].expect("pusher:error").await;
    assert!(e.data["message"].is_string(), "{:?}", e.raw);
    let mut again = s.connect().await;
    write_raw(&mut again, &frame(false, TEXT, &part, MASK)).await;
    write_raw(&mut again, &frame(true, CONTINUATION, b"", MASK)).await;
    let e = again.expect("pusher:error").await;
    assert!(e.data["message"].is_string(), "{:?}", e.raw);
    still_healthy(&s.api(), &mut h).await;
}

#[tokio::test]
async fn frame_level_violations_get_their_close_codes() {
    let s = start("").await;
    let mut h = healthy(&s).await;

    // Fragmented text message: each frame fits, the message (40000 > 32768) does not.
    let mut c = s.connect().await;
    let part = vec![b'a'; 20_000];
    write_raw(&mut c, &frame(false, TEXT, &part, MASK)).await;
    write_raw(&mut c, &frame(true, CONTINUATION, &part, MASK)).await;
    assert_eq!(
        ending(&mut c).await,
        Ending::Code(1009),
        "oversized message"
    );

    // A single 40000-byte frame.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(true, TEXT, &vec![b'a'; 40_000], MASK)).await;
    assert_eq!(ending(&mut c).await, Ending::Code(1009), "oversized frame");

    // Only a header, claiming 1 TiB: refused from the header alone, no payload needed.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame_header(true, TEXT, 1 << 40, MASK)).await;
    assert_eq!(
        ending(&mut c).await,
        Ending::Code(1009),
        "huge frame header"
    );

    // Binary frame.
    let mut c = s.connect().await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ending(&mut c).await, Ending::Code(1003), "binary frame");

    // Invalid UTF-8 in a text frame.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(true, TEXT, &[0xC3, 0x28], MASK)).await;
    assert_eq!(ending(&mut c).await, Ending::Code(1007), "invalid UTF-8");

    // Invalid UTF-8 split across fragments.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(false, TEXT, b"{\"event\":\"\xC3", MASK)).await;
    write_raw(&mut c, &frame(true, CONTINUATION, b"\x28\"}", MASK)).await;
    assert_eq!(
        ending(&mut c).await,
        Ending::Code(1007),
        "invalid UTF-8 across fragments"
    );

    // Unmasked client frame.
    let mut c = s.connect().await;
    let ping = json!({"event":"pusher:ping","data":{}}).to_string();
    write_raw(&mut c, &frame(true, TEXT, ping.as_bytes(), None)).await;
    assert_eq!(ending(&mut c).await, Ending::Code(1002), "unmasked frame");

    // Control frame over 125 bytes.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(true, PING, &[0u8; 126], MASK)).await;
    assert_eq!(
        ending(&mut c).await,
        Ending::Code(1002),
        "oversized control frame"
    );

    // Reserved opcode.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(true, 0x3, b"x", MASK)).await;
    assert_eq!(ending(&mut c).await, Ending::Code(1002), "reserved opcode");

    // Continuation without a start.
    let mut c = s.connect().await;
    write_raw(&mut c, &frame(true, CONTINUATION, b"x", MASK)).await;
    assert_eq!(
        ending(&mut c).await,
        Ending::Code(1002),
        "orphan continuation"
    );

    // A message just under the limit is read, answered, and the socket stays.
    let mut c = s.connect().await;
    let near = format!("\"{}\"", "a".repeat(32_768 - 2));
    write_raw(&mut c, &frame(true, TEXT, near.as_bytes(), MASK)).await;
    let before = ping_pong(&mut c).await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].event, "pusher:error");

    still_healthy(&s.api(), &mut h).await;
}

// ------------------------------------------------------------------ 5. oversized HTTP

#[tokio::test]
async fn oversized_request_heads_get_431_and_bodies_413() {
    let s = start("[limits]\nmax_request_body_bytes = 8192\n").await;
    let mut h = healthy(&s).await;
    let upgrade = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    let heads = [
        (
            "one 20 KB header",
            format!("X-Pad: {}\r\n", "a".repeat(20_000)),
        ),
        (
            "1000 small headers",
            (0..1000)
                .map(|i| format!("X-H{i}: v\r\n"))
                .collect::<String>(),
        ),
        ("a 20 KB request target", String::new()),
    ];
    for (what, extra) in heads {
        let head = if what == "a 20 KB request target" {
            upgrade.replacen(
                "protocol=7",
                &format!("protocol=7&pad={}", "a".repeat(20_000)),
                1,
            )
        } else {
            format!("{upgrade}{extra}")
        };
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let since = Instant::now();
        let _ = tcp.write_all(format!("{head}\r\n").as_bytes()).await;
        let (got, _) = await_close(&mut tcp, since, CLOSE_DEADLINE).await;
        assert_eq!(
            status_line(&got),
            "HTTP/1.1 431 Request Header Fields Too Large",
            "{what}"
        );
    }
    // A 4 KB header is well within the limit: the upgrade goes through.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(format!("{upgrade}X-Pad: {}\r\n\r\n", "a".repeat(4096)).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(status_line(&buf[..n]), "HTTP/1.1 101 Switching Protocols");
    drop(tcp);

    // Bodies: exactly at max_request_body_bytes is published, one byte more is 413.
    let api = s.api();
    let body = |len: usize| {
        let skeleton = json!({"name":"at-limit","channel":"healthy","data":""}).to_string();
        json!({"name":"at-limit","channel":"healthy","data":"x".repeat(len - skeleton.len())})
            .to_string()
    };
    let at = body(8192);
    assert_eq!(at.len(), 8192);
    let r = api
        .request_at("POST", "/events", &[], &at, now(), SECRET)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    h.expect("at-limit").await;
    let over = body(8193);
    let r = api
        .request_at("POST", "/events", &[], &over, now(), SECRET)
        .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(r.body["error"].is_string(), "JSON error body: {:?}", r.body);
    // Far over, unsigned: refused by the signature before the body is read.
    let r = api
        .raw(
            "POST",
            &format!("/apps/{APP_ID}/events"),
            &"x".repeat(100_000),
        )
        .await;
    assert_eq!(r.status, 401, "{:?}", r.body);

    still_healthy(&api, &mut h).await;
}

// ------------------------------------------------------------------ 6. API signatures

#[tokio::test]
async fn forged_stale_and_future_signatures_get_401_and_replay_is_bounded_by_time_only() {
    let s = start("").await;
    let mut h = healthy(&s).await;
    let api = s.api();
    let body = |name: &str| json!({"name":name,"channel":"healthy","data":"x"}).to_string();
    let t = now();

    for (what, ts, secret) in [
        ("forged", t, "not-the-secret"),
        ("other app's secret", t, "other-secret"),
        ("stale (now - 601 s)", t - 601, SECRET),
        ("future (now + 601 s)", t + 601, SECRET),
        ("timestamp 0", 0, SECRET),
    ] {
        let r = api
            .request_at("POST", "/events", &[], &body("forged"), ts, secret)
            .await;
        assert_eq!(r.status, 401, "{what}: {:?}", r.body);
        assert!(r.body["error"].is_string(), "{what}: {:?}", r.body);
    }
    // Inside the window (10 s of margin for a slow test machine) is fine.
    for ts in [t - 590, t + 590] {
        let r = api
            .request_at("POST", "/events", &[], &body("skewed"), ts, SECRET)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        h.expect("skewed").await;
    }
    // The exact same signed request, twice: both accepted and both delivered.
    // By design: Pusher's scheme bounds replay by auth_timestamp only (no nonce).
    for _ in 0..2 {
        let r = api
            .request_at("POST", "/events", &[], &body("replayed"), t, SECRET)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    h.expect("replayed").await;
    h.expect("replayed").await;

    still_healthy(&api, &mut h).await;
}

// ------------------------------------------------------------------ 7. malformed client messages

#[tokio::test]
async fn malformed_messages_get_errors_and_the_socket_stays() {
    let s = start("").await;
    let mut h = healthy(&s).await;
    let mut c = s.connect().await;
    assert_eq!(
        c.subscribe("private-mal").await.event,
        "pusher_internal:subscription_succeeded"
    );

    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let long_event = "e".repeat(201);
    let long_client_event = format!("client-{}", "e".repeat(194));
    assert_eq!(long_client_event.len(), 201);
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("not JSON", "hello".into()),
        ("truncated JSON", r#"{"event":"pusher:ping""#.into()),
        ("trailing garbage", r#"{"event":"pusher:ping"} x"#.into()),
        ("JSON array", r#"["pusher:ping"]"#.into()),
        ("JSON array subscribe", r#"["pusher:subscribe",null,{"channel":"array-sub"}]"#.into()),
        ("number", "42".into()),
        ("null", "null".into()),
        ("string", r#""pusher:ping""#.into()),
        ("{}", "{}".into()),
        ("event is a number", r#"{"event":1}"#.into()),
        ("event is null", r#"{"event":null}"#.into()),
        ("event is an object", r#"{"event":{"a":1}}"#.into()),
        ("event is a lone surrogate", r#"{"event":"\ud800"}"#.into()),
        ("channel is a number", r#"{"event":"client-x","channel":5}"#.into()),
        ("duplicate event key", r#"{"event":"pusher:ping","event":"pusher:ping"}"#.into()),
        ("subscribe, no data", r#"{"event":"pusher:subscribe"}"#.into()),
        ("subscribe, data null", r#"{"event":"pusher:subscribe","data":null}"#.into()),
        ("subscribe, data number", r#"{"event":"pusher:subscribe","data":7}"#.into()),
        ("subscribe, data array", r#"{"event":"pusher:subscribe","data":["a"]}"#.into()),
        ("subscribe, data non-JSON string", r#"{"event":"pusher:subscribe","data":"a"}"#.into()),
        ("subscribe, channel number", r#"{"event":"pusher:subscribe","data":{"channel":5}}"#.into()),
        ("subscribe, auth number", r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":5}}"#.into()),
        ("subscribe, nested data", format!(r#"{{"event":"pusher:subscribe","data":{nested}}}"#)),
        ("unsubscribe, no data", r#"{"event":"pusher:unsubscribe"}"#.into()),
        ("unsubscribe, data number", r#"{"event":"pusher:unsubscribe","data":1}"#.into()),
        ("unsubscribe, channel array", r#"{"event":"pusher:unsubscribe","data":{"channel":[]}}"#.into()),
        ("signin, no data", r#"{"event":"pusher:signin"}"#.into()),
        ("signin, data string", r#"{"event":"pusher:signin","data":"x"}"#.into()),
        ("signin, auth number", r#"{"event":"pusher:signin","data":{"auth":1,"user_data":"{}"}}"#.into()),
        ("signin, user_data object", r#"{"event":"pusher:signin","data":{"auth":"a","user_data":{}}}"#.into()),
        ("10 KB of nested arrays", nested.clone()),
        ("30 KB string", format!("\"{}\"", "a".repeat(30_000))),
        (
            "30 KB client event data",
            json!({"event":"client-big","channel":"private-mal","data":"a".repeat(30_000)}).to_string(),
        ),
        ("pusher:foo", r#"{"event":"pusher:foo","data":{}}"#.into()),
        ("pusher_internal:member_added", r#"{"event":"pusher_internal:member_added","channel":"presence-x","data":{"user_id":"1"}}"#.into()),
        ("pusher_internal:subscription_succeeded", r#"{"event":"pusher_internal:subscription_succeeded","channel":"private-mal","data":{}}"#.into()),
        ("pusher:connection_established", r#"{"event":"pusher:connection_established","data":{}}"#.into()),
        ("empty event name", r#"{"event":"","data":{}}"#.into()),
        ("201-char event name", json!({"event":long_event,"data":{}}).to_string()),
        ("201-char client event", json!({"event":long_client_event,"channel":"private-mal","data":{}}).to_string()),
        ("client event, unsubscribed channel", r#"{"event":"client-x","channel":"private-other","data":{}}"#.into()),
        ("client event, no channel", r#"{"event":"client-x","data":{}}"#.into()),
    ];
    // Each case is followed by a subscribe to a fresh public channel: its
    // subscription_succeeded marks the end of the case's answers, whatever they are.
    let mut mismatches = Vec::new();
    for (i, (what, text)) in cases.iter().enumerate() {
        c.send_raw(Message::Text(text.clone().into())).await;
        let answers = answers_until_sync(&mut c, i).await;
        let ok = match answers.as_slice() {
            // The message echoes at most a short prefix of client text (see
            // `truncate` in session/handler.rs): no reply amplifies the input.
            [e] if e.event == "pusher:error" => {
                let msg = e.data["message"].as_str().unwrap_or("");
                e.data["code"].is_null() && !msg.is_empty() && msg.len() <= 512
            }
            _ => false,
        };
        if !ok {
            let got: Vec<String> = answers
                .iter()
                .map(|e| format!("{:.300}", e.raw.to_string()))
                .collect();
            mismatches.push(format!("{what}: {text:.80} -> {got:?}"));
        }
    }
    // Channel names the subscribe data parses but the channel rules refuse.
    for channel in ["", "bad channel!", &"c".repeat(165), "ünïcode"] {
        c.send(json!({"event":"pusher:subscribe","data":{"channel":channel}}))
            .await;
        let before = ping_pong(&mut c).await;
        assert_eq!(before.len(), 1, "{channel:?}: {before:?}");
        assert_eq!(
            before[0].event, "pusher:subscription_error",
            "{:?}",
            before[0].raw
        );
        assert_eq!(before[0].data["type"], "InvalidChannel");
        assert_eq!(before[0].data["status"], 400);
    }

    // Still subscribed and working: a client event reaches the other subscriber.
    let mut peer = s.connect().await;
    peer.subscribe("private-mal").await;
    c.send(json!({"event":"client-ok","channel":"private-mal","data":{"n":1}}))
        .await;
    assert_eq!(peer.expect("client-ok").await.data, json!({"n":1}));
    assert!(ping_pong(&mut c).await.is_empty());

    still_healthy(&s.api(), &mut h).await;
    assert!(
        mismatches.is_empty(),
        "expected exactly one pusher:error (code null) for each of:\n{}",
        mismatches.join("\n")
    );
}

// ------------------------------------------------------------------ 8. client event flood

#[tokio::test]
async fn a_client_event_flood_is_rate_limited_and_the_flooder_stays() {
    const N: usize = 1000;
    const RATE: f64 = 10.0; // limits.client_events_per_second, also the bucket size
    let s = start("").await;
    let mut h = healthy(&s).await;
    let mut flooder = s.connect().await;
    let mut receiver = s.connect().await;
    for c in [&mut flooder, &mut receiver] {
        assert_eq!(
            c.subscribe("private-flood").await.event,
            "pusher_internal:subscription_succeeded"
        );
    }

    // Write the burst and read the answers at the same time, so neither side's
    // socket buffer fills; the pong after the burst marks its end.
    let Client {
        ws,
        socket_id,
        activity_timeout,
    } = flooder;
    let (mut sink, mut stream) = ws.split();
    let started = Instant::now();
    let send = async {
        for i in 0..N {
            let m = json!({"event":"client-flood","channel":"private-flood","data":{"i":i}});
            sink.feed(Message::Text(m.to_string().into()))
                .await
                .unwrap();
        }
        sink.feed(Message::Text(
            json!({"event":"pusher:ping","data":{}}).to_string().into(),
        ))
        .await
        .unwrap();
        sink.flush().await.unwrap();
    };
    let read = async {
        let mut limited = 0usize;
        loop {
            let m = timeout(WAIT, stream.next())
                .await
                .expect("answers within the deadline")
                .expect("socket open")
                .expect("no websocket error");
            let Message::Text(t) = m else {
                panic!("flooder got {m:?}")
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            match v["event"].as_str() {
                Some("pusher:pong") => return limited,
                Some("pusher:error") => {
                    let data: Value = match &v["data"] {
                        Value::String(s) => serde_json::from_str(s).unwrap(),
                        d => d.clone(),
                    };
                    assert_eq!(data["code"], 4301, "{v}");
                    limited += 1;
                }
                _ => panic!("flooder got {v}"),
            }
        }
    };
    let ((), limited) = tokio::join!(send, read);
    let elapsed = started.elapsed().as_secs_f64();
    let passed = N - limited;
    // The bucket starts full (10) and refills at 10/s: over the burst at most
    // 10 + 10 × elapsed can pass (+1 for a token refilled mid-count). At least
    // the full bucket passes.
    let bound = RATE + (RATE * elapsed).ceil() + 1.0;
    eprintln!("flood: {passed} of {N} passed, {limited} refused with 4301, in {elapsed:.3}s");
    assert!(
        passed >= RATE as usize,
        "{passed} passed; the full bucket should"
    );
    assert!(
        (passed as f64) <= bound,
        "{passed} passed in {elapsed:.3}s, bound {bound}"
    );

    // The receiver got exactly the events that passed, in order, nothing else.
    let got = receiver.until_marker(&s.api(), "private-flood").await;
    assert_eq!(got.len(), passed, "receiver got {got:?}");
    let indices: Vec<u64> = got
        .iter()
        .map(|e| {
            assert_eq!(e.event, "client-flood");
            e.data["i"].as_u64().unwrap()
        })
        .collect();
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
    assert_eq!(
        indices[..RATE as usize],
        (0..RATE as u64).collect::<Vec<_>>()[..]
    );

    // The flooder is still connected and answering.
    let mut flooder = Client {
        ws: sink.reunite(stream).unwrap(),
        socket_id,
        activity_timeout,
    };
    flooder.expect("marker").await; // it is subscribed too
    assert!(ping_pong(&mut flooder).await.is_empty());

    still_healthy(&s.api(), &mut h).await;
}

// ------------------------------------------------- before the upgrade

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command: utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / hz
}

#[test]
fn stalled_partial_proxy_headers_cost_no_cpu_and_time_out() {
    use herdgate_testkit::process::Herdgate;
    let hg = Herdgate::start(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nproxy_protocol = true\nhandshake_timeout = \"3s\"\n\
         [[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n",
    );
    // 20 clients send two bytes of a PROXY header and stall.
    let mut held: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            use std::io::Write;
            let mut t = std::net::TcpStream::connect(&hg.addr).unwrap();
            t.write_all(b"PR").unwrap();
            t
        })
        .collect();
    let before = cpu_seconds(hg.pid());
    let t0 = Instant::now();
    // Their deadline is 3 s: wait for each close (EOF) on a blocking read.
    for t in &mut held {
        use std::io::Read;
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert!(
            matches!(t.read(&mut b), Ok(0) | Err(_)),
            "closed, nothing sent"
        );
    }
    let waited = t0.elapsed();
    let used = cpu_seconds(hg.pid()) - before;
    println!("20 stalled partial PROXY headers: {used:.2} s CPU over {waited:.1?}");
    // A busy-spinning reader would burn a core per client for the whole wait.
    assert!(
        used < 0.25 * waited.as_secs_f64(),
        "{used:.2} s of CPU in {waited:?} for 20 idle connections"
    );
    assert!(
        waited < Duration::from_secs(6),
        "closed at the deadline, not after {waited:?}"
    );
}

#[tokio::test]
async fn one_address_cannot_hold_every_handshake_slot() {
    let s = start("[limits]\nmax_handshakes_per_ip = 4\n").await;
    let api = s.api();
    let mut h = healthy(&s).await;
    // Four silent connections from 127.0.0.1 hold that address's places.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    // Wait until the server has taken them all (each task takes its place first).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, m) = admin_get(s.admin, "/metrics").await;
        let accepted = m
            .lines()
            .find(|l| l.starts_with("herdgate_tcp_accepted_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if accepted >= 5.0 {
            break; // the healthy socket's connection and the four silent ones
        }
        assert!(Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    // A fifth from the same address is closed at once, without an answer.
    let mut fifth = TcpStream::connect(s.addr).await.unwrap();
    let (got, _) = await_close(&mut fifth, Instant::now(), CLOSE_DEADLINE).await;
    assert!(got.is_empty(), "no bytes for a refused connection");
    // Another address is not affected.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = sock.connect(s.addr).await.unwrap();
    let c = Client::connect_on(&s.ws_url(KEY), Box::new(other)).await;
    drop(c);
    // When the silent ones go, the address gets its places back.
    drop(silent);
    let deadline = Instant::now() + WAIT;
    loop {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let url = s.ws_url(KEY);
        let connect = Client::try_connect_on(&url, Box::new(tcp));
        if timeout(Duration::from_secs(2), connect)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the address never got its places back"
        );
    }
    let (_, m) = admin_get(s.admin, "/metrics").await;
    assert!(m.contains("reason=\"handshakes_per_ip\""), "{m}");
    still_healthy(&api, &mut h).await;
}

#[tokio::test]
async fn one_deadline_covers_proxy_header_and_request_head() {
    // 3 s in all: a PROXY header after 2 s leaves 1 s for the head
    // (separate deadlines would give the head a fresh 3 s: 5 s). The bound
    // between them leaves a second either way for a busy machine.
    let s = start("[server]\nhandshake_timeout = \"3s\"\nproxy_protocol = true\n").await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await; // the slow client's pace
    tcp.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET /app/")
        .await
        .unwrap();
    let (got, took) = await_close(&mut tcp, t0, Duration::from_secs(8)).await;
    assert!(
        took < Duration::from_secs(4),
        "closed {took:?} after accept; the head must not get a fresh deadline"
    );
    assert!(
        got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn the_admin_listener_serves_a_bounded_number_of_connections() {
    let s = start("[limits]\nmax_admin_connections = 2\n").await;
    let idle: Vec<TcpStream> = vec![
        TcpStream::connect(s.admin).await.unwrap(),
        TcpStream::connect(s.admin).await.unwrap(),
    ];
    // Both places are taken: a third connection is not served meanwhile.
    let mut third = TcpStream::connect(s.admin).await.unwrap();
    third
        .write_all(b"GET /livez HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "served beyond max_admin_connections"
    );
    // One idle connection goes: the third is served.
    drop(idle);
    let n = timeout(WAIT, third.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
