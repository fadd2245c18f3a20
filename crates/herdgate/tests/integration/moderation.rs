//! Moderation (docs/PROTOCOL.md "Moderation") at the edges of its timing,
//! with raw clients: a banned user who subscribed before signing in (as
//! pusher-js does) is taken out as it signs in, and an unsubscribe +
//! subscribe racing the removal notice leaves no ghost subscriber. The
//! everyday paths run with pusher-js and the Node SDK in
//! tests/compat/moderation.test.mjs.

use herdgate_testkit::*;
use serde_json::json;

async fn subscriptions(api: &Api, channel: &str) -> u64 {
    let r = api
        .request(
            "GET",
            &format!("/channels/{channel}"),
            &[("info", "subscription_count")],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["subscription_count"].as_u64().unwrap_or(0)
}

async fn remove(api: &Api, channel: &str, user: &str, body: &str) -> serde_json::Value {
    let r = api
        .request(
            "POST",
            &format!("/channels/{channel}/users/{user}/remove"),
            &[],
            body,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

#[tokio::test]
async fn a_banned_user_who_subscribed_before_signing_in_is_taken_out_as_it_signs_in() {
    let s = start("").await;
    let api = s.api();
    let room = "private-mod-early";
    assert_eq!(
        remove(&api, room, "mallory", r#"{"ban_seconds":60}"#).await,
        json!({"removed": 0, "ban_seconds": 60})
    );
    let mut mallory = s.connect().await;
    // Not signed in yet: nobody the ban can name, so the app's signature
    // lets it in.
    mallory.expect_subscribed(room).await;
    assert_eq!(subscriptions(&api, room).await, 1);
    assert_eq!(
        mallory.signin("mallory").await.event,
        "pusher:signin_success"
    );
    let notice = mallory.expect("pusher:subscription_error").await;
    assert_eq!(notice.data["type"], "Removed", "{:?}", notice.raw);
    assert_eq!(subscriptions(&api, room).await, 0);
    // Out for good: its session forgot the channel (a client event on it
    // is refused), and subscribing again is refused by the ban.
    let e = mallory.subscribe(room).await;
    assert_eq!(e.data["type"], "Banned", "{:?}", e.raw);
    // Someone else signed in on the same channel is untouched.
    let mut alice = s.connect().await;
    alice.expect_subscribed(room).await;
    assert_eq!(alice.signin("alice").await.event, "pusher:signin_success");
    assert!(alice.until_marker(&api, room).await.is_empty());
}

#[tokio::test]
async fn an_unsubscribe_and_subscribe_racing_the_notice_leave_no_ghost() {
    let s = start("").await;
    let api = s.api();
    let room = "presence-mod-race";
    let mut bob = s.connect().await;
    let e = bob.subscribe_presence(room, "bob").await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    for round in 0..10 {
        let mut carol = s.connect().await;
        let e = carol.subscribe_presence(room, "carol").await;
        assert_eq!(e.event, "pusher_internal:subscription_succeeded");
        assert_eq!(
            bob.expect("pusher_internal:member_added").await.data["user_id"],
            "carol"
        );
        assert_eq!(
            remove(&api, room, "carol", "").await,
            json!({"removed": 1, "ban_seconds": 0})
        );
        assert_eq!(
            bob.expect("pusher_internal:member_removed").await.data["user_id"],
            "carol"
        );
        // Before reading the notice: leave and come back (no ban).
        carol
            .send(json!({"event":"pusher:unsubscribe","data":{"channel":room}}))
            .await;
        let data = json!({"user_id": "carol", "user_info": {"name": "User carol"}}).to_string();
        let auth = auth_for(&carol.socket_id, room, Some(&data));
        carol
            .send(json!({"event":"pusher:subscribe","data":{"channel":room,"auth":auth,"channel_data":data}}))
            .await;
        let notice = carol.expect("pusher:subscription_error").await;
        assert_eq!(notice.data["type"], "Removed");
        carol.expect("pusher_internal:subscription_succeeded").await;
        assert_eq!(
            bob.expect("pusher_internal:member_added").await.data["user_id"],
            "carol",
            "round {round}: back in"
        );
        assert_eq!(subscriptions(&api, room).await, 2, "round {round}: once");
        // Its new subscription is its own: closing takes it out (a ghost
        // would never be removed).
        carol.close().await;
        assert_eq!(
            bob.expect("pusher_internal:member_removed").await.data["user_id"],
            "carol",
            "round {round}: gone"
        );
    }
}
