//! Webhooks end to end: herdgate as a process, real pusher-js clients, and
//! a real receiver that checks every POST with the official Node SDK
//! (`pusher.webhook({headers, rawBody}).isValid()`); one scenario also
//! checks the bodies with the official Python SDK.

use herdgate_testkit::cluster::metric;
use herdgate_testkit::process::Herdgate;
use herdgate_testkit::webhook::{Got, JsClients, Receiver};
use herdgate_testkit::{APP_ID, KEY, SECRET, WAIT};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ALL: &str =
    r#"["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event"]"#;

/// A standalone herdgate whose app sends every event type to `rx`, with
/// `[webhooks]` settings `settings`.
fn herdgate(rx: &Receiver, settings: &str, extra_hook: &str) -> Herdgate {
    Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_ip = 0\nmax_handshakes_per_ip = 0\n[overload]\nenabled = false\n[webhooks]\n{settings}\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = {ALL}\n{extra_hook}\n",
        rx.url()
    ))
}

fn clients(hg: &Herdgate) -> JsClients {
    let (host, port) = hg.addr.rsplit_once(':').unwrap();
    JsClients::start(host, port.parse().unwrap(), APP_ID, KEY, SECRET)
}

fn receiver() -> Receiver {
    Receiver::start(APP_ID, KEY, SECRET)
}

fn names(got: &[Got]) -> Vec<(String, String)> {
    got.iter()
        .map(|g| (g.name().to_string(), g.channel().to_string()))
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Pusher's event set from pusher-js clients: occupied once for the first
/// subscriber, member events per user (not per socket), client events with
/// socket_id (and user_id on presence), removed and vacated ~3 s after the
/// last socket left; every POST signed and valid for the Node SDK, with the
/// configured header.
#[test]
fn pushers_events_reach_the_backend_signed_per_user_and_debounced() {
    let mut rx = receiver();
    let hg = herdgate(&rx, "", "headers = { \"X-Env\" = \"prod\" }");
    let mut js = clients(&hg);
    let room = "presence-lobby";

    let a = js.connect("a", "alice");
    js.subscribe("a", room);
    let got = rx.events_until(WAIT, |g| g.name() == "member_added");
    assert_eq!(
        names(&got),
        [
            ("channel_occupied".into(), room.into()),
            ("member_added".into(), room.into())
        ]
    );
    assert_eq!(got[1].event["user_id"], "alice");

    // Alice's second socket: no second member_added. Bob: one.
    js.connect("a2", "alice");
    js.subscribe("a2", room);
    js.connect("b", "bob");
    js.subscribe("b", room);
    let got = rx.events_until(WAIT, |g| g.name() == "member_added");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event["user_id"], "bob");

    // Client events: on presence with user_id, on private without.
    js.trigger("a", room, "client-typing", json!({"typing": true}));
    let got = rx.events_until(WAIT, |g| g.name() == "client_event");
    assert_eq!(
        got[0].event,
        json!({"name":"client_event","channel":room,"event":"client-typing",
               "data":"{\"typing\":true}","socket_id":a,"user_id":"alice"})
    );
    let c = js.connect("c", "carol");
    js.subscribe("c", "private-notes");
    let got = rx.events_until(WAIT, |g| g.name() == "channel_occupied");
    assert_eq!(got[0].channel(), "private-notes");
    js.trigger("c", "private-notes", "client-note", json!("hi"));
    let got = rx.events_until(WAIT, |g| g.name() == "client_event");
    assert_eq!(got[0].event["socket_id"], c.as_str());
    assert_eq!(got[0].event["data"], "hi");
    assert!(
        got[0].event.get("user_id").is_none(),
        "no user_id off presence"
    );

    // Alice's first socket leaves: she is still there. Her second: removed,
    // about 3 s later.
    js.disconnect("a");
    let left = now_ms();
    js.disconnect("a2");
    let got = rx.events_until(WAIT, |g| g.name() == "member_removed");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event["user_id"], "alice");
    let waited = got[0].t.saturating_sub(left);
    assert!(
        (2900..6000).contains(&waited),
        "member_removed {waited} ms after she left"
    );
    // Taken before the disconnect: the server may see the close before
    // the helper answers, so only this is a strict lower bound.
    let left = now_ms();
    js.disconnect("b");
    let got = rx.events_until(WAIT, |g| g.name() == "channel_vacated");
    assert_eq!(
        names(&got),
        [
            ("member_removed".into(), room.into()),
            ("channel_vacated".into(), room.into())
        ]
    );
    let waited = got[1].t.saturating_sub(left);
    assert!(
        (2900..6000).contains(&waited),
        "channel_vacated {waited} ms after the last socket left"
    );
    for post in &rx.posts {
        assert_eq!(
            post["valid"], true,
            "the Node SDK accepts every POST: {post}"
        );
        assert_eq!(post["headers"]["x-env"], "prod");
        assert_eq!(post["headers"]["x-pusher-key"], KEY);
        assert_eq!(post["path"], "/hooks");
    }
    python_sdk_accepts(&rx.posts);
}

/// The official Python SDK (`pusher.Pusher.validate_webhook`) agrees with
/// the Node SDK on every body and signature.
fn python_sdk_accepts(posts: &[Value]) {
    let bodies: Vec<Value> = posts
        .iter()
        .map(|p| json!({"raw": p["raw"], "signature": p["signature"]}))
        .collect();
    let script = r#"
import json, sys, pusher
p = pusher.Pusher(app_id=sys.argv[1], key=sys.argv[2], secret=sys.argv[3])
posts = json.load(sys.stdin)
ok = 0
for post in posts:
    data = p.validate_webhook(key=sys.argv[2], signature=post["signature"], body=post["raw"])
    if data is None or "events" not in data:
        print("REFUSED", post["raw"])
        sys.exit(1)
    ok += 1
print("valid", ok)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, APP_ID, KEY, SECRET])
        .env("PYTHONPATH", python_sdk_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&bodies).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python SDK refused a webhook: {stdout}"
    );
    assert_eq!(stdout.trim(), format!("valid {}", posts.len()));
}

/// Where scripts/setup installed the official Python SDK.
fn python_sdk_path() -> String {
    std::env::var("HERDGATE_PY_SDK").unwrap_or_else(|_| {
        herdgate_testkit::process::repo_path("target/ci-tools/python")
            .display()
            .to_string()
    })
}

/// A page reload (leave and come back within the window) reaches the
/// backend as nothing at all: no vacated + occupied pair, no removed +
/// added pair. The final leave does.
#[test]
fn leaving_and_coming_back_within_the_window_sends_neither() {
    let mut rx = receiver();
    let hg = herdgate(&rx, "", "");
    let mut js = clients(&hg);
    let room = "presence-session-7";
    js.connect("a", "alice");
    js.subscribe("a", room);
    rx.events_until(WAIT, |g| g.name() == "member_added");
    // The reload: the socket goes, a new one comes within a second.
    js.disconnect("a");
    js.connect("a", "alice");
    js.subscribe("a", room);
    // Then the real leave; everything before it would arrive first.
    let left = now_ms();
    js.disconnect("a");
    let got = rx.events_until(WAIT, |g| g.name() == "channel_vacated");
    assert_eq!(
        names(&got),
        [
            ("member_removed".into(), room.into()),
            ("channel_vacated".into(), room.into())
        ],
        "the reload produced nothing"
    );
    assert!(
        got[0].t >= left + 2900,
        "the last leave's, after its window"
    );
    assert_eq!(metric(&hg, "herdgate_webhook_debounced_total"), 2.0);
}

/// `user_online` once for a user's first signed-in socket, `user_offline`
/// once after their last one went (debounced like `member_removed`: a
/// reconnect within the window sends neither), for pusher-js's `signin()`.
#[test]
fn users_online_and_offline_reach_the_backend_once_per_transition() {
    let mut rx = receiver();
    let hg = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[overload]\nenabled = false\n[webhooks]\ndebounce = \"1s\"\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = [\"user_online\", \"user_offline\"]\n",
        rx.url()
    ));
    let mut js = clients(&hg);
    let users = |got: &[Got]| -> Vec<(String, String)> {
        got.iter()
            .map(|g| {
                assert_eq!(g.channel(), "", "no channel on user events: {:?}", g.event);
                (
                    g.name().to_string(),
                    g.event["user_id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    js.connect("a", "alice");
    js.signin("a");
    let got = rx.events_until(WAIT, |g| g.name() == "user_online");
    assert_eq!(users(&got), [("user_online".into(), "alice".into())]);

    // A second socket of alice, then the first goes: nothing. A reconnect
    // within the window (the last socket goes, a new one signs in within
    // a second): nothing.
    js.connect("a2", "alice");
    js.signin("a2");
    js.disconnect("a");
    js.disconnect("a2");
    js.connect("a3", "alice");
    js.signin("a3");
    // Bob comes and goes for real; alice finally too.
    js.connect("b", "bob");
    js.signin("b");
    let got = rx.events_until(WAIT, |g| g.name() == "user_online");
    assert_eq!(
        users(&got),
        [("user_online".into(), "bob".into())],
        "alice's reconnect within the window sent neither event"
    );
    let left = now_ms();
    js.disconnect("b");
    js.disconnect("a3");
    // Two users on maybe two workers: two events, in either order.
    let mut got = rx.events_until(WAIT, |g| g.name() == "user_offline");
    got.extend(rx.events_until(WAIT, |g| g.name() == "user_offline"));
    got.sort_by(|x, y| {
        x.event["user_id"]
            .as_str()
            .cmp(&y.event["user_id"].as_str())
    });
    assert_eq!(
        users(&got),
        [
            ("user_offline".into(), "alice".into()),
            ("user_offline".into(), "bob".into())
        ]
    );
    assert!(
        got.iter().all(|g| g.t >= left + 900),
        "after the 1 s window"
    );
    assert!(
        rx.next_event(Duration::from_millis(1500)).is_none(),
        "once each"
    );
}

/// The receiver answers 500 for ~10 s, then recovers: every event is
/// delivered once, in order per channel, retried with backoff meanwhile.
#[test]
fn a_failing_receiver_gets_every_event_once_and_in_order_after_it_recovers() {
    let mut rx = receiver();
    let hg = herdgate(&rx, "debounce = \"0s\"\nbatch_max_events = 5", "");
    let mut js = clients(&hg);
    rx.set_mode("500");
    js.connect("a", "alice");
    let channels: Vec<String> = (0..6).map(|i| format!("private-c{i}")).collect();
    for c in &channels {
        js.subscribe("a", c);
        js.unsubscribe("a", c);
    }
    let failing_since = Instant::now();
    // Refused for ten seconds (several attempts, backing off).
    // (Attempts back off 1, 2, 4, 8 s, ±50 %.)
    while failing_since.elapsed() < Duration::from_secs(10) {
        rx.wait_post(WAIT * 2, |p| p["answered"] == 500);
    }
    rx.set_mode("ok");
    let mut got = Vec::new();
    while got.len() < 12 {
        got.push(
            rx.next_event(WAIT * 4)
                .expect("every event, after the recovery"),
        );
    }
    assert!(
        rx.next_event(Duration::from_millis(1500)).is_none(),
        "and nothing twice: {:?}",
        rx.posts.last()
    );
    for c in &channels {
        let mine: Vec<&str> = got
            .iter()
            .filter(|g| g.channel() == c)
            .map(|g| g.name())
            .collect();
        assert_eq!(mine, ["channel_occupied", "channel_vacated"], "{c}");
    }
    assert!(metric(&hg, "herdgate_webhook_retries_total") >= 3.0);
    assert_eq!(metric(&hg, "herdgate_webhook_delivered_total"), 12.0);
}

/// Down for longer than the retry window: the events are dropped, counted,
/// and the next ones flow when the receiver is back.
#[test]
fn a_receiver_down_past_the_retry_window_loses_those_events_counted() {
    let mut rx = receiver();
    let hg = herdgate(
        &rx,
        "debounce = \"0s\"\nretry_window = \"4s\"\ntimeout = \"1s\"",
        "",
    );
    let mut js = clients(&hg);
    rx.set_mode("500");
    js.connect("a", "alice");
    js.subscribe("a", "private-lost");
    let deadline = Instant::now() + WAIT;
    while metric(&hg, "herdgate_webhook_dropped_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the batch was not dropped within the window"
        );
        rx.wait_post(WAIT, |p| p["answered"] == 500);
    }
    rx.set_mode("ok");
    js.subscribe("a", "private-after");
    let got = rx.events_until(WAIT, |g| g.name() == "channel_occupied");
    assert_eq!(
        names(&got),
        [("channel_occupied".into(), "private-after".into())]
    );
    assert_eq!(metric(&hg, "herdgate_webhook_dropped_total"), 1.0);
}

/// A receiver that never answers: every attempt times out, the queue stops
/// at its bound (the rest is dropped and counted), nothing else waits.
#[test]
fn a_hanging_receiver_times_out_and_the_queue_stays_bounded() {
    let mut rx = receiver();
    let hg = herdgate(
        &rx,
        "debounce = \"0s\"\ntimeout = \"300ms\"\nqueue_events = 40\nbatch_max_events = 20",
        "",
    );
    let mut js = clients(&hg);
    rx.set_mode("hang");
    js.connect("a", "alice");
    for i in 0..50 {
        let c = format!("private-h{i}");
        js.subscribe("a", &c);
        js.unsubscribe("a", &c);
    }
    // 100 events for a queue of 40 (one batch of 20 of them in flight).
    let deadline = Instant::now() + WAIT;
    while metric(&hg, "herdgate_webhook_posts_total") < 2.0 {
        assert!(Instant::now() < deadline, "no timed-out attempts");
        rx.wait_post(WAIT, |p| p["hung"] == true);
    }
    let queued = metric(&hg, "herdgate_webhook_queue_events");
    let dropped = metric(&hg, "herdgate_webhook_dropped_total");
    assert!(
        queued <= 60.0,
        "bounded: {queued} queued (40 waiting + 20 in flight)"
    );
    assert!(dropped >= 40.0, "the rest dropped: {dropped}");
    // The node itself is unaffected: clients still get answers at once.
    js.subscribe("a", "private-still-fine");
}
