//! Conflation in normal state (`[[apps.conflation]]`, docs/PROTOCOL.md
//! "Conflation"): per key, the latest API event of each interval reaches
//! the channel's sockets; the first arrival's time decides when and in which
//! order; a key beyond `max_keys` is sent at once; client events are left
//! alone unless the rule says otherwise.

use herdgate_testkit::*;
use serde_json::json;

const RULES: &str = r#"
[[apps.conflation]]
prefix = "score-"
interval = "300ms"
[[apps.conflation]]
prefix = "deck-"
key = "data.slide"
interval = "300ms"
max_keys = 2
[[apps.conflation]]
prefix = "private-live-"
interval = "300ms"
[[apps.conflation]]
prefix = "private-cursor-"
key = "data.user"
interval = "300ms"
client_events = true
"#;

fn data_of(e: &Event) -> String {
    e.data
        .as_str()
        .map_or_else(|| e.data.to_string(), str::to_string)
}

#[tokio::test]
async fn the_latest_event_per_name_per_interval_in_first_arrival_order() {
    let s = start_with_app("", RULES).await;
    let mut c = s.connect().await;
    c.expect_subscribed("score-final").await;
    let api = s.api();
    for (name, data) in [("goal", "1"), ("goal", "2"), ("corner", "1"), ("goal", "3")] {
        assert_eq!(
            api.publish("score-final", name, data, None).await.status,
            200
        );
    }
    // The marker waits too (its own key), after the two others.
    let before = c.until_marker(&api, "score-final").await;
    let got: Vec<(String, String)> = before
        .iter()
        .map(|e| (e.event.clone(), data_of(e)))
        .collect();
    assert_eq!(
        got,
        vec![("goal".into(), "3".into()), ("corner".into(), "1".into())],
        "the latest goal and the corner, in the order they first came"
    );
    // A channel no rule names is not conflated.
    c.expect_subscribed("plain").await;
    for n in ["1", "2"] {
        api.publish("plain", "goal", n, None).await;
    }
    let before = c.until_marker(&api, "plain").await;
    assert_eq!(
        before.len(),
        2,
        "both sent: {:?}",
        before.iter().map(data_of).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_data_field_keys_and_a_key_beyond_max_keys_goes_at_once() {
    let s = start_with_app("", RULES).await;
    let mut c = s.connect().await;
    c.expect_subscribed("deck-keynote").await;
    let api = s.api();
    let slide = |slide: &str, n: u32| json!({"slide": slide, "n": n}).to_string();
    for (k, n) in [("a", 1), ("a", 2), ("b", 1), ("c", 1)] {
        assert_eq!(
            api.publish("deck-keynote", "moved", &slide(k, n), None)
                .await
                .status,
            200
        );
    }
    // Two keys wait (a, b); c finds the room full and goes at once.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = c.expect("moved").await;
        let d: serde_json::Value = serde_json::from_str(&data_of(&e)).unwrap();
        seen.push((
            d["slide"].as_str().unwrap().to_string(),
            d["n"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        vec![("c".into(), 1), ("a".into(), 2), ("b".into(), 1)]
    );
    // Nothing else came (a's first event was replaced): an event without
    // the field is its own key, sent at once, so the marker comes next.
    let before = c.until_marker(&api, "deck-keynote").await;
    assert!(
        before.is_empty(),
        "{:?}",
        before.iter().map(data_of).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn client_events_are_not_conflated_unless_the_rule_says_so() {
    let s = start_with_app("", RULES).await;
    let (mut a, mut b) = (s.connect().await, s.connect().await);
    a.expect_subscribed("private-live-1").await;
    b.expect_subscribed("private-live-1").await;
    for n in 0..3 {
        a.send(json!({"event":"client-move","channel":"private-live-1","data":{"n":n}}))
            .await;
    }
    for n in 0..3 {
        let e = b.expect("client-move").await;
        assert_eq!(e.data["n"], n, "{:?}", e.raw);
    }
}

#[tokio::test]
async fn client_events_are_conflated_when_the_rule_says_so() {
    let s = start_with_app("", RULES).await;
    let (mut a, mut b) = (s.connect().await, s.connect().await);
    a.expect_subscribed("private-cursor-1").await;
    b.expect_subscribed("private-cursor-1").await;
    for n in 0..3 {
        a.send(
            json!({"event":"client-move","channel":"private-cursor-1","data":{"user":"a","n":n}}),
        )
        .await;
    }
    let e = b.expect("client-move").await;
    assert_eq!(
        (e.data["user"].as_str(), e.data["n"].as_u64()),
        (Some("a"), Some(2)),
        "the latest of a's"
    );
    // Another key, later: the next event b gets (a's first two are gone).
    a.send(json!({"event":"client-move","channel":"private-cursor-1","data":{"user":"z","n":9}}))
        .await;
    let e = b.expect("client-move").await;
    assert_eq!(
        (e.data["user"].as_str(), e.data["n"].as_u64()),
        (Some("z"), Some(9))
    );
}
