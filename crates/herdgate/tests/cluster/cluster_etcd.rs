//! The cluster on etcd, as real processes on loopback with a real etcd:
//! every scenario runs a publish stream through both edges into rooms with
//! readers on both edges, does something to the cluster, and then the
//! external checker (`herdgate_testkit::cluster::check`) decides: every
//! publish answered 200 reached every reader exactly once, in its
//! publisher's order.
//!
//! Scenarios run one at a time (they share the machine's two cores and
//! judge timings against leases).

use herdgate_testkit::cluster::*;
use herdgate_testkit::process::Herdgate;
use herdgate_testkit::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    crate::SERIAL.blocking_lock()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn rooms(n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("room-{i}")).collect())
}

/// Where a stream publishes and reads: each running edge's API and URL.
struct Edges {
    apis: Vec<(usize, Api)>,
    urls: Vec<String>,
}

fn edges(c: &Cluster) -> Edges {
    let running: Vec<usize> = (0..c.edges.len())
        .filter(|e| c.edges[*e].is_some())
        .collect();
    Edges {
        apis: running.iter().map(|e| (*e, c.api(*e))).collect(),
        urls: running.iter().map(|e| c.url(*e)).collect(),
    }
}

/// Readers on every edge, a publisher per edge; `during` runs while they
/// do. Returns the verdict (printed with `name`), after asserting nothing
/// acknowledged was lost, duplicated or reordered.
async fn under_stream<Fut>(
    edges: Edges,
    name: &str,
    rooms: Arc<Vec<String>>,
    during: Fut,
) -> Verdict
where
    Fut: std::future::Future<Output = ()>,
{
    under_stream_with(edges, name, rooms, 1, during).await
}

/// [`under_stream`] with `per_edge` readers on every edge, each subscribed
/// to every room.
async fn under_stream_with<Fut>(
    edges: Edges,
    name: &str,
    rooms: Arc<Vec<String>>,
    per_edge: usize,
    during: Fut,
) -> Verdict
where
    Fut: std::future::Future<Output = ()>,
{
    under_stream_load(edges, name, rooms, per_edge, |_| during).await
}

/// The publish stream of a scenario: what the publishers were answered,
/// and the publishers themselves — one per edge from the start, and any
/// a scenario adds while it runs (more load), each stoppable on its own.
struct Stream {
    ledger: Arc<Mutex<Ledger>>,
    rooms: Arc<Vec<String>>,
    publishers: Mutex<Vec<Publisher>>,
}

/// A running publisher: its id, its stop flag, its task (until stopped and awaited).
type Publisher = (usize, Arc<AtomicBool>, Option<tokio::task::JoinHandle<()>>);

impl Stream {
    /// Start publisher `id` (its events are ordered by `id`'s sequence)
    /// through `api`, `pace` apart, into the ledger.
    fn publish(&self, id: usize, api: Api, pace: Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(publisher(
            api,
            id,
            self.rooms.clone(),
            stop.clone(),
            pace,
            self.ledger.clone(),
        ));
        self.publishers.lock().unwrap().push((id, stop, Some(task)));
    }

    /// Stop the publishers `which` picks and wait until each has had its
    /// last answer (none is left with a request in flight).
    async fn stop(&self, which: impl Fn(usize) -> bool) {
        let tasks: Vec<_> = self
            .publishers
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|(id, ..)| which(*id))
            .filter_map(|(_, stop, task)| {
                stop.store(true, Ordering::Relaxed);
                task.take()
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

/// [`under_stream_with`], `during` given the stream so that it can add
/// and stop publishers.
async fn under_stream_load<F, Fut>(
    edges: Edges,
    name: &str,
    rooms: Arc<Vec<String>>,
    per_edge: usize,
    during: F,
) -> Verdict
where
    F: FnOnce(Arc<Stream>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut joining = Vec::new();
    for url in &edges.urls {
        for _ in 0..per_edge {
            joining.push(tokio::spawn(reader(url.clone(), rooms.clone())));
        }
    }
    let mut readers = Vec::new();
    for r in joining {
        readers.push(r.await.unwrap());
    }
    let stream = Arc::new(Stream {
        ledger: Arc::new(Mutex::new(Ledger::default())),
        rooms: rooms.clone(),
        publishers: Mutex::new(Vec::new()),
    });
    // `HERDGATE_TEST_PUBLISHERS` sequential publishers per edge (default
    // 1), each its own order: more make the stream denser.
    let per_edge_pubs: usize = std::env::var("HERDGATE_TEST_PUBLISHERS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(1);
    for (e, api) in &edges.apis {
        for k in 0..per_edge_pubs {
            stream.publish(e * 100 + k, api.clone(), Duration::from_millis(10));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    during(stream.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.stop(|_| true).await;
    let t = Instant::now();
    end_all(&edges.apis[0].1, &rooms).await;
    println!("{name}: end_all took {:?}", t.elapsed());
    let mut inboxes = Vec::new();
    for r in readers {
        let inbox = r.finish(Duration::from_secs(5)).await;
        assert_eq!(inbox.closed, None, "no reader socket was closed");
        inboxes.push(inbox);
    }
    let ledger = stream.ledger.lock().unwrap();
    let v = check(&ledger, &inboxes);
    println!("{name}: {v:?}");
    assert_eq!(v.lost, 0, "{name}: acknowledged publishes lost");
    assert_eq!(v.duplicates, 0, "{name}: duplicates");
    assert_eq!(v.reordered, 0, "{name}: reordered");
    if v.excused > 0 {
        println!(
            "{name}: {} acknowledged publishes missed by sockets told their room was unavailable",
            v.excused
        );
    }
    assert!(v.acked > 0, "{name}: something was acknowledged");
    v
}

/// Publish a probe to `room` through `api` until it is accepted; how long that took.
async fn until_accepted(api: &Api, room: &str, since: Instant) -> Duration {
    let body = json!({"name":"probe","channel":room,"data":""}).to_string();
    loop {
        if api.request("POST", "/events", &[], &body).await.status == 200 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < WAIT * 2,
            "{room} never accepted publishes again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn steady_state_loses_nothing_and_refuses_nothing() {
    let _g = serial();
    let c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let v = rt.block_on(under_stream(edges(&c), "steady state", rooms(30), async {
        tokio::time::sleep(Duration::from_secs(2)).await
    }));
    assert_eq!(v.refused, 0, "nothing refused in steady state");
    // Every node holds the same revision.
    let revs: Vec<u64> = (0..2)
        .map(|e| c.edge_status(e)["rev"].as_u64().unwrap())
        .collect();
    let wrevs: Vec<u64> = (0..3)
        .map(|w| status_of(c.worker(w))["cluster"]["rev"].as_u64().unwrap())
        .collect();
    assert!(
        revs.iter().chain(&wrevs).all(|r| *r == revs[0]),
        "{revs:?} {wrevs:?}"
    );
}

/// kill -9 the owner of a room, again and again under one publish stream
/// (3 times here, `HERDGATE_TEST_KILLS=20` for the measurement in
/// docs/CLUSTER.md), restarting it with the same id between kills.
#[test]
fn a_killed_worker_fails_over_through_etcd_without_loss_again_and_again() {
    let _g = serial();
    let kills: usize = std::env::var("HERDGATE_TEST_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3);
    let mut c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let rooms = rooms(30);
    let e = edges(&c);
    let api = c.api(0);
    let mut rehomes = Vec::new();
    let r = rooms.clone();
    let mut moved_rooms: Vec<String> = Vec::new();
    let v = rt.block_on(under_stream(
        e,
        "kill -9 a worker, repeatedly",
        rooms.clone(),
        async {
            for k in 0..kills {
                let room = &r[k % r.len()];
                let victim = tokio::task::block_in_place(|| c.owner(0, room));
                moved_rooms.extend(tokio::task::block_in_place(|| {
                    r.iter()
                        .filter(|x| c.owner(0, x) == victim)
                        .cloned()
                        .collect::<Vec<_>>()
                }));
                let killed = Instant::now();
                c.kill_worker(victim);
                rehomes.push(until_accepted(&api, room, killed).await);
                let now = tokio::task::block_in_place(|| c.owner(0, room));
                assert_ne!(now, victim, "the room moved");
                tokio::task::block_in_place(|| {
                    let w = c.spawn_worker(victim, "");
                    w.wait_log("registered in etcd", WAIT);
                    c.workers[victim] = Some(w);
                    c.wait_settled(3);
                });
            }
        },
    ));
    rehomes.sort();
    println!(
        "kill -9: {:.2} publishes refused per moved room and kill",
        v.refused_per_room(&rooms) * rooms.len() as f64 / moved_rooms.len().max(1) as f64
    );
    println!(
        "re-home after kill -9 over {kills} kills: p50 {:?}, max {:?}, all {rehomes:?}",
        rehomes[rehomes.len() / 2],
        rehomes[rehomes.len() - 1]
    );
}

/// More registrations than a link queue ever held in frames (65,536) move
/// at once: 700 sockets × 100 rooms, every room on the worker that is
/// killed. Each registration is an awaited send, so none is dropped.
#[test]
fn seventy_thousand_registrations_move_at_once() {
    let _g = serial();
    let mut c = Cluster::start(1, 2, 1);
    let victim = c.owner(0, "big-0");
    let rooms: Arc<Vec<String>> = Arc::new(
        (0..)
            .map(|i| format!("big-{i}"))
            .filter(|r| c.owner(0, r) == victim)
            .take(100)
            .collect(),
    );
    let rt = runtime();
    let e = edges(&c);
    let api = c.api(0);
    let r = rooms.clone();
    let v = rt.block_on(under_stream_with(
        e,
        "70,000 registrations moved",
        rooms.clone(),
        700,
        async {
            let counters = |c: &Cluster| {
                tokio::task::block_in_place(|| {
                    let e = c.edge(0);
                    (
                        metric(e, "herdgate_room_moves_total"),
                        metric(e, "herdgate_registrations_moved_total"),
                    )
                })
            };
            let (moves, regs) = counters(&c);
            let killed = Instant::now();
            c.kill_worker(victim);
            let rehome = until_accepted(&api, &r[99], killed).await;
            println!("70,000 registrations: the last room took publishes after {rehome:?}");
            let (moves_after, regs_after) = counters(&c);
            assert!(
                moves_after - moves >= 100.0,
                "every room moved: {}",
                moves_after - moves
            );
            assert!(
                regs_after - regs >= 70_000.0,
                "every registration moved: {}",
                regs_after - regs
            );
        },
    ));
    assert_eq!(v.readers, 700);
}

/// Every worker's membership digest (equal before and after: nothing
/// joined, left or restarted).
fn membership(c: &Cluster) -> Vec<Value> {
    (0..3)
        .map(|w| {
            let d = status_of(c.worker(w))["cluster"]["digest"].clone();
            assert!(d.is_string(), "worker {w} reports a digest: {d}");
            d
        })
        .collect()
}

#[test]
fn a_stopped_worker_is_fenced_and_never_serves_a_room_it_lost() {
    let _g = serial();
    let c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let rooms = rooms(30);
    let victim = c.owner(0, &rooms[0]);
    let pid = c.worker(victim).pid();
    let api = c.api(0);
    let e = edges(&c);
    rt.block_on(under_stream(
        e,
        "SIGSTOP a worker for 2 x lease",
        rooms.clone(),
        async {
            // SAFETY: kill(2) on a child of this test.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            let stopped = Instant::now();
            until_accepted(&api, &rooms[0], stopped).await;
            tokio::time::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed())).await;
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    ));
    // It knew it was fenced, and came back as a new incarnation with rooms.
    let w = c.worker(victim);
    w.wait_log("lease lost", WAIT);
    c.wait_settled(3);
    if std::env::var_os("HERDGATE_TEST_LOGS").is_some() {
        while let Ok(l) = w.log.recv_timeout(Duration::from_millis(500)) {
            println!("W: {l}");
        }
        for e in 0..2 {
            while let Ok(l) = c.edge(e).log.try_recv() {
                println!("e{e}: {l}");
            }
        }
    }
    let fenced = metric(c.edge(0), "herdgate_deliver_fenced_total")
        + metric(c.edge(1), "herdgate_deliver_fenced_total");
    println!("SIGSTOP: deliveries fenced at the edges after the resume: {fenced}");
}

#[test]
fn a_partial_partition_moves_nothing_and_only_the_cut_edge_refuses() {
    let _g = serial();
    // Edge 0 runs as nobody so that its packets to one worker can be dropped.
    let c = Cluster::start_with(1, 3, 2, Some(0));
    let rt = runtime();
    let rooms = rooms(30);
    let w1 = c.owner(0, &rooms[0]);
    let w1_rooms: Vec<String> = rooms
        .iter()
        .filter(|r| c.owner(0, r) == w1)
        .cloned()
        .collect();
    // The membership, not its revision: a node that re-lists after a slow
    // watch writes its own key again (same value) so all meet at one
    // revision, which is not a change.
    let before = membership(&c);
    let (api_a, api_b) = (c.api(0), c.api(1));
    let port = link_port(c.worker(w1));
    let e = edges(&c);
    let mut a_refused = 0;
    let mut b_ok = 0;
    let mut retry_after = true;
    rt.block_on(under_stream(
        e,
        "partial partition A-W1",
        rooms.clone(),
        async {
            let cut = Cut::new(port);
            // A notices after three missed heartbeats; give it a moment.
            tokio::time::sleep(Duration::from_millis(800)).await;
            for i in 0..40 {
                let room = &w1_rooms[i % w1_rooms.len()];
                let body = json!({"name":"probe","channel":room,"data":""}).to_string();
                let r = api_a.request("POST", "/events", &[], &body).await;
                if r.status == 503 {
                    a_refused += 1;
                    retry_after &= r.headers.contains_key("retry-after");
                }
                if api_b.request("POST", "/events", &[], &body).await.status == 200 {
                    b_ok += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(cut);
            // A's link comes back; its rooms are ready again.
            until_accepted(&api_a, &w1_rooms[0], Instant::now()).await;
        },
    ));
    assert!(
        a_refused >= 30,
        "A's publishes to W1's rooms were refused: {a_refused}/40"
    );
    assert!(retry_after, "with Retry-After");
    assert!(
        b_ok >= 30,
        "B's publishes to W1's rooms were accepted: {b_ok}/40"
    );
    assert_eq!(
        before,
        membership(&c),
        "the membership did not change: nothing moved"
    );
    assert_eq!(
        metric(c.worker(w1), "herdgate_room_moves_total"),
        0.0,
        "no room moved away from W1"
    );
}

/// How many times to run each one-way partition scenario
/// (`HERDGATE_TEST_RUNS`, default 1; the closing figures use 10 and 20).
fn runs() -> usize {
    std::env::var("HERDGATE_TEST_RUNS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(1)
}

/// One direction of the link between edge A (index 0) and the owner W1 of
/// `rooms[0]` is cut for `hold`, under a publish stream through both
/// edges; `cut` makes the cuts, called every 100 ms while the partition
/// lasts (to cut new connections too). The checker (timed) then requires
/// every 200 to have reached every socket, unless that socket was told
/// `unavailable` before the 200. Returns the verdict.
fn one_way_partition(
    name: &str,
    nobody_edge: bool,
    hold: Duration,
    cut: impl Fn(&Cluster, usize, &mut Vec<Cut>),
) -> Verdict {
    let c = Cluster::start_with(1, 3, 2, nobody_edge.then_some(0));
    let rt = runtime();
    let rooms = rooms(30);
    let w1 = c.owner(0, &rooms[0]);
    let before = membership(&c);
    let e = edges(&c);
    let api_a = c.api(0);
    let v = rt.block_on(under_stream(e, name, rooms.clone(), async {
        let mut cuts = Vec::new();
        let until = Instant::now() + hold;
        while Instant::now() < until {
            tokio::task::block_in_place(|| cut(&c, w1, &mut cuts));
            // Polled: a new connection has no event the test can await.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(cuts);
        // A's link comes back; its rooms on W1 take publishes again.
        until_accepted(&api_a, &rooms[0], Instant::now()).await;
    }));
    assert_eq!(before, membership(&c), "{name}: nothing moved");
    assert!(
        v.excused > 0,
        "{name}: A's sockets were told `unavailable` while publishes through B were acknowledged"
    );
    v
}

/// The scenario: edge A's packets to W1's link port are dropped
/// (iptables owner match; W1's packets to A still arrive). Before the
/// link lease, W1 gave A up after three silent heartbeats and acknowledged
/// publishes without it while A, still reading W1's frames, had not told
/// its sockets: 3 acknowledged publishes lost per run. Now A's lease needs
/// W1's echo of A's own heartbeats: it runs out first.
#[test]
fn a_one_way_cut_from_edge_to_worker_acknowledges_nothing_the_edge_missed() {
    let _g = serial();
    for run in 0..runs() {
        let v = one_way_partition(
            &format!("one-way cut A -> W1, run {run}"),
            true,
            Duration::from_secs(8),
            |c, w1, cuts| {
                if cuts.is_empty() {
                    cuts.push(Cut::new(link_port(c.worker(w1))));
                }
            },
        );
        println!(
            "A -> W1 cut, run {run}: acked {} lost {} excused {}",
            v.acked, v.lost, v.excused
        );
    }
}

/// The reverse: W1's packets to edge A (on A's link connection) are
/// dropped; A's packets, heartbeats included, still reach W1. A hears
/// nothing back, so its lease runs out and it tells its sockets; W1 keeps
/// waiting for A's receipts (503) until A's side closes.
#[test]
fn a_one_way_cut_from_worker_to_edge_acknowledges_nothing_the_edge_missed() {
    let _g = serial();
    for run in 0..runs() {
        let v = one_way_partition(
            &format!("one-way cut W1 -> A, run {run}"),
            false,
            Duration::from_secs(8),
            |c, w1, cuts| {
                // Every connection A makes to W1, as it appears.
                let port = link_port(c.worker(w1));
                for flow in connections_to(c.edge(0).pid(), port) {
                    if !cuts.iter().any(|c| c.is_flow(port, flow)) {
                        cuts.push(Cut::flow(port, flow));
                    }
                }
                assert!(!cuts.is_empty(), "A has a link to W1");
            },
        );
        println!(
            "W1 -> A cut, run {run}: acked {} lost {} excused {}",
            v.acked, v.lost, v.excused
        );
    }
}

/// A link delayed one way past the lease: W3 is reached through a relay
/// that holds one direction of edge A's connection for 2 s (the lease is
/// 300 ms), then lets it go on, late. Worker → edge held: A hears no echo,
/// tells its sockets and closes. Edge → worker held: W3 hears nothing from
/// A (its heartbeats, then its close, are late) and holds its
/// acknowledgements until A's lease has surely run out. Either way the
/// checker (timed) finds nothing lost.
#[test]
fn a_link_delayed_past_the_lease_acknowledges_nothing_the_edge_missed() {
    use herdgate_testkit::relay::Way;
    let _g = serial();
    for way in [Way::Down, Way::Up] {
        for run in 0..runs() {
            let mut c = Cluster::start(1, 2, 2);
            let (w3, relay) = c.spawn_worker_behind_relay(2);
            w3.wait_log("registered in etcd", WAIT);
            c.workers.push(Some(w3));
            c.wait_settled(3);
            let owned: Vec<String> = (0..)
                .map(|i| format!("relayed-{i}"))
                .filter(|r| c.owner(0, r) == 2)
                .take(10)
                .collect();
            let rooms = Arc::new(
                owned
                    .iter()
                    .cloned()
                    .chain((0..10).map(|i| format!("room-{i}")))
                    .collect::<Vec<_>>(),
            );
            let rt = runtime();
            let e = edges(&c);
            let api_a = c.api(0);
            let name = format!("{way:?} delayed 2 s on A's link to W3, run {run}");
            let v = rt.block_on(under_stream(e, &name, rooms.clone(), async {
                let port = relay.addr().port();
                let flows = tokio::task::block_in_place(|| connections_to(c.edge(0).pid(), port));
                assert_eq!(flows.len(), 1, "A has one link to W3: {flows:?}");
                relay.stall(flows[0], way);
                tokio::time::sleep(Duration::from_secs(2)).await;
                relay.unstall(flows[0], way);
                until_accepted(&api_a, &rooms[0], Instant::now()).await;
            }));
            println!(
                "{way:?} delay, run {run}: acked {} lost {} excused {}",
                v.acked, v.lost, v.excused
            );
            if way == Way::Down {
                // A missed what W3 sent meanwhile, and was told first.
                assert!(
                    v.excused > 0,
                    "A's sockets were told while B's publishes were acknowledged"
                );
            }
        }
    }
}

/// Whole-process faults chained under one publish stream through both
/// edges (40 rooms): SIGSTOP a worker past its lease, SIGCONT, start a 4th
/// worker (scale-out), then kill -9 another. Run it `HERDGATE_TEST_RUNS`
/// times (20 for the closing figures, once with a core kept busy).
#[test]
fn a_chain_of_faults_loses_nothing() {
    let _g = serial();
    for run in 0..runs() {
        let mut c = Cluster::start(1, 3, 2);
        let rt = runtime();
        let rooms = rooms(40);
        let e = edges(&c);
        let api = c.api(0);
        let r = rooms.clone();
        let name = format!("chained faults, run {run}");
        let v = rt.block_on(under_stream(e, &name, rooms.clone(), async {
            // 1. SIGSTOP the owner of a room past its lease, then SIGCONT.
            let stopped_worker = tokio::task::block_in_place(|| c.owner(0, &r[0]));
            let pid = c.worker(stopped_worker).pid();
            // SAFETY: kill(2) on a child of this test.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            let stopped = Instant::now();
            until_accepted(&api, &r[0], stopped).await;
            tokio::time::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed())).await;
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            tokio::task::block_in_place(|| {
                c.worker(stopped_worker).wait_log("lease lost", WAIT);
                c.wait_settled(3);
            });
            // 2. Scale out: a 4th worker joins.
            tokio::task::block_in_place(|| {
                let w = c.spawn_worker(3, "");
                w.wait_log("registered in etcd", WAIT);
                c.workers.push(Some(w));
                c.wait_settled(4);
            });
            // 3. kill -9 the owner of another room (not the one stopped).
            let room = r
                .iter()
                .find(|x| tokio::task::block_in_place(|| c.owner(0, x)) != stopped_worker)
                .expect("a room elsewhere")
                .clone();
            let victim = tokio::task::block_in_place(|| c.owner(0, &room));
            let killed = Instant::now();
            c.kill_worker(victim);
            until_accepted(&api, &room, killed).await;
        }));
        println!(
            "chained faults, run {run}: acked {} lost {} excused {} refused {}",
            v.acked, v.lost, v.excused, v.refused
        );
    }
}

#[test]
fn a_worker_cut_from_etcd_fences_itself_and_its_rooms_move() {
    let _g = serial();
    let mut c = Cluster::start(1, 2, 2);
    let relay = herdgate_testkit::relay::Relay::start(c.etcd.client_addr(0));
    c.workers.push(Some(
        c.spawn_worker_via(2, &[format!("http://{}", relay.addr())]),
    ));
    c.wait_settled(3);
    let rt = runtime();
    let rooms = rooms(30);
    let Some(victim_room) = rooms.iter().find(|r| c.owner(0, r) == 2).cloned() else {
        panic!("w3 owns none of the rooms");
    };
    let api = c.api(1);
    let e = edges(&c);
    let mut fenced_after = Duration::ZERO;
    let w3 = c.workers[2].take().unwrap();
    rt.block_on(under_stream(
        e,
        "worker cut from etcd",
        rooms.clone(),
        async {
            relay.set(herdgate_testkit::relay::Mode::Blackhole);
            let cut = Instant::now();
            tokio::task::block_in_place(|| {
                eventually("w3 fenced", WAIT, || {
                    status_of(&w3)["cluster"]["fenced"] == true
                })
            });
            fenced_after = cut.elapsed();
            until_accepted(&api, &victim_room, cut).await;
            relay.set(herdgate_testkit::relay::Mode::Pass);
        },
    ));
    println!("cut from etcd: fenced {fenced_after:?} after the cut (lease 2 s, margin 0.5 s)");
    assert!(
        fenced_after < Duration::from_millis(2500),
        "fenced before its lease could expire"
    );
    c.workers[2] = Some(w3);
    c.wait_settled(3);
}

#[test]
fn scale_out_moves_rooms_only_into_the_new_worker_in_steps() {
    let _g = serial();
    let mut c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let rooms = rooms(60);
    let before: Vec<usize> = rooms.iter().map(|r| c.owner(0, r)).collect();
    let e = edges(&c);
    let mut w4 = None;
    let v = rt.block_on(under_stream(e, "scale-out 3 -> 4", rooms.clone(), async {
        w4 = Some(tokio::task::block_in_place(|| {
            Herdgate::start(&with_ramp(
                &worker_toml(&worker_name(3), &c.endpoints, ""),
                4,
                "400ms",
            ))
        }));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }));
    c.workers.push(w4);
    c.wait_settled(4);
    let after: Vec<usize> = rooms.iter().map(|r| c.owner(0, r)).collect();
    let moved: Vec<usize> = (0..rooms.len())
        .filter(|i| before[*i] != after[*i])
        .collect();
    assert!(
        moved.iter().all(|i| after[*i] == 3),
        "rooms moved only into the new worker"
    );
    let moved_names: Vec<String> = moved.iter().map(|i| rooms[*i].clone()).collect();
    // Rooms moved per view the edge applied (one per ramp step).
    let steps: Vec<String> = std::iter::from_fn(|| c.edge(0).log.try_recv().ok())
        .inspect(|l| {
            if std::env::var_os("HERDGATE_TEST_LOGS").is_some() {
                println!("e1: {l}")
            }
        })
        .filter(|l| l.contains("view applied"))
        .filter_map(|l| {
            let n = l
                .split("rooms_moved=")
                .nth(1)?
                .split([' ', ','])
                .next()?
                .to_string();
            (n != "0").then_some(n)
        })
        .collect();
    println!(
        "scale-out: {} of {} rooms moved, all to w4, in steps {steps:?}; {:.2} publishes refused per moved room",
        moved.len(),
        rooms.len(),
        v.refused_per_room(&moved_names)
    );
    assert!(!moved.is_empty() && moved.len() < rooms.len() / 2);
    assert!(steps.len() >= 2, "in steps: {steps:?}");
}

#[test]
fn scale_in_by_sigterm_hands_rooms_over_and_leaves() {
    let _g = serial();
    let mut c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let rooms = rooms(30);
    let e = edges(&c);
    let theirs: Vec<String> = rooms
        .iter()
        .filter(|r| c.owner(0, r) == 2)
        .cloned()
        .collect();
    let mut leaving = c.workers[2].take().unwrap();
    let (status, v) = rt.block_on(async {
        let mut status = None;
        let v = under_stream(e, "scale-in by SIGTERM", rooms.clone(), async {
            leaving.signal(libc::SIGTERM);
            status = leaving.wait_exit(WAIT).await;
        })
        .await;
        (status, v)
    });
    println!(
        "scale-in: {} rooms handed over, {:.2} publishes refused per moved room",
        theirs.len(),
        v.refused_per_room(&theirs)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "it exited cleanly: {status:?}"
    );
    assert!(
        c.etcd.get_prefix("/herdgate-test/workers/w3").is_empty(),
        "its key is gone"
    );
    c.wait_settled(2);
}

/// The rehearsal's controller: it samples and decides every `SYNC_TICKS`
/// ticks of `TICK` (a sync every 500 ms; the HPA's default period is 15 s),
/// and scales down only after `SCALE_DOWN_WINDOW` of lower recommendations
/// (shipped: 600 s for workers, 900 s for edges; Kubernetes' default is
/// 300 s). Between syncs, each tick watches the cluster change.
const TICK: Duration = Duration::from_millis(50);
const SYNC_TICKS: u32 = 10;
const SCALE_DOWN_WINDOW: Duration = Duration::from_secs(4);
/// Worker CPU is averaged over the last second (metrics-server: ~15 s).
const CPU_WINDOW: Duration = Duration::from_secs(1);

/// What the rehearsal saw, and when.
#[derive(Default)]
struct Rehearsal {
    /// One line per controller sync.
    log: Vec<String>,
    worker_crossed: Option<Instant>,
    worker_decided: Option<Instant>,
    /// The new worker in the first edge's view (weight 0, joining).
    worker_registered: Option<Instant>,
    /// Active at full weight, linked, in every edge's view.
    worker_full: Option<Instant>,
    /// It holds rooms (`herdgate_channels` > 0).
    worker_rooms: Option<Instant>,
    /// It holds every room of the scenario its full weight gives it.
    worker_spread: Option<Instant>,
    /// Those rooms (by the first edge's view at full weight).
    worker_owns: Vec<String>,
    edge_crossed: Option<Instant>,
    edge_decided: Option<Instant>,
    /// The new edge ready (`/readyz`) and linked to every worker.
    edge_ready: Option<Instant>,
    fell: Option<Instant>,
    worker_down: Option<Instant>,
    /// The leaving worker out of the first edge's view.
    worker_gone: Option<Instant>,
    edge_down: Option<Instant>,
    /// Weights of the new worker seen while it joined / left.
    ramp: Vec<u64>,
    drain: Vec<u64>,
    drain_states: Vec<String>,
    peak_publishers: usize,
    peak_audience: usize,
    /// Publishes refused (503, during moves) by the time of each mark:
    /// decided, spread, down, gone.
    refused: [usize; 4],
    /// Whether the stopped edge's key was still in etcd at the first tick
    /// after it exited (at most a tick, 0.5 s, after; its lease is 2 s).
    edge_key_after_exit: Option<bool>,
}

impl Rehearsal {
    fn since(&self, from: Option<Instant>, to: Option<Instant>) -> String {
        match (from, to) {
            (Some(f), Some(t)) => format!("{:.2} s", t.saturating_duration_since(f).as_secs_f64()),
            _ => "—".into(),
        }
    }
}

/// A worker's entry in a node's cluster status.
fn worker_in(status: &Value, id: &str) -> Option<Value> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id)
        .cloned()
}

/// The rehearsal itself (see the test below): plays both HPAs on `c`,
/// driving the load on `stream`, until the added worker and edge are gone
/// again. Returns the leaving worker's and edge's exits (status, time from
/// SIGTERM).
async fn rehearse(
    c: &mut Cluster,
    stream: Arc<Stream>,
    r: &mut Rehearsal,
) -> [(Option<std::process::ExitStatus>, Duration); 2] {
    use herdgate_testkit::autoscaler::{CpuMeter, Targets};
    let targets = Targets::REHEARSAL;
    let mut workers_hpa = targets.workers(1, 2, SCALE_DOWN_WINDOW);
    let mut edges_hpa = targets.edges(1, 2, SCALE_DOWN_WINDOW);
    let start = Instant::now();
    let at = |t: Instant| t.duration_since(start).as_secs_f64();
    use tokio::task::block_in_place as block;
    let meter = |pid| CpuMeter::new(pid, targets.worker_cpu_request, CPU_WINDOW);
    let mut meters = vec![meter(c.worker(0).pid())];
    let refused = || stream.ledger.lock().unwrap().refused.len();
    // Running (not terminating) pods of each kind.
    let (mut workers, mut edges) = (1usize, 1usize);
    let mut audience: Vec<(usize, tokio::task::JoinHandle<()>)> = Vec::new();
    let mut extra_publishers = 0usize;
    let (mut worker_exit, mut edge_exit) = (None, None);
    let (mut syncs, mut rise_syncs, mut peak_left) = (0u32, 0u32, 2u32);
    let mut tick = 0u32;
    loop {
        tokio::time::sleep(TICK).await;
        tick += 1;
        let now = Instant::now();
        assert!(
            now - start < Duration::from_secs(60),
            "the rehearsal did not finish in 60 s:\n{}",
            r.log.join("\n")
        );
        if r.edge_key_after_exit.is_none()
            && edge_exit
                .as_ref()
                .is_some_and(|h: &tokio::task::JoinHandle<_>| h.is_finished())
        {
            let key = block(|| c.etcd.get_prefix("/herdgate-test/edges/e2"));
            r.edge_key_after_exit = Some(!key.is_empty());
        }
        // Between syncs: watch the new worker join and leave, and the new edge come up.
        if r.worker_decided.is_some() && r.worker_full.is_none() {
            let views: Vec<Value> = block(|| {
                (0..c.edges.len())
                    .filter(|e| c.edges[*e].is_some())
                    .map(|e| c.edge_status(e))
                    .collect()
            });
            if let Some(w) = worker_in(&views[0], "w2") {
                r.worker_registered.get_or_insert(now);
                let vnodes = w["vnodes"].as_u64().unwrap_or(0);
                if r.ramp.last() != Some(&vnodes) {
                    r.ramp.push(vnodes);
                }
            }
            let full = views.iter().all(|v| {
                worker_in(v, "w2").is_some_and(|w| {
                    w["state"] == "active" && w["vnodes"] == 64 && w["link"] == "up"
                })
            });
            if full {
                r.worker_full = Some(now);
                let view = view_from_status(&views[0]);
                r.worker_owns = stream
                    .rooms
                    .iter()
                    .filter(|room| view.owner_of(APP_ID, room).is_some_and(|o| &**o == "w2"))
                    .cloned()
                    .collect();
            }
        }
        if r.worker_decided.is_some() && r.worker_spread.is_none() {
            let held = block(|| metric(c.worker(1), "herdgate_channels"));
            if held > 0.0 {
                r.worker_rooms.get_or_insert(now);
            }
            if r.worker_full.is_some() && held >= r.worker_owns.len() as f64 {
                r.worker_spread = Some(now);
                r.refused[1] = refused();
            }
        }
        if r.edge_decided.is_some() && r.edge_ready.is_none() {
            let s = block(|| status_of(c.edge(1)));
            let ws = s["cluster"]["workers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if s["ready"] == true && ws.len() == workers && ws.iter().all(|w| w["link"] == "up") {
                r.edge_ready = Some(now);
            }
        }
        if r.worker_down.is_some() && r.worker_gone.is_none() {
            match worker_in(&block(|| c.edge_status(0)), "w2") {
                Some(w) => {
                    let vnodes = w["vnodes"].as_u64().unwrap_or(0);
                    if r.drain.last() != Some(&vnodes) {
                        r.drain.push(vnodes);
                    }
                    let state = w["state"].as_str().unwrap_or_default().to_string();
                    if r.drain_states.last() != Some(&state) {
                        r.drain_states.push(state);
                    }
                }
                None => {
                    r.worker_gone = Some(now);
                    r.refused[3] = refused();
                }
            }
        }
        if r.worker_gone.is_some() && r.edge_down.is_some() {
            break;
        }
        if tick % SYNC_TICKS != 0 {
            continue;
        }

        // A controller sync: the metrics, the formula, the action.
        syncs += 1;
        let cpu: Vec<f64> = block(|| meters.iter_mut().filter_map(|m| m.sample()).collect());
        let conns: Vec<f64> = block(|| {
            (0..c.edges.len())
                .filter(|e| c.edges[*e].is_some())
                .map(|e| metric(c.edge(e), "herdgate_connections_open"))
                .collect()
        });
        let dw = workers_hpa.decide(now, workers, &cpu);
        let de = edges_hpa.decide(now, edges, &conns);
        r.log.push(format!(
            "{:6.2} s  workers {workers}: CPU {:?} % of {} core, ratio {:.2} -> {} (recommended {})  |  edges {edges}: connections {:?}, ratio {:.2} -> {} (recommended {})  |  load: +{extra_publishers} publishers, {} audience",
            at(now),
            cpu.iter().map(|u| (u * 100.0).round() as i64).collect::<Vec<_>>(),
            targets.worker_cpu_request,
            dw.ratio,
            dw.desired,
            dw.recommended,
            conns.iter().map(|n| *n as i64).collect::<Vec<_>>(),
            de.ratio,
            de.desired,
            de.recommended,
            audience.len(),
        ));
        let rising = r.fell.is_none() && syncs > 3;
        if syncs <= 3 {
            assert!(
                dw.desired == 1 && de.desired == 1,
                "the baseline load scales nothing:\n{}",
                r.log.join("\n")
            );
        }
        if rising && dw.ratio > 1.0 {
            r.worker_crossed.get_or_insert(now);
        }
        if rising && de.ratio > 1.0 {
            r.edge_crossed.get_or_insert(now);
        }
        assert!(
            (dw.desired >= workers && de.desired >= edges) || r.fell.is_some(),
            "nothing scales down before the load falls:\n{}",
            r.log.join("\n")
        );
        // Workers: a StatefulSet (one more ordinal; the highest one goes).
        if dw.desired > workers {
            r.worker_decided = Some(now);
            r.refused[0] = refused();
            let config = format!(
                "{}[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"0s\"\n",
                with_ramp(&worker_toml(&worker_name(1), &c.endpoints, ""), 4, "300ms")
            );
            let w2 = block(|| Herdgate::start(&config));
            meters.push(meter(w2.pid()));
            c.workers.push(Some(w2));
            workers = 2;
        } else if dw.desired < workers {
            r.worker_down = Some(now);
            r.refused[2] = refused();
            let mut w2 = c.workers[1].take().expect("the added worker");
            meters.pop();
            workers = 1;
            w2.signal(libc::SIGTERM);
            worker_exit = Some(tokio::spawn(async move {
                let t = Instant::now();
                let status = w2.wait_exit(Duration::from_secs(30)).await;
                (status, t.elapsed())
            }));
        }
        // Edges: a Deployment (the newest pod goes first).
        if de.desired > edges {
            r.edge_decided = Some(now);
            let e2 = block(|| Herdgate::start(&edge_toml(&edge_name(1), &c.endpoints, "")));
            c.edges.push(Some(e2));
            edges = 2;
        } else if de.desired < edges {
            r.edge_down = Some(now);
            // Out of the Service first (a preStop), so no request is in flight.
            stream.stop(|id| id >= 2000).await;
            let mut e2 = c.edges[1].take().expect("the added edge");
            edges = 1;
            e2.signal(libc::SIGTERM);
            edge_exit = Some(tokio::spawn(async move {
                let t = Instant::now();
                let status = e2.wait_exit(Duration::from_secs(30)).await;
                (status, t.elapsed())
            }));
        }

        // The load: rising until both have scaled out (and two syncs more,
        // the peak), held until the new capacity serves, then falling.
        if rising && peak_left > 0 {
            if r.worker_decided.is_some() && r.edge_decided.is_some() {
                peak_left -= 1;
            }
            rise_syncs += 1;
            assert!(
                rise_syncs <= 40,
                "the rising load never crossed both targets:\n{}",
                r.log.join("\n")
            );
            // New clients pick the edge with the fewest connections (a
            // client-side stand-in for the Service spreading them).
            let ready: Vec<usize> = if r.edge_ready.is_some() {
                vec![0, 1]
            } else {
                vec![0]
            };
            for k in 0..8 {
                let e = *ready
                    .iter()
                    .min_by_key(|e| audience.iter().filter(|(a, _)| a == *e).count())
                    .unwrap();
                let room = stream.rooms[(audience.len() + k) % stream.rooms.len()].clone();
                audience.push((e, audience_socket(c.url(e), room).await));
            }
            for _ in 0..2 {
                let e = ready[extra_publishers % ready.len()];
                let id = 1000 * (e + 1) + extra_publishers;
                stream.publish(id, c.api(e), Duration::from_millis(1));
                extra_publishers += 1;
            }
            r.peak_publishers = extra_publishers;
            r.peak_audience = audience.len();
        } else if rising && r.worker_spread.is_some() && r.edge_ready.is_some() {
            // The load falls: the extra publishers stop, the audience leaves.
            r.fell = Some(now);
            stream.stop(|id| id >= 1000).await;
            for (_, a) in audience.drain(..) {
                a.abort();
            }
        }
    }
    [
        worker_exit.expect("the worker left").await.unwrap(),
        edge_exit.expect("the edge left").await.unwrap(),
    ]
}

/// The Kubernetes autoscalers rehearsed on real processes (docs/CLUSTER.md
/// "Autoscaling, rehearsed"): etcd, one worker, one edge, two readers on
/// it and a publish stream; the test plays both HPAs with the controller's
/// formula (`desired = ceil(replicas × average / target)`, 10 % tolerance,
/// a scale-down window; `herdgate_testkit::autoscaler`) on the metrics the
/// shipped HPAs use — worker CPU (from /proc) as a fraction of its
/// request, edge `herdgate_connections_open` (from /metrics). Only the
/// magnitudes are scaled down for 2 shared cores (`Targets::REHEARSAL`:
/// 60 % of a 0.2-core request, 40 connections per edge; shipped
/// `Targets::SHIPPED`: 60 % of 1 core, 35,000), and the clock (a sync
/// every 0.5 s instead of 15 s, a 4 s scale-down window instead of 600 s /
/// 900 s, a 4 × 300 ms ramp instead of 4 × 5 s). The load rises
/// (publishers and an audience of sockets) until both cross their
/// targets: a worker is added (it joins at weight 0 and ramps up in 4
/// steps) and an edge; then the load falls, and after the window the
/// newest worker gets SIGTERM and drains (weight down in steps, rooms
/// handed over), and the newest edge goes too. Every publish acknowledged
/// across both transitions reached every reader once, in order. The times
/// (threshold → capacity, SIGTERM → gone) are printed; docs/BENCHMARKS.md
/// "Autoscaling rehearsal" quotes them.
#[test]
fn autoscaling_adds_a_worker_under_load_and_drains_it_after_with_no_acked_publish_lost() {
    use herdgate_testkit::autoscaler::Targets;
    let _g = serial();
    let mut c = Cluster::start(1, 1, 1);
    let rt = runtime();
    let rooms = rooms(20);
    let e = edges(&c);
    let mut r = Rehearsal::default();
    let mut exits = None;
    let mut acked = (0, 0, 0);
    let (cl, rr, ex, ak) = (&mut c, &mut r, &mut exits, &mut acked);
    let began = Instant::now();
    let v = rt.block_on(under_stream_load(
        e,
        "autoscaling rehearsal",
        rooms.clone(),
        2,
        move |stream| async move {
            *ex = Some(rehearse(cl, stream.clone(), rr).await);
            // Acknowledged while the worker joined, into its rooms once
            // it held them, and while it drained.
            let l = stream.ledger.lock().unwrap();
            let within = |from: Option<Instant>, to: Option<Instant>, rooms: Option<&[String]>| {
                let (from, to) = (from.unwrap(), to.unwrap());
                l.acked
                    .iter()
                    .zip(&l.acked_at)
                    .filter(|((room, ..), t)| {
                        **t >= from && **t <= to && rooms.is_none_or(|rs| rs.contains(room))
                    })
                    .count()
            };
            *ak = (
                within(rr.worker_decided, rr.worker_full, None),
                within(rr.worker_spread, rr.fell, Some(&rr.worker_owns)),
                within(rr.worker_down, rr.worker_gone, None),
            );
        },
    ));
    let wall = began.elapsed();
    let [(worker_exit, worker_took), (edge_exit, edge_took)] = exits.expect("it ran");
    let since = |a, b| r.since(a, b);
    let report = [
        format!(
            "targets: worker CPU 60 % of {} core, {} connections per edge; a sync every {:?}, scale-down window {SCALE_DOWN_WINDOW:?}",
            Targets::REHEARSAL.worker_cpu_request,
            Targets::REHEARSAL.edge_connections,
            TICK * SYNC_TICKS,
        ),
        format!(
            "worker: above target -> decided (above target + 10 %) {}; decided -> in the view {}, -> first rooms {}, -> active at full weight {} (weights {:?}), -> every room of its share ({} of {}) {}",
            since(r.worker_crossed, r.worker_decided),
            since(r.worker_decided, r.worker_registered),
            since(r.worker_decided, r.worker_rooms),
            since(r.worker_decided, r.worker_full),
            r.ramp,
            r.worker_owns.len(),
            rooms.len(),
            since(r.worker_decided, r.worker_spread),
        ),
        format!(
            "worker: above target -> active at full weight {}, -> every room of its share {}",
            since(r.worker_crossed, r.worker_full),
            since(r.worker_crossed, r.worker_spread),
        ),
        format!(
            "edge: above target -> decided {}, -> ready and linked to every worker {}",
            since(r.edge_crossed, r.edge_decided),
            since(r.edge_crossed, r.edge_ready),
        ),
        format!(
            "peak load: +{} publishers, {} audience sockets",
            r.peak_publishers, r.peak_audience
        ),
        format!(
            "load fell -> scale-down decided: worker {}, edge {}",
            since(r.fell, r.worker_down),
            since(r.fell, r.edge_down),
        ),
        format!(
            "worker SIGTERM -> out of the view {} (weights {:?}, states {:?}), -> exited {:.2} s ({worker_exit:?})",
            since(r.worker_down, r.worker_gone),
            r.drain,
            r.drain_states,
            worker_took.as_secs_f64(),
        ),
        format!(
            "edge SIGTERM -> exited {:.2} s ({edge_exit:?}); handover barriers timed out at w1: {}",
            edge_took.as_secs_f64(),
            metric(c.worker(0), "herdgate_handover_timeouts_total") as u64,
        ),
        format!(
            "acknowledged while joining {}, into its rooms while it held them {}, while draining {}; refused (503, rooms moving) while joining {}, while draining {}",
            acked.0,
            acked.1,
            acked.2,
            r.refused[1] - r.refused[0],
            r.refused[3] - r.refused[2],
        ),
        format!("{v:?}; wall time {:.1} s", wall.as_secs_f64()),
    ];
    eprintln!(
        "autoscaling rehearsal, controller syncs:\n{}",
        r.log.join("\n")
    );
    eprintln!("autoscaling rehearsal:\n  {}", report.join("\n  "));

    // It joined in steps: weights between 0 and full were in the view.
    assert!(
        r.ramp.iter().any(|w| *w > 0 && *w < 64),
        "the new worker ramped up in steps: {:?}",
        r.ramp
    );
    assert!(
        !r.worker_owns.is_empty(),
        "the new worker took a share of the rooms"
    );
    // Capacity within the ramp (4 x 300 ms) and a start-up's margin.
    let to_capacity = r.worker_spread.unwrap() - r.worker_decided.unwrap();
    assert!(
        to_capacity < Duration::from_secs(5),
        "the new worker served its share {to_capacity:?} after the decision"
    );
    assert!(
        acked.0 > 0 && acked.1 > 0 && acked.2 > 0,
        "publishes acknowledged across both transitions: {acked:?}"
    );
    // It left in steps, draining, and exited cleanly within its drain timeout (10 s).
    assert!(
        r.drain_states.iter().any(|s| s == "draining"),
        "the leaving worker drained: {:?}",
        r.drain_states
    );
    assert!(
        worker_exit.is_some_and(|s| s.success()),
        "the leaving worker exited cleanly: {worker_exit:?}"
    );
    assert!(
        worker_took < Duration::from_secs(10),
        "within its drain timeout: {worker_took:?}"
    );
    assert!(
        edge_exit.is_some_and(|s| s.success()),
        "the leaving edge exited cleanly: {edge_exit:?}"
    );
    // It left the view as it stopped (its lease revoked), not when the
    // lease would have run out: a drain at the same time waits for no gone
    // edge at its handover barriers.
    assert_eq!(
        r.edge_key_after_exit,
        Some(false),
        "the stopped edge's key was gone as it exited"
    );
    assert!(
        c.etcd.get_prefix("/herdgate-test/workers/w2").is_empty(),
        "its key is gone"
    );
    c.wait_settled(1);
}

#[test]
fn killing_the_etcd_leader_moves_nothing_and_refuses_nothing() {
    let _g = serial();
    let c = Cluster::start(3, 3, 2);
    let rt = runtime();
    let before = membership(&c);
    let e = edges(&c);
    let v = rt.block_on(under_stream(
        e,
        "kill -9 the etcd leader",
        rooms(30),
        async {
            tokio::task::block_in_place(|| {
                let leader = c.etcd.leader();
                c.etcd.kill9(leader);
                let _ = c.etcd.leader(); // a new one
            });
            tokio::time::sleep(Duration::from_secs(2)).await;
        },
    ));
    assert_eq!(v.refused, 0, "no publish refused");
    // Nodes that re-listed wrote their keys again (a new revision), but
    // the membership is the same: no lease expired, nothing moved.
    assert_eq!(before, membership(&c), "the same membership");
    for w in 0..3 {
        assert_eq!(metric(c.worker(w), "herdgate_room_moves_total"), 0.0);
    }
    for w in 0..3 {
        assert_eq!(status_of(c.worker(w))["cluster"]["fenced"], false);
    }
}

/// Once every node says it is frozen, publish probes for two leases: how
/// many were accepted and refused. No worker may be fenced meanwhile.
async fn while_frozen(c: &Cluster, api: &Api, rooms: &[String]) -> (usize, usize) {
    let t = Instant::now();
    tokio::task::block_in_place(|| {
        eventually_or(
            "every node frozen",
            WAIT,
            || {
                (0..3).all(|w| status_of(c.worker(w))["cluster"]["frozen"] == true)
                    && (0..2).all(|e| c.edge_status(e)["frozen"] == true)
            },
            || {
                let w: Vec<_> = (0..3)
                    .map(|w| status_of(c.worker(w))["cluster"].clone())
                    .collect();
                let e: Vec<_> = (0..2).map(|e| c.edge_status(e)).collect();
                let log: Vec<String> = std::iter::from_fn(|| c.worker(0).log.try_recv().ok())
                    .filter(|l| !l.contains("membership view"))
                    .collect();
                format!("workers {w:#?}\nedges {e:#?}\nw1 log: {log:#?}")
            },
        )
    });
    println!("etcd lost: every node frozen {:?} after", t.elapsed());
    let (mut accepted, mut refused) = (0, 0);
    let until = Instant::now() + Duration::from_secs(4);
    let mut i = 0;
    while Instant::now() < until {
        let body = json!({"name":"probe","channel":rooms[i % rooms.len()],"data":""}).to_string();
        match api.request("POST", "/events", &[], &body).await.status {
            200 => accepted += 1,
            _ => refused += 1,
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| {
        assert!(
            (0..3).all(|w| status_of(c.worker(w))["cluster"]["fenced"] == false),
            "no worker fenced while frozen"
        );
    });
    println!("frozen: {accepted} probes accepted, {refused} refused");
    (accepted, refused)
}

/// etcd itself dies (its one member kill -9) and comes back from its data
/// two leases later: the cluster serves throughout on the frozen
/// membership; whether etcd's restored leases survive its restart or not,
/// nothing acknowledged is lost and the freeze ends.
#[test]
fn etcd_killed_outright_freezes_the_membership_and_nothing_stops() {
    let _g = serial();
    let c = Cluster::start(1, 3, 2);
    let rt = runtime();
    let rooms = rooms(10);
    let revs = membership(&c);
    let api = c.api(0);
    let mut frozen = (0, 0);
    rt.block_on(under_stream(
        edges(&c),
        "etcd killed and restarted",
        rooms.clone(),
        async {
            c.etcd.kill9(0);
            frozen = while_frozen(&c, &api, &rooms).await;
            tokio::task::block_in_place(|| c.etcd.restart(0));
            until_accepted(&api, &rooms[0], Instant::now()).await;
        },
    ));
    assert_eq!(frozen.1, 0, "the frozen cluster refused nothing");
    assert!(frozen.0 > 20);
    c.wait_settled(3);
    eventually("the freeze ends", WAIT, || {
        (0..3).all(|w| status_of(c.worker(w))["cluster"]["frozen"] == false)
            && (0..2).all(|e| c.edge_status(e)["frozen"] == false)
    });
    let after = membership(&c);
    println!(
        "etcd restarted: {}",
        if revs == after {
            "leases survived, no moves"
        } else {
            "leases gone, nodes rejoined"
        }
    );
}

/// etcd loses quorum (two of three members stopped) under a publish
/// stream: no lease can expire and no key change, so the whole cluster
/// freezes its membership and keeps serving — no worker fenced, publishes
/// accepted, no socket closed — until etcd is back.
#[test]
fn losing_etcd_quorum_freezes_the_membership_and_the_cluster_keeps_serving() {
    let _g = serial();
    let c = Cluster::start(3, 3, 2);
    let rt = runtime();
    let rooms = rooms(10);
    let revs = membership(&c);
    let e = edges(&c);
    let api = c.api(0);
    let mut refused_frozen = 0;
    let mut accepted_frozen = 0;
    rt.block_on(under_stream(
        e,
        "etcd quorum lost and regained",
        rooms.clone(),
        async {
            let stopped: Vec<usize> = tokio::task::block_in_place(|| {
                let leader = c.etcd.leader();
                let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
                c.etcd.stop(leader);
                c.etcd.stop(others[0]);
                vec![leader, others[0]]
            });
            (accepted_frozen, refused_frozen) = while_frozen(&c, &api, &rooms).await;
            tokio::task::block_in_place(|| {
                for m in stopped {
                    c.etcd.cont(m);
                }
            });
            until_accepted(&api, &rooms[0], Instant::now()).await;
        },
    ));
    assert_eq!(refused_frozen, 0, "the frozen cluster refused nothing");
    assert!(accepted_frozen > 20);
    // etcd 3.4 revokes leases that ran out while a stopped leader was
    // paused as soon as it runs again (SIGSTOP stops its clock, not the
    // world's): then every node registers again as a new incarnation and
    // the rooms come back through the handover barrier. Either way:
    // nothing lost, no socket closed, and the freeze ends.
    c.wait_settled(3);
    let after = membership(&c);
    println!(
        "quorum regained: {}",
        if revs == after {
            "leases survived, no moves"
        } else {
            "leases revoked, nodes rejoined"
        }
    );
    eventually("the freeze ends", WAIT, || {
        (0..3).all(|w| status_of(c.worker(w))["cluster"]["frozen"] == false)
            && (0..2).all(|e| c.edge_status(e)["frozen"] == false)
    });
}

#[test]
fn an_edge_stopped_past_its_lease_loses_its_users_elsewhere_and_comes_back() {
    let _g = serial();
    let c = Cluster::start(1, 3, 2);
    let rt = runtime();
    rt.block_on(async {
        let mut a = connect(c.edge(0)).await;
        let mut b = connect(c.edge(1)).await;
        a.subscribe_presence("presence-hall", "alice").await;
        b.subscribe_presence("presence-hall", "bob").await;
        assert_eq!(
            a.expect("pusher_internal:member_added").await.data["user_id"],
            "bob"
        );
        let pid = c.edge(1).pid();
        // SAFETY: kill(2) on a child of this test.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let e = a.expect("pusher_internal:member_removed").await;
        assert_eq!(
            e.data["user_id"], "bob",
            "bob left presence when his edge's lease ran out"
        );
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        // Back: its sockets are registered again and bob is announced again.
        let e = a.expect("pusher_internal:member_added").await;
        assert_eq!(e.data["user_id"], "bob");
        let users = c.api(0).user_ids("presence-hall").await;
        assert_eq!(users, ["alice", "bob"]);
        assert_eq!(c.api(1).user_ids("presence-hall").await, ["alice", "bob"]);
    });
}

#[test]
fn a_worker_restarted_with_the_same_id_gets_its_rooms_back() {
    let _g = serial();
    let mut c = Cluster::start(1, 3, 2);
    let rooms = rooms(30);
    let victim = c.owner(0, &rooms[0]);
    let mine: Vec<&String> = rooms.iter().filter(|r| c.owner(0, r) == victim).collect();
    c.kill_worker(victim);
    // At once, before its old lease expired: the new process waits for the key.
    let w = c.spawn_worker(victim, "");
    w.wait_log("registered in etcd", WAIT);
    c.workers[victim] = Some(w);
    c.wait_settled(3);
    assert!(
        mine.iter().all(|r| c.owner(0, r) == victim),
        "its rooms came back"
    );
    let rt = runtime();
    rt.block_on(under_stream(
        edges(&c),
        "after a same-id restart",
        rooms,
        async { tokio::time::sleep(Duration::from_secs(1)).await },
    ));
}

#[test]
fn terminate_reaches_a_user_after_its_room_failed_over() {
    let _g = serial();
    let mut c = Cluster::start(1, 3, 2);
    let rt = runtime();
    rt.block_on(async {
        let mut u = connect(c.edge(0)).await;
        assert_eq!(u.signin("lin").await.event, "pusher:signin_success");
        tokio::task::block_in_place(|| {
            let owner = c.owner(0, "#server-to-user-lin");
            c.kill_worker(owner)
        });
        let api = c.api(1);
        let deadline = Instant::now() + WAIT;
        loop {
            let r = api
                .request("POST", "/users/lin/terminate_connections", &[], "{}")
                .await;
            if r.status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "terminate never accepted: {:?}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            u.expect_close().await,
            Some(4009),
            "the sign-in moved with the room"
        );
    });
}

#[test]
fn a_full_presence_room_refuses_on_every_edge_and_records_nothing() {
    let _g = serial();
    let etcd = herdgate_testkit::etcd::Etcd::start(1);
    let eps = etcd.endpoints();
    let workers: Vec<Herdgate> = (0..2)
        .map(|i| Herdgate::start(&worker_toml(&worker_name(i), &eps, "")))
        .collect();
    let small = "[limits]\nmax_presence_members = 2\n";
    let edges: Vec<Herdgate> = (0..2)
        .map(|i| Herdgate::start(&edge_toml(&edge_name(i), &eps, "").replace("[limits]\n", small)))
        .collect();
    let c = Cluster {
        etcd,
        workers: workers.into_iter().map(Some).collect(),
        edges: edges.into_iter().map(Some).collect(),
        endpoints: eps,
        worker_tail: String::new(),
    };
    c.wait_settled(2);
    let rt = runtime();
    rt.block_on(async {
        let mut a = connect(c.edge(0)).await;
        let mut b = connect(c.edge(1)).await;
        let mut late = connect(c.edge(1)).await;
        a.subscribe_presence("presence-table", "a").await;
        b.subscribe_presence("presence-table", "b").await;
        a.expect("pusher_internal:member_added").await;
        let e = late.subscribe_presence("presence-table", "c").await;
        assert_eq!(e.event, "pusher:subscription_error", "{:?}", e.raw);
        assert_eq!(e.data["status"], 403);
        // Not recorded: its client events are refused, it gets no room traffic.
        late.send(json!({"event":"client-hi","channel":"presence-table","data":{}}))
            .await;
        assert_eq!(late.expect("pusher:error").await.event, "pusher:error");
        late.subscribe("control").await;
        c.api(0)
            .publish("presence-table", "table-news", "x", None)
            .await;
        a.expect("table-news").await;
        let before = late.until_marker(&c.api(0), "control").await;
        assert!(before.is_empty(), "the refused socket got {before:?}");
        let r = c
            .api(0)
            .request(
                "GET",
                "/channels/presence-table",
                &[("info", "user_count,subscription_count")],
                "",
            )
            .await;
        assert_eq!(r.body["user_count"], 2);
        assert_eq!(r.body["subscription_count"], 2);
    });
}

/// Webhooks from a cluster: a room with sockets on both edges is occupied
/// and vacated once (its owner emits, edges never do); when its owner is
/// killed the new owner takes the room over silently — no second
/// channel_occupied while the sockets stayed.
#[test]
fn webhooks_come_once_per_cluster_from_the_owner_also_across_a_failover() {
    use herdgate_testkit::webhook::Receiver;
    let _g = serial();
    let mut rx = Receiver::start(APP_ID, KEY, SECRET);
    let tail = format!(
        "[webhooks]\ndebounce = \"1s\"\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = [\"channel_occupied\", \"channel_vacated\", \"user_online\", \"user_offline\"]\n",
        rx.url()
    );
    let mut c = Cluster::start_tailed(1, 2, 2, None, &tail);
    let rt = runtime();
    let room = "webhook-room";
    let victim = c.owner(0, room);
    let api = c.api(0);
    let occupied = |g: &herdgate_testkit::webhook::Got, ch: &str| {
        g.name() == "channel_occupied" && g.channel() == ch
    };
    // A user whose owner is the same worker, signed in on both edges.
    let user = (0..)
        .map(|i| format!("carol-{i}"))
        .find(|u| c.owner(0, &format!("#server-to-user-{u}")) == victim)
        .unwrap();
    let user_events = |got: &[herdgate_testkit::webhook::Got], name: &str| {
        got.iter()
            .filter(|g| g.name() == name && g.event["user_id"] == user.as_str())
            .count()
    };
    let (mut a, mut b, ua, ub) = rt.block_on(async {
        let mut a = connect(c.edge(0)).await;
        let mut b = connect(c.edge(1)).await;
        a.subscribe(room).await;
        b.subscribe(room).await;
        let mut ua = connect(c.edge(0)).await;
        let mut ub = connect(c.edge(1)).await;
        ua.signin(&user).await;
        ub.signin(&user).await;
        let mut m = connect(c.edge(1)).await;
        m.subscribe("marker-1").await;
        (a, b, ua, ub)
    });
    let got = rx.events_until(WAIT, |g| occupied(g, "marker-1"));
    let for_room: Vec<_> = got.iter().filter(|g| g.channel() == room).collect();
    assert_eq!(
        for_room.len(),
        1,
        "one channel_occupied for two edges: {got:?}"
    );
    assert_eq!(
        user_events(&got, "user_online"),
        1,
        "one user_online for two sockets on two edges: {got:?}"
    );

    c.kill_worker(victim);
    rt.block_on(async {
        until_accepted(&api, room, Instant::now()).await;
        let mut m = connect(c.edge(0)).await;
        m.subscribe("marker-2").await;
    });
    let got = rx.events_until(WAIT, |g| occupied(g, "marker-2"));
    assert!(
        got.iter().all(|g| g.channel() != room),
        "the new owner took the room over silently: {got:?}"
    );
    assert_eq!(
        user_events(&got, "user_online") + user_events(&got, "user_offline"),
        0,
        "the user's new owner took them over silently: {got:?}"
    );
    // The user's last sockets go: one user_offline, from the new owner.
    rt.block_on(async {
        ua.close().await;
        ub.close().await;
    });
    let got = rx.events_until(WAIT, |g| g.name() == "user_offline");
    assert_eq!(user_events(&got, "user_offline"), 1, "{got:?}");

    rt.block_on(async {
        a.send(json!({"event":"pusher:unsubscribe","data":{"channel":room}}))
            .await;
        b.send(json!({"event":"pusher:unsubscribe","data":{"channel":room}}))
            .await;
    });
    let got = rx.events_until(WAIT, |g| {
        g.name() == "channel_vacated" && g.channel() == room
    });
    assert!(got
        .iter()
        .all(|g| g.channel() != room || g.name() == "channel_vacated"));
    // A second one would have come with the first: a marker's, a debounce
    // later, comes after anything that was on its way.
    rt.block_on(async {
        let mut m = connect(c.edge(0)).await;
        m.subscribe("marker-3").await;
        m.send(json!({"event":"pusher:unsubscribe","data":{"channel":"marker-3"}}))
            .await;
    });
    let got = rx.events_until(WAIT, |g| {
        g.name() == "channel_vacated" && g.channel() == "marker-3"
    });
    assert!(
        got.iter().all(|g| g.channel() != room),
        "one channel_vacated: {got:?}"
    );
    assert!(rx.posts.iter().all(|p| p["valid"] == true));
}
