//! Edges and workers as real processes on loopback: rooms shared across
//! edges, a worker killed under a publish stream, an edge killed with users
//! in presence.

use herdgate_testkit::process::Herdgate;
use herdgate_testkit::*;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

const APPS: &str = r#"
[[apps]]
id = "100001"
key = "test-key"
secret = "test-secret"
"#;

fn worker(link: &str) -> Herdgate {
    Herdgate::start(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[cluster]\nrole = \"worker\"\nlink_listen = \"{link}\"\nheartbeat_interval = \"100ms\"\nedge_lease = \"1s\"\n{APPS}"
    ))
}

fn edge(workers: &[String]) -> Herdgate {
    let list: Vec<String> = workers.iter().map(|w| format!("{w:?}")).collect();
    let hg = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[limits]\nmax_connections_per_ip = 0\n[cluster]\nrole = \"edge\"\nworkers = [{}]\nheartbeat_interval = \"100ms\"\nsettle = \"1s\"\n{APPS}",
        list.join(", ")
    ));
    for _ in 0..workers.len() {
        wait_log(&hg, "worker link up");
    }
    hg
}

fn wait_log(hg: &Herdgate, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match hg.log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no log line with {needle:?} within {WAIT:?}"),
        }
    }
}

struct Cluster {
    workers: Vec<Herdgate>,
    links: Vec<String>,
    edges: Vec<Herdgate>,
}

fn cluster() -> Cluster {
    let workers: Vec<Herdgate> = (0..3).map(|_| worker("127.0.0.1:0")).collect();
    let links: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let edges = (0..2).map(|_| edge(&links)).collect();
    Cluster {
        workers,
        links,
        edges,
    }
}

fn addr(hg: &Herdgate) -> SocketAddr {
    hg.addr.parse().unwrap()
}

fn url(hg: &Herdgate) -> String {
    format!(
        "ws://{}/app/{KEY}?protocol=7&client=test&version=1.0",
        hg.addr
    )
}

fn api(hg: &Herdgate) -> Api {
    Api {
        tls: None,
        addr: addr(hg),
        app_id: APP_ID.into(),
        key: KEY.into(),
        secret: SECRET.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_three_workers_share_rooms() {
    let c = cluster();
    let (e1, e2) = (&c.edges[0], &c.edges[1]);
    let mut a = Client::connect(&url(e1)).await;
    let mut b = Client::connect(&url(e2)).await;

    // Presence across edges: each sees the other's member events.
    let e = a.subscribe_presence("presence-lobby", "ua").await;
    assert_eq!(e.data["presence"]["count"], 1);
    let e = b.subscribe_presence("presence-lobby", "ub").await;
    assert_eq!(
        e.data["presence"]["count"], 2,
        "the member list is merged across edges"
    );
    assert_eq!(
        a.expect("pusher_internal:member_added").await.data["user_id"],
        "ub"
    );
    a.subscribe("private-chat").await;
    b.subscribe("private-chat").await;

    // Client events cross edges, with user_id on presence, never echoed.
    a.send(json!({"event":"client-typing","channel":"presence-lobby","data":{"t":1}}))
        .await;
    let e = b.expect("client-typing").await;
    assert_eq!(e.raw["user_id"], "ua");
    b.send(json!({"event":"client-hi","channel":"private-chat","data":{}}))
        .await;
    a.expect("client-hi").await;

    // A publish through either edge reaches both sockets exactly once.
    for (i, via) in [e1, e2].into_iter().enumerate() {
        api(via)
            .publish("private-chat", "news", &format!("n{i}"), None)
            .await;
        for c in [&mut a, &mut b] {
            let e = c.expect("news").await;
            assert_eq!(e.raw["data"], format!("n{i}"));
        }
    }
    let extra = a.until_marker(&api(e2), "private-chat").await;
    assert!(extra.is_empty(), "a got {extra:?}");
    b.expect("marker").await; // a's marker reached b too
    let extra = b.until_marker(&api(e1), "private-chat").await;
    assert!(extra.is_empty(), "b got {extra:?}");

    // Queries give the same answer on both edges.
    for via in [e1, e2] {
        let r = api(via)
            .request(
                "GET",
                "/channels/presence-lobby",
                &[("info", "user_count,subscription_count")],
                "",
            )
            .await;
        assert_eq!(
            r.body,
            json!({"occupied":true,"user_count":2,"subscription_count":2})
        );

        assert_eq!(api(via).user_ids("presence-lobby").await, ["ua", "ub"]);
        let r = api(via).request("GET", "/channels", &[], "").await;
        assert_eq!(
            r.body,
            json!({"channels":{"presence-lobby":{},"private-chat":{}}})
        );
    }
}

/// Kill -9 a worker under a steady publish stream, then bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dies_and_returns_under_a_publish_stream() {
    let mut c = cluster();
    const ROOMS: usize = 12;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("room-{i}")).collect();
    let mut clients = Vec::new();
    for e in &c.edges {
        let mut cl = Client::connect(&url(e)).await;
        for r in &rooms {
            cl.subscribe(r).await;
        }
        clients.push(cl);
    }
    let mut p1 = Client::connect(&url(&c.edges[0])).await;
    p1.subscribe_presence("presence-stage", "p1").await;
    let mut p2 = Client::connect(&url(&c.edges[1])).await;
    p2.subscribe_presence("presence-stage", "p2").await;
    p1.expect("pusher_internal:member_added").await;

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut cl| {
            tokio::spawn(async move {
                let mut got: HashMap<String, Vec<u32>> = HashMap::new();
                let mut ends = 0;
                loop {
                    match cl.recv().await {
                        Received::Event(e) if e.event == "seq" => got
                            .entry(e.channel.unwrap())
                            .or_default()
                            .push(e.raw["data"].as_str().unwrap().parse().unwrap()),
                        Received::Event(e) if e.event == "end" => {
                            ends += 1;
                            if ends == ROOMS {
                                return (got, cl);
                            }
                        }
                        Received::Event(_) => {} // herdgate:status while rooms move
                        Received::Closed(code) => {
                            panic!("a client socket closed ({code:?}) during the failover")
                        }
                    }
                }
            })
        })
        .collect();

    let apis = [api(&c.edges[0]), api(&c.edges[1])];
    let mut acked: HashMap<String, Vec<u32>> = HashMap::new();
    let mut refused = 0;
    let publish = |seq: u32| {
        let room = rooms[seq as usize % ROOMS].clone();
        let api = &apis[seq as usize % 2];
        async move {
            let body = json!({"name":"seq","channel":room,"data":seq.to_string()}).to_string();
            (
                room,
                api.request("POST", "/events", &[], &body).await.status,
            )
        }
    };
    let mut seq = 0u32;
    let step = |acked: &mut HashMap<String, Vec<u32>>,
                refused: &mut u32,
                (room, status): (String, u16),
                seq: u32| {
        match status {
            200 => acked.entry(room).or_default().push(seq),
            503 => *refused += 1,
            s => panic!("publish answered {s}"),
        }
    };
    for _ in 0..60 {
        let r = publish(seq).await;
        step(&mut acked, &mut refused, r, seq);
        seq += 1;
    }
    // Kill -9 the worker that owns room-0 (the same ring as every edge's);
    // keep publishing while its rooms move.
    let ring = herdgate::ring::NamedRing::new(&c.links, herdgate::ring::DEFAULT_VNODES);
    let owner = ring
        .candidates(APP_ID, &rooms[0])
        .next()
        .unwrap()
        .to_string();
    let victim = c.links.iter().position(|l| *l == owner).unwrap();
    let dead_link = c.links[victim].clone();
    let _ = c.workers[victim].child.kill();
    let _ = c.workers[victim].child.wait();
    let killed = std::time::Instant::now();
    // Per room: when it was last refused after the kill; the re-homing time
    // is the latest first-success-after-refusal over the moved rooms.
    let mut refused_rooms: HashMap<String, bool> = HashMap::new();
    let mut rehomed = Duration::ZERO;
    for _ in 0..300 {
        let r = publish(seq).await;
        match r.1 {
            503 => {
                refused_rooms.insert(r.0.clone(), true);
            }
            200 if refused_rooms.get(&r.0) == Some(&true) => {
                refused_rooms.insert(r.0.clone(), false);
                rehomed = rehomed.max(killed.elapsed());
            }
            _ => {}
        }
        step(&mut acked, &mut refused, r, seq);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(5)).await; // the stream's pace
    }
    assert!(
        !refused_rooms.is_empty(),
        "the dead worker owned some rooms"
    );
    assert!(
        refused_rooms.values().all(|still| !still),
        "every moved room resumed: {refused_rooms:?}"
    );
    // Presence is still right, on both edges.
    for a in &apis {
        let r = a
            .request(
                "GET",
                "/channels/presence-stage",
                &[("info", "user_count")],
                "",
            )
            .await;
        assert_eq!(
            r.body["user_count"], 2,
            "presence after the move: {:?}",
            r.body
        );
    }
    // The worker returns on its old address; its rooms move back.
    c.workers[victim] = worker(&dead_link);
    for e in &c.edges {
        wait_log(e, "worker link up");
    }
    for _ in 0..300 {
        let r = publish(seq).await;
        step(&mut acked, &mut refused, r, seq);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The returned worker owns rooms again (only its own: the ring).
    let admin: SocketAddr = c.workers[victim].admin.as_ref().unwrap().parse().unwrap();
    let (_, metrics) = admin_get(admin, "/metrics").await;
    let channels: f64 = metrics
        .lines()
        .find(|l| l.starts_with("herdgate_channels "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        channels >= 1.0,
        "rooms moved back to the returned worker:\n{metrics}"
    );
    // End the stream on every room (retrying through any settle period).
    let body = json!({"name":"end","channels":rooms.clone(),"data":""}).to_string();
    let deadline = std::time::Instant::now() + WAIT;
    while apis[0].request("POST", "/events", &[], &body).await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "end never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in readers {
        let (got, _cl) = tokio::time::timeout(WAIT * 2, r)
            .await
            .expect("readers finish")
            .unwrap();
        for (room, seqs) in &acked {
            let recv = got.get(room).cloned().unwrap_or_default();
            for s in seqs {
                assert!(
                    recv.contains(s),
                    "publish {s} to {room} was acknowledged with 200 but never arrived"
                );
            }
        }
    }
    println!(
        "failover: {} publishes acknowledged, {refused} refused with 503 while {} rooms moved; all moved rooms published again {:?} after the kill; {channels} rooms back on the returned worker",
        acked.values().map(Vec::len).sum::<usize>(),
        refused_rooms.len(),
        rehomed
    );
    assert!(
        rehomed < Duration::from_secs(3),
        "rooms resumed within 3 s: {rehomed:?}"
    );
    drop(p1);
    drop(p2);
}

/// Kill -9 an edge: its users leave presence within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edge_leaves_no_ghost_users() {
    let mut c = cluster();
    let mut a = Client::connect(&url(&c.edges[0])).await;
    let mut b = Client::connect(&url(&c.edges[1])).await;
    a.subscribe_presence("presence-hall", "alice").await;
    b.subscribe_presence("presence-hall", "bob").await;
    assert_eq!(
        a.expect("pusher_internal:member_added").await.data["user_id"],
        "bob"
    );
    let killed = std::time::Instant::now();
    let _ = c.edges[1].child.kill();
    let _ = c.edges[1].child.wait();
    let e = a.expect("pusher_internal:member_removed").await;
    assert_eq!(e.data["user_id"], "bob");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "member_removed after {took:?} (lease 1 s + link timeout)"
    );
    println!("edge kill: member_removed after {took:?}");
    let r = api(&c.edges[0])
        .request("GET", "/channels/presence-hall/users", &[], "")
        .await;
    assert_eq!(r.body, json!({"users":[{"id":"alice"}]}));
}

/// A new worker list by SIGHUP: only the rooms the new worker now owns move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_worker_list_moves_only_the_rooms_that_changed_owner() {
    let workers: Vec<Herdgate> = (0..3).map(|_| worker("127.0.0.1:0")).collect();
    let links: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let e = edge(&links[..2]);
    const ROOMS: usize = 30;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("room-{i}")).collect();
    let mut cl = Client::connect(&url(&e)).await;
    for r in &rooms {
        cl.subscribe(r).await;
    }
    let channels = |w: &Herdgate| {
        let admin: SocketAddr = w.admin.as_ref().unwrap().parse().unwrap();
        async move {
            let (_, m) = admin_get(admin, "/metrics").await;
            m.lines()
                .find(|l| l.starts_with("herdgate_channels "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0) as usize
        }
    };
    let before = [channels(&workers[0]).await, channels(&workers[1]).await];
    assert_eq!(before[0] + before[1], ROOMS);

    // Add the third worker to the list and reload.
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    let list: Vec<String> = links.iter().map(|l| format!("{l:?}")).collect();
    let old: Vec<String> = links[..2].iter().map(|l| format!("{l:?}")).collect();
    std::fs::write(
        &e.config_path,
        text.replace(&old.join(", "), &list.join(", ")),
    )
    .unwrap();
    e.signal(libc::SIGHUP);
    wait_log(&e, "worker list changed");
    wait_log(&e, "worker link up");

    // The rooms the ring now gives the new worker moved there, and only they.
    let ring = herdgate::ring::NamedRing::new(&links, herdgate::ring::DEFAULT_VNODES);
    let expected = rooms
        .iter()
        .filter(|r| ring.candidates(APP_ID, r).next() == Some(links[2].as_str()))
        .count();
    let deadline = std::time::Instant::now() + WAIT;
    let after = loop {
        let after = [
            channels(&workers[0]).await,
            channels(&workers[1]).await,
            channels(&workers[2]).await,
        ];
        if after[2] == expected && after.iter().sum::<usize>() == ROOMS {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rooms did not settle: {after:?}, expected {expected} on the new worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // metrics have no event to await
    };
    assert!(
        expected > 0,
        "the new worker owns some of the {ROOMS} rooms"
    );
    assert!(
        after[0] <= before[0] && after[1] <= before[1],
        "nothing moved between the old workers: {before:?} → {after:?}"
    );
    println!(
        "worker list reload: {before:?} → {after:?} ({expected} rooms moved to the new worker)"
    );

    // Every room still delivers (after the settle period).
    for r in &rooms {
        let body = json!({"name":"ping","channel":r,"data":r}).to_string();
        let deadline = std::time::Instant::now() + WAIT;
        while api(&e).request("POST", "/events", &[], &body).await.status != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "{r} never accepted publishes again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let ev = cl.next_event().await;
            if ev.event == "ping" {
                assert_eq!(ev.raw["data"], r.as_str());
                break;
            }
        }
    }
}

/// The link as mutually authenticated TLS: nodes with certificates from the
/// cluster CA talk; a node without one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_the_link() {
    let pki = herdgate_testkit::pki::Pki::new();
    let (wc, wk, _) = pki.leaf("worker", false);
    let (ec, ek, _) = pki.leaf("edge", false);
    let ca = pki.ca_pem_path();
    let section = |c: &std::path::Path, k: &std::path::Path| {
        format!(
            "[cluster.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            c.display().to_string(),
            k.display().to_string(),
            ca.display().to_string()
        )
    };
    let w = Herdgate::start(&format!(
        "[server]\nadmin_listen = \"\"\n[cluster]\nrole = \"worker\"\nlink_listen = \"127.0.0.1:0\"\nheartbeat_interval = \"100ms\"\n{}{APPS}",
        section(&wc, &wk)
    ));
    let e = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nworkers = [{:?}]\nheartbeat_interval = \"100ms\"\nsettle = \"1s\"\n{}{APPS}",
        w.addr,
        section(&ec, &ek)
    ));
    wait_log(&e, "worker link up");
    let mut a = Client::connect(&url(&e)).await;
    a.subscribe("secure-room").await;
    api(&e).publish("secure-room", "e", "over mTLS", None).await;
    assert_eq!(a.expect("e").await.raw["data"], "over mTLS");

    // An edge with no certificate gets no link.
    let _plain = edge_without_wait(&w.addr);
    wait_log(&w, "link TLS handshake refused");
}

fn edge_without_wait(worker: &str) -> Herdgate {
    Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nworkers = [{worker:?}]\nheartbeat_interval = \"100ms\"\nsettle = \"1s\"\n{APPS}"
    ))
}
