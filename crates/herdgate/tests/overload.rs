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
[overload.actions]
presence_events_max_members = 1
coalesce_prefixes = ["feed-"]
coalesce_interval = "300ms"
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
async fn critical_refuses_new_sockets_and_readyz_follows_the_state() {
    let s = start(&shedding_config("[0.01, 0.02, 0.03]")).await;
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 200);
    let mut a = s.connect().await;
    let b = s.connect().await;
    let c = s.connect().await;
    status(&mut a, "critical").await;
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 503);
    let (code, body) = admin_get(s.admin, "/status").await;
    assert_eq!(code, 200);
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["state"], "critical");
    assert!(
        st["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("connections"),
        "{st}"
    );
    assert_eq!(st["limits"]["max_connections"], 100);
    assert!(
        admin_get(s.admin, "/livez").await.0 == 200,
        "liveness never fails because of load"
    );
    // A new socket is refused before the upgrade, with a jittered Retry-After.
    match tokio_tungstenite::connect_async(s.ws_url(KEY)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503);
            assert!(r.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // Existing sockets were never dropped to make room.
    a.send(json!({"event":"pusher:ping"})).await;
    a.expect("pusher:pong").await;
    b.close().await;
    c.close().await;
    status(&mut a, "degraded").await;
    assert_eq!(
        admin_get(s.admin, "/readyz").await.0,
        200,
        "ready again below critical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_and_never_slows_its_room() {
    let s = start("[limits]\noutbound_queue_messages = 256\noutbound_queue_bytes = 1048576\nwrite_timeout = \"2s\"").await;
    let api = s.api();
    // The slow socket: tiny receive buffer, subscribes, then never reads again.
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
    let payload = "x".repeat(8_000);
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0..1000 {
                    let e = c.expect("bulk").await;
                    assert_eq!(e.raw["data"].as_str().unwrap().len(), 8_000, "event {i}");
                }
                c
            })
        })
        .collect();
    for _ in 0..100 {
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
    }
    for r in readers {
        tokio::time::timeout(WAIT * 3, r)
            .await
            .expect("fast readers get all 1000 events")
            .unwrap();
    }
    let grown = herdgate::sys::rss_bytes()
        .unwrap_or(0)
        .saturating_sub(rss_before);
    assert!(
        grown < 256 << 20,
        "memory stayed bounded (grew {} MiB)",
        grown >> 20
    );
    // The slow socket's queue overflowed; the server closes it (4100) once
    // its stalled write gives up (write_timeout), which may take a moment.
    let closed_count = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("herdgate_connections_closed_total"))
            .filter(|l| l.contains("slow_consumer") || l.contains("write_timeout"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, metrics) = admin_get(s.admin, "/metrics").await;
        if closed_count(&metrics) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow consumer not closed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // bounded poll: a metric has no event to await
    }
    drop(slow);
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
