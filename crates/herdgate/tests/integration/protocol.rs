//! The Pusher protocol over a real websocket against an in-process herdgate.

use herdgate_testkit::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connection_established_gives_distinct_unguessable_socket_ids() {
    let s = start("").await;
    let a = s.connect().await;
    let b = s.connect().await;
    for id in [&a.socket_id, &b.socket_id] {
        let (hi, lo) = id.split_once('.').expect("<int>.<int>");
        assert!(
            hi.parse::<u32>().is_ok() && lo.parse::<u32>().is_ok(),
            "{id}"
        );
    }
    assert_ne!(a.socket_id, b.socket_id);
    assert_eq!(a.activity_timeout, 120);
}

#[tokio::test]
async fn ping_gets_pong() {
    let s = start("").await;
    let mut c = s.connect().await;
    c.send(json!({"event":"pusher:ping","data":{}})).await;
    c.expect("pusher:pong").await;
}

#[tokio::test]
async fn public_subscribe_and_publish() {
    let s = start("").await;
    let mut c = s.connect().await;
    let e = c.subscribe("lobby").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    assert_eq!(e.channel.as_deref(), Some("lobby"));
    s.api()
        .publish("lobby", "news", r#"{"headline":"hi"}"#, None)
        .await;
    let e = c.expect("news").await;
    assert_eq!(e.channel.as_deref(), Some("lobby"));
    assert_eq!(
        e.raw["data"],
        json!(r#"{"headline":"hi"}"#),
        "data stays a string, byte for byte"
    );
}

#[tokio::test]
async fn private_channels_need_a_valid_signature() {
    let s = start("").await;
    let mut c = s.connect().await;
    assert_eq!(
        c.subscribe("private-room").await.event,
        "pusher_internal:subscription_succeeded"
    );
    assert_eq!(
        c.subscribe("private-encrypted-room").await.event,
        "pusher_internal:subscription_succeeded"
    );

    // Signed for another socket id: refused, 401.
    let forged = auth_for("1.1", "private-other", None);
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"private-other","auth":forged}}))
        .await;
    let e = c.expect("pusher:subscription_error").await;
    assert_eq!(e.channel.as_deref(), Some("private-other"));
    assert_eq!(e.data["status"], 401);
    assert_eq!(e.data["type"], "AuthError");

    // Without auth at all.
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"private-x"}}))
        .await;
    assert_eq!(
        c.expect("pusher:subscription_error").await.data["status"],
        401
    );

    // A refused channel receives nothing.
    s.api().publish("private-other", "secret", "x", None).await;
    let before = c.until_marker(&s.api(), "private-room").await;
    assert!(before.is_empty(), "received {before:?}");
}

#[tokio::test]
async fn presence_is_per_user_not_per_socket() {
    let s = start("").await;
    let mut alice = s.connect().await;
    let e = alice.subscribe_presence("presence-lobby", "alice").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    assert_eq!(e.data["presence"]["count"], 1);
    assert_eq!(e.data["presence"]["hash"]["alice"]["name"], "User alice");

    let mut bob1 = s.connect().await;
    let e = bob1.subscribe_presence("presence-lobby", "bob").await;
    assert_eq!(e.data["presence"]["count"], 2);
    let added = alice.expect("pusher_internal:member_added").await;
    assert_eq!(added.data["user_id"], "bob");
    assert_eq!(added.data["user_info"]["name"], "User bob");

    // Bob's second socket: no second member_added for alice.
    let mut bob2 = s.connect().await;
    assert_eq!(
        bob2.subscribe_presence("presence-lobby", "bob").await.data["presence"]["count"],
        2
    );
    // Bob's first socket leaves: bob is still present.
    bob1.send(json!({"event":"pusher:unsubscribe","data":{"channel":"presence-lobby"}}))
        .await;
    let before = alice.until_marker(&s.api(), "presence-lobby").await;
    assert!(before.is_empty(), "alice saw {before:?}");
    // The last socket goes away (disconnect): member_removed.
    bob2.close().await;
    let removed = alice.expect("pusher_internal:member_removed").await;
    assert_eq!(removed.data["user_id"], "bob");

    let users = s
        .api()
        .request("GET", "/channels/presence-lobby/users", &[], "")
        .await;
    assert_eq!(users.body, json!({"users":[{"id":"alice"}]}));
}

#[tokio::test]
async fn presence_needs_channel_data_and_respects_member_cap() {
    let s = start("[limits]\nmax_presence_members = 1").await;
    let mut a = s.connect().await;
    let auth = auth_for(&a.socket_id, "presence-x", None);
    a.send(json!({"event":"pusher:subscribe","data":{"channel":"presence-x","auth":auth}}))
        .await;
    assert_eq!(
        a.expect("pusher:subscription_error").await.data["status"],
        400
    );
    assert_eq!(
        a.subscribe_presence("presence-x", "1").await.event,
        "pusher_internal:subscription_succeeded"
    );
    let mut b = s.connect().await;
    let e = b.subscribe_presence("presence-x", "2").await;
    assert_eq!(e.event, "pusher:subscription_error");
    assert_eq!(e.data["type"], "LimitReached");
}

#[tokio::test]
async fn client_events_go_to_others_only_with_user_id_on_presence() {
    let s = start("").await;
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    a.subscribe_presence("presence-chat", "a").await;
    b.subscribe_presence("presence-chat", "b").await;
    a.expect("pusher_internal:member_added").await;
    a.subscribe("private-chat").await;
    b.subscribe("private-chat").await;

    a.send(json!({"event":"client-typing","channel":"presence-chat","data":{"typing":true}}))
        .await;
    let e = b.expect("client-typing").await;
    assert_eq!(
        e.raw["data"],
        json!({"typing":true}),
        "data forwarded as sent"
    );
    assert_eq!(e.raw["user_id"], "a");

    a.send(json!({"event":"client-typing","channel":"private-chat","data":{"n":1}}))
        .await;
    let e = b.expect("client-typing").await;
    assert!(e.raw.get("user_id").is_none());

    let echoed = a.until_marker(&s.api(), "private-chat").await;
    assert!(echoed.is_empty(), "the sender got {echoed:?}");
}

#[tokio::test]
async fn client_events_refused_where_pusher_refuses_them() {
    let s = start("").await;
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    for c in [&mut a, &mut b] {
        c.subscribe("public-room").await;
        c.subscribe("private-encrypted-room").await;
        c.subscribe("private-room").await;
    }
    for (event, channel) in [
        ("client-x", "public-room"),
        ("client-x", "private-encrypted-room"),
        ("client-x", "private-not-subscribed"),
        ("pusher_internal:member_added", "private-room"),
        ("pusher:subscription_succeeded", "private-room"),
    ] {
        a.send(json!({"event":event,"channel":channel,"data":{}}))
            .await;
        let e = a.expect("pusher:error").await;
        assert!(
            e.data["message"].as_str().unwrap().len() > 5,
            "{event} on {channel}: {e:?}"
        );
    }
    let long = format!("client-{}", "x".repeat(200));
    a.send(json!({"event":long,"channel":"private-room","data":{}}))
        .await;
    a.expect("pusher:error").await;
    let big = "y".repeat(10_241);
    a.send(json!({"event":"client-big","channel":"private-room","data":big}))
        .await;
    a.expect("pusher:error").await;

    let got = b.until_marker(&s.api(), "private-room").await;
    assert!(got.is_empty(), "b received refused events: {got:?}");
}

#[tokio::test]
async fn client_events_disabled_per_app() {
    let s = start("").await;
    let mut c = Client::connect(&s.ws_url("no-client-events-key")).await;
    let auth = pusher_sign::channel_auth(
        "no-client-events-key",
        "other-secret",
        &c.socket_id,
        "private-a",
        None,
    );
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"private-a","auth":auth}}))
        .await;
    c.expect("pusher_internal:subscription_succeeded").await;
    c.send(json!({"event":"client-x","channel":"private-a","data":{}}))
        .await;
    assert!(c.expect("pusher:error").await.data["message"]
        .as_str()
        .unwrap()
        .contains("disabled"));
}

#[tokio::test]
async fn client_event_rate_limit_answers_4301_and_keeps_the_socket() {
    let s = start("[limits]\nclient_events_per_second = 3").await;
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    a.subscribe("private-r").await;
    b.subscribe("private-r").await;
    for i in 0..5 {
        a.send(json!({"event":"client-n","channel":"private-r","data":{"i":i}}))
            .await;
    }
    let e = a.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4301);
    let got = b.until_marker(&s.api(), "private-r").await;
    assert_eq!(got.len(), 3, "only the burst passes: {got:?}");
    // Still connected and served.
    a.expect("pusher:error").await; // the second refused event
    a.expect("marker").await;
    a.send(json!({"event":"pusher:ping","data":{}})).await;
    a.expect("pusher:pong").await;
}

#[tokio::test]
async fn user_signin_and_user_channel() {
    let s = start("").await;
    let mut c = s.connect().await;
    // The user channel is refused before sign-in.
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-u1","auth":""}}))
        .await;
    assert_eq!(
        c.expect("pusher:subscription_error").await.data["status"],
        403
    );

    let e = c.signin("u1").await;
    assert_eq!(e.event, "pusher:signin_success");
    assert_eq!(e.data["user_data"], r#"{"id":"u1"}"#);
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-u1","auth":""}}))
        .await;
    c.expect("pusher_internal:subscription_succeeded").await;
    // Someone else's user channel stays refused.
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-u2","auth":""}}))
        .await;
    c.expect("pusher:subscription_error").await;

    s.api()
        .publish("#server-to-user-u1", "inbox", "hello", None)
        .await;
    assert_eq!(c.expect("inbox").await.raw["data"], "hello");

    let r = s
        .api()
        .request("POST", "/users/u1/terminate_connections", &[], "{}")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(c.expect_close().await, Some(4009));
}

#[tokio::test]
async fn bad_signin_closes_4009() {
    let s = start("").await;
    let mut c = s.connect().await;
    c.send(json!({"event":"pusher:signin","data":{"auth":format!("{KEY}:00"),"user_data":"{\"id\":\"x\"}"}})).await;
    let e = c.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4009);
    assert_eq!(c.expect_close().await, Some(4009));
}

#[tokio::test]
async fn names_and_limits_are_validated() {
    let s = start("[limits]\nmax_channels_per_connection = 2").await;
    let mut c = s.connect().await;
    for bad in [
        "a".repeat(165),
        "has space".into(),
        "slash/es".into(),
        "".into(),
    ] {
        c.send(json!({"event":"pusher:subscribe","data":{"channel":bad}}))
            .await;
        let e = c.expect("pusher:subscription_error").await;
        assert_eq!(e.data["type"], "InvalidChannel", "{bad:?}");
    }
    assert_eq!(
        c.subscribe(&"a".repeat(164)).await.event,
        "pusher_internal:subscription_succeeded"
    );
    c.subscribe("b").await;
    let e = c.subscribe("c").await;
    assert_eq!(e.event, "pusher:subscription_error");
    assert_eq!(e.data["type"], "LimitReached");
    // Unsubscribing frees a place.
    c.send(json!({"event":"pusher:unsubscribe","data":{"channel":"b"}}))
        .await;
    assert_eq!(
        c.subscribe("c").await.event,
        "pusher_internal:subscription_succeeded"
    );
}

#[tokio::test]
async fn malformed_messages_get_errors_and_the_socket_stays() {
    let s = start("").await;
    let mut c = s.connect().await;
    for bad in [
        "not json",
        "[]",
        "{}",
        r#"{"event":5}"#,
        r#"{"event":"pusher:subscribe"}"#,
        r#"{"event":"pusher:subscribe","data":7}"#,
        r#"{"event":"pusher:subscribe","data":{"channel":7}}"#,
        r#"{"event":"pusher:unsubscribe","data":"nope"}"#,
        r#"{"event":"pusher:signin","data":{}}"#,
        r#"{"event":"something:else","data":{}}"#,
    ] {
        c.send_raw(Message::Text(bad.into())).await;
        c.expect("pusher:error").await;
    }
    c.send(json!({"event":"pusher:ping"})).await;
    c.expect("pusher:pong").await;
}

#[tokio::test]
async fn connection_errors_use_pusher_codes() {
    let s = start("").await;
    assert_eq!(
        refused_with(s.addr, "/app/nope?protocol=7").await,
        Some(4001)
    );
    assert_eq!(
        refused_with(s.addr, "/app/disabled-key?protocol=7").await,
        Some(4003)
    );
    assert_eq!(
        refused_with(s.addr, "/elsewhere?protocol=7").await,
        Some(4005)
    );
    assert_eq!(
        refused_with(s.addr, &format!("/app/{KEY}/extra?protocol=7")).await,
        Some(4005)
    );
    assert_eq!(
        refused_with(
            s.addr,
            &format!("/app/{KEY}?protocol=7&version=bad!version")
        )
        .await,
        Some(4006)
    );
    assert_eq!(
        refused_with(s.addr, &format!("/app/{KEY}?protocol=99")).await,
        Some(4007)
    );
    assert_eq!(
        refused_with(s.addr, &format!("/app/{KEY}?client=js")).await,
        Some(4008)
    );
}

#[tokio::test]
async fn binary_and_oversized_frames_close_the_socket() {
    let s = start("[limits]\nmax_message_bytes = 20000").await;
    let mut c = s.connect().await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.expect_close().await, Some(1003));
    let mut c = s.connect().await;
    c.send_raw(Message::Text("x".repeat(20_001).into())).await;
    assert_eq!(c.expect_close().await, Some(1009));
}

#[tokio::test]
async fn silent_socket_is_pinged_then_closed_4201() {
    let s = start("[server]\nactivity_timeout = \"1s\"\npong_timeout = \"1s\"").await;
    let mut c = s.connect().await;
    assert_eq!(c.activity_timeout, 1);
    c.expect("pusher:ping").await;
    assert_eq!(c.expect_close().await, Some(4201));

    // A socket that answers stays.
    let mut c = s.connect().await;
    c.expect("pusher:ping").await;
    c.send(json!({"event":"pusher:pong","data":{}})).await;
    c.expect("pusher:ping").await;
    c.send(json!({"event":"pusher:pong","data":{}})).await;
    c.send(json!({"event":"pusher:ping","data":{}})).await;
    c.expect("pusher:pong").await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_reconnect_code() {
    let mut s = start("").await;
    let mut c = s.connect().await;
    c.subscribe("x").await;
    let closing = tokio::spawn(async move { c.expect_close().await });
    s.shutdown().await;
    assert_eq!(closing.await.unwrap(), Some(4200));
}

#[tokio::test]
async fn connection_cap_refuses_upgrades_with_503_and_retry_after() {
    let s = start("[limits]\nmax_connections = 2").await;
    let _a = s.connect().await;
    let b = s.connect().await;
    let err = tokio_tungstenite::connect_async(s.ws_url(KEY))
        .await
        .expect_err("third is refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            let secs: u64 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=10).contains(&secs));
        }
        other => panic!("expected HTTP 503, got {other}"),
    }
    // A slot frees when a socket leaves (exactly once).
    b.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio_tungstenite::connect_async(s.ws_url(KEY))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never came back"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_socket_that_never_subscribes_is_pruned_4202() {
    let s = start("[limits]\nsubscribe_deadline = \"300ms\"").await;
    let mut idle = s.connect().await;
    let mut busy = s.connect().await;
    busy.subscribe("x").await;
    assert_eq!(idle.expect_close().await, Some(4202));
    // The subscribed socket outlives the deadline and keeps being served.
    let mut third = s.connect().await;
    assert_eq!(
        third.expect_close().await,
        Some(4202),
        "deadline passed for this one too"
    );
    busy.send(json!({"event":"pusher:ping"})).await;
    busy.expect("pusher:pong").await;
}

#[tokio::test]
async fn allowed_origins_are_enforced_per_app() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = start("").await;
    let attempt = |origin: Option<&'static str>| {
        let mut req = s.ws_url("origin-key").into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    assert!(attempt(Some("https://events.example.com")).await.is_ok());
    assert!(attempt(Some("https://hall.example.org")).await.is_ok());
    for bad in [
        Some("https://evil.example.net"),
        Some("http://events.example.com"),
        None,
    ] {
        match attempt(bad).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{bad:?}")
            }
            other => panic!("{bad:?}: expected 403, got {:?}", other.map(|_| ())),
        }
    }
    // Apps without a list accept any origin.
    let mut req = s.ws_url(KEY).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://anywhere.test".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}
