//! Pusher parity at the wire: cache channels, subscription counts,
//! watchlists, authorized connections, per-user and per-app quotas,
//! idempotent and atomic publishes. Every request is signed by
//! `pusher-sign` (not the server's code); pusher-js itself reads these
//! frames in tests/compat/parity.test.mjs.

use herdgate_testkit::*;
use serde_json::{json, Value};

fn signin_frame(socket_id: &str, user_data: &Value) -> Value {
    let user_data = user_data.to_string();
    let auth = pusher_sign::signin_auth(KEY, SECRET, socket_id, &user_data);
    json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}})
}

/// Sign in with a watchlist; returns the first frame after signin_success.
async fn signin_watching(c: &mut Client, id: &str, watchlist: &[&str]) {
    let frame = signin_frame(&c.socket_id, &json!({"id": id, "watchlist": watchlist}));
    c.send(frame).await;
    c.expect("pusher:signin_success").await;
}

/// Online and offline ids of watchlist frames until both sets cover `want`
/// (one owner answers per frame: the first state may come in several).
async fn watch_state(c: &mut Client, want: usize) -> (Vec<String>, Vec<String>) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    while on.len() + off.len() < want {
        let e = c.expect("pusher_internal:watchlist_events").await;
        for ev in e.data["events"].as_array().unwrap() {
            let ids = ev["user_ids"].as_array().unwrap();
            let to = match ev["name"].as_str().unwrap() {
                "online" => &mut on,
                "offline" => &mut off,
                other => panic!("unknown watchlist event {other}"),
            };
            to.extend(ids.iter().map(|i| i.as_str().unwrap().to_string()));
        }
    }
    on.sort();
    off.sort();
    (on, off)
}

#[tokio::test]
async fn a_cache_channel_answers_a_miss_then_the_last_server_event() {
    let s = start("").await;
    let api = s.api();
    let mut first = s.connect().await;
    first.expect_subscribed("cache-stage").await;
    let miss = first.expect("pusher:cache_miss").await;
    assert_eq!(miss.channel.as_deref(), Some("cache-stage"));
    let r = api
        .request("GET", "/channels/cache-stage", &[("info", "cache")], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["cache"], Value::Null, "{:?}", r.body);

    api.publish("cache-stage", "state", "slide 1", None).await;
    api.publish("cache-stage", "state", "slide 2", None).await;
    assert_eq!(first.expect("state").await.data, "slide 1");
    assert_eq!(first.expect("state").await.data, "slide 2");

    // A late subscriber gets the last one right after subscription_succeeded.
    let mut late = s.connect().await;
    late.expect_subscribed("cache-stage").await;
    let cached = late.expect("state").await;
    assert_eq!(cached.channel.as_deref(), Some("cache-stage"));
    assert_eq!(cached.data, "slide 2");
    // ...and nothing more than it.
    assert!(late.until_marker(&api, "cache-stage").await.is_empty());

    let r = api
        .request("GET", "/channels/cache-stage", &[("info", "cache")], "")
        .await;
    assert_eq!(r.status, 200);
    let ttl = r.body["cache"]["ttl"].as_u64().unwrap();
    assert!(ttl > 3500 && ttl <= 3600, "default cache_ttl is 1 h: {ttl}");
    // The marker is a server event too: it is the cached one now.
    assert!(r.body["cache"]["data"]
        .as_str()
        .unwrap()
        .starts_with("marker-"));

    // Kept with no subscriber at all; a plain channel caches nothing.
    first.close().await;
    late.close().await;
    api.publish("cache-stage", "state", "slide 3", None).await;
    let mut again = s.connect().await;
    again.expect_subscribed("cache-stage").await;
    assert_eq!(again.expect("state").await.data, "slide 3");
    let r = api
        .request("GET", "/channels/plain", &[("info", "cache")], "")
        .await;
    assert_eq!(r.body["cache"], Value::Null);

    // Private and presence cache channels are cache channels too.
    let mut p = s.connect().await;
    p.expect_subscribed("private-cache-qa").await;
    p.expect("pusher:cache_miss").await;
    api.publish("private-cache-qa", "question", "q1", None)
        .await;
    let ev = p.expect("question").await;
    assert_eq!(ev.data, "q1");
    let mut q = s.connect().await;
    let ok = q.subscribe_presence("presence-cache-room", "u1").await;
    assert_eq!(ok.event, "pusher_internal:subscription_succeeded");
    q.expect("pusher:cache_miss").await;
}

#[tokio::test]
async fn client_events_are_not_cached() {
    let s = start("").await;
    let api = s.api();
    let mut a = s.connect().await;
    a.expect_subscribed("private-cache-chat").await;
    a.expect("pusher:cache_miss").await;
    let mut w = s.connect().await;
    w.expect_subscribed("private-cache-chat").await;
    w.expect("pusher:cache_miss").await;
    a.send(json!({"event":"client-typing","channel":"private-cache-chat","data":"{}"}))
        .await;
    // The room has handled it once another subscriber got it.
    w.expect("client-typing").await;
    let mut b = s.connect().await;
    b.expect_subscribed("private-cache-chat").await;
    b.expect("pusher:cache_miss").await;
    // b saw a's later client event, but the cache never held it.
    assert!(b.until_marker(&api, "private-cache-chat").await.is_empty());
}

#[tokio::test]
async fn subscription_counts_follow_every_change_and_slow_down_above_100() {
    let s = start_with_app("", "subscription_count_events = true").await;
    let api = s.api();
    let mut a = s.connect().await;
    a.expect_subscribed("watching").await;
    let count = |e: &Event| e.data["subscription_count"].as_u64().unwrap();
    let e = a.expect("pusher_internal:subscription_count").await;
    assert_eq!((e.channel.as_deref(), count(&e)), (Some("watching"), 1));
    let mut b = s.connect().await;
    b.expect_subscribed("watching").await;
    assert_eq!(
        count(&a.expect("pusher_internal:subscription_count").await),
        2
    );
    assert_eq!(
        count(&b.expect("pusher_internal:subscription_count").await),
        2
    );
    b.send(json!({"event":"pusher:unsubscribe","data":{"channel":"watching"}}))
        .await;
    assert_eq!(
        count(&a.expect("pusher_internal:subscription_count").await),
        1
    );

    // Presence channels count members instead: no subscription_count there.
    let mut p = s.connect().await;
    p.subscribe_presence("presence-stage", "u1").await;
    assert!(p.until_marker(&api, "presence-stage").await.is_empty());

    // Up to 100 subscribers every change is told at once; above, changes
    // wait for the room's interval (5 s) and go out as one.
    let mut crowd = Vec::new();
    for _ in 0..100 {
        let mut c = s.connect().await;
        c.expect_subscribed("watching").await;
        crowd.push(c);
    }
    loop {
        if count(&a.expect("pusher_internal:subscription_count").await) == 101 {
            break;
        }
    }
    for _ in 0..5 {
        let mut c = s.connect().await;
        c.expect_subscribed("watching").await;
        crowd.push(c);
    }
    let mut counts = Vec::new();
    for e in a.until_marker(&api, "watching").await {
        assert_eq!(e.event, "pusher_internal:subscription_count");
        counts.push(count(&e));
    }
    while counts.last() != Some(&106) {
        counts.push(count(&a.expect("pusher_internal:subscription_count").await));
    }
    assert!(
        counts.len() <= 2,
        "5 joins within the interval were told one by one: {counts:?}"
    );
}

#[tokio::test]
async fn subscription_counts_are_off_unless_the_app_asks() {
    let s = start("").await;
    let mut a = s.connect().await;
    a.expect_subscribed("watching").await;
    let mut b = s.connect().await;
    b.expect_subscribed("watching").await;
    assert!(a.until_marker(&s.api(), "watching").await.is_empty());
}

#[tokio::test]
async fn a_watchlist_tells_online_and_offline_across_sockets() {
    let s = start("").await;
    let mut alice = s.connect().await;
    signin_watching(&mut alice, "alice", &["bob", "carol"]).await;
    assert_eq!(
        watch_state(&mut alice, 2).await,
        (vec![], vec!["bob".into(), "carol".into()])
    );

    // Online from bob's first signed-in socket; his second changes nothing.
    let mut bob1 = s.connect().await;
    bob1.signin("bob").await;
    assert_eq!(
        watch_state(&mut alice, 1).await,
        (vec!["bob".into()], vec![])
    );
    let mut bob2 = s.connect().await;
    bob2.signin("bob").await;
    bob1.close().await;
    // Offline only when his last socket is gone.
    bob2.close().await;
    assert_eq!(
        watch_state(&mut alice, 1).await,
        (vec![], vec!["bob".into()])
    );

    // A user signed in before the watcher is online in the first state.
    let mut carol = s.connect().await;
    carol.signin("carol").await;
    assert_eq!(
        watch_state(&mut alice, 1).await,
        (vec!["carol".into()], vec![])
    );
    let mut dave = s.connect().await;
    signin_watching(&mut dave, "dave", &["carol", "erin", "carol"]).await;
    assert_eq!(
        watch_state(&mut dave, 2).await,
        (vec!["carol".into()], vec!["erin".into()])
    );

    // A watcher that leaves is told nothing more (and holds nothing).
    alice.close().await;
    carol.close().await;
    assert_eq!(
        watch_state(&mut dave, 1).await,
        (vec![], vec!["carol".into()])
    );
}

#[tokio::test]
async fn a_watchlist_over_the_cap_is_refused() {
    let s = start_with_app("", "max_watchlist = 2").await;
    let mut c = s.connect().await;
    let frame = signin_frame(
        &c.socket_id,
        &json!({"id": "u", "watchlist": ["a", "b", "c"]}),
    );
    c.send(frame).await;
    let e = c.expect("pusher:error").await;
    assert!(
        e.data["message"].as_str().unwrap().contains("more than 2"),
        "{:?}",
        e.raw
    );
    // Not signed in: a user event does not reach it, and the socket lives.
    c.expect_subscribed("alive").await;
    let r = s
        .api()
        .request(
            "POST",
            "/events",
            &[],
            &json!({"name":"n","channel":"#server-to-user-u","data":"x"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(c.until_marker(&s.api(), "alive").await.is_empty());
    let mut ok = s.connect().await;
    signin_watching(&mut ok, "u2", &["a", "b"]).await;
    assert_eq!(watch_state(&mut ok, 2).await.1.len(), 2);
}

#[tokio::test]
async fn an_app_that_requires_authorization_closes_anonymous_sockets() {
    let s = start_with_app(
        "",
        "require_user_authentication = true\nuser_authentication_timeout = \"1s\"",
    )
    .await;
    let api = s.api();
    // Connected first, so their deadlines pass first: one signs in, one
    // holds a private channel (authorized by the backend), one does nothing.
    let mut signed = s.connect().await;
    signed.signin("u1").await;
    let mut private = s.connect().await;
    private.expect_subscribed("private-room").await;
    let mut public = s.connect().await;
    public.expect_subscribed("news").await;
    let mut anonymous = s.connect().await;
    assert_eq!(anonymous.expect_close().await, Some(4009));
    assert_eq!(public.expect_close().await, Some(4009));
    // Still connected, past their deadline.
    assert!(private.until_marker(&api, "private-room").await.is_empty());
    let mut signed_news = signed;
    signed_news.expect_subscribed("news").await;
    assert!(signed_news.until_marker(&api, "news").await.is_empty());
}

#[tokio::test]
async fn a_user_over_its_connection_cap_is_closed_with_4004() {
    let s = start_with_app("", "max_connections_per_user = 2").await;
    let mut a = s.connect().await;
    a.signin("u").await;
    let mut b = s.connect().await;
    b.signin("u").await;
    let mut c = s.connect().await;
    let frame = signin_frame(&c.socket_id, &json!({"id": "u"}));
    c.send(frame).await;
    assert_eq!(c.expect_close().await, Some(4004));
    // Another user is not affected; a freed place can be taken again.
    let mut other = s.connect().await;
    other.signin("v").await;
    a.close().await;
    // The place is free once the server has seen the close, which the
    // client cannot observe: a refused try is closed, try again (bounded).
    for attempt in 0.. {
        let mut d = s.connect().await;
        let frame = signin_frame(&d.socket_id, &json!({"id": "u"}));
        d.send(frame).await;
        match d.recv().await {
            Received::Event(e) if e.event == "pusher:signin_success" => break,
            Received::Event(e) if e.data["code"] == 4004 && attempt < 50 => {}
            other => panic!("sign-in after a place was freed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_app_over_its_connection_quota_is_refused_with_4004() {
    let s = start_with_app("", "max_connections = 2").await;
    let a = s.connect().await;
    let _b = s.connect().await;
    let path = format!("/app/{KEY}?protocol=7&client=test&version=1.0");
    assert_eq!(refused_with(s.addr, &path).await, Some(4004));
    // Another app is not limited by it.
    let other = Client::connect(&s.ws_url("no-client-events-key")).await;
    drop(other);
    a.close().await;
    // The quota counts sockets, not attempts: the freed place is free.
    let mut again = None;
    for _ in 0..50 {
        let url = format!("ws://{}{path}", s.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        use futures_util::StreamExt;
        let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        let text = match first {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t.to_string(),
            other => panic!("{other:?}"),
        };
        if text.contains("pusher:connection_established") {
            again = Some(ws);
            break;
        }
        // The closed socket's task has not ended yet: the refusal was
        // answered; try again once it has (bounded by the loop).
        assert!(text.contains("4004"), "{text}");
        let _ = tokio::time::timeout(WAIT, ws.next()).await;
    }
    assert!(again.is_some(), "the freed place was never given back");
}

#[tokio::test]
async fn client_events_over_the_app_quota_get_4301() {
    let s = start_with_app("", "max_client_events_per_second = 2").await;
    let mut a = s.connect().await;
    a.expect_subscribed("private-chat").await;
    let mut b = s.connect().await;
    b.expect_subscribed("private-chat").await;
    for i in 0..5 {
        a.send(
            json!({"event":"client-msg","channel":"private-chat","data":format!("{{\"i\":{i}}}")}),
        )
        .await;
    }
    // The first ones pass, then the app's quota answers 4301 (the socket stays).
    let e = a.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4301, "{:?}", e.raw);
    let got = b.until_marker(&s.api(), "private-chat").await;
    assert!(
        !got.is_empty() && got.len() < 5,
        "{} of 5 client events passed a quota of 2/s",
        got.len()
    );
}

#[tokio::test]
async fn backend_events_and_reads_over_the_app_quota_get_429() {
    let s = start_with_app(
        "",
        "max_backend_events_per_second = 3\nmax_read_requests_per_second = 1",
    )
    .await;
    let api = s.api();
    let body = json!({"name":"e","channels":["a","b","c"],"data":"x"}).to_string();
    assert_eq!(api.request("POST", "/events", &[], &body).await.status, 200);
    // Three channels spent the second's three events.
    let r = api.request("POST", "/events", &[], &body).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(api.request("GET", "/channels", &[], "").await.status, 200);
    let r = api.request("GET", "/channels", &[], "").await;
    assert_eq!(r.status, 429, "{:?}", r.body);
}

#[tokio::test]
async fn a_keyed_publish_is_delivered_once_and_a_reused_key_is_a_conflict() {
    let s = start("").await;
    let api = s.api();
    let mut c = s.connect().await;
    c.expect_subscribed("chat").await;
    let body = json!({"name":"line","channel":"chat","data":"hello"}).to_string();
    let key = [("x-idempotency-key", "k-1")];
    let first = api
        .request_with_headers("POST", "/events", &key, &body)
        .await;
    assert_eq!(first.status, 200);
    let retry = api
        .request_with_headers("POST", "/events", &key, &body)
        .await;
    assert_eq!((retry.status, &retry.body), (200, &first.body));
    let other = json!({"name":"line","channel":"chat","data":"bye"}).to_string();
    let r = api
        .request_with_headers("POST", "/events", &key, &other)
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    // The body's key works the same (what pusher-http-php sends).
    let keyed =
        json!({"name":"line","channel":"chat","data":"again","idempotency_key":"k-2"}).to_string();
    assert_eq!(
        api.request("POST", "/events", &[], &keyed).await.status,
        200
    );
    assert_eq!(
        api.request("POST", "/events", &[], &keyed).await.status,
        200
    );
    // Per event in a batch.
    let batch = json!({"batch":[
        {"name":"line","channel":"chat","data":"b1","idempotency_key":"k-3"},
        {"name":"line","channel":"chat","data":"b2"}]})
    .to_string();
    assert_eq!(
        api.request("POST", "/batch_events", &[], &batch)
            .await
            .status,
        200
    );
    // Retried: the keyed event is not published again (its owner remembers
    // the key), the unkeyed one is.
    assert_eq!(
        api.request("POST", "/batch_events", &[], &batch)
            .await
            .status,
        200
    );
    let got: Vec<Value> = c
        .until_marker(&api, "chat")
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["hello", "again", "b1", "b2", "b2"].map(Value::from));
    // Two replays answered by the API, one event dropped by its owner (the
    // recorder is per process: no other test here publishes duplicates).
    let (_, metrics) = admin_get(s.admin, "/metrics").await;
    assert!(
        metrics.contains("herdgate_publish_duplicates_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_batch_with_one_bad_event_publishes_nothing() {
    let s = start("").await;
    let api = s.api();
    let mut c = s.connect().await;
    c.expect_subscribed("news").await;
    let big = "x".repeat(20_000);
    let batch = json!({"batch":[
        {"name":"a","channel":"news","data":"fine"},
        {"name":"b","channel":"news","data":big}]})
    .to_string();
    let r = api.request("POST", "/batch_events", &[], &batch).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(c.until_marker(&api, "news").await.is_empty());
}

#[tokio::test]
async fn a_presence_user_info_over_the_cap_is_refused() {
    let s = start_with_app("", "max_user_info_bytes = 64").await;
    let mut c = s.connect().await;
    let data = json!({"user_id":"u","user_info":{"bio":"x".repeat(100)}}).to_string();
    let auth = auth_for(&c.socket_id, "presence-r", Some(&data));
    c.send(json!({"event":"pusher:subscribe","data":{"channel":"presence-r","auth":auth,"channel_data":data}}))
        .await;
    let e = c.expect("pusher:subscription_error").await;
    assert_eq!(e.data["status"], 400, "{:?}", e.raw);
    assert!(s.api().user_ids("presence-r").await.is_empty());
}

#[tokio::test]
async fn a_forged_user_data_is_closed_with_4009() {
    let s = start("").await;
    let mut c = s.connect().await;
    // Signed for one user, sent as another (with a watchlist added).
    let signed = json!({"id": "guest"}).to_string();
    let auth = pusher_sign::signin_auth(KEY, SECRET, &c.socket_id, &signed);
    let forged = json!({"id": "admin", "watchlist": ["ceo"]}).to_string();
    c.send(json!({"event":"pusher:signin","data":{"auth":auth,"user_data":forged}}))
        .await;
    assert_eq!(c.expect_close().await, Some(4009));
    // Nobody is signed in as "admin": a watcher of it sees it offline.
    let mut w = s.connect().await;
    signin_watching(&mut w, "w", &["admin"]).await;
    assert_eq!(watch_state(&mut w, 1).await, (vec![], vec!["admin".into()]));
}
