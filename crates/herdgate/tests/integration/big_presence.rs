//! Big presence rooms (docs/PROTOCOL.md "Big presence rooms"): 2,000 members
//! in one presence channel of an app with `presence_full_members = 5`. Past
//! the threshold a join or a leave costs the other members nothing (but a
//! featured member's), the count reaches them within one
//! `presence_count_interval`, a joiner gets the true count with itself and
//! the featured members, and the API pages through the whole list. The
//! pusher-js side (the plugin, two edges) is tests/compat/big-presence.test.mjs.

use herdgate_testkit::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Instant;

const ROOM: &str = "presence-keynote";
const MEMBERS: usize = 2_000;

async fn join(s: &TestServer, user: &str, featured: bool) -> (Client, Event) {
    let mut c = s.connect().await;
    let info = if featured {
        json!({"name": user, "featured": true})
    } else {
        json!({"name": user})
    };
    let data = json!({"user_id": user, "user_info": info}).to_string();
    let auth = auth_for(&c.socket_id, ROOM, Some(&data));
    c.send(
        json!({"event":"pusher:subscribe","data":{"channel":ROOM,"auth":auth,"channel_data":data}}),
    )
    .await;
    let e = c.expect("pusher_internal:subscription_succeeded").await;
    (c, e)
}

fn listed(e: &Event) -> BTreeSet<String> {
    e.data["presence"]["hash"]
        .as_object()
        .map(|h| h.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_members_cost_each_other_o1_frames_and_the_count_arrives() {
    let s = start_with_app(
        "[limits]\nmax_presence_members = 5000\n",
        "presence_full_members = 5\npresence_count_interval = \"1s\"\n",
    )
    .await;
    let api = s.api();
    let (mut watcher, _) = join(&s, "watcher", false).await;
    let (host, _) = join(&s, "host", true).await;
    let mut members = vec![host];
    // Small so far (Pusher semantics): everyone hears of everyone.
    assert_eq!(
        watcher.expect("pusher_internal:member_added").await.data["user_id"],
        "host"
    );
    for i in 0..3 {
        members.push(join(&s, &format!("m{i:04}"), false).await.0);
        let e = watcher.expect("pusher_internal:member_added").await;
        assert_eq!(e.data["user_id"], format!("m{i:04}"));
    }
    // The sixth member makes the room big: from here on nobody hears of a
    // non-featured member joining.
    let start = Instant::now();
    for i in 3..MEMBERS - 2 {
        members.push(join(&s, &format!("m{i:04}"), false).await.0);
    }
    let took = start.elapsed();
    // What the watcher got meanwhile: count events only, at most one per
    // interval (and the final one within an interval of the last join).
    let mut counts = Vec::new();
    loop {
        let e = watcher.next_event().await;
        assert_eq!(e.event, "herdgate:presence_count", "{:?}", e.raw);
        let n = e.data["count"].as_u64().unwrap();
        counts.push(n);
        if n == MEMBERS as u64 {
            break;
        }
    }
    assert!(
        counts.len() as f64 <= took.as_secs_f64() + 2.0,
        "{} count events in {took:?}: at most one a second",
        counts.len()
    );
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");

    // A joiner: the true count, itself and the featured member listed.
    let (late, ok) = join(&s, "late", false).await;
    assert_eq!(ok.data["presence"]["count"], MEMBERS + 1);
    assert_eq!(
        listed(&ok),
        BTreeSet::from(["host".to_string(), "late".to_string()])
    );
    // A non-featured member leaving: nothing; the featured one: heard.
    members.pop().unwrap().close().await;
    late.close().await;
    assert!(watcher
        .until_marker(&api, ROOM)
        .await
        .iter()
        .all(|e| e.event == "herdgate:presence_count"));
    members.remove(0).close().await; // the host
    let e = watcher.expect("pusher_internal:member_removed").await;
    assert_eq!(e.data["user_id"], "host");

    // The whole list, page by page.
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = vec![("limit", "700")];
        if let Some(a) = &after {
            q.push(("after", a.as_str()));
        }
        let r = api
            .request("GET", &format!("/channels/{ROOM}/users"), &q, "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let page: Vec<String> = r.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_string())
            .collect();
        assert!(page.len() <= 700);
        all.extend(page);
        match r.body["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let want: Vec<String> = std::iter::once("m0000".to_string())
        .chain((1..MEMBERS - 3).map(|i| format!("m{i:04}")))
        .chain(std::iter::once("watcher".to_string()))
        .collect();
    assert_eq!(all.len(), want.len(), "every member once");
    assert_eq!(all, want, "sorted, complete");
    let bad = api
        .request(
            "GET",
            &format!("/channels/{ROOM}/users"),
            &[("limit", "0")],
            "",
        )
        .await;
    assert_eq!(bad.status, 400);
    drop(members);
}

/// The same room across a cluster (real processes: 3 workers, 2 edges,
/// static membership): 2,000 members, half on each edge. The owner decides
/// the mode; an observer on either edge hears no non-featured join, both get
/// the count, and a joiner on either edge gets the true count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_members_across_two_edges() {
    use herdgate_testkit::process::Herdgate;
    let app = format!(
        "[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\npresence_full_members = 5\npresence_count_interval = \"1s\"\n"
    );
    let limits = "[limits]\nmax_presence_members = 5000\n[overload]\nenabled = false\n";
    let workers: Vec<Herdgate> = (0..3)
        .map(|_| {
            Herdgate::start(&format!(
                "[server]\nadmin_listen = \"\"\n{limits}[cluster]\nrole = \"worker\"\nlink_listen = \"127.0.0.1:0\"\nsecret = \"big-presence-cluster-secret\"\n{app}"
            ))
        })
        .collect();
    let list: Vec<String> = workers.iter().map(|w| format!("{:?}", w.addr)).collect();
    let edges: Vec<Herdgate> = (0..2)
        .map(|_| {
            let e = Herdgate::start(&format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{limits}[cluster]\nrole = \"edge\"\nworkers = [{}]\nsecret = \"big-presence-cluster-secret\"\n{app}",
                list.join(", ")
            ));
            for _ in 0..workers.len() {
                while !tokio::task::block_in_place(|| {
                    e.log.recv_timeout(std::time::Duration::from_secs(10))
                })
                .expect("edge links up")
                .contains("worker link up")
                {}
            }
            e
        })
        .collect();
    let url = |i: usize| {
        format!(
            "ws://{}/app/{KEY}?protocol=7&client=big&version=1.0",
            edges[i % 2].addr
        )
    };
    let join_on = |i: usize, user: String| {
        let url = url(i);
        async move {
            let mut c = Client::connect(&url).await;
            let data = json!({"user_id": user, "user_info": {"name": user}}).to_string();
            let auth = auth_for(&c.socket_id, ROOM, Some(&data));
            c.send(json!({"event":"pusher:subscribe","data":{"channel":ROOM,"auth":auth,"channel_data":data}}))
                .await;
            let e = c.expect("pusher_internal:subscription_succeeded").await;
            (c, e)
        }
    };
    let mut watchers = Vec::new();
    for i in 0..2 {
        watchers.push(join_on(i, format!("watcher-{i}")).await.0);
    }
    let mut members = Vec::new();
    for i in 0..MEMBERS - 2 {
        members.push(join_on(i, format!("m{i:04}")).await.0);
    }
    for w in &mut watchers {
        // Past the first few (small room), only count events: every
        // member_added before the room went big came first.
        let mut added = 0;
        loop {
            let e = w.next_event().await;
            match e.event.as_str() {
                "pusher_internal:member_added" => added += 1,
                "herdgate:presence_count" => {
                    if e.data["count"] == MEMBERS {
                        break;
                    }
                }
                other => panic!("unexpected {other}: {:?}", e.raw),
            }
        }
        assert!(
            added <= 5,
            "{added} member_added: only while the room was small"
        );
    }
    for i in 0..2 {
        let (c, ok) = join_on(i, format!("late-{i}")).await;
        assert_eq!(ok.data["presence"]["count"], MEMBERS + 1 + i, "on edge {i}");
        assert_eq!(listed(&ok), BTreeSet::from([format!("late-{i}")]));
        members.push(c);
    }
    drop(members);
}
