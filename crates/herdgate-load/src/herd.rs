//! `herd`: a reconnect storm after a server dies, measured end to end
//! (docs/BENCHMARKS.md "Reconnect herd").
//!
//! N clients connect over TLS to server A and each subscribes to
//! `--channels` private channels, authorized by an in-process auth endpoint
//! that counts its calls (signing with `pusher-sign`, not herdgate's code).
//! Then A is killed (SIGKILL) and every client reconnects to server B after
//! a random delay within `--spread`, and subscribes to the same channels.
//! With `--grants` the clients offer a P-256 key, keep the grants herdgate
//! hands out and present them on B (docs/PROTOCOL.md "Auth grants"); with
//! `--resume` each keeps its TLS session, which B resumes if it holds A's
//! ticket keys. Without them, every reconnect is a full handshake and one
//! endpoint call per channel: the same herd, as it costs today.
//!
//! Reported: endpoint calls during the recovery, B's full and resumed TLS
//! handshakes (from its `/metrics`), B's CPU per reconnect, the time until
//! 50 % and 99 % of the clients are back and subscribed.
//!
//! With `--publish-rate` (a cluster: A and B edges of the same workers,
//! `--api` the HTTP API of one of its edges), events are published to every client's
//! channels in turn, from before A dies until after the herd is back; each
//! client counts the events it receives (each carries its publish id), and
//! the run reports the acked publishes (HTTP 200) that never reached their
//! channel's client. With `--recover` the clients subscribe with herdgate's
//! resume extension and present their last position on B
//! (docs/PROTOCOL.md "History and resume"), as the `herdgate-resume` plugin
//! does: the events published while they were away are replayed.

use crate::net;
use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

#[derive(Args, Debug, Clone)]
pub struct HerdArgs {
    /// Server A (killed): `wss://127.0.0.1:PORT`.
    #[arg(long)]
    pub first: String,
    /// Server B (takes the herd).
    #[arg(long)]
    pub then: String,
    /// Server A's pid, killed once every client is subscribed.
    #[arg(long)]
    pub kill_pid: u32,
    /// Server B's pid (its CPU time) and admin URL (its `/metrics`).
    #[arg(long)]
    pub server_pid: u32,
    #[arg(long)]
    pub admin: String,
    /// CA certificate (PEM) of both servers.
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub clients: usize,
    /// Private channels per client.
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// Clients reconnect within this many milliseconds of losing A.
    #[arg(long, default_value_t = 1000)]
    pub spread_ms: u64,
    /// Offer keys, keep grants and present them.
    #[arg(long)]
    pub grants: bool,
    /// Keep each client's TLS session for resumption.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value = "herdgate-demo-key")]
    pub key: String,
    #[arg(long, default_value = "herdgate-demo-secret")]
    pub secret: String,
    #[arg(long, default_value = "100001")]
    pub app_id: String,
    /// Events per second published through `--api` to the clients'
    /// channels, in turn (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub publish_rate: f64,
    /// An HTTP API of the cluster (`http(s)://127.0.0.1:PORT`), for the publishes.
    #[arg(long)]
    pub api: Option<String>,
    /// Publish this long before A is killed, and after every client is
    /// back (ms).
    #[arg(long, default_value_t = 2000)]
    pub publish_ms: u64,
    /// Subscribe with resume and present the last position on B.
    #[arg(long)]
    pub recover: bool,
}

/// The app's auth endpoint: signs, and counts.
struct Endpoint {
    key: String,
    secret: String,
    calls: AtomicU64,
}

impl Endpoint {
    fn authorize(&self, socket_id: &str, channel: &str) -> String {
        self.calls.fetch_add(1, Ordering::Relaxed);
        pusher_sign::channel_auth(&self.key, &self.secret, socket_id, channel, None)
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// One client's grants: channel → grant text.
type Grants = HashMap<String, String>;

pub fn run(args: &HerdArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(herd(args))
}

async fn herd(args: &HerdArgs) -> Result<()> {
    let first = net::Target::parse(&args.first)?;
    let then = net::Target::parse(&args.then)?;
    if !first.tls || !then.tls {
        bail!("herd measures TLS reconnects: use wss:// URLs");
    }
    let base = net::tls_config(Some(&args.ca), false)?;
    let endpoint = Arc::new(Endpoint {
        key: args.key.clone(),
        secret: args.secret.clone(),
        calls: AtomicU64::new(0),
    });
    let (killed_tx, killed_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<()>>(args.clients);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::channel::<Result<Instant>>(args.clients);
    let (done_tx, done_rx) = watch::channel(false);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<(usize, Track)>(args.clients);
    // Connections opened at once to A: a few hundred, as clients would arrive.
    let opening = Arc::new(Semaphore::new(256));
    for i in 0..args.clients {
        let mut tls = (*base).clone();
        tls.resumption = if args.resume {
            rustls::client::Resumption::in_memory_sessions(4)
        } else {
            rustls::client::Resumption::disabled()
        };
        let client = Client {
            i,
            tls: Arc::new(tls),
            endpoint: endpoint.clone(),
            channels: (0..args.channels)
                .map(|c| format!("private-herd-{i}-{c}"))
                .collect(),
            key: args.key.clone(),
            grants_on: args.grants,
            recover: args.recover,
        };
        let (first, then) = (first.clone(), then.clone());
        let (ready_tx, back_tx) = (ready_tx.clone(), back_tx.clone());
        let mut killed = killed_rx.clone();
        let mut done = done_rx.clone();
        let opening = opening.clone();
        let spread = args.spread_ms;
        let seen_tx = seen_tx.clone();
        tokio::spawn(async move {
            let mut track = Track::new(client.channels.len());
            let permit = opening.acquire_owned().await;
            let joined = client.join(&first, None, &mut track).await;
            drop(permit);
            let (mut ws, grants, keypair) = match joined {
                Ok(j) => j,
                Err(e) => {
                    let _ = ready_tx.send(Err(e)).await;
                    return;
                }
            };
            let _ = ready_tx.send(Ok(())).await;
            // Reading until A dies: the socket closes under the client.
            tokio::select! {
                _ = killed.wait_for(|k| *k) => {}
                _ = client.read(&mut ws, &mut track) => {}
            }
            drop(ws);
            let delay = rand::random::<u64>() % spread.max(1);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let back = client
                .join(&then, Some((grants, keypair)), &mut track)
                .await;
            let ws = match back {
                Ok((ws, ..)) => {
                    let _ = back_tx.send(Ok(Instant::now())).await;
                    Some(ws)
                }
                Err(e) => {
                    let _ = back_tx.send(Err(e)).await;
                    None
                }
            };
            if let Some(mut ws) = ws {
                tokio::select! {
                    _ = done.wait_for(|d| *d) => {}
                    _ = client.read(&mut ws, &mut track) => {}
                }
            }
            let _ = seen_tx.send((client.i, track)).await;
        });
    }
    drop((ready_tx, back_tx, seen_tx));
    for _ in 0..args.clients {
        ready_rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("a client task ended"))?
            .context("joining server A")?;
    }
    let joined_calls = endpoint.calls.load(Ordering::Relaxed);
    eprintln!(
        "{} clients subscribed on A ({} endpoint calls); killing A",
        args.clients, joined_calls
    );
    // Publishes, from before A dies until after the herd is back.
    let publishing = match (&args.api, args.publish_rate > 0.0) {
        (Some(api), true) => {
            let (stop_tx, stop_rx) = watch::channel(false);
            let p = Publisher::new(args, api, base.clone())?;
            let task = tokio::spawn(p.run(args.publish_rate, stop_rx));
            tokio::time::sleep(Duration::from_millis(args.publish_ms)).await;
            Some((stop_tx, task))
        }
        (None, true) => bail!("--publish-rate needs --api"),
        _ => None,
    };
    let before = Snapshot::take(args).await?;
    kill(args.kill_pid);
    let t0 = Instant::now();
    let _ = killed_tx.send(true);
    let mut times = Vec::with_capacity(args.clients);
    let mut failed = 0usize;
    for _ in 0..args.clients {
        match back_rx.recv().await {
            Some(Ok(t)) => times.push(t.duration_since(t0)),
            Some(Err(e)) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("a client did not come back: {e:#}");
                }
            }
            None => break,
        }
    }
    let after = Snapshot::take(args).await?;
    // The events: publish a while longer, let the last ones arrive, then
    // collect what every client saw.
    let events = match publishing {
        Some((stop_tx, task)) => {
            tokio::time::sleep(Duration::from_millis(args.publish_ms)).await;
            let _ = stop_tx.send(true);
            let acked = task.await.context("publisher")??;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = done_tx.send(true);
            let mut seen: Vec<Option<Track>> = (0..args.clients).map(|_| None).collect();
            while let Some((i, t)) = seen_rx.recv().await {
                seen[i] = Some(t);
            }
            Some(tally(&acked, &seen))
        }
        None => None,
    };
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or("—".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    let back = times.len();
    let calls = endpoint.calls.load(Ordering::Relaxed) - joined_calls;
    let full = after.full - before.full;
    let resumed = after.resumed - before.resumed;
    let cpu = after.cpu - before.cpu;
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| mode | grants {}, TLS resumption {} |",
        on(args.grants),
        on(args.resume)
    );
    println!(
        "| clients back and subscribed ({} channels each) | {back} of {} |",
        args.channels, args.clients
    );
    println!("| auth endpoint calls during the recovery | {calls} |");
    println!("| server B: TLS handshakes full / resumed | {full} / {resumed} |");
    println!(
        "| server B: CPU per reconnect | {:.0} µs |",
        cpu * 1e6 / back.max(1) as f64
    );
    println!(
        "| back and subscribed: 50 % / 99 % / all | {} / {} / {} |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    if let Some(e) = &events {
        println!(
            "| events published / acked (HTTP 200) | {} / {} |",
            e.attempted, e.acked
        );
        println!(
            "| acked events that never reached their client (lost) | {} |",
            e.lost
        );
        println!("| publishes not acked, by status | {} |", e.failed);
        println!("| events received twice | {} |", e.duplicates);
        println!(
            "| resumed on B: recovered / not recovered; events replayed | {} / {}; {} |",
            e.recovered, e.not_recovered, e.replayed
        );
    }
    if failed > 0 {
        bail!("{failed} clients did not come back");
    }
    Ok(())
}

/// What became of the published events.
struct Events {
    attempted: u64,
    acked: u64,
    lost: u64,
    duplicates: u64,
    recovered: u64,
    not_recovered: u64,
    replayed: u64,
    failed: String,
}

fn tally(acked: &Acked, seen: &[Option<Track>]) -> Events {
    let mut e = Events {
        attempted: acked.attempted,
        acked: acked.ok.len() as u64,
        lost: 0,
        duplicates: 0,
        recovered: 0,
        not_recovered: 0,
        replayed: 0,
        failed: if acked.failed.is_empty() {
            "—".into()
        } else {
            acked
                .failed
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    };
    for t in seen.iter().flatten() {
        e.duplicates += t.duplicates;
        e.recovered += t.recovered;
        e.not_recovered += t.not_recovered;
        e.replayed += t.replayed;
    }
    for &(i, c, id) in &acked.ok {
        let got = seen
            .get(i)
            .and_then(|t| t.as_ref())
            .is_some_and(|t| t.got[c].contains(&id));
        e.lost += u64::from(!got);
    }
    e
}

/// One client's view of its channels: the publish ids received (live or
/// replayed), and the resume position of each channel.
struct Track {
    got: Vec<std::collections::HashSet<u64>>,
    /// (serial, epoch) of the last event, or of the subscription.
    position: Vec<Option<(u64, String)>>,
    duplicates: u64,
    recovered: u64,
    not_recovered: u64,
    /// Per channel: resuming from a position, until `herdgate:resumed`.
    replaying: Vec<bool>,
    /// Events that came as a replay: published while the client was away.
    replayed: u64,
}

impl Track {
    fn new(channels: usize) -> Track {
        Track {
            got: vec![Default::default(); channels],
            position: vec![None; channels],
            duplicates: 0,
            recovered: 0,
            not_recovered: 0,
            replaying: vec![false; channels],
            replayed: 0,
        }
    }

    /// Note what `m` (on channel `c`) tells: an event, a position.
    fn note(&mut self, c: usize, m: &Value) {
        let event = m["event"].as_str().unwrap_or("");
        match event {
            "tick" => {
                if let Some(id) = parse_data(m)["id"].as_u64() {
                    if !self.got[c].insert(id) {
                        self.duplicates += 1;
                    }
                    self.replayed += u64::from(self.replaying[c]);
                }
                if let Some(serial) = m["serial"].as_u64() {
                    if let Some(p) = &mut self.position[c] {
                        p.0 = serial;
                    }
                }
            }
            "pusher_internal:subscription_succeeded" => {
                if let (Some(serial), Some(epoch)) = (m["serial"].as_u64(), m["epoch"].as_str()) {
                    self.position[c] = Some((serial, epoch.to_string()));
                }
            }
            "herdgate:resumed" => {
                self.replaying[c] = false;
                let data = parse_data(m);
                if data["recovered"] == true {
                    self.recovered += 1;
                } else {
                    self.not_recovered += 1;
                }
                if let (Some(serial), Some(epoch)) =
                    (data["serial"].as_u64(), data["epoch"].as_str())
                {
                    self.position[c] = Some((serial, epoch.to_string()));
                }
            }
            _ => {}
        }
    }
}

/// The publishes that were acked: (client, channel, publish id).
struct Acked {
    attempted: u64,
    ok: Vec<(usize, usize, u64)>,
    /// Not acked, by HTTP status or error.
    failed: std::collections::BTreeMap<String, u64>,
}

/// Publishes `tick` events to the clients' channels in turn.
struct Publisher {
    api: net::Target,
    tls: tokio_rustls::TlsConnector,
    clients: usize,
    channels: usize,
    app_id: String,
    key: String,
    secret: String,
}

impl Publisher {
    fn new(args: &HerdArgs, api: &str, tls: Arc<rustls::ClientConfig>) -> Result<Publisher> {
        Ok(Publisher {
            api: net::Target::parse(api)?,
            tls: tokio_rustls::TlsConnector::from(tls),
            clients: args.clients,
            channels: args.channels,
            app_id: args.app_id.clone(),
            key: args.key.clone(),
            secret: args.secret.clone(),
        })
    }

    /// 32 connections, one request in flight on each, paced together at
    /// `rate`; until `stop`.
    async fn run(self, rate: f64, stop: watch::Receiver<bool>) -> Result<Acked> {
        const CONNECTIONS: usize = 32;
        let me = Arc::new(self);
        let next = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (me, next, mut stop) = (me.clone(), next.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut acked = Acked {
                    attempted: 0,
                    ok: Vec::new(),
                    failed: Default::default(),
                };
                let mut sender = None;
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let at = start + Duration::from_secs_f64(id as f64 / rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    if sender.is_none() {
                        sender = me.connect().await.ok();
                    }
                    let Some(s) = sender.as_mut() else { continue };
                    let slot = id as usize % (me.clients * me.channels);
                    let (i, c) = (slot / me.channels, slot % me.channels);
                    acked.attempted += 1;
                    match me.publish(s, i, c, id).await {
                        Ok((200, _)) => acked.ok.push((i, c, id)),
                        Ok((status, why)) => {
                            *acked.failed.entry(format!("{status} ({why})")).or_default() += 1
                        }
                        Err(_) => {
                            *acked.failed.entry("error".into()).or_default() += 1;
                            sender = None;
                        }
                    }
                }
                acked
            }));
        }
        let mut all = Acked {
            attempted: 0,
            ok: Vec::new(),
            failed: Default::default(),
        };
        for t in tasks {
            let a = t.await?;
            all.attempted += a.attempted;
            all.ok.extend(a.ok);
            for (k, n) in a.failed {
                *all.failed.entry(k).or_default() += n;
            }
        }
        Ok(all)
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>> {
        let conn = net::connect(&self.api, None, Some(&self.tls))
            .await
            .map_err(|e| anyhow!("API connection: {}", e.label()))?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// One `tick` to client `i`'s channel `c`: the answer's status, and
    /// its error message if any.
    async fn publish(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
        i: usize,
        c: usize,
        id: u64,
    ) -> Result<(u16, String)> {
        use http_body_util::BodyExt;
        let path = format!("/apps/{}/events", self.app_id);
        let body = json!({
            "name": "tick",
            "channels": [format!("private-herd-{i}-{c}")],
            "data": json!({"id": id}).to_string(),
        })
        .to_string();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let query = pusher_sign::signed_query(
            "POST",
            &path,
            &self.key,
            &self.secret,
            ts,
            body.as_bytes(),
            &[],
        );
        let request = http::Request::post(format!("{path}?{query}"))
            .header(http::header::HOST, self.api.authority())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        sender.ready().await?;
        let resp = sender.send_request(request).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let why = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        Ok((status, why))
    }
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn kill(pid: u32) {
    // SIGKILL: the server dies as in a crash, with no drain.
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

/// Server B's counters at one moment.
struct Snapshot {
    cpu: f64,
    full: u64,
    resumed: u64,
}

impl Snapshot {
    async fn take(args: &HerdArgs) -> Result<Snapshot> {
        let cpu = crate::procstat::cpu_secs(args.server_pid)
            .ok_or_else(|| anyhow!("no CPU time for pid {}", args.server_pid))?;
        let text = metrics_text(&args.admin).await?;
        let count = |kind: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("herdgate_tls_handshakes_total")
                        && l.contains(&format!("kind=\"{kind}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        Ok(Snapshot {
            cpu,
            full: count("full"),
            resumed: count("resumed"),
        })
    }
}

/// `GET {admin}/metrics` over plain HTTP/1.0 (the admin listener).
async fn metrics_text(admin: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = net::Target::parse(admin)?;
    let mut tcp = TcpStream::connect(target.addr).await?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).await?;
    Ok(body)
}

struct Client {
    i: usize,
    tls: Arc<rustls::ClientConfig>,
    endpoint: Arc<Endpoint>,
    channels: Vec<String>,
    key: String,
    grants_on: bool,
    recover: bool,
}

impl Client {
    /// Read the socket until it closes, noting each event.
    async fn read(&self, ws: &mut Ws, track: &mut Track) {
        while let Ok(m) = next(ws).await {
            self.note(&m, track);
        }
    }

    fn note(&self, m: &Value, track: &mut Track) {
        let channel = m["channel"].as_str().unwrap_or("");
        if let Some(c) = self.channels.iter().position(|x| x == channel) {
            track.note(c, m);
        }
    }

    /// Connect to `target` and subscribe to every channel: with the grants
    /// held (and this client's key) if given, else through the endpoint.
    async fn join(
        &self,
        target: &net::Target,
        held: Option<(Grants, Option<Arc<EcdsaKeyPair>>)>,
        track: &mut Track,
    ) -> Result<(Ws, Grants, Option<Arc<EcdsaKeyPair>>)> {
        let (mut grants, keypair) = match held {
            Some(h) => h,
            None => {
                let kp = self.grants_on.then(|| {
                    let rng = SystemRandom::new();
                    let pkcs8 =
                        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                            .expect("P-256 key");
                    Arc::new(
                        EcdsaKeyPair::from_pkcs8(
                            &ECDSA_P256_SHA256_FIXED_SIGNING,
                            pkcs8.as_ref(),
                            &rng,
                        )
                        .expect("P-256 key"),
                    )
                });
                (Grants::new(), kp)
            }
        };
        let tcp = TcpStream::connect(target.addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost".to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .context("TLS")?;
        let url = format!(
            "wss://localhost:{}/app/{}?protocol=7&client=herd&version=1.0",
            target.port, self.key
        );
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .context("websocket upgrade")?;
        let established = next(&mut ws).await?;
        let socket_id = parse_data(&established)["socket_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no socket_id: {established}"))?
            .to_string();
        let public = keypair
            .as_ref()
            .map(|k| B64.encode(k.public_key().as_ref()));
        let mut pending: Vec<&String> = self.channels.iter().collect();
        let mut presented: HashMap<String, bool> = HashMap::new();
        let sig = keypair
            .as_ref()
            .filter(|_| !grants.is_empty())
            .map(|kp| proof(kp, &self.key, &socket_id));
        let resume = |c: usize| {
            self.recover.then(|| match &track.position[c] {
                Some((serial, epoch)) => json!({"serial": serial, "epoch": epoch}),
                None => json!({}),
            })
        };
        let resumes: Vec<Option<Value>> = (0..self.channels.len()).map(resume).collect();
        for (c, r) in resumes.iter().enumerate() {
            track.replaying[c] = r.as_ref().is_some_and(|r| r.get("serial").is_some());
        }
        for (c, ch) in self.channels.iter().enumerate() {
            let with_grant = sig.as_ref().zip(grants.get(ch));
            let auth = match with_grant {
                Some((sig, g)) => {
                    presented.insert(ch.clone(), true);
                    format!("hg-grant.v1:{g}:{sig}")
                }
                None => self.endpoint.authorize(&socket_id, ch),
            };
            send_subscribe(&mut ws, ch, &auth, public.as_deref(), resumes[c].as_ref()).await?;
        }
        // Until every channel is subscribed and, with grants, has its grant.
        let mut granted = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() || (keypair.is_some() && granted < self.channels.len()) {
            let m = tokio::time::timeout_at(deadline, next(&mut ws))
                .await
                .map_err(|_| anyhow!("client {}: subscriptions not done in 60 s", self.i))??;
            self.note(&m, track);
            let event = m["event"].as_str().unwrap_or("");
            let channel = m["channel"].as_str().unwrap_or("").to_string();
            match event {
                "pusher_internal:subscription_succeeded" => pending.retain(|c| **c != channel),
                "pusher:subscription_error" => {
                    let data: Value = parse_data(&m);
                    if data["type"] == "GrantRefused" && presented.remove(&channel).is_some() {
                        grants.remove(&channel);
                        let auth = self.endpoint.authorize(&socket_id, &channel);
                        let c = self.channels.iter().position(|x| *x == channel);
                        let r = c.and_then(|c| resumes[c].as_ref());
                        send_subscribe(&mut ws, &channel, &auth, public.as_deref(), r).await?;
                    } else {
                        bail!("client {}: {channel}: {data}", self.i);
                    }
                }
                "herdgate:grant" => {
                    let data = parse_data(&m);
                    if let (Some(ch), Some(g)) = (data["channel"].as_str(), data["grant"].as_str())
                    {
                        grants.insert(ch.to_string(), g.to_string());
                        granted += 1;
                    }
                }
                _ => {}
            }
        }
        Ok((ws, grants, keypair))
    }
}

/// The socket's proof of holding the key: one signature per connection,
/// presented with every grant (docs/PROTOCOL.md "Auth grants").
fn proof(kp: &EcdsaKeyPair, app_key: &str, socket_id: &str) -> String {
    let msg = format!("herdgate-grant-v1\n{app_key}\n{socket_id}");
    let sig = kp
        .sign(&SystemRandom::new(), msg.as_bytes())
        .expect("ECDSA signature");
    B64.encode(sig.as_ref())
}

async fn send_subscribe(
    ws: &mut Ws,
    channel: &str,
    auth: &str,
    key: Option<&str>,
    resume: Option<&Value>,
) -> Result<()> {
    let mut data = json!({"channel": channel, "auth": auth});
    if let Some(k) = key {
        data["grant"] = json!({"key": k});
    }
    if let Some(r) = resume {
        data["resume"] = r.clone();
    }
    let m = json!({"event": "pusher:subscribe", "data": data}).to_string();
    ws.send(Message::text(m)).await?;
    Ok(())
}

fn parse_data(m: &Value) -> Value {
    match &m["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        other => other.clone(),
    }
}

async fn next(ws: &mut Ws) -> Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed"),
        }
    }
}
