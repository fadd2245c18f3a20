//! Load smoke: thousands of sockets over many channels all receive a broadcast.
//! No timing assertion: this proves correctness at a size where bounded
//! queues, the ring and the accept path all get exercised.

use futures_util::{SinkExt, StreamExt};
use herdgate_testkit::*;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 5_000;
const CHANNELS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_sockets_over_a_hundred_channels_all_receive_a_broadcast() {
    let (soft, _) = herdgate::sys::raise_nofile_limit().unwrap();
    assert!(
        soft as usize > CONNECTIONS * 2 + 100,
        "open-files limit {soft} too low for this test"
    );
    let s = start("[limits]\nmax_handshakes = 512\nmax_connections_per_ip = 0").await;
    let url = s.ws_url(KEY);
    let rss_before = herdgate::sys::rss_bytes().unwrap_or(0);

    // Connect and subscribe everyone, at most 256 handshakes at a time.
    let gate = Arc::new(Semaphore::new(256));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CONNECTIONS);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(CONNECTIONS);
    let release = Arc::new(tokio::sync::Notify::new());
    for i in 0..CONNECTIONS {
        let (url, gate, ready_tx, done_tx, release) = (
            url.clone(),
            gate.clone(),
            ready_tx.clone(),
            done_tx.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            let mut permit = Some(gate.acquire_owned().await.unwrap());
            let cfg = WebSocketConfig::default().read_buffer_size(4096);
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(cfg), false)
                .await
                .expect("connect");
            let channel = format!("smoke-{}", i % CHANNELS);
            let mut established = false;
            let mut subscribed = false;
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["event"].as_str().unwrap() {
                    "pusher:connection_established" if !established => {
                        established = true;
                        let sub = json!({"event":"pusher:subscribe","data":{"channel":channel}});
                        ws.send(Message::Text(sub.to_string().into()))
                            .await
                            .unwrap();
                    }
                    "pusher_internal:subscription_succeeded" => {
                        subscribed = true;
                        permit.take(); // let the next handshake start
                        ready_tx.send(()).await.unwrap();
                    }
                    "broadcast" if subscribed => {
                        assert_eq!(v["channel"], channel.as_str());
                        done_tx.send(()).await.unwrap();
                        release.notified().await;
                        return;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            panic!("socket {i} closed early");
        });
    }
    drop((ready_tx, done_tx));
    for n in 0..CONNECTIONS {
        tokio::time::timeout(WAIT * 6, ready_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {CONNECTIONS} subscribed in time"));
    }
    let open = s.running.as_ref().unwrap().open_sessions();
    assert_eq!(open, CONNECTIONS);
    let rss = herdgate::sys::rss_bytes().unwrap_or(0);
    println!(
        "smoke: {open} open sessions; test process RSS {} MiB (server and clients together, +{} MiB)",
        rss >> 20,
        rss.saturating_sub(rss_before) >> 20
    );

    // One API call reaches all 100 channels.
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("smoke-{c}")).collect();
    let body = json!({"name":"broadcast","channels":channels,"data":"to everyone"});
    let r = s
        .api()
        .request("POST", "/events", &[], &body.to_string())
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for n in 0..CONNECTIONS {
        tokio::time::timeout(WAIT * 3, done_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {CONNECTIONS} received the broadcast"));
    }
    release.notify_waiters();
}
