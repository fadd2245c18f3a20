//! herdgate's test harness, shared by every integration test: an
//! in-process herdgate on 127.0.0.1:0, herdgate as a real process, a
//! websocket client that speaks the Pusher protocol, a signed HTTP API
//! client, a test PKI, a real etcd cluster ([`etcd`]), a TCP relay that
//! cuts links on demand ([`relay`]) and the Kubernetes autoscaler's
//! decision on real processes' metrics ([`autoscaler`]).
//!
//! Every signature is made with `pusher-sign`, which shares no code with the
//! server, so a test fails when the server stops being Pusher-compatible.
#![deny(unsafe_code)]

pub mod autoscaler;
pub mod cluster;
pub mod etcd;
pub mod pki;
pub mod process;
pub mod relay;
#[allow(unsafe_code)] // every libc call, one safe wrapper each
pub mod sys;
pub mod webhook;

use futures_util::{SinkExt, StreamExt};
use herdgate::config::Config;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Any byte stream a test client runs on: plain TCP or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub const APP_ID: &str = "100001";
pub const KEY: &str = "test-key";
pub const SECRET: &str = "test-secret";
/// Every wait in a test is bounded by this; it is a deadline, not a measurement.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub running: Option<herdgate::Running>,
}

/// Start herdgate with the test app and `extra` TOML appended to `[limits]`-style sections.
pub async fn start(extra: &str) -> TestServer {
    start_with_app(extra, "").await
}

/// [`start`], with `app_keys` (TOML lines) added to the test app's table.
pub async fn start_with_app(extra: &str, app_keys: &str) -> TestServer {
    // Tests drain instantly unless they configure [shutdown] themselves.
    let drain = if extra.contains("[shutdown]") {
        ""
    } else {
        "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"0s\"\n"
    };
    // Load shedding reacts to a busy test machine; tests of it turn it on.
    let overload = if extra.contains("[overload") {
        ""
    } else {
        "[overload]\nenabled = false\n"
    };
    let text = format!(
        r#"
{drain}
{overload}
{extra}

[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
{app_keys}

[[apps]]
id = "100002"
key = "no-client-events-key"
secret = "other-secret"
enable_client_events = false

[[apps]]
id = "100003"
key = "disabled-key"
secret = "disabled-secret"
enabled = false

[[apps]]
id = "100004"
key = "origin-key"
secret = "origin-secret"
allowed_origins = ["https://events.example.com", "https://*.example.org"]
"#
    );
    let config = Config::from_toml_str(&text).expect("test config is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let running = herdgate::start(listener, Some(admin), config).expect("server starts");
    TestServer {
        addr,
        admin: admin_addr,
        running: Some(running),
    }
}

impl TestServer {
    pub fn ws_url(&self, key: &str) -> String {
        format!(
            "ws://{}/app/{key}?protocol=7&client=test&version=1.0",
            self.addr
        )
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url(KEY)).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub fn api(&self) -> Api {
        Api {
            tls: None,
            addr: self.addr,
            app_id: APP_ID.into(),
            key: KEY.into(),
            secret: SECRET.into(),
        }
    }
}

pub struct Client {
    pub ws: WebSocketStream<Box<dyn Io>>,
    pub socket_id: String,
    pub activity_timeout: u64,
}

/// An event as the client sees it, with `data` decoded when it was a JSON string.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: String,
    pub channel: Option<String>,
    pub data: Value,
    pub raw: Value,
}

#[derive(Debug)]
pub enum Received {
    Event(Event),
    Closed(Option<u16>),
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let uri: http::Uri = url.parse().unwrap();
        let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        Client::connect_on(url, Box::new(tcp)).await
    }

    /// Speak the protocol over an already-connected stream (e.g. TLS).
    pub async fn connect_on(url: &str, io: Box<dyn Io>) -> Client {
        Client::try_connect_on(url, io)
            .await
            .expect("websocket upgrade")
    }

    /// [`Client::connect_on`], with a refused upgrade as an error.
    pub async fn try_connect_on(url: &str, io: Box<dyn Io>) -> Result<Client, tungstenite::Error> {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, io))
            .await
            .expect("connect in time")?;
        let mut c = Client {
            ws,
            socket_id: String::new(),
            activity_timeout: 0,
        };
        let e = c.next_event().await;
        assert_eq!(e.event, "pusher:connection_established");
        c.socket_id = e.data["socket_id"].as_str().unwrap().to_string();
        c.activity_timeout = e.data["activity_timeout"].as_u64().unwrap();
        Ok(c)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    pub async fn recv(&mut self) -> Received {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the deadline");
            match m {
                Some(Ok(Message::Text(t))) => {
                    let raw: Value = serde_json::from_str(t.as_str()).unwrap();
                    let data = match &raw["data"] {
                        Value::String(s) => {
                            serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                        }
                        other => other.clone(),
                    };
                    return Received::Event(Event {
                        event: raw["event"].as_str().unwrap().to_string(),
                        channel: raw["channel"].as_str().map(String::from),
                        data,
                        raw,
                    });
                }
                Some(Ok(Message::Close(f))) => {
                    return Received::Closed(f.map(|f| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                    return Received::Closed(None)
                }
                Some(Err(e)) => panic!("websocket error: {e}"),
            }
        }
    }

    pub async fn next_event(&mut self) -> Event {
        match self.recv().await {
            Received::Event(e) => e,
            Received::Closed(code) => panic!("expected an event, the socket closed with {code:?}"),
        }
    }

    /// The next event named `name`, failing on anything else first.
    pub async fn expect(&mut self, name: &str) -> Event {
        let e = self.next_event().await;
        assert_eq!(e.event, name, "unexpected event {:?}", e.raw);
        e
    }

    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Received::Closed(code) => return code,
                Received::Event(e) if e.event == "pusher:error" => continue,
                Received::Event(e) => panic!("expected a close, got {:?}", e.raw),
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Event {
        let auth = auth_for(&self.socket_id, channel, None);
        self.send(json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}))
            .await;
        self.next_event().await
    }

    /// Subscribe and assert `pusher_internal:subscription_succeeded`.
    pub async fn expect_subscribed(&mut self, channel: &str) -> Event {
        let e = self.subscribe(channel).await;
        assert_eq!(
            e.event, "pusher_internal:subscription_succeeded",
            "subscribing to {channel}: {:?}",
            e.raw
        );
        e
    }

    pub async fn subscribe_presence(&mut self, channel: &str, user_id: &str) -> Event {
        let data = json!({"user_id": user_id, "user_info": {"name": format!("User {user_id}")}})
            .to_string();
        let auth = auth_for(&self.socket_id, channel, Some(&data));
        self.send(json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth,"channel_data":data}}))
            .await;
        self.next_event().await
    }

    pub async fn signin(&mut self, user_id: &str) -> Event {
        let user_data = json!({"id": user_id}).to_string();
        let auth = pusher_sign::signin_auth(KEY, SECRET, &self.socket_id, &user_data);
        self.send(json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}}))
            .await;
        self.next_event().await
    }

    /// Publish a marker on `channel` through the API and read until it arrives,
    /// returning everything received before it: proves what did *not* arrive.
    pub async fn until_marker(&mut self, api: &Api, channel: &str) -> Vec<Event> {
        let marker = format!("marker-{}", rand_suffix());
        api.publish(channel, "marker", &marker, None).await;
        let mut before = Vec::new();
        loop {
            let e = self.next_event().await;
            if e.event == "marker" && e.data == Value::String(marker.clone()) {
                return before;
            }
            before.push(e);
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

pub fn rand_suffix() -> u64 {
    rand::random::<u32>() as u64
}

pub fn auth_for(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    pusher_sign::channel_auth(KEY, SECRET, socket_id, channel, channel_data)
}

pub fn data_of(e: &Event) -> &Value {
    &e.data
}

/// A signed Pusher HTTP API client over plain HTTP/1.1.
#[derive(Clone)]
pub struct Api {
    /// Set: speak HTTPS with this client config (server name "localhost").
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub addr: SocketAddr,
    pub app_id: String,
    pub key: String,
    pub secret: String,
}

pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
    pub headers: http::HeaderMap,
}

impl Api {
    /// Sign and send. `params` are extra query parameters (unescaped, as the SDKs send them).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
    ) -> ApiResponse {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.request_at(method, path, params, body, ts, &self.secret)
            .await
    }

    pub async fn request_at(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
        ts: u64,
        secret: &str,
    ) -> ApiResponse {
        let full_path = format!("/apps/{}{path}", self.app_id);
        let query = pusher_sign::signed_query(
            method,
            &full_path,
            &self.key,
            secret,
            ts,
            body.as_bytes(),
            params,
        );
        self.raw(method, &format!("{full_path}?{query}"), body)
            .await
    }

    /// [`Api::request`] with extra HTTP headers (outside the signature, as
    /// Pusher signs only the query).
    pub async fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> ApiResponse {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let full_path = format!("/apps/{}{path}", self.app_id);
        let query = pusher_sign::signed_query(
            method,
            &full_path,
            &self.key,
            &self.secret,
            ts,
            body.as_bytes(),
            &[],
        );
        self.raw_with(method, &format!("{full_path}?{query}"), body, headers)
            .await
    }

    /// Send a request exactly as given (no signing).
    pub async fn raw(&self, method: &str, path_and_query: &str, body: &str) -> ApiResponse {
        self.raw_with(method, path_and_query, body, &[]).await
    }

    async fn raw_with(
        &self,
        method: &str,
        path_and_query: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> ApiResponse {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let stream: Box<dyn Io> = match &self.tls {
            Some(cfg) => Box::new(tls_connect(cfg.clone(), tcp).await.expect("TLS handshake")),
            None => Box::new(tcp),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("in time")
            .unwrap();
        let (parts, body) = resp.into_parts();
        use http_body_util::BodyExt;
        let bytes = body.collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        ApiResponse {
            status: parts.status.as_u16(),
            body,
            headers: parts.headers,
        }
    }

    /// The sorted ids of `GET /channels/{channel}/users`.
    pub async fn user_ids(&self, channel: &str) -> Vec<String> {
        let r = self
            .request("GET", &format!("/channels/{channel}/users"), &[], "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let mut ids: Vec<String> = r.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    pub async fn publish(
        &self,
        channel: &str,
        name: &str,
        data: &str,
        socket_id: Option<&str>,
    ) -> ApiResponse {
        let mut body = json!({"name": name, "channels": [channel], "data": data});
        if let Some(s) = socket_id {
            body["socket_id"] = json!(s);
        }
        let r = self
            .request("POST", "/events", &[], &body.to_string())
            .await;
        assert_eq!(r.status, 200, "publish failed: {:?}", r.body);
        r
    }
}

/// Open a websocket that the server refuses after the upgrade: asserts a
/// `pusher:error` before the close, returns the close code.
pub async fn refused_with(addr: SocketAddr, path_and_query: &str) -> Option<u16> {
    let url = format!("ws://{addr}{path_and_query}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade happens, then the close");
    let mut saw_error = false;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["event"], "pusher:error");
                saw_error = true;
            }
            Some(Ok(Message::Close(f))) => {
                assert!(saw_error, "pusher:error comes before the close");
                return f.map(|f| u16::from(f.code));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// `npm ci` in `dir` when its node_modules is missing or older than the
/// committed lockfile: what every Node-driven test runs first, so that
/// `cargo test` works on a fresh machine. No package may download a
/// browser of its own (the browser tests use Debian's Chromium).
pub fn npm_ci(dir: &std::path::Path) {
    let lock = dir.join("package-lock.json");
    let installed = dir.join("node_modules/.package-lock.json");
    let fresh = match (std::fs::metadata(&lock), std::fs::metadata(&installed)) {
        (Ok(l), Ok(i)) => i.modified().unwrap() >= l.modified().unwrap(),
        _ => false,
    };
    if fresh {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .status()
        .expect("npm is needed for these tests (install Node.js 20+)");
    assert!(status.success(), "npm ci failed in {}", dir.display());
}

/// GET a path on the admin listener; returns (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let api = Api {
        tls: None,
        addr,
        app_id: String::new(),
        key: String::new(),
        secret: String::new(),
    };
    let r = api.raw("GET", path, "").await;
    let body = match r.body {
        Value::String(s) => s,
        other => other.to_string(),
    };
    (r.status, body)
}

/// A rustls client trusting only `ca` (DER), offering ALPN http/1.1.
pub fn tls_client_config(
    ca: &rustls::pki_types::CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(cfg)
}

pub async fn tls_connect(
    cfg: std::sync::Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connect = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
    tokio::time::timeout(WAIT, connect)
        .await
        .expect("TLS in time")
}
