//! The abuse suite: one test per row of docs/SECURITY.md that an attacker
//! can drive from outside. Each plays the attacker with real sockets (from
//! many `127.x.y.z` source addresses where the attack needs them), asserts
//! that the bound in the threat model holds, and meanwhile an honest client
//! from another address connects, subscribes and receives within a stated
//! time. Waits are on answers (frames, responses, closes) with deadlines.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::StreamExt;
use herdgate_testkit::process::Herdgate;
use herdgate_testkit::*;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

const APP_ID: &str = "200001";
const APP_KEY: &str = "abuse-key";
const APP_SECRET: &str = "abuse-secret";
/// What an honest client is promised while an attack runs: connected,
/// subscribed and its first event received within this.
const HONEST_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- helpers

/// Lift this process's open-files limit to its hard limit (the attacks hold
/// thousands of sockets).
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A TCP connection to `to` from the source address `from` (any 127.x.y.z
/// is this machine's).
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// The `i`-th attacker address: 127.1.x.y.
fn attacker(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i >> 8) as u8, (i & 0xff) as u8 + 1))
}

/// Read an HTTP response head (and whatever follows in the same reads)
/// within `within`; `None` if none came.
async fn read_head(tcp: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
            }
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Some(String::from_utf8_lossy(&got).into_owned());
                }
            }
            Err(_) => return (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"))
}

fn process_config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{extra}

[overload]
enabled = false

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"
"#
    )
}

fn process_api(addr: SocketAddr) -> Api {
    Api {
        tls: None,
        addr,
        app_id: APP_ID.into(),
        key: APP_KEY.into(),
        secret: APP_SECRET.into(),
    }
}

/// An honest client: connects to `addr` (app `key`), subscribes to
/// `channel`, and receives one event published through `api`. How long
/// it all took.
async fn honest_round(addr: SocketAddr, key: &str, api: &Api, channel: &str) -> Duration {
    let start = Instant::now();
    let url = format!("ws://{addr}/app/{key}?protocol=7&client=honest&version=1.0");
    let mut c = Client::connect(&url).await;
    assert_eq!(
        c.subscribe(channel).await.event,
        "pusher_internal:subscription_succeeded"
    );
    let r = api
        .request(
            "POST",
            "/events",
            &[],
            &json!({"name": "honest", "channels": [channel], "data": "hi"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "honest publish: {:?}", r.body);
    let e = c.expect("honest").await;
    assert_eq!(e.data, json!("hi"));
    start.elapsed()
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/pid/status")
}

// ------------------------------------------- 1. HTTP fallback: xhr_send

/// The issue's attack at its size: 33 addresses × 128 connections (each
/// address's `max_handshakes_per_ip`), each a `POST …/xhr_send` announcing
/// 65,536 bytes and sending `["`. Before, every one held an accept permit
/// for ever and the node accepted nobody while saying it was ready.
/// Now: a session is bound to its opener and capped per address, a session
/// takes 4 sends at once (429 beyond), and each stalled body is answered
/// 408 at `handshake_timeout`. An honest client gets through during the
/// attack; then the attacker holds every permit with idle connections:
/// `/readyz` says "saturated" and the honest client still gets in once the
/// deadline frees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_xhr_send_bodies_do_not_halt_the_listener() {
    raise_nofile();
    // 16 sessions per address (the default is 64): every address then has
    // sessions to stall sends on and sends past the 4 per session.
    let hg = Herdgate::start(&process_config(
        "handshake_timeout = \"2s\"\n[limits]\nmax_http_sessions_per_ip = 16",
    ));
    let addr = hg.socket_addr();
    let admin = hg.admin_addr();
    let api = process_api(addr);
    const IPS: u32 = 33;
    const PER_IP: usize = 128;

    // Each address opens fallback sessions until refused (16 + 1).
    let mut streams = Vec::new();
    let mut sessions: Vec<Vec<String>> = Vec::new();
    for i in 0..IPS {
        let ip = attacker(i);
        let mut mine = Vec::new();
        for s in 0..17 {
            let mut tcp = connect_from(ip, addr).await.unwrap();
            let path = format!("/pusher/app/{APP_KEY}/{i}/a{i}s{s}");
            let req = format!(
                "GET {path}/xhr_streaming?protocol=7&client=js&version=8.4.0 HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            tcp.write_all(req.as_bytes()).await.unwrap();
            let head = read_head(&mut tcp, Duration::from_secs(5))
                .await
                .expect("a fallback session is answered at once");
            match status_of(&head) {
                200 => {
                    mine.push(path);
                    streams.push(tcp);
                }
                503 => assert_eq!(s, 16, "refused before the per-address cap: {head}"),
                other => panic!("unexpected {other}: {head}"),
            }
        }
        assert_eq!(mine.len(), 16, "limits.max_http_sessions_per_ip");
        sessions.push(mine);
    }

    // Every remaining connection of each address: a stalled xhr_send.
    let attack_start = Instant::now();
    let mut stalled = Vec::new();
    for (i, mine) in sessions.iter().enumerate() {
        let ip = attacker(i as u32);
        for n in 0..(PER_IP - mine.len()) {
            let Ok(mut tcp) = connect_from(ip, addr).await else {
                continue;
            };
            let req = format!(
                "POST {}/xhr_send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n[\"",
                mine[n % mine.len()]
            );
            if tcp.write_all(req.as_bytes()).await.is_err() {
                continue;
            }
            stalled.push(tcp);
        }
    }
    // Every answer is awaited at once: sends past 4 per session get 429 at
    // once, the others wait for their body until the deadline (2 s): 408.
    let answers: Vec<_> = stalled
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let head = read_head(&mut tcp, Duration::from_secs(8)).await;
                (head.map(|h| status_of(&h)), attack_start.elapsed(), tcp)
            })
        })
        .collect();

    // During the attack: an honest websocket client (127.0.0.1) and the API.
    let took = honest_round(addr, APP_KEY, &api, "lobby").await;
    assert!(took < HONEST_WITHIN, "honest client took {took:?}");
    let (status, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 200, "not saturated by this attack: {body}");

    let (mut too_many, mut timed_out) = (0, 0);
    let mut held = Vec::new();
    for a in answers {
        let (status, at, tcp) = a.await.unwrap();
        match status {
            Some(429) => too_many += 1,
            Some(408) => {
                assert!(at >= Duration::from_millis(1900), "408 before the deadline");
                timed_out += 1;
            }
            other => panic!("a stalled xhr_send answered {other:?}"),
        }
        held.push(tcp);
    }
    println!(
        "stalled xhr_send: {timed_out} held until 408 at the 2 s deadline, {too_many} refused 429 at once; honest client in {took:?}"
    );
    assert!(
        timed_out <= IPS as usize * 16 * 4,
        "at most 4 sends in flight per session: {timed_out}"
    );
    assert!(too_many > 0);
    drop(held);
    drop(streams);

    // Now hold every permit with idle connections (33 × 128 > 4096).
    let mut idle = Vec::new();
    for i in 0..IPS {
        for _ in 0..PER_IP {
            let s = TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(attacker(i), 0)).unwrap();
            // Queued in the backlog, or accepted: either way it waits.
            idle.push(tokio::spawn(s.connect(addr)));
        }
    }
    let saturated_by = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, body) = admin_get(admin, "/readyz").await;
        if status == 503 {
            assert!(body.contains("saturated"), "{body}");
            break;
        }
        assert!(
            Instant::now() < saturated_by,
            "/readyz never said saturated"
        );
        // /readyz has no event to await: poll it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, status) = admin_get(admin, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["accept"]["saturated"], true, "{status}");
    let honest = Instant::now();
    let took = honest_round(addr, APP_KEY, &api, "lobby").await;
    println!("saturated by idle connections: honest client in {took:?} (handshake_timeout 2 s)");
    assert!(
        honest.elapsed() < Duration::from_secs(2) + HONEST_WITHIN,
        "an honest client waits at most one handshake_timeout for a permit"
    );
    drop(idle);
}

/// One address can open at most `max_http_sessions_per_ip` fallback
/// sessions, and only the address that opened a session may send on it.
#[tokio::test]
async fn fallback_sessions_are_capped_per_ip_and_bound_to_their_address() {
    let s = start("[limits]\nmax_http_sessions_per_ip = 2\n").await;
    let open = |ip: IpAddr, id: &'static str| async move {
        let mut tcp = connect_from(ip, s.addr).await.unwrap();
        let req = format!(
            "GET /pusher/app/{KEY}/1/{id}/xhr_streaming?protocol=7&client=js&version=8.4.0 HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut tcp, WAIT).await.unwrap();
        (status_of(&head), tcp)
    };
    let a: IpAddr = "127.0.3.1".parse().unwrap();
    let b: IpAddr = "127.0.3.2".parse().unwrap();
    let (s1, _t1) = open(a, "one").await;
    let (s2, _t2) = open(a, "two").await;
    let (s3, _t3) = open(a, "three").await;
    assert_eq!((s1, s2, s3), (200, 200, 503));
    let (s4, _t4) = open(b, "four").await;
    assert_eq!(s4, 200, "another address is not affected");

    let send = |ip: IpAddr, id: &'static str| async move {
        let mut tcp = connect_from(ip, s.addr).await.unwrap();
        let body = r#"["{\"event\":\"pusher:ping\",\"data\":{}}"]"#;
        let req = format!(
            "POST /pusher/app/{KEY}/1/{id}/xhr_send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        status_of(&read_head(&mut tcp, WAIT).await.unwrap())
    };
    assert_eq!(send(b, "one").await, 403, "another address's session");
    assert_eq!(send(a, "one").await, 204, "its own");

    // An honest websocket client meanwhile.
    let mut c = s.connect().await;
    assert_eq!(
        c.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );
    s.api().publish("healthy", "e", "ok", None).await;
    assert_eq!(c.expect("e").await.data, json!("ok"));
}

// ------------------------------------------------ 2. reload revocation

fn reload_config(apps: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[overload]\nenabled = false\n{apps}"
    )
}

fn app_toml(id: &str, key: &str, secret: &str, enabled: bool) -> String {
    format!(
        "[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{secret}\"\nenabled = {enabled}\n"
    )
}

async fn connect_key(addr: SocketAddr, key: &str) -> Client {
    Client::connect(&format!(
        "ws://{addr}/app/{key}?protocol=7&client=abuse&version=1.0"
    ))
    .await
}

async fn subscribe_private(c: &mut Client, key: &str, secret: &str, channel: &str) -> Event {
    let auth = pusher_sign::channel_auth(key, secret, &c.socket_id, channel, None);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}))
        .await;
    c.next_event().await
}

fn wait_reloaded(hg: &Herdgate) {
    tokio::task::block_in_place(|| hg.wait_log("config reloaded", WAIT));
}

/// A leaked secret is rotated by SIGHUP (same app id, new key and secret).
/// Before: a socket opened earlier still subscribed with auth signed by the
/// old secret and received what was published afterwards. Now it is closed
/// (4001: its key is gone), and a socket of an app whose key stayed but
/// whose secret changed is closed 4203 (reconnect, authorize again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotating_a_secret_closes_open_sockets() {
    let before = format!(
        "{}{}",
        app_toml("1", "leaked-key", "leaked-secret", true),
        app_toml("2", "same-key", "old-secret", true)
    );
    let hg = Herdgate::start(&reload_config(&before));
    let addr = hg.socket_addr();
    let mut rotated = connect_key(addr, "leaked-key").await;
    let e = subscribe_private(&mut rotated, "leaked-key", "leaked-secret", "private-a").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    let mut same_key = connect_key(addr, "same-key").await;
    let e = subscribe_private(&mut same_key, "same-key", "old-secret", "private-b").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    // A socket on a public channel only: the old secret authorized nothing of it.
    let mut public = connect_key(addr, "same-key").await;
    assert_eq!(
        public.subscribe("news").await.event,
        "pusher_internal:subscription_succeeded"
    );

    let after = format!(
        "{}{}",
        app_toml("1", "fresh-key", "fresh-secret", true),
        app_toml("2", "same-key", "new-secret", true)
    );
    std::fs::write(&hg.config_path, reload_config(&after)).unwrap();
    hg.signal(libc::SIGHUP);
    wait_reloaded(&hg);

    let e = rotated.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4001, "{:?}", e.raw);
    assert_eq!(rotated.expect_close().await, Some(4001));
    let e = same_key.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4203, "{:?}", e.raw);
    assert_eq!(same_key.expect_close().await, Some(4203));

    // The old secret opens nothing on a new socket; the new one does, and
    // what is published with the new credentials arrives.
    let mut again = connect_key(addr, "same-key").await;
    let e = subscribe_private(&mut again, "same-key", "old-secret", "private-b").await;
    assert_eq!(e.event, "pusher:subscription_error", "{:?}", e.raw);
    let e = subscribe_private(&mut again, "same-key", "new-secret", "private-b").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    let api = Api {
        tls: None,
        addr,
        app_id: "2".into(),
        key: "same-key".into(),
        secret: "new-secret".into(),
    };
    api.publish("private-b", "after", "rotated", None).await;
    assert_eq!(again.expect("after").await.data, json!("rotated"));
    // The public-only socket went on, and hears the new credentials' publish.
    api.publish("news", "after", "still here", None).await;
    assert_eq!(public.expect("after").await.data, json!("still here"));
}

/// `enabled = false` by SIGHUP closes the app's open sockets with 4003
/// (before, they kept subscribing and exchanging client events); another
/// app's sockets are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_disabling_an_app_closes_its_sockets() {
    let apps = |enabled: bool| {
        format!(
            "{}{}",
            app_toml("1", "victim-key", "victim-secret", enabled),
            app_toml("2", "other-key", "other-secret", true)
        )
    };
    let hg = Herdgate::start(&reload_config(&apps(true)));
    let addr = hg.socket_addr();
    let mut victim = connect_key(addr, "victim-key").await;
    let e = subscribe_private(&mut victim, "victim-key", "victim-secret", "private-x").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    let mut other = connect_key(addr, "other-key").await;
    assert_eq!(
        other.subscribe("news").await.event,
        "pusher_internal:subscription_succeeded"
    );

    std::fs::write(&hg.config_path, reload_config(&apps(false))).unwrap();
    hg.signal(libc::SIGHUP);
    wait_reloaded(&hg);

    let e = victim.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4003, "{:?}", e.raw);
    assert_eq!(victim.expect_close().await, Some(4003));
    assert_eq!(
        refused_with(addr, "/app/victim-key?protocol=7&client=a&version=1").await,
        Some(4003)
    );
    let api = Api {
        tls: None,
        addr,
        app_id: "2".into(),
        key: "other-key".into(),
        secret: "other-secret".into(),
    };
    api.publish("news", "n", "still here", None).await;
    assert_eq!(other.expect("n").await.data, json!("still here"));
}

// -------------------------------------------- 3. presence churn

/// One authorized member replays its own presence auth: 5,000
/// subscribe/unsubscribe pairs as fast as it can write them. Before, each
/// pair reached all 24 other members (~10,000 member events each) and 21
/// of them were closed 4100 as slow consumers. Now its subscribes are
/// limited per socket (`limits.channel_ops_per_second` 10, burst 102):
/// beyond, `pusher:subscription_error` 429. No member is closed, each
/// sees at most the burst's worth of member events plus the rate, and a
/// new member joins during the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_churn_is_rate_limited_and_victims_survive() {
    let s = start("").await;
    let channel = "presence-keynote";
    let mut victims = Vec::new();
    for i in 0..24 {
        let mut c = s.connect().await;
        let e = c.subscribe_presence(channel, &format!("victim-{i}")).await;
        assert_eq!(e.event, "pusher_internal:subscription_succeeded");
        victims.push(c);
    }
    // Each victim has seen the joins of those after it: drain them, so the
    // count below is the attack's only.
    for (i, c) in victims.iter_mut().enumerate() {
        for _ in i + 1..24 {
            assert_eq!(c.next_event().await.event, "pusher_internal:member_added");
        }
    }

    let attacker = s.connect().await;
    let data = json!({"user_id": "attacker"}).to_string();
    let auth = auth_for(&attacker.socket_id, channel, Some(&data));
    let sub = json!({"event": "pusher:subscribe",
                     "data": {"channel": channel, "auth": auth, "channel_data": data}});
    let unsub = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});
    let attack_start = Instant::now();
    let (mut sink, mut stream) = attacker.ws.split();
    let writer = tokio::spawn(async move {
        use futures_util::SinkExt;
        for _ in 0..5000 {
            let a = tokio_tungstenite::tungstenite::Message::text(sub.to_string());
            let b = tokio_tungstenite::tungstenite::Message::text(unsub.to_string());
            if sink.feed(a).await.is_err() || sink.feed(b).await.is_err() {
                break;
            }
        }
        let _ = sink.flush().await;
        sink
    });
    // The attacker reads its own answers: count the refusals.
    let reader = tokio::spawn(async move {
        let (mut ok, mut limited) = (0u32, 0u32);
        while ok + limited < 5000 {
            let Ok(Some(Ok(m))) = timeout(WAIT, stream.next()).await else {
                break;
            };
            let Ok(v) = serde_json::from_str::<Value>(m.to_text().unwrap_or("")) else {
                continue;
            };
            match v["event"].as_str() {
                Some("pusher_internal:subscription_succeeded") => ok += 1,
                Some("pusher:subscription_error") => {
                    let d: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                    assert_eq!(d["status"], 429, "{v}");
                    limited += 1;
                }
                _ => {}
            }
        }
        (ok, limited)
    });

    // A new member joins during the attack.
    let mut newcomer = s.connect().await;
    let e = newcomer.subscribe_presence(channel, "newcomer").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");

    let _sink = writer.await.unwrap();
    let (ok, limited) = reader.await.unwrap();
    let elapsed = attack_start.elapsed();
    assert_eq!(ok + limited, 5000, "every subscribe was answered");
    // Burst of 102 tokens (max_channels_per_connection + 2), then 10/s;
    // leaving the presence channel spends one too.
    let allowed = 102.0 + 10.0 * elapsed.as_secs_f64();
    assert!(
        (ok as f64) <= allowed,
        "{ok} subscribes done in {elapsed:?}: more than the bucket allows ({allowed})"
    );

    // Every victim is still open and receives a marker; member events
    // before it are the attacker's pairs (and the newcomer's join).
    let api = s.api();
    let mut worst = 0;
    for c in victims.iter_mut() {
        let before = c.until_marker(&api, channel).await;
        let member_events = before
            .iter()
            .filter(|e| e.event.starts_with("pusher_internal:member_"))
            .count();
        worst = worst.max(member_events);
        assert!(
            member_events <= 2 * ok as usize + 1,
            "{member_events} member events for {ok} subscribes"
        );
    }
    println!(
        "presence churn of 5,000 pairs in {elapsed:?}: {ok} subscribes done, {limited} refused 429; \
         at most {worst} member events per victim, 0 victims closed"
    );
}

// --------------------------------------------- 4. HTTP API bodies

/// 1,000 unauthenticated clients each announce a 256 KiB API body and send
/// it slowly. Before, each body was buffered before the signature was
/// checked (~256 MiB parked). Now the signature (which covers `body_md5`)
/// is checked first: each gets 401 before its body is read, and the
/// node's memory does not grow with the bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_api_bodies_are_not_buffered() {
    raise_nofile();
    let hg = Herdgate::start(&process_config("handshake_timeout = \"10s\""));
    let addr = hg.socket_addr();
    let api = process_api(addr);
    let rss_before = rss_kib(hg.pid());
    let chunk = vec![b'x'; 16 * 1024];
    let mut conns = Vec::new();
    for i in 0..1000u32 {
        let mut tcp = connect_from(attacker(i % 50), addr).await.unwrap();
        let req = format!(
            "POST /apps/{APP_ID}/events?auth_key={APP_KEY}&auth_timestamp=1&auth_signature=00 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 262144\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let _ = tcp.write_all(&chunk).await;
        conns.push(tcp);
    }
    let mut unauthorized = 0;
    for tcp in conns.iter_mut() {
        let head = read_head(tcp, WAIT)
            .await
            .expect("answered before the body");
        if status_of(&head) == 401 {
            unauthorized += 1;
        }
    }
    // Keep sending: a server that read bodies would buffer them now.
    for tcp in conns.iter_mut() {
        let _ = tcp.write_all(&chunk).await;
    }
    let took = honest_round(addr, APP_KEY, &api, "lobby").await;
    let grew = rss_kib(hg.pid()).saturating_sub(rss_before);
    println!(
        "1,000 unsigned 256 KiB bodies: {unauthorized} answered 401 unread; RSS grew {grew} KiB; honest client in {took:?}"
    );
    assert_eq!(unauthorized, 1000);
    assert!(took < HONEST_WITHIN);
    // 1,000 buffered bodies of even 32 KiB would be 32 MiB.
    assert!(grew < 32 * 1024, "RSS grew {grew} KiB");
}

// ------------------------------------------------- 5. PROXY protocol

/// With `trusted_proxies` set, a PROXY header is believed only from those
/// peers: a direct client claiming an address inside them (to escape the
/// per-IP caps) is cut off; the real proxy's clients get through.
#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_is_refused() {
    let s = start(
        "[server]\nproxy_protocol = true\nhandshake_timeout = \"2s\"\ntrusted_proxies = [\"127.0.4.1/32\"]\n",
    )
    .await;
    let upgrade = |claimed: &str| {
        format!(
            "PROXY TCP4 {claimed} 127.0.0.1 5000 80\r\nGET /app/{KEY}?protocol=7&client=t&version=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    // A direct client pretending to be (behind) the proxy.
    let mut spoof = connect_from("127.0.4.2".parse().unwrap(), s.addr)
        .await
        .unwrap();
    let _ = spoof.write_all(upgrade("127.0.4.1").as_bytes()).await;
    assert_eq!(
        read_head(&mut spoof, WAIT).await,
        None,
        "closed without an answer"
    );
    // The trusted proxy, for a client.
    let mut proxy = connect_from("127.0.4.1".parse().unwrap(), s.addr)
        .await
        .unwrap();
    proxy
        .write_all(upgrade("198.51.100.7").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut proxy, WAIT).await.expect("answered");
    assert_eq!(status_of(&head), 101, "{head}");
}

// ----------------------------------------------------- 6. admin listener

/// A page on the operator's machine cannot read the admin listener through
/// DNS rebinding (its `Host` is the attacker's name: 421), and with
/// `admin.token` set only a bearer of it reads anything but the probes.
#[tokio::test]
async fn admin_listener_refuses_foreign_hosts_and_missing_tokens() {
    let s = start("[admin]\ntoken = \"t0ken\"\n").await;
    let get = |host: &'static str, path: &'static str, auth: Option<&'static str>| async move {
        let mut tcp = TcpStream::connect(s.admin).await.unwrap();
        let auth = auth.map_or(String::new(), |a| format!("Authorization: Bearer {a}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        status_of(&read_head(&mut tcp, WAIT).await.unwrap())
    };
    assert_eq!(get("rebound.attacker.example", "/", None).await, 421);
    // The probes answer whatever name a health checker uses.
    assert_eq!(get("rebound.attacker.example", "/readyz", None).await, 200);
    assert_eq!(
        get("rebound.attacker.example:9601", "/status", Some("t0ken")).await,
        421
    );
    assert_eq!(get("127.0.0.1:9601", "/readyz", None).await, 200);
    assert_eq!(get("localhost", "/livez", None).await, 200);
    assert_eq!(get("127.0.0.1", "/status", None).await, 401);
    assert_eq!(get("127.0.0.1", "/metrics", Some("wrong")).await, 401);
    assert_eq!(get("[::1]:9601", "/status", Some("t0ken")).await, 200);
    assert_eq!(
        get("127.0.0.1", "/status/live?token=t0ken", None).await,
        200
    );
    // The public listener is unaffected.
    let mut c = s.connect().await;
    assert_eq!(
        c.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );
}

// ------------------------------------- 7. subscription errors (issue 24)

/// A channel name over the 164-character limit is echoed whole in its
/// `pusher:subscription_error`, so the client can match it to the pending
/// subscription (a cut name left pusher-js waiting for ever).
#[tokio::test]
async fn an_overlong_channel_name_is_echoed_whole() {
    let s = start("").await;
    let mut c = s.connect().await;
    let long = format!("lobby-{}", "x".repeat(300));
    let e = c.subscribe(&long).await;
    assert_eq!(e.event, "pusher:subscription_error", "{:?}", e.raw);
    assert_eq!(e.channel.as_deref(), Some(long.as_str()));
    assert_eq!(e.data["type"], "InvalidChannel");
}

/// Auth grants (docs/SECURITY.md "Auth grants"): junk presented as a
/// grant is refused (`GrantRefused` 401) before any signature check; a
/// client holding one real grant and presenting it again and again with
/// bad signatures gets `GrantRefused` for each, and at most
/// `limits.auth_grant_checks_per_second` (burst twice that) signature
/// checks run node-wide: the rest are refused unchecked (503, busy). An
/// honest client keeps receiving and still subscribes with the app's
/// signature.
#[tokio::test]
async fn forged_grants_are_refused_and_their_checks_bounded_node_wide() {
    let s = start_with_app(
        "[limits]\nauth_grant_checks_per_second = 2\n",
        "auth_grants = true\n",
    )
    .await;
    let mut honest = s.connect().await;
    assert_eq!(
        honest.subscribe("healthy").await.event,
        "pusher_internal:subscription_succeeded"
    );
    let mut attacker = s.connect().await;
    let outcome = |e: &Event| (e.data["type"].clone(), e.data["status"].as_u64());
    // Junk: refused by its MAC, no signature checked.
    for i in 0..6 {
        let auth = format!("hg-grant.v1:{}:{}", "A".repeat(600), "B".repeat(86));
        let channel = format!("private-junk-{i}");
        attacker
            .send(json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}))
            .await;
        let e = attacker.next_event().await;
        assert_eq!(
            outcome(&e),
            (json!("GrantRefused"), Some(401)),
            "{:?}",
            e.raw
        );
    }
    // One real grant, authorized by the app (its signature), for a key
    // whose private half the attacker then does not use.
    let key = rcgen::KeyPair::generate().unwrap();
    let public = URL_SAFE_NO_PAD.encode(key.public_key_raw());
    let own = "private-own";
    let auth = auth_for(&attacker.socket_id, own, None);
    attacker
        .send(json!({"event":"pusher:subscribe","data":{"channel":own,"auth":auth,"grant":{"key":public}}}))
        .await;
    attacker
        .expect("pusher_internal:subscription_succeeded")
        .await;
    let g = attacker.expect("herdgate:grant").await;
    let grant = g.data["grant"].as_str().expect("a grant").to_string();
    let mut statuses = Vec::new();
    for i in 0..8u8 {
        attacker
            .send(json!({"event":"pusher:unsubscribe","data":{"channel":own}}))
            .await;
        // A new (bad) signature each time: never a proof the socket verified.
        let auth = format!("hg-grant.v1:{grant}:{}", URL_SAFE_NO_PAD.encode([i; 64]));
        attacker
            .send(json!({"event":"pusher:subscribe","data":{"channel":own,"auth":auth}}))
            .await;
        let e = attacker.next_event().await;
        assert_eq!(e.data["type"], "GrantRefused", "{:?}", e.raw);
        statuses.push(e.data["status"].as_u64().unwrap());
    }
    // The burst (4) checked and refused, the rest refused unchecked. Time
    // refills the bucket: a slow machine may let one more through.
    assert!(statuses[..4].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(
        statuses[4..].contains(&503),
        "the node-wide budget: {statuses:?}"
    );
    // The honest client is untouched, and the app's own signature still works.
    let api = s.api();
    let before = honest.until_marker(&api, "healthy").await;
    assert!(
        before.is_empty(),
        "{:?}",
        before.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    honest.expect_subscribed("private-honest").await;
    // A forged sign-in grant: refused as a grant (the socket is not signed
    // in, and not closed: the plugin asks the app's endpoint instead).
    let user_data = json!({"id": "someone-else"}).to_string();
    let auth = format!("hg-grant.v1:{}:{}", "A".repeat(300), "B".repeat(86));
    attacker
        .send(json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}}))
        .await;
    let e = attacker.expect("herdgate:grant").await;
    assert_eq!(e.data["signin"], true, "{:?}", e.raw);
    assert!(e.data["refused"].is_string(), "{:?}", e.raw);
    // The attacker's socket stays (a refused grant is not an error of the connection).
    attacker.expect_subscribed("private-after").await;
}

/// docs/SECURITY.md "Moderation". A removed client keeps talking: the client
/// events it sends after the removal's 200 (before and after its session
/// reads the notice) reach nobody, and re-subscribing with its app's valid
/// signature is refused while it is banned. A caller holding the secret
/// cannot grow the app's ban list past `max_channel_bans` (429), and the
/// bans already set hold. An honest member hears none of it and still
/// subscribes and receives.
#[tokio::test]
async fn a_removed_client_reaches_nobody_and_the_ban_list_is_bounded() {
    let s = start_with_app("", "max_channel_bans = 3\n").await;
    let api = s.api();
    let room = "private-abuse-moderated";
    let mut honest = s.connect().await;
    honest.expect_subscribed(room).await;
    let mut mallory = s.connect().await;
    assert_eq!(
        mallory.signin("mallory").await.event,
        "pusher:signin_success"
    );
    mallory.expect_subscribed(room).await;

    let remove = |user: &str, body: &str| {
        let path = format!("/channels/{room}/users/{user}/remove");
        let body = body.to_string();
        let api = &api;
        async move { api.request("POST", &path, &[], &body).await }
    };
    let r = remove("mallory", r#"{"ban_seconds":60}"#).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"removed": 1, "ban_seconds": 60}));
    // It floods client events on the channel without reading a thing, then
    // pings: the pong comes once its session handled every one of them.
    for i in 0..20 {
        mallory
            .send(json!({"event":"client-spam","channel":room,"data":{"i":i}}))
            .await;
    }
    mallory.send(json!({"event":"pusher:ping","data":{}})).await;
    let mut notices = 0;
    loop {
        let e = mallory.next_event().await;
        if e.event == "pusher:subscription_error" {
            assert_eq!(e.data["type"], "Removed", "{:?}", e.raw);
            notices += 1;
        }
        if e.event == "pusher:pong" {
            break;
        }
    }
    assert_eq!(notices, 1, "one notice");
    // Everything it sent is behind the marker in the room's order: none of
    // it reached the honest member.
    let heard = honest.until_marker(&api, room).await;
    assert!(
        heard.iter().all(|e| e.event != "client-spam"),
        "{:?}",
        heard.iter().map(|e| &e.raw).collect::<Vec<_>>()
    );
    // Its app would still sign it in: the ban refuses it.
    let e = mallory.subscribe(room).await;
    assert_eq!(e.data["type"], "Banned", "{:?}", e.raw);
    assert_eq!(e.data["status"], 403);

    // The ban list: 3 per app at the owner. Two more fill it; a fourth is
    // refused, and nothing of it is done.
    for u in ["u1", "u2"] {
        assert_eq!(remove(u, r#"{"ban_seconds":600}"#).await.status, 200);
    }
    let full = remove("u3", r#"{"ban_seconds":600}"#).await;
    assert_eq!(full.status, 429, "{:?}", full.body);
    assert!(full.headers.contains_key("retry-after"));
    let e = mallory.subscribe(room).await;
    assert_eq!(e.data["type"], "Banned", "the bans set still hold");
    // A removal without a ban needs no place in the list.
    assert_eq!(remove("u3", "").await.status, 200);
    // Lifting one makes room.
    let lifted = api
        .request("POST", &format!("/channels/{room}/users/u1/unban"), &[], "")
        .await;
    assert_eq!(lifted.body, json!({"lifted": true}));
    assert_eq!(remove("u3", r#"{"ban_seconds":600}"#).await.status, 200);

    // The honest member: still subscribed, still hears, still joins more.
    assert!(honest.until_marker(&api, room).await.is_empty());
    honest.expect_subscribed("private-abuse-after").await;
    let mut late = s.connect().await;
    late.expect_subscribed(room).await;
    assert!(late.until_marker(&api, room).await.is_empty());
}
