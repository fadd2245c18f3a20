//! The Pusher HTTP API and the admin listener.

use herdgate_testkit::*;
use serde_json::json;

#[tokio::test]
async fn events_to_many_channels_with_exclusion_and_info() {
    let s = start("").await;
    let api = s.api();
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    for c in [&mut a, &mut b] {
        c.subscribe("one").await;
        c.subscribe("two").await;
    }
    let body = json!({"name":"e","channels":["one","two"],"data":"d","socket_id":a.socket_id,"info":"subscription_count"});
    let r = api.request("POST", "/events", &[], &body.to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"channels":{"one":{"subscription_count":2},"two":{"subscription_count":2}}})
    );
    // Order is kept within a channel, not across channels (their owners are
    // different workers): compare as a set.
    let mut got = [b.expect("e").await.channel, b.expect("e").await.channel];
    got.sort();
    assert_eq!(got, [Some("one".into()), Some("two".into())]);
    let got = a.until_marker(&api, "one").await;
    assert!(got.is_empty(), "excluded socket got {got:?}");
}

#[tokio::test]
async fn batch_events() {
    let s = start("").await;
    let mut c = s.connect().await;
    c.subscribe("b").await;
    let batch: Vec<_> = (0..10)
        .map(|i| json!({"channel":"b","name":format!("e{i}"),"data":i.to_string()}))
        .collect();
    let r = s
        .api()
        .request(
            "POST",
            "/batch_events",
            &[],
            &json!({"batch": batch}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for i in 0..10 {
        assert_eq!(c.expect(&format!("e{i}")).await.raw["data"], i.to_string());
    }
    let batch: Vec<_> = (0..11)
        .map(|_| json!({"channel":"b","name":"x","data":"1"}))
        .collect();
    let r = s
        .api()
        .request(
            "POST",
            "/batch_events",
            &[],
            &json!({"batch": batch}).to_string(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].as_str().unwrap().contains("10"));
}

#[tokio::test]
async fn channel_queries() {
    let s = start("").await;
    let api = s.api();
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    a.subscribe_presence("presence-room", "u1").await;
    b.subscribe_presence("presence-room", "u2").await;
    a.subscribe("public-room").await;
    a.signin("u1").await;

    let r = api.request("GET", "/channels", &[], "").await;
    assert_eq!(
        r.body,
        json!({"channels":{"presence-room":{},"public-room":{}}}),
        "user registries are not channels"
    );
    let r = api
        .request(
            "GET",
            "/channels",
            &[("filter_by_prefix", "presence-"), ("info", "user_count")],
            "",
        )
        .await;
    assert_eq!(
        r.body,
        json!({"channels":{"presence-room":{"user_count":2}}})
    );
    let r = api
        .request("GET", "/channels", &[("info", "user_count")], "")
        .await;
    assert_eq!(r.status, 400);

    let r = api
        .request(
            "GET",
            "/channels/presence-room",
            &[("info", "user_count,subscription_count")],
            "",
        )
        .await;
    assert_eq!(
        r.body,
        json!({"occupied":true,"user_count":2,"subscription_count":2})
    );
    let r = api.request("GET", "/channels/empty-room", &[], "").await;
    assert_eq!(r.body, json!({"occupied":false}));
    let r = api
        .request(
            "GET",
            "/channels/public-room",
            &[("info", "user_count")],
            "",
        )
        .await;
    assert_eq!(r.status, 400);

    assert_eq!(api.user_ids("presence-room").await, ["u1", "u2"]);
    let r = api
        .request("GET", "/channels/public-room/users", &[], "")
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn refusals_have_the_documented_status() {
    let s = start("[limits]\nmax_request_body_bytes = 20000").await;
    let api = s.api();
    let ok = json!({"name":"e","channel":"c","data":"d"}).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // Signatures.
    assert_eq!(
        api.request_at("POST", "/events", &[], &ok, now, "wrong")
            .await
            .status,
        401
    );
    let stale = api
        .request_at("POST", "/events", &[], &ok, now - 601, SECRET)
        .await;
    assert_eq!(stale.status, 401);
    assert!(stale.body["error"]
        .as_str()
        .unwrap()
        .contains("auth_timestamp"));
    assert_eq!(
        api.raw("POST", "/apps/100001/events", &ok).await.status,
        401
    );
    let other_app = Api {
        app_id: "100002".into(),
        ..s.api()
    };
    assert_eq!(
        other_app.request("POST", "/events", &[], &ok).await.status,
        401,
        "key of another app"
    );
    // A body altered after signing.
    let signed_for_other_body = {
        let md5 = pusher_sign::body_md5(b"{}");
        let q = format!("auth_key={KEY}&auth_timestamp={now}&auth_version=1.0&body_md5={md5}");
        let sig = pusher_sign::hmac_hex(SECRET, &format!("POST\n/apps/{APP_ID}/events\n{q}"));
        api.raw(
            "POST",
            &format!("/apps/{APP_ID}/events?{q}&auth_signature={sig}"),
            &ok,
        )
        .await
    };
    assert_eq!(signed_for_other_body.status, 401);

    // Forbidden: a disabled app, correctly signed.
    let disabled = Api {
        app_id: "100003".into(),
        key: "disabled-key".into(),
        secret: "disabled-secret".into(),
        ..s.api()
    };
    assert_eq!(
        disabled.request("POST", "/events", &[], &ok).await.status,
        403
    );

    // Not found.
    let unknown = Api {
        app_id: "999".into(),
        ..s.api()
    };
    assert_eq!(
        unknown.request("POST", "/events", &[], &ok).await.status,
        404
    );
    assert_eq!(api.request("GET", "/nothing", &[], "").await.status, 404);

    // Bad requests.
    for body in [
        "not json".to_string(),
        json!({"name":"e","data":"d"}).to_string(),
        json!({"name":"e","channel":"bad channel","data":"d"}).to_string(),
        json!({"name":"e".repeat(201),"channel":"c","data":"d"}).to_string(),
        json!({"name":"e","channels":(0..101).map(|i| format!("c{i}")).collect::<Vec<_>>(),"data":"d"}).to_string(),
        json!({"name":"e","channel":"c","data":"d","socket_id":"nope"}).to_string(),
    ] {
        let r = api.request("POST", "/events", &[], &body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(r.body["error"].is_string());
    }

    // Too large: data over the payload limit, and a body over the body limit.
    let big = json!({"name":"e","channel":"c","data":"x".repeat(10_241)}).to_string();
    assert_eq!(api.request("POST", "/events", &[], &big).await.status, 413);
    let huge = json!({"name":"e","channel":"c","data":"x".repeat(30_000)}).to_string();
    assert_eq!(api.request("POST", "/events", &[], &huge).await.status, 413);
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let s = start("").await;
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::get("/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        use http_body_util::BodyExt;
        resp.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn admin_health_and_metrics() {
    let mut s = start("").await;
    let mut c = s.connect().await;
    c.subscribe("m").await;
    s.api().publish("m", "e", "d", None).await;
    c.expect("e").await;
    assert_eq!(admin_get(s.admin, "/livez").await.0, 200);
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 200);
    let (status, text) = admin_get(s.admin, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "herdgate_connections_open",
        "herdgate_connections_accepted_total",
        "herdgate_subscriptions",
        "herdgate_channels",
        "herdgate_messages_published_total",
        "herdgate_messages_delivered_total",
        "herdgate_http_requests_total",
        "herdgate_delivery_delay_seconds_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    assert!(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .all(|l| l.starts_with("herdgate_")));
    // Draining: /readyz turns 503 while /livez stays 200.
    s.running.as_ref().unwrap().node.life.draining.cancel();
    assert_eq!(admin_get(s.admin, "/readyz").await.0, 503);
    assert_eq!(admin_get(s.admin, "/livez").await.0, 200);
    s.shutdown().await;
}
