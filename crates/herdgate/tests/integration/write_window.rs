//! An app's write window (`write_delay`, docs/OPERATIONS.md "Write
//! window"): a room's events to a plain-TCP socket wait out the window the
//! first of them opens, and the room's worker then writes them in place,
//! all in one go, without waking the socket's task; a TLS socket of the
//! same app keeps its window with its session. Either way every event
//! arrives, once, in order.

use herdgate_testkit::pki::{tls_section, Pki};
use herdgate_testkit::*;
use tokio::net::TcpStream;

/// `herdgate_write_window_flushes_total{how="in_place"}` as the admin
/// endpoint reports it (0 before the first).
async fn flushed_in_place(s: &TestServer) -> f64 {
    let (status, text) = admin_get(s.admin, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find(|l| {
            l.starts_with("herdgate_write_window_flushes_total") && l.contains("how=\"in_place\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `tick` events `0..n` to `live`, each acked.
async fn publish_ticks(api: &Api, n: u32) {
    for i in 0..n {
        let r = api.publish("live", "tick", &i.to_string(), None).await;
        assert_eq!(r.status, 200);
    }
}

async fn expect_ticks(c: &mut Client, n: u32) {
    for i in 0..n {
        let e = c.expect("tick").await;
        assert_eq!(e.raw["data"], i.to_string(), "every event, once, in order");
    }
}

#[tokio::test]
async fn held_events_arrive_in_order_on_tls_and_plain_sockets_and_the_worker_writes_plain_ones() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("leaf", false);
    let s = start_with_app(&tls_section(&cert, &key, ""), "write_delay = \"200ms\"").await;
    let cfg = tls_client_config(&pki.ca_der, &[&rustls::version::TLS13]);
    let url = format!(
        "wss://localhost:{}/app/{KEY}?protocol=7&client=test&version=1.0",
        s.addr.port()
    );
    let mut secure = {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        Client::connect_on(&url, Box::new(tls_connect(cfg.clone(), tcp).await.unwrap())).await
    };
    secure.expect_subscribed("live").await;
    let before = flushed_in_place(&s).await;
    let api = Api {
        tls: Some(cfg),
        ..s.api()
    };
    publish_ticks(&api, 20).await;
    expect_ticks(&mut secure, 20).await;
    // (The counter is the test binary's: no other test has a window.)
    assert_eq!(
        flushed_in_place(&s).await,
        before,
        "a TLS socket's window is kept by its session, not written in place"
    );

    // Plain sockets: the worker writes their windows in place.
    let s = start_with_app("", "write_delay = \"200ms\"").await;
    let mut a = s.connect().await;
    a.expect_subscribed("live").await;
    let mut b = s.connect().await;
    b.expect_subscribed("live").await;
    let before = flushed_in_place(&s).await;
    let api = s.api();
    publish_ticks(&api, 20).await;
    expect_ticks(&mut a, 20).await;
    expect_ticks(&mut b, 20).await;
    assert!(
        flushed_in_place(&s).await >= before + 2.0,
        "both sockets' windows were written by the worker"
    );
    // An answer of a socket's own is not held for the window, and what
    // the window held goes out with it, first.
    api.publish("live", "tick", "0", None).await;
    a.send(serde_json::json!({"event": "pusher:ping", "data": {}}))
        .await;
    let first = a.next_event().await;
    assert_eq!(first.event, "tick");
    assert_eq!(a.next_event().await.event, "pusher:pong");
}
