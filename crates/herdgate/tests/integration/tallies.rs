//! Reaction tallies (`[[apps.tallies]]`, docs/PROTOCOL.md "Tallies"): the
//! room's owner counts the named events per interval, by a field's value,
//! and sends one `herdgate:tally` summary to the channel; the events reach
//! nobody, the senders get no echo.

use herdgate_testkit::*;
use serde_json::json;

const RULES: &str = r#"
[[apps.tallies]]
prefix = "private-keynote-"
events = ["client-clap"]
field = "emoji"
max_values = 2
interval = "300ms"
"#;

#[tokio::test]
async fn claps_are_counted_and_summed_up_once_per_interval() {
    let s = start_with_app("", RULES).await;
    let ch = "private-keynote-1";
    let mut watcher = s.connect().await;
    watcher.expect_subscribed(ch).await;
    let mut clappers = Vec::new();
    for _ in 0..4 {
        let mut c = s.connect().await;
        c.expect_subscribed(ch).await;
        clappers.push(c);
    }
    for (c, emoji) in clappers.iter_mut().zip(["👏", "👏", "❤️", "🔥"]) {
        c.send(json!({"event":"client-clap","channel":ch,"data":{"emoji":emoji}}))
            .await;
    }
    // Other client events on the channel are not tallied.
    clappers[0]
        .send(json!({"event":"client-chat","channel":ch,"data":{"text":"hi"}}))
        .await;
    let chat = watcher.next_event().await;
    assert_eq!(chat.event, "client-chat", "{:?}", chat.raw);
    // One summary; no clap reached anyone.
    let tally = watcher.next_event().await;
    assert_eq!(tally.event, "herdgate:tally", "{:?}", tally.raw);
    let t = &tally.data["tallies"]["client-clap"];
    assert_eq!(t["total"], 4, "{:?}", tally.raw);
    assert_eq!(
        t["values"],
        json!({"👏": 2, "❤️": 1}),
        "max_values = 2: the first two values"
    );
    assert_eq!(t["other"], 1);
    assert_eq!(tally.data["interval_ms"], 300);
    for c in &mut clappers {
        let e = c.next_event().await;
        if e.event == "client-chat" {
            continue; // the chat, to everyone but its sender
        }
        assert_eq!(
            e.event, "herdgate:tally",
            "a clapper gets the summary, never a clap: {:?}",
            e.raw
        );
    }
    // An event name only herdgate sends: nobody can forge a summary.
    let api = s.api();
    let forged = json!({"name":"herdgate:tally","channel":ch,"data":"{}"}).to_string();
    assert_eq!(
        api.request("POST", "/events", &[], &forged).await.status,
        400
    );
}

/// The same summary, signed, to the app's webhook (`event_types = ["tally"]`).
#[test]
fn the_summary_also_goes_to_the_apps_webhook() {
    use herdgate_testkit::process::Herdgate;
    use herdgate_testkit::webhook::Receiver;
    let mut rx = Receiver::start(APP_ID, KEY, SECRET);
    let hg = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[overload]\nenabled = false\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = [\"tally\"]\n{RULES}",
        rx.url()
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!(
            "ws://{}/app/{KEY}?protocol=7&client=test&version=1.0",
            hg.addr
        );
        let ch = "private-keynote-2";
        let mut c = Client::connect(&url).await;
        c.expect_subscribed(ch).await;
        for _ in 0..3 {
            c.send(json!({"event":"client-clap","channel":ch,"data":{"emoji":"👏"}}))
                .await;
        }
        let tally = c.expect("herdgate:tally").await;
        assert_eq!(tally.data["tallies"]["client-clap"]["total"], 3);
    });
    let got = rx.events_until(WAIT, |g| g.name() == "tally");
    let t = &got.last().expect("a tally webhook").event;
    assert_eq!(t["channel"], "private-keynote-2");
    assert_eq!(t["tallies"]["client-clap"]["total"], 3, "{t}");
    assert_eq!(t["tallies"]["client-clap"]["values"]["👏"], 3);
    assert_eq!(t["interval_ms"], 300);
}
