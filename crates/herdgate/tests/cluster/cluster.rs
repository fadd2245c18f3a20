//! Static membership, edges and workers as real processes on loopback:
//! rooms shared across edges; a worker killed under a publish stream (no
//! failover: its rooms are unavailable until it returns, nothing is lost,
//! nothing splits); an edge killed with users in presence; the link's
//! authentication. The etcd cluster is tested in cluster_etcd.rs.

use herdgate_testkit::process::Herdgate;
use herdgate_testkit::*;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// One test at a time: each runs several debug processes, and two of them
/// side by side on two cores can stall a link past its heartbeats.
use crate::SERIAL;

/// The link's shared secret in these tests.
const SECRET_LINK: &str = "cluster-test-secret-0123456789";

const APPS: &str = r#"
[[apps]]
id = "100001"
key = "test-key"
secret = "test-secret"
"#;

fn worker(link: &str) -> Herdgate {
    Herdgate::start(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[overload]\nenabled = false\n[cluster]\nrole = \"worker\"\nlink_listen = \"{link}\"\nheartbeat_interval = \"250ms\"\nedge_lease = \"2s\"\nsecret = \"{SECRET_LINK}\"\n{APPS}"
    ))
}

fn edge(workers: &[String]) -> Herdgate {
    edge_as(workers, false, "250ms")
}

/// An edge with links heartbeating every `heartbeat` (the link uses the
/// larger of the two ends' asks); with `nobody`, running as uid 65534 so
/// that a [`Cut`] can isolate it.
fn edge_as(workers: &[String], nobody: bool, heartbeat: &str) -> Herdgate {
    let list: Vec<String> = workers.iter().map(|w| format!("{w:?}")).collect();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[limits]\nmax_connections_per_ip = 0\n[overload]\nenabled = false\n[cluster]\nrole = \"edge\"\nworkers = [{}]\nheartbeat_interval = \"{heartbeat}\"\nhandover_timeout = \"5s\"\nsecret = \"{SECRET_LINK}\"\n{APPS}",
        list.join(", ")
    );
    let hg = if nobody {
        Herdgate::start_as_nobody(&config)
    } else {
        Herdgate::start(&config)
    };
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
    let _serial = SERIAL.lock().await;
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

/// The owner of a room of the test app in a static cluster over `links`
/// (every edge builds this same view).
fn owner_of(links: &[String], room: &str) -> String {
    let m = herdgate::cluster::membership::Membership::fixed(links, 64);
    m.current().owner_of(APP_ID, room).unwrap().to_string()
}

/// Kill -9 a worker under a steady publish stream, then bring it back.
/// Static membership has no failover: the dead worker's rooms answer 503
/// (its sockets are told the room is unavailable) until it returns; the
/// other rooms never notice; every publish answered 200 arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_worker_dies_and_returns_without_failover_or_loss() {
    let _serial = SERIAL.lock().await;
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
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut cl| {
            tokio::spawn(async move {
                let mut got: HashMap<String, Vec<u32>> = HashMap::new();
                let mut states: Vec<(String, String)> = Vec::new();
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
                                return (got, states, cl);
                            }
                        }
                        Received::Event(e) if e.event == "herdgate:status" => states.push((
                            e.channel.unwrap_or_default(),
                            e.data["room"].as_str().unwrap_or_default().to_string(),
                        )),
                        Received::Event(_) => {}
                        Received::Closed(code) => {
                            panic!("a client socket closed ({code:?}) while a worker was down")
                        }
                    }
                }
            })
        })
        .collect();

    let victim_link = owner_of(&c.links, &rooms[0]);
    let victim = c.links.iter().position(|l| *l == victim_link).unwrap();
    let victim_rooms: Vec<&String> = rooms
        .iter()
        .filter(|r| owner_of(&c.links, r) == victim_link)
        .collect();
    let apis = [api(&c.edges[0]), api(&c.edges[1])];
    let mut acked: HashMap<String, Vec<u32>> = HashMap::new();
    let mut seq = 0u32;
    // (room, status) of one publish, alternating edges.
    async fn publish(apis: &[Api; 2], room: &str, seq: u32) -> u16 {
        let body = json!({"name":"seq","channel":room,"data":seq.to_string()}).to_string();
        apis[seq as usize % 2]
            .request("POST", "/events", &[], &body)
            .await
            .status
    }
    for _ in 0..48 {
        let room = &rooms[seq as usize % ROOMS];
        assert_eq!(publish(&apis, room, seq).await, 200);
        acked.entry(room.clone()).or_default().push(seq);
        seq += 1;
    }
    let _ = c.workers[victim].child.kill();
    let _ = c.workers[victim].child.wait();
    // Its rooms: 503 (no other worker takes them); the others: 200.
    let mut refused = 0;
    for _ in 0..120 {
        let room = &rooms[seq as usize % ROOMS];
        match publish(&apis, room, seq).await {
            200 => {
                assert!(
                    !victim_rooms.contains(&room) || refused == 0,
                    "{room} of the dead worker accepted a publish: a second owner"
                );
                acked.entry(room.clone()).or_default().push(seq);
            }
            503 => {
                assert!(
                    victim_rooms.contains(&room),
                    "{room} refused, but its worker is up"
                );
                refused += 1;
            }
            s => panic!("publish answered {s}"),
        }
        seq += 1;
    }
    assert!(refused > 0, "the dead worker's rooms were refused");
    // Back on its address: its rooms are registered again and flow.
    c.workers[victim] = worker(&victim_link);
    for e in &c.edges {
        wait_log(e, "worker link up");
    }
    for _ in 0..48 {
        let room = &rooms[seq as usize % ROOMS];
        assert_eq!(
            publish(&apis, room, seq).await,
            200,
            "{room} after the return"
        );
        acked.entry(room.clone()).or_default().push(seq);
        seq += 1;
    }
    let body = json!({"name":"end","channels":rooms.clone(),"data":""}).to_string();
    assert_eq!(
        apis[0].request("POST", "/events", &[], &body).await.status,
        200
    );
    for r in readers {
        let (got, states, _cl) = tokio::time::timeout(WAIT * 2, r)
            .await
            .expect("readers finish")
            .unwrap();
        for (room, seqs) in &acked {
            let recv = got.get(room).cloned().unwrap_or_default();
            assert_eq!(
                &recv, seqs,
                "{room}: every acknowledged publish, once, in order"
            );
        }
        for room in &victim_rooms {
            let seen: Vec<&str> = states
                .iter()
                .filter(|(c, _)| c == *room)
                .map(|(_, s)| s.as_str())
                .collect();
            assert_eq!(seen, ["unavailable", "ready"], "{room}");
        }
        assert!(
            states.iter().all(|(c, _)| victim_rooms.contains(&c)),
            "only the dead worker's rooms were affected: {states:?}"
        );
    }
    println!(
        "static worker down: {} acknowledged, {refused} refused (its {} rooms), 0 lost",
        acked.values().map(Vec::len).sum::<usize>(),
        victim_rooms.len()
    );
}

/// A partial partition in a static cluster: edge A's packets to one worker
/// are dropped (iptables, A runs as nobody) while edge B still reaches it.
/// Nothing fails over, so nothing splits: A's publishes to that worker's
/// rooms answer 503 and A's sockets there are told the rooms are
/// unavailable; B's publishes keep flowing; once the cut heals A's rooms
/// are ready again. Every publish answered 200 reached every socket that
/// was not told its room was unavailable, once, in order.
///
/// B may be refused in one window only: a publish through B to the cut
/// worker's rooms is acknowledged once A confirmed it too or A's link is
/// given up (docs/LINK.md "Link lease"), so one B sent while the worker
/// still waits for A — between the cut and A's lease running out — may
/// outlast the API's 1 s and be answered 503, never 200 for what A's
/// sockets missed. On a loaded machine that window's edge reaches past 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_partial_partition_refuses_on_the_cut_edge_and_splits_nothing() {
    let _serial = SERIAL.lock().await;
    use herdgate_testkit::cluster::{check, end_all, publisher, reader, Cut, Ledger};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let workers: Vec<Herdgate> = (0..3).map(|_| worker("127.0.0.1:0")).collect();
    let links: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let edges = [edge_as(&links, true, "250ms"), edge(&links)];
    let rooms: Arc<Vec<String>> = Arc::new((0..12).map(|i| format!("room-{i}")).collect());
    let w1 = owner_of(&links, &rooms[0]);
    let w1_port: u16 = w1.rsplit(':').next().unwrap().parse().unwrap();
    let w1_rooms: Vec<String> = rooms
        .iter()
        .filter(|r| owner_of(&links, r) == w1)
        .cloned()
        .collect();
    let mut readers = Vec::new();
    for e in &edges {
        readers.push(reader(url(e), rooms.clone()).await);
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let pubs: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| {
            tokio::spawn(publisher(
                api(e),
                i,
                rooms.clone(),
                stop.clone(),
                Duration::from_millis(10),
                ledger.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut_at;
    let lost_at;
    {
        cut_at = std::time::Instant::now();
        let _cut = Cut::new(w1_port);
        wait_log(&edges[0], "worker link lost");
        lost_at = std::time::Instant::now();
        // Past the worker's edge lease (2 s): it drops A's registrations.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    wait_log(&edges[0], "worker link up");
    // A's rooms take publishes again.
    let probe = json!({"name":"probe","channel":w1_rooms[0],"data":""}).to_string();
    let deadline = std::time::Instant::now() + WAIT;
    while api(&edges[0])
        .request("POST", "/events", &[], &probe)
        .await
        .status
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "A's rooms never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        p.await.unwrap();
    }
    end_all(&api(&edges[1]), &rooms).await;
    let mut inboxes = Vec::new();
    for r in readers {
        let inbox = r.finish(Duration::from_secs(5)).await;
        assert_eq!(inbox.closed, None, "no reader socket was closed");
        inboxes.push(inbox);
    }
    let ledger = ledger.lock().unwrap();
    let v = check(&ledger, &inboxes);
    println!("static partial partition: {v:?}");
    assert_eq!((v.lost, v.duplicates, v.reordered), (0, 0, 0), "{v:?}");
    // The worker lets A go at most a few heartbeats after A gave up the
    // link (its FIN, or silence): half a second covers that on a busy host.
    let window = cut_at..lost_at + Duration::from_millis(500);
    let refused_b: Vec<_> = ledger
        .refused
        .iter()
        .zip(&ledger.refused_sent)
        .filter(|(r, _)| r.1 == 1)
        .collect();
    assert!(
        refused_b
            .iter()
            .all(|(r, sent)| window.contains(*sent) && w1_rooms.contains(&r.0) && r.3 == 503),
        "B, which reaches every worker, was refused only while the worker waited for A, \
         for the cut worker's rooms, with 503: {refused_b:?} (A gave the link up {:?} after the cut)",
        lost_at - cut_at
    );
    println!(
        "B refused {} publishes while the worker waited for A",
        refused_b.len()
    );
    let refused_a: Vec<_> = ledger.refused.iter().filter(|r| r.1 == 0).collect();
    assert!(
        !refused_a.is_empty(),
        "A's publishes to the cut worker's rooms were refused"
    );
    assert!(
        refused_a
            .iter()
            .all(|r| w1_rooms.contains(&r.0) && r.3 == 503),
        "A refused only the cut worker's rooms, with 503: {refused_a:?}"
    );
    let b_to_w1 = ledger
        .acked
        .iter()
        .filter(|a| a.1 == 1 && w1_rooms.contains(&a.0))
        .count();
    assert!(
        b_to_w1 > 0,
        "B's publishes to the cut worker's rooms were accepted"
    );
    // Only A's sockets in the cut worker's rooms were told anything.
    assert!(
        inboxes[1].states.is_empty(),
        "B's sockets: {:?}",
        inboxes[1].states
    );
    for room in &w1_rooms {
        assert_eq!(
            inboxes[0].states.get(room).map(Vec::as_slice),
            Some(&["unavailable".to_string(), "ready".to_string()][..]),
            "{room}"
        );
    }
    drop(workers);
}

/// `GET /channels` over 50,000 occupied channels: each worker answers in
/// pages under the link's frame limit, the edge merges them, and the links
/// stay up (a reply over the limit used to tear the link down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_channels_are_listed_in_pages() {
    let _serial = SERIAL.lock().await;
    // Links heartbeating every second: 50,000 subscriptions from a debug
    // build on two shared cores must not read as a dead link.
    let workers: Vec<Herdgate> = (0..3).map(|_| worker("127.0.0.1:0")).collect();
    let links: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let e = &edge_as(&links, false, "1s");
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(Client::connect(&url(e)).await);
    }
    let subscribing: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut cl)| {
            tokio::spawn(async move {
                for j in 0..100 {
                    let ev = cl.subscribe(&format!("many-{i:03}-{j:02}")).await;
                    assert_eq!(
                        ev.event, "pusher_internal:subscription_succeeded",
                        "{:?}",
                        ev.raw
                    );
                }
                cl
            })
        })
        .collect();
    let mut clients = Vec::new();
    for s in subscribing {
        clients.push(s.await.unwrap());
    }
    let r = api(e).request("GET", "/channels", &[], "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let listed = r.body["channels"].as_object().unwrap();
    assert_eq!(listed.len(), 50_000);
    assert!(listed.contains_key("many-000-00") && listed.contains_key("many-499-99"));
    let r = api(e)
        .request(
            "GET",
            "/channels",
            &[
                ("filter_by_prefix", "many-123-"),
                ("info", "subscription_count"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let listed = r.body["channels"].as_object().unwrap();
    assert_eq!(listed.len(), 100);
    assert!(
        listed.values().all(|v| v["subscription_count"] == 1),
        "{listed:?}"
    );
    // The links survived.
    let mut probe = clients.swap_remove(0);
    api(e)
        .publish("many-000-07", "after-list", "{}", None)
        .await;
    assert_eq!(
        probe.expect("after-list").await.channel.as_deref(),
        Some("many-000-07")
    );
    while let Ok(line) = e.log.try_recv() {
        assert!(!line.contains("worker link lost"), "a link broke: {line}");
    }
}

/// Kill -9 an edge: its users leave presence within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edge_leaves_no_ghost_users() {
    let _serial = SERIAL.lock().await;
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
        took < Duration::from_secs(5),
        "member_removed after {took:?} (lease 2 s + link timeout)"
    );
    println!("edge kill: member_removed after {took:?}");
    let r = api(&c.edges[0])
        .request("GET", "/channels/presence-hall/users", &[], "")
        .await;
    assert_eq!(r.body, json!({"users":[{"id":"alice"}]}));
}

/// A static worker list changes only with a restart of every edge at once:
/// a SIGHUP with another list is reported and changes nothing (edges that
/// disagreed during a rolling change would route a room to two owners).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_worker_list_is_not_reloaded_live() {
    let _serial = SERIAL.lock().await;
    let workers: Vec<Herdgate> = (0..2).map(|_| worker("127.0.0.1:0")).collect();
    let links: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let e = edge(&links[..1]);
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    std::fs::write(
        &e.config_path,
        text.replace(
            &format!("[{:?}]", links[0]),
            &format!("[{:?}, {:?}]", links[0], links[1]),
        ),
    )
    .unwrap();
    e.signal(libc::SIGHUP);
    let line = wait_log(&e, "config reloaded");
    assert!(line.contains("cluster.workers"), "{line}");
    let mut cl = Client::connect(&url(&e)).await;
    cl.subscribe("room-1").await;
    api(&e).publish("room-1", "ping", "x", None).await;
    assert_eq!(cl.expect("ping").await.raw["data"], "x");
}

/// The link without TLS needs the cluster secret: a worker refuses an edge
/// with another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_without_the_secret_is_refused() {
    let _serial = SERIAL.lock().await;
    let w = worker("127.0.0.1:0");
    let _stray = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nworkers = [{:?}]\nheartbeat_interval = \"100ms\"\nsecret = \"not-the-cluster-secret-at-all\"\n{APPS}",
        w.addr
    ));
    wait_log(&w, "bad proof of the cluster secret");
}

/// The link as mutually authenticated TLS: nodes with certificates from the
/// cluster CA talk; a node without one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_the_link() {
    let _serial = SERIAL.lock().await;
    let pki = herdgate_testkit::pki::Pki::new();
    let (wc, wk, _) = pki.leaf("worker", false);
    let (ec, ek, _) = pki.leaf_named("edge", &["edge-1"]);
    let (oc, ok, _) = pki.leaf_named("other", &["edge-2"]);
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
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nnode_id = \"edge-1\"\nworkers = [{:?}]\nheartbeat_interval = \"100ms\"\n{}{APPS}",
        w.addr,
        section(&ec, &ek)
    ));
    wait_log(&e, "worker link up");
    // A certificate of the same CA that names another edge cannot claim
    // this one's id (which would replace its link).
    let _impostor = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nnode_id = \"edge-1\"\nworkers = [{:?}]\nheartbeat_interval = \"100ms\"\n{}{APPS}",
        w.addr,
        section(&oc, &ok)
    ));
    wait_log(&w, "does not name it");
    let mut a = Client::connect(&url(&e)).await;
    a.subscribe("secure-room").await;
    api(&e).publish("secure-room", "e", "over mTLS", None).await;
    assert_eq!(a.expect("e").await.raw["data"], "over mTLS");
    // The real edge's link was never replaced: it still delivers.
    api(&e).publish("secure-room", "e", "still", None).await;
    assert_eq!(a.expect("e").await.raw["data"], "still");

    // An edge with no certificate gets no link.
    let _plain = edge_without_wait(&w.addr);
    wait_log(&w, "link TLS handshake refused");
}

fn edge_without_wait(worker: &str) -> Herdgate {
    Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nworkers = [{worker:?}]\nheartbeat_interval = \"100ms\"\nsecret = \"{SECRET_LINK}\"\n{APPS}"
    ))
}

/// A watch made while the watched user's owner is down reaches it when
/// its link comes back (`Restore`), and the owner then tells the watcher
/// the current state: the first state is late, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_made_while_its_owner_is_down_gets_its_state_on_return() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster();
    let user_room = |u: &str| format!("#server-to-user-{u}");
    let victim_link = owner_of(&c.links, &user_room("bob"));
    let victim = c.links.iter().position(|l| *l == victim_link).unwrap();
    // A watcher whose own sign-in is owned elsewhere, so that it succeeds.
    let alice = (0..)
        .map(|i| format!("alice-{i}"))
        .find(|a| owner_of(&c.links, &user_room(a)) != victim_link)
        .unwrap();
    let _ = c.workers[victim].child.kill();
    let _ = c.workers[victim].child.wait();
    for e in &c.edges {
        wait_log(e, "worker link lost");
    }
    let mut w = Client::connect(&url(&c.edges[0])).await;
    let user_data = json!({"id": alice, "watchlist": ["bob"]}).to_string();
    let auth = pusher_sign::signin_auth(KEY, SECRET, &w.socket_id, &user_data);
    w.send(json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}}))
        .await;
    w.expect("pusher:signin_success").await;

    c.workers[victim] = worker(&victim_link);
    for e in &c.edges {
        wait_log(e, "worker link up");
    }
    let first = w.expect("pusher_internal:watchlist_events").await;
    assert_eq!(
        first.data["events"],
        json!([{"name": "offline", "user_ids": ["bob"]}]),
        "{:?}",
        first.raw
    );
    let mut bob = Client::connect(&url(&c.edges[1])).await;
    bob.signin("bob").await;
    let online = w.expect("pusher_internal:watchlist_events").await;
    assert_eq!(
        online.data["events"],
        json!([{"name": "online", "user_ids": ["bob"]}])
    );
}
