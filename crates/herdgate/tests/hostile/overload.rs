//! Degrade, never halt: load states, shedding, slow consumers, storms.
//! Timings here are deadlines on waits, never performance claims.

use herdgate_testkit::process::Herdgate;
use herdgate_testkit::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Thresholds low enough that a handful of sockets move the node between states.
fn shedding_config(connections: &str) -> String {
    format!(
        r#"
[limits]
max_connections = 100
max_connections_per_ip = 0
[overload]
sample_interval = "20ms"
cooldown = "300ms"
connections = {connections}
# Only the signal under test moves the state: a busy machine must not.
scheduling_lag_ms = [5000.0, 10000.0, 20000.0]
memory = [0.97, 0.98, 0.99]
[overload.actions]
presence_events_max_members = 1
coalesce_prefixes = ["feed-"]
# Long enough that the five quick publishes below always fall in one
# interval, however slow the machine: the test waits for one flush.
coalesce_interval = "2s"
nonessential_prefixes = ["roulette-"]
essential_prefixes = ["announce-"]
"#
    )
}

/// Skip `herdgate:status` events until one says `state`.
async fn status(c: &mut Client, state: &str) -> Event {
    loop {
        let e = c.next_event().await;
        if e.event == "herdgate:status" && e.data["state"] == state {
            return e;
        }
        assert_eq!(e.event, "herdgate:status", "unexpected {:?}", e.raw);
    }
}

#[tokio::test]
async fn degraded_mode_sheds_in_order_and_essential_broadcasts_flow() {
    // Two sockets = 0.02 of the cap: degraded.
    let s = start(&shedding_config("[0.01, 0.02, 0.9]")).await;
    let api = s.api();
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    let e = status(&mut b, "degraded").await;
    let limited: Vec<String> = serde_json::from_value(e.data["limited"].clone()).unwrap();
    for feature in [
        "client_events",
        "presence_member_events",
        "coalesced_channels",
        "nonessential_subscriptions",
    ] {
        assert!(
            limited.iter().any(|l| l == feature),
            "{feature} not in {limited:?}"
        );
    }
    status(&mut a, "degraded").await;

    for c in [&mut a, &mut b] {
        c.subscribe("private-chat").await;
        c.subscribe("announce-live").await;
        c.subscribe("feed-news").await;
    }
    // Client events are refused with 4301 and never reach the other socket.
    a.send(json!({"event":"client-typing","channel":"private-chat","data":{}}))
        .await;
    assert_eq!(a.expect("pusher:error").await.data["code"], 4301);
    // Non-essential subscriptions are refused, essential ones are not.
    let e = a.subscribe("roulette-table-1").await;
    assert_eq!(e.event, "pusher:subscription_error");
    assert_eq!(e.data["status"], 503);

    // Presence rooms above 1 member: no member events (counts stay right).
    a.subscribe_presence("presence-hall", "u1").await;
    let e = b.subscribe_presence("presence-hall", "u2").await;
    assert_eq!(e.data["presence"]["count"], 2);

    // Coalescing: five quick events on feed-news arrive as the last one only.
    for i in 1..=5 {
        api.publish("feed-news", "headline", &i.to_string(), None)
            .await;
    }
    // Essential broadcasts are not held back.
    api.publish("announce-live", "session-update", "keynote starts", None)
        .await;
    let e = b.expect("session-update").await;
    assert_eq!(e.raw["data"], "keynote starts");
    let e = b.expect("headline").await;
    assert_eq!(
        e.raw["data"], "5",
        "only the latest coalesced event is sent"
    );
    let rest = b.until_marker(&api, "announce-live").await;
    assert!(
        rest.is_empty(),
        "b got {rest:?} (no client event, no member_added, no other headline)"
    );
    // a saw no member_added for u2 either (only the broadcasts b saw).
    let rest = a.until_marker(&api, "announce-live").await;
    let names: Vec<&str> = rest.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["session-update", "headline", "marker"],
        "a got {rest:?}"
    );
    b.expect("marker").await; // a's marker reached b too

    // Load goes away: one socket left (0.01) steps down to pressured after the cooldown.
    a.close().await;
    let e = status(&mut b, "pressured").await;
    assert_eq!(e.data["limited"], json!(["client_events_rate"]));
}

#[tokio::test]
async fn critical_refuses_new_sockets_and_admission_reopens_before_features_recover() {
    // One connect within a 20 ms sample is 50/s, over 40/s: critical by
    // accept rate. Shed features keep a 30 s cooldown; admission has 300 ms.
    let s = start(
        r#"
[limits]
max_connections = 100
max_connections_per_ip = 0
[overload]
sample_interval = "20ms"
cooldown = "30s"
admission_cooldown = "300ms"
accept_rate = [10.0, 20.0, 40.0]
# Only the signal under test moves the state: a busy machine must not.
scheduling_lag_ms = [5000.0, 10000.0, 20000.0]
memory = [0.97, 0.98, 0.99]
"#,
    )
    .await;
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 200);
    let mut a = s.connect().await;
    status(&mut a, "critical").await;
    let (code, body) = admin_get(s.admin, "/status").await;
    assert_eq!(code, 200);
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["state"], "critical", "{st}");
    assert_eq!(st["limits"]["max_connections"], 100);
    assert!(
        admin_get(s.admin, "/livez").await.0 == 200,
        "liveness never fails because of load"
    );
    // A new socket is refused before the upgrade, with a jittered Retry-After,
    // while admission is critical; /readyz says so too.
    let mut refused = false;
    let mut ready_503 = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(refused && ready_503) {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        ready_503 |= admin_get(s.admin, "/readyz").await.0 == 503;
        match tokio_tungstenite::connect_async(s.ws_url(KEY)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503);
                assert!(r.headers().contains_key("retry-after"));
                refused = true;
            }
            Ok(_) => {} // admitted in the sample before critical: try again
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // Existing sockets were never dropped to make room.
    a.send(json!({"event":"pusher:ping"})).await;
    a.expect("pusher:pong").await;
    // Nobody connects for a moment: the accept rate falls and admission
    // reopens within its short cooldown, while the features shed at
    // critical stay shed for their long one.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = admin_get(s.admin, "/status").await;
        let st: Value = serde_json::from_str(&body).unwrap();
        if st["admission"] == "normal" {
            assert_eq!(st["state"], "critical", "features still shed: {st}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "admission never reopened: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // bounded poll of a sampled state
    }
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 200, "ready again");
    let _d = s.connect().await;
}

#[tokio::test]
async fn a_node_at_its_cap_admits_again_as_soon_as_sockets_leave() {
    // At the cap the node is critical by `connections`, but that signal does
    // not close admission: the cap refuses by itself and frees places at once.
    let s = start(
        r#"
[limits]
max_connections = 20
max_connections_per_ip = 0
[overload]
sample_interval = "20ms"
cooldown = "30s"
# Only the signal under test moves the state: a busy machine must not.
scheduling_lag_ms = [5000.0, 10000.0, 20000.0]
memory = [0.97, 0.98, 0.99]
"#,
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(s.connect().await);
    }
    status(&mut held[0], "critical").await;
    match tokio_tungstenite::connect_async(s.ws_url(KEY)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503 at the cap, got {:?}", other.map(|_| ())),
    }
    for c in held.drain(10..) {
        c.close().await;
    }
    // Each close frees its place when its session ends; the next connect gets it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let c = loop {
        match tokio_tungstenite::connect_async(s.ws_url(KEY)).await {
            Ok((ws, _)) => break ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never admitted again"
                );
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    };
    let (_, body) = admin_get(s.admin, "/status").await;
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(
        st["state"], "normal",
        "admitted while features are still shed: {st}"
    );
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_and_never_slows_its_room() {
    // The slow socket is closed by its queue's overflow, long before this;
    // the timeout is long so that a busy machine's stall is not mistaken
    // for the room waiting on the slow socket.
    const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
    let s = start("[limits]\noutbound_queue_messages = 256\noutbound_queue_bytes = 1048576\nwrite_timeout = \"20s\"").await;
    let api = s.api();
    // The slow socket: tiny receive buffer, subscribes, then stops reading.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(s.addr).await.unwrap();
    let mut slow = Client::connect_on(&s.ws_url(KEY), Box::new(tcp)).await;
    slow.subscribe("room").await;
    let mut fast = Vec::new();
    for _ in 0..3 {
        let mut c = s.connect().await;
        c.subscribe("room").await;
        fast.push(c);
    }
    let rss_before = herdgate::sys::rss_bytes().unwrap_or(0);
    let t0 = std::time::Instant::now();
    let micros = move || t0.elapsed().as_micros() as u64;
    // Each event carries when it was published; readers measure its delay.
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut worst = 0u64;
                for i in 0..1000 {
                    let e = c.expect("bulk").await;
                    let data = e.raw["data"].as_str().unwrap();
                    assert_eq!(data.len(), 8_000, "event {i}");
                    let sent: u64 = data[..20].parse().unwrap();
                    worst = worst.max(micros().saturating_sub(sent));
                }
                (c, Duration::from_micros(worst))
            })
        })
        .collect();
    for _ in 0..100 {
        let batch: Vec<_> = (0..10)
            .map(|_| {
                let data = format!("{:020}{}", micros(), "x".repeat(7_980));
                json!({"channel":"room","name":"bulk","data":data})
            })
            .collect();
        let r = api
            .request(
                "POST",
                "/batch_events",
                &[],
                &json!({ "batch": batch }).to_string(),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    // The slow reader wakes up: it gets what its queue held before the
    // overflow, then the close: 4100, so pusher-js backs off and reconnects.
    let slow_end = tokio::spawn(async move {
        loop {
            match slow.recv().await {
                Received::Event(e) => assert!(e.event == "bulk", "{:?}", e.raw),
                Received::Closed(code) => return code,
            }
        }
    });
    for r in readers {
        let (_, worst) = tokio::time::timeout(WAIT * 3, r)
            .await
            .expect("fast readers get all 1000 events")
            .unwrap();
        // Had the room waited for the slow socket, events would have waited
        // for its write timeout.
        assert!(
            worst < WRITE_TIMEOUT,
            "a fast reader waited {worst:?} for an event (write timeout {WRITE_TIMEOUT:?})"
        );
    }
    let grown = herdgate::sys::rss_bytes()
        .unwrap_or(0)
        .saturating_sub(rss_before);
    assert!(
        grown < 256 << 20,
        "memory stayed bounded (grew {} MiB)",
        grown >> 20
    );
    let code = tokio::time::timeout(WAIT, slow_end)
        .await
        .expect("the slow socket is closed")
        .unwrap();
    assert_eq!(code, Some(4100), "slow consumer close code");
}

/// A client process opens 5x the cap as fast as it can while 200 established
/// subscribers receive a steady essential stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_five_times_the_cap() {
    const CAP: usize = 400;
    const SUBSCRIBERS: usize = 200;
    let server = Herdgate::start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[limits]
max_connections = {CAP}
max_connections_per_ip = 0
# One client address opens every socket: the storm is about the node cap.
max_handshakes_per_ip = 0
[shutdown]
deregister_delay = "0s"
drain_period = "0s"
[overload.actions]
essential_prefixes = ["announce-"]
[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
"#
    ));
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let admin: std::net::SocketAddr = server.admin.as_ref().unwrap().parse().unwrap();
    let url = format!("ws://{addr}/app/{KEY}?protocol=7&client=test&version=1.0");
    let mut subs = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut c = Client::connect(&url).await;
        c.subscribe("announce-live").await;
        subs.push(c);
    }
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let e = c.next_event().await;
                    match e.event.as_str() {
                        "update" => {
                            seen.push(e.raw["data"].as_str().unwrap().parse::<u32>().unwrap())
                        }
                        "done" => return seen,
                        "herdgate:status" => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();

    let api = Api {
        tls: None,
        addr,
        app_id: APP_ID.into(),
        key: KEY.into(),
        secret: SECRET.into(),
    };
    let storm = std::process::Command::new(herdgate_testkit::process::bin("herdgate-load"))
        .args([
            "storm",
            "-n",
            &(5 * CAP).to_string(),
            "--duration",
            "2",
            "--quiet",
            "--url",
            &format!("ws://{addr}"),
        ])
        .args([
            "--app-id",
            APP_ID,
            "--key",
            KEY,
            "--secret",
            SECRET,
            "--json-out",
        ])
        .arg(server.config_path.with_file_name("storm.json"))
        .spawn()
        .unwrap();
    let storm = tokio::task::spawn_blocking(move || {
        let mut storm = storm;
        storm.wait().unwrap()
    });
    let mut published = 0u32;
    let mut peak = 0u64;
    while !storm.is_finished() {
        api.publish("announce-live", "update", &published.to_string(), None)
            .await;
        published += 1;
        let (live, _) = admin_get(admin, "/livez").await;
        assert_eq!(live, 200, "/livez answers throughout the storm");
        let (_, body) = admin_get(admin, "/status").await;
        let st: Value = serde_json::from_str(&body).unwrap();
        peak = peak.max(st["connections"].as_u64().unwrap());
        assert!(
            peak <= CAP as u64,
            "open connections {peak} exceeded the cap {CAP}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // the steady stream's pace
    }
    assert!(storm.await.unwrap().success());
    api.publish("announce-live", "done", "", None).await;
    for r in receivers {
        let seen = tokio::time::timeout(WAIT, r)
            .await
            .expect("subscriber finished")
            .unwrap();
        assert_eq!(
            seen,
            (0..published).collect::<Vec<_>>(),
            "every essential message, in order"
        );
    }
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(server.config_path.with_file_name("storm.json")).unwrap(),
    )
    .unwrap();
    let c = &report["connections"];
    assert!(c["established"].as_u64().unwrap() <= (CAP - SUBSCRIBERS) as u64);
    assert!(c["refused"].as_u64().unwrap() > 0, "{c}");
    for (status, _) in c["refused_by_http_status"].as_object().unwrap() {
        assert_eq!(status, "503", "refusals are 503s: {c}");
    }
    for (code, _) in c["refused_by_close_code"].as_object().unwrap() {
        assert!(
            code.starts_with("41"),
            "post-upgrade refusals are 41xx: {c}"
        );
    }
    println!("storm: {published} essential messages to {SUBSCRIBERS} subscribers; peak {peak} open; load tool: {c}");
}

/// Resident memory of a process, from /proc.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// The gauge of bytes queued to every socket, from /metrics.
async fn queued_bytes(admin: std::net::SocketAddr) -> f64 {
    let (_, m) = admin_get(admin, "/metrics").await;
    m.lines()
        .find(|l| l.starts_with("herdgate_outbound_queue_bytes "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A burst to 1,000 sockets that stopped reading: what they hold waits in
/// their counted outbound queues as references to the room's one copy of
/// each event — not copied into per-socket write buffers outside any count
/// — and it is given back once the sockets are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_slow_sockets_is_bounded_and_memory_returns() {
    const SLOW: usize = 1000;
    let server = Herdgate::start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[limits]
max_connections_per_ip = 0
max_handshakes_per_ip = 0
write_timeout = "3s"
[overload]
enabled = false
sample_interval = "100ms"
[shutdown]
deregister_delay = "0s"
drain_period = "0s"
[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
"#
    ));
    let addr = server.socket_addr();
    let admin = server.admin_addr();
    let url = format!("ws://{addr}/app/{KEY}?protocol=7&client=test&version=1.0");
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        let mut c = Client::connect_on(&url, Box::new(tcp)).await;
        c.subscribe("room").await;
        slow.push(c);
    }
    let connected = rss_of(server.pid());
    let api = Api {
        tls: None,
        addr,
        app_id: APP_ID.into(),
        key: KEY.into(),
        secret: SECRET.into(),
    };
    // 100 KB per socket, under the default 256 KiB queue: nothing overflows,
    // the sockets' queues hold it (~100 MB counted in all).
    let payload = "x".repeat(10_000);
    let batch: Vec<_> = (0..10)
        .map(|_| json!({"channel":"room","name":"bulk","data":payload}))
        .collect();
    let r = api
        .request(
            "POST",
            "/batch_events",
            &[],
            &json!({ "batch": batch }).to_string(),
        )
        .await;
    assert_eq!(r.status, 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    let queued = loop {
        let q = queued_bytes(admin).await;
        if q >= (SLOW * 50_000) as f64 {
            break q;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues never filled: {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // bounded poll of a sampled gauge
    };
    let held = rss_of(server.pid());
    // The sockets' write deadline closes them (4100).
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let (_, body) = admin_get(admin, "/status").await;
        let st: Value = serde_json::from_str(&body).unwrap();
        if st["connections"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow sockets still open: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // bounded poll of a sampled count
    }
    drop(slow);
    // The monitor trims after the mass close; give it a few samples.
    let mut after = rss_of(server.pid());
    let deadline = tokio::time::Instant::now() + WAIT;
    while after > connected + (8 << 20) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await; // bounded poll: RSS has no event
        after = rss_of(server.pid());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "burst to {SLOW} slow sockets: {:.1} MiB queued; RSS connected {:.1} MiB, holding the burst {:.1} MiB, after close {:.1} MiB",
        queued / (1 << 20) as f64,
        mib(connected),
        mib(held),
        mib(after)
    );
    // A per-socket copy of what is queued would be ~100 MB here.
    assert!(
        held < connected + (32 << 20),
        "holding {:.1} MiB queued cost {:.1} MiB of RSS over {:.1} MiB",
        queued / (1 << 20) as f64,
        mib(held - connected),
        mib(connected)
    );
    assert!(
        after <= connected + (8 << 20),
        "memory returned near its level before the burst: {:.1} MiB vs {:.1} MiB",
        mib(after),
        mib(connected)
    );
}
