//! Clusters of real herdgate processes for tests: etcd membership, edges and
//! workers as child processes, the faults (kill, stop, cuts), and the
//! external checker that decides whether anything acknowledged was lost.
//!
//! The checker is the oracle of every cluster scenario: publishers record
//! what the HTTP API answered 200 for; readers (sockets subscribed for the
//! whole scenario, on every edge) record what arrived. A publish answered 200
//! must have reached every reader exactly once, and each publisher's events
//! must arrive in the order it sent them.

use crate::etcd::Etcd;
use crate::process::Herdgate;
use crate::{admin_get, Api, Client, APP_ID, KEY, SECRET, WAIT};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The link secret of test clusters.
pub const LINK_SECRET: &str = "test-cluster-link-secret-0123456789";

/// Test timings: a 2 s lease (etcd's test members grant 1 s and up),
/// keepalives every 300 ms, 100 ms link heartbeats.
pub const TIMING: &str = r#"heartbeat_interval = "100ms"
edge_lease = "2s"
handover_timeout = "1s"
"#;

const APPS: &str = "[[apps]]\nid = \"100001\"\nkey = \"test-key\"\nsecret = \"test-secret\"\n";

fn etcd_section(endpoints: &[String]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[cluster.etcd]\nendpoints = [{}]\nprefix = \"/herdgate-test\"\nlease_ttl = \"2s\"\nkeepalive_interval = \"300ms\"\nfence_margin = \"500ms\"\nrequest_timeout = \"1s\"\n",
        list.join(", ")
    )
}

/// How test workers join and leave: in one step, at once.
const SCALE: &str = "[cluster.scale]\nramp_steps = 1\nramp_interval = \"200ms\"\n";

/// A worker's config: etcd membership, link on an ephemeral port.
pub fn worker_toml(name: &str, endpoints: &[String], extra: &str) -> String {
    format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[overload]\nenabled = false\n[cluster]\nrole = \"worker\"\nmembership = \"etcd\"\nnode_id = \"{name}\"\nlink_listen = \"127.0.0.1:0\"\nsecret = \"{LINK_SECRET}\"\n{TIMING}{extra}\n{}{SCALE}drain_timeout = \"10s\"\n{APPS}",
        etcd_section(endpoints)
    )
}

/// A [`worker_toml`] that joins (and leaves) in `steps` weight steps
/// `interval` apart (`cluster.scale.ramp_steps`, `ramp_interval`) instead
/// of at once.
pub fn with_ramp(worker_toml: &str, steps: u32, interval: &str) -> String {
    assert!(worker_toml.contains(SCALE), "a worker_toml config");
    worker_toml.replace(
        SCALE,
        &format!("[cluster.scale]\nramp_steps = {steps}\nramp_interval = \"{interval}\"\n"),
    )
}

/// An edge's config.
pub fn edge_toml(name: &str, endpoints: &[String], extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_ip = 0\nmax_handshakes_per_ip = 0\n[overload]\nenabled = false\n[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"0s\"\n[cluster]\nrole = \"edge\"\nmembership = \"etcd\"\nnode_id = \"{name}\"\nsecret = \"{LINK_SECRET}\"\n{TIMING}{extra}\n{}{APPS}",
        etcd_section(endpoints)
    )
}

/// An etcd cluster, workers `w1…` and edges `e1…` as processes.
pub struct Cluster {
    pub etcd: Etcd,
    pub workers: Vec<Option<Herdgate>>,
    pub edges: Vec<Option<Herdgate>>,
    /// etcd endpoints each node was started with (a relay, for some).
    pub endpoints: Vec<String>,
    /// Appended to every worker's config (after its `[[apps]]`: e.g. the
    /// app's `[[apps.webhooks]]`).
    pub worker_tail: String,
}

pub fn worker_name(i: usize) -> String {
    format!("w{}", i + 1)
}

pub fn edge_name(i: usize) -> String {
    format!("e{}", i + 1)
}

impl Cluster {
    /// Start `members` etcd members, `workers` workers and `edges` edges, and
    /// wait until every edge routes to every worker.
    pub fn start(members: usize, workers: usize, edges: usize) -> Cluster {
        Cluster::start_with(members, workers, edges, None)
    }

    /// [`Cluster::start`], with edge `nobody` (if any) running as uid 65534
    /// so that a [`Cut`] can isolate it.
    pub fn start_with(
        members: usize,
        workers: usize,
        edges: usize,
        nobody: Option<usize>,
    ) -> Cluster {
        Cluster::start_tailed(members, workers, edges, nobody, "")
    }

    /// [`Cluster::start_with`], `worker_tail` appended to every worker's config.
    pub fn start_tailed(
        members: usize,
        workers: usize,
        edges: usize,
        nobody: Option<usize>,
        worker_tail: &str,
    ) -> Cluster {
        let etcd = Etcd::start(members);
        let endpoints = etcd.endpoints();
        let mut c = Cluster {
            etcd,
            workers: Vec::new(),
            edges: Vec::new(),
            endpoints,
            worker_tail: worker_tail.to_string(),
        };
        for i in 0..workers {
            let w = c.spawn_worker(i, "");
            c.workers.push(Some(w));
        }
        for i in 0..edges {
            let config = edge_toml(&edge_name(i), &c.endpoints, "");
            let e = if nobody == Some(i) {
                Herdgate::start_as_nobody(&config)
            } else {
                Herdgate::start(&config)
            };
            c.edges.push(Some(e));
        }
        c.wait_settled(workers);
        c
    }

    pub fn spawn_worker(&self, i: usize, extra: &str) -> Herdgate {
        Herdgate::start(&format!(
            "{}{}",
            worker_toml(&worker_name(i), &self.endpoints, extra),
            self.worker_tail
        ))
    }

    /// A worker whose edges reach it through a [`crate::relay::Relay`]: it
    /// listens for links on a fresh port, and advertises the relay's
    /// address, which forwards to that port. Returns the worker and the relay.
    pub fn spawn_worker_behind_relay(&self, i: usize) -> (Herdgate, crate::relay::Relay) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = crate::relay::Relay::start(SocketAddr::from(([127, 0, 0, 1], port)));
        let config = worker_toml(
            &worker_name(i),
            &self.endpoints,
            &format!("advertise = \"{}\"\n", relay.addr()),
        )
        .replace(
            "link_listen = \"127.0.0.1:0\"",
            &format!("link_listen = \"127.0.0.1:{port}\""),
        );
        let w = Herdgate::start(&format!("{config}{}", self.worker_tail));
        (w, relay)
    }

    /// A worker that reaches etcd through `endpoints` (a relay, say).
    pub fn spawn_worker_via(&self, i: usize, endpoints: &[String]) -> Herdgate {
        Herdgate::start(&format!(
            "{}{}",
            worker_toml(&worker_name(i), endpoints, ""),
            self.worker_tail
        ))
    }

    /// Kill -9 a worker (it stays `None`).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut h) = self.workers[i].take() {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
    }

    /// Which worker indexes own rooms (vnodes > 0) in an edge's view.
    pub fn owners(&self, edge: usize) -> Vec<usize> {
        let s = self.edge_status(edge);
        s["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|w| w["vnodes"].as_u64().unwrap_or(0) > 0)
            .map(|w| w["id"].as_str().unwrap()[1..].parse::<usize>().unwrap() - 1)
            .collect()
    }

    pub fn worker(&self, i: usize) -> &Herdgate {
        self.workers[i].as_ref().expect("worker running")
    }

    pub fn edge(&self, i: usize) -> &Herdgate {
        self.edges[i].as_ref().expect("edge running")
    }

    /// A running edge's cluster status (`/status` → `cluster`).
    pub fn edge_status(&self, i: usize) -> Value {
        status_of(self.edge(i))["cluster"].clone()
    }

    /// Wait until every running edge sees exactly `workers` active workers
    /// with their full weight and links up, all at the same revision.
    pub fn wait_settled(&self, workers: usize) {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let statuses: Vec<Value> = (0..self.edges.len())
                .filter(|i| self.edges[*i].is_some())
                .map(|i| self.edge_status(i))
                .collect();
            let ok = statuses.iter().all(|s| {
                let ws = s["workers"].as_array().cloned().unwrap_or_default();
                ws.len() == workers
                    && ws
                        .iter()
                        .all(|w| w["state"] == "active" && w["link"] == "up" && w["vnodes"] == 64)
            }) && statuses.windows(2).all(|p| p[0]["rev"] == p[1]["rev"]);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not settle with {workers} workers: {statuses:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Which worker (index) owns `channel`, by an edge's current view.
    pub fn owner(&self, edge: usize, channel: &str) -> usize {
        let view = view_from_status(&self.edge_status(edge));
        let id = view
            .owner_of(APP_ID, channel)
            .expect("an owner")
            .to_string();
        id[1..].parse::<usize>().unwrap() - 1
    }

    pub fn api(&self, edge: usize) -> Api {
        api_for(self.edge(edge))
    }

    pub fn url(&self, edge: usize) -> String {
        url_for(self.edge(edge))
    }
}

/// The view an edge reports, rebuilt here to compute owners as it does.
pub fn view_from_status(s: &Value) -> herdgate::cluster::view::View {
    let workers = s["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            (
                herdgate::cluster::view::NodeId::from(w["id"].as_str().unwrap()),
                herdgate::cluster::view::WorkerInfo {
                    addr: w["addr"].as_str().unwrap_or_default().to_string(),
                    vnodes: w["vnodes"].as_u64().unwrap_or(0) as u32,
                    state: w["state"].as_str().unwrap_or_default().to_string(),
                    incarnation: 0,
                },
            )
        })
        .collect();
    herdgate::cluster::view::View::new(s["rev"].as_u64().unwrap_or(0), workers, Default::default())
}

/// `/status` of a process (blocking).
pub fn status_of(hg: &Herdgate) -> Value {
    let admin = hg.admin_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, body) = rt.block_on(admin_get(admin, "/status"));
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// A counter from `/metrics` of a process (summed over labels), blocking.
pub fn metric(hg: &Herdgate, name: &str) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, body) = rt.block_on(admin_get(hg.admin_addr(), "/metrics"));
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn api_for(hg: &Herdgate) -> Api {
    Api {
        tls: None,
        addr: hg.socket_addr(),
        app_id: APP_ID.into(),
        key: KEY.into(),
        secret: SECRET.into(),
    }
}

pub fn url_for(hg: &Herdgate) -> String {
    format!(
        "ws://{}/app/{KEY}?protocol=7&client=test&version=1.0",
        hg.addr
    )
}

/// Drop the packets uid 65534 (a process started with
/// [`Herdgate::start_as_nobody`]) sends to `port` on loopback, until dropped:
/// that process can no longer reach the port, everyone else can.
pub struct Cut {
    rule: Vec<String>,
}

impl Cut {
    /// Drop what processes of uid 65534 (`nobody`) send to `port`: one
    /// direction of every connection they make to it, reconnections too.
    pub fn new(port: u16) -> Cut {
        let port = port.to_string();
        Cut::with([
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "-m",
            "owner",
            "--uid-owner",
            "65534",
            "--dport",
            &port,
        ])
    }

    /// Drop the packets of one established TCP flow on loopback, from
    /// port `from` to port `to`: one direction of one connection (a new
    /// connection between the same processes is not cut).
    pub fn flow(from: u16, to: u16) -> Cut {
        let (from, to) = (from.to_string(), to.to_string());
        Cut::with([
            "-p",
            "tcp",
            "-s",
            "127.0.0.1",
            "--sport",
            &from,
            "-d",
            "127.0.0.1",
            "--dport",
            &to,
        ])
    }

    /// Whether this is [`Cut::flow`]`(from, to)`.
    pub fn is_flow(&self, from: u16, to: u16) -> bool {
        let (from, to) = (from.to_string(), to.to_string());
        self.rule
            .windows(2)
            .any(|w| w[0] == "--sport" && w[1] == from)
            && self
                .rule
                .windows(2)
                .any(|w| w[0] == "--dport" && w[1] == to)
    }

    fn with<const N: usize>(spec: [&str; N]) -> Cut {
        let mut rule: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        rule.extend(["-j".to_string(), "DROP".to_string()]);
        let cut = Cut { rule };
        cut.iptables("-A");
        cut
    }

    fn iptables(&self, op: &str) {
        let out = std::process::Command::new("iptables")
            .args([op, "OUTPUT"])
            .args(&self.rule)
            .output()
            .expect("iptables is needed for partition tests (scripts/test installs it)");
        assert!(
            out.status.success(),
            "iptables {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.iptables("-D");
    }
}

/// What the HTTP API answered for each publish.
#[derive(Default)]
pub struct Ledger {
    /// (room, publisher, seq) answered 200.
    pub acked: Vec<(String, usize, u64)>,
    /// When each of `acked` was answered (the same order).
    pub acked_at: Vec<Instant>,
    /// (room, publisher, seq, status) of every other answer.
    pub refused: Vec<(String, usize, u64, u16)>,
    /// When each of `refused` was sent (the same order).
    pub refused_sent: Vec<Instant>,
}

impl Ledger {
    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }
}

/// Publish `data = "{publisher}:{seq}"` events named `seq` round-robin over
/// `rooms` through `api` until `stop` is set, sequentially (so this
/// publisher's events have an order), `pace` apart.
pub async fn publisher(
    api: Api,
    publisher: usize,
    rooms: Arc<Vec<String>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pace: Duration,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut seq = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let room = &rooms[seq as usize % rooms.len()];
        let body =
            json!({"name":"seq","channel":room,"data":format!("{publisher}:{seq}")}).to_string();
        let sent = Instant::now();
        let status = api.request("POST", "/events", &[], &body).await.status;
        {
            let mut l = ledger.lock().unwrap();
            match status {
                200 => {
                    l.acked.push((room.clone(), publisher, seq));
                    l.acked_at.push(Instant::now());
                }
                s => {
                    l.refused.push((room.clone(), publisher, seq, s));
                    l.refused_sent.push(sent);
                }
            }
        }
        seq += 1;
        tokio::time::sleep(pace).await;
    }
}

/// What one reader socket received.
#[derive(Default, Debug)]
pub struct Inbox {
    /// Per room, `(publisher, seq)` in arrival order.
    pub got: HashMap<String, Vec<(usize, u64)>>,
    /// `herdgate:status` room states per channel, in order.
    pub states: HashMap<String, Vec<String>>,
    /// Per room, events and states interleaved as they arrived.
    pub timeline: HashMap<String, Vec<Item>>,
    /// Per room, when each `unavailable` arrived.
    pub unavailable_at: HashMap<String, Vec<Instant>>,
    pub closed: Option<Option<u16>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Event(usize, u64),
    State(String),
}

impl Inbox {
    /// Whether `(p, s)` was published while this socket was told its room
    /// was unavailable: between an `unavailable` and the next `ready`, after
    /// the last of `p`'s events before and before the first after — and
    /// that `unavailable` arrived by `acked_at`, when the publish was
    /// answered (if known).
    fn excused(&self, room: &str, p: usize, s: u64, acked_at: Option<Instant>) -> bool {
        let Some(t) = self.timeline.get(room) else {
            return false;
        };
        let told = self.unavailable_at.get(room);
        let mut nth = 0;
        let mut i = 0;
        while i < t.len() {
            if t[i] != Item::State("unavailable".into()) {
                i += 1;
                continue;
            }
            let at = told.and_then(|u| u.get(nth)).copied();
            nth += 1;
            let in_time = match (at, acked_at) {
                (Some(at), Some(acked)) => at <= acked,
                _ => true,
            };
            let end = (i..t.len())
                .find(|j| t[*j] == Item::State("ready".into()))
                .unwrap_or(t.len());
            let before = t[..i].iter().rev().find_map(|it| match it {
                Item::Event(q, x) if *q == p => Some(*x),
                _ => None,
            });
            let after = t[end..].iter().find_map(|it| match it {
                Item::Event(q, x) if *q == p => Some(*x),
                _ => None,
            });
            if before.is_none_or(|b| b < s) && after.is_none_or(|a| a > s) && in_time {
                return true;
            }
            // The unavailables up to the next `ready` belong to this episode.
            nth += t[i + 1..end]
                .iter()
                .filter(|it| **it == Item::State("unavailable".into()))
                .count();
            i = end;
        }
        false
    }
}

/// A socket subscribed to rooms, recording what arrives.
pub struct Reader {
    inbox: Arc<Mutex<Inbox>>,
    task: tokio::task::JoinHandle<()>,
    ends: Arc<std::sync::atomic::AtomicUsize>,
    rooms: usize,
}

impl Reader {
    /// What arrived, once every room's `end` did or `within` passed (then
    /// the inbox is what there is: the checker counts what is missing).
    pub async fn finish(self, within: Duration) -> Inbox {
        let deadline = Instant::now() + within;
        while self.ends.load(std::sync::atomic::Ordering::Acquire) < self.rooms
            && Instant::now() < deadline
            && !self.task.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        std::mem::take(&mut *self.inbox.lock().unwrap())
    }
}

/// A socket on `url` subscribed to `rooms`, recording everything.
pub async fn reader(url: String, rooms: Arc<Vec<String>>) -> Reader {
    let mut c = Client::connect(&url).await;
    for r in rooms.iter() {
        let e = c.subscribe(r).await;
        assert_eq!(
            e.event, "pusher_internal:subscription_succeeded",
            "{:?}",
            e.raw
        );
    }
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let ends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (i2, e2) = (inbox.clone(), ends.clone());
    let task = tokio::spawn(async move {
        use futures_util::StreamExt;
        loop {
            let m = match c.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(_)) | None => {
                    i2.lock().unwrap().closed = Some(None);
                    return;
                }
            };
            let text = match m {
                tokio_tungstenite::tungstenite::Message::Text(t) => t,
                tokio_tungstenite::tungstenite::Message::Close(f) => {
                    i2.lock().unwrap().closed = Some(f.map(|f| u16::from(f.code)));
                    return;
                }
                _ => continue,
            };
            let raw: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            let event = raw["event"].as_str().unwrap_or_default();
            let channel = raw["channel"].as_str().unwrap_or_default().to_string();
            let mut inbox = i2.lock().unwrap();
            match event {
                "seq" => {
                    let d = raw["data"].as_str().unwrap_or_default();
                    let (p, s) = d.split_once(':').unwrap();
                    let (p, s): (usize, u64) = (p.parse().unwrap(), s.parse().unwrap());
                    inbox.got.entry(channel.clone()).or_default().push((p, s));
                    inbox
                        .timeline
                        .entry(channel)
                        .or_default()
                        .push(Item::Event(p, s));
                }
                "end" => {
                    e2.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                "herdgate:status" => {
                    let data: Value = raw["data"]
                        .as_str()
                        .and_then(|d| serde_json::from_str(d).ok())
                        .unwrap_or(Value::Null);
                    if let Some(room) = data["room"].as_str() {
                        if room == "unavailable" {
                            inbox
                                .unavailable_at
                                .entry(channel.clone())
                                .or_default()
                                .push(Instant::now());
                        }
                        inbox
                            .states
                            .entry(channel.clone())
                            .or_default()
                            .push(room.to_string());
                        inbox
                            .timeline
                            .entry(channel)
                            .or_default()
                            .push(Item::State(room.to_string()));
                    }
                }
                _ => {}
            }
        }
    });
    Reader {
        inbox,
        task,
        ends,
        rooms: rooms.len(),
    }
}

/// An audience socket: connected to `url`, subscribed to `room`, reading
/// and discarding what arrives (load on an edge, not checked). A
/// subscription refused with 503 (the room is moving) is tried again, as
/// a client would. Aborting the task closes the socket.
pub async fn audience_socket(url: String, room: String) -> tokio::task::JoinHandle<()> {
    let mut c = Client::connect(&url).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let e = c.subscribe(&room).await;
        if e.event == "pusher_internal:subscription_succeeded" {
            break;
        }
        assert!(
            e.event == "pusher:subscription_error"
                && e.data["status"] == 503
                && Instant::now() < deadline,
            "{:?}",
            e.raw
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = c.ws.next().await {}
    })
}

/// Send `end` to every room (retrying through refusals) so readers finish.
pub async fn end_all(api: &Api, rooms: &[String]) {
    for room in rooms {
        let body = json!({"name":"end","channel":room,"data":""}).to_string();
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let r = api.request("POST", "/events", &[], &body).await;
            if r.status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "end never accepted on {room}: {} {:?}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The verdict: what was lost, duplicated or reordered.
#[derive(Default)]
pub struct Verdict {
    pub acked: usize,
    pub refused: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub reordered: usize,
    pub readers: usize,
    /// Acknowledged but missed by a socket that was told its room was
    /// unavailable at the time (its edge could not reach the owner).
    pub excused: usize,
    /// Publishes not answered 200, per room.
    pub refused_by_room: HashMap<String, usize>,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verdict")
            .field("acked", &self.acked)
            .field("refused", &self.refused)
            .field("lost", &self.lost)
            .field("duplicates", &self.duplicates)
            .field("reordered", &self.reordered)
            .field("readers", &self.readers)
            .field("excused", &self.excused)
            .finish()
    }
}

impl Verdict {
    /// Publishes refused in `rooms`, per room of them.
    pub fn refused_per_room(&self, rooms: &[String]) -> f64 {
        let n: usize = rooms
            .iter()
            .map(|r| self.refused_by_room.get(r).copied().unwrap_or(0))
            .sum();
        n as f64 / rooms.len().max(1) as f64
    }
}

/// Check every reader's inbox against the ledger: each acknowledged publish
/// arrived exactly once at every reader, in its publisher's order — unless
/// the reader had been told its room was unavailable then (`excused`):
/// between the publisher's events around it, and **before** the publish
/// was answered 200 (the `unavailable` arrived at the reader no later than
/// the 200 at the publisher: a socket told afterwards was not told in time).
pub fn check(ledger: &Ledger, inboxes: &[Inbox]) -> Verdict {
    let mut v = Verdict {
        acked: ledger.acked.len(),
        refused: ledger.refused.len(),
        ..Verdict::default()
    };
    for (room, ..) in &ledger.refused {
        *v.refused_by_room.entry(room.clone()).or_default() += 1;
    }
    let mut acked: HashMap<&str, Vec<(usize, u64)>> = HashMap::new();
    let mut acked_at: HashMap<(&str, usize, u64), Instant> = HashMap::new();
    for (i, (room, p, s)) in ledger.acked.iter().enumerate() {
        acked.entry(room).or_default().push((*p, *s));
        if let Some(at) = ledger.acked_at.get(i) {
            acked_at.insert((room, *p, *s), *at);
        }
    }
    for inbox in inboxes {
        for (room, got) in &inbox.got {
            let mut seen = std::collections::HashSet::new();
            let mut last: BTreeMap<usize, u64> = BTreeMap::new();
            for (p, s) in got {
                if !seen.insert((*p, *s)) {
                    v.duplicates += 1;
                }
                if last.get(p).is_some_and(|prev| prev >= s) {
                    v.reordered += 1;
                }
                last.insert(*p, *s);
            }
            let _ = room;
        }
        v.readers += 1;
        for (room, want) in &acked {
            let got: std::collections::HashSet<&(usize, u64)> = inbox
                .got
                .get(*room)
                .map(|g| g.iter().collect())
                .unwrap_or_default();
            type Refs<'a> = Vec<&'a (usize, u64)>;
            let (excused, missing): (Refs, Refs) = want
                .iter()
                .filter(|w| !got.contains(w))
                .partition(|(p, s)| {
                    let at = acked_at.get(&(*room, *p, *s)).copied();
                    inbox.excused(room, *p, *s, at)
                });
            v.excused += excused.len();
            if !excused.is_empty() && std::env::var_os("HERDGATE_TEST_EXCUSED").is_some() {
                let t = inbox.timeline.get(*room).cloned().unwrap_or_default();
                eprintln!(
                    "reader {}: {room}: excused {:?}; timeline {:?}",
                    v.readers, excused, t
                );
            }
            if !missing.is_empty() {
                eprintln!(
                    "reader {}: {room}: {} acknowledged missing, e.g. {:?}",
                    v.readers,
                    missing.len(),
                    &missing[..missing.len().min(5)]
                );
            }
            v.lost += missing.len();
        }
    }
    v
}

/// Connect a plain client to a process.
pub async fn connect(hg: &Herdgate) -> Client {
    Client::connect(&url_for(hg)).await
}

/// The local ports of the established TCP connections process `pid` has
/// to `127.0.0.1:port` (from `ss`): an edge's link connections to a worker.
pub fn connections_to(pid: u32, port: u16) -> Vec<u16> {
    let out = std::process::Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .expect("ss (iproute2) is needed for flow cuts");
    let text = String::from_utf8_lossy(&out.stdout);
    let peer = format!("127.0.0.1:{port}");
    let who = format!("pid={pid},");
    text.lines()
        .filter(|l| l.contains(&who))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer Process (no state column with `state`).
            let (local, remote) = (cols.get(2)?, cols.get(3)?);
            (*remote == peer).then(|| local.rsplit(':').next()?.parse().ok())?
        })
        .collect()
}

/// The socket address of a process's link listener (a worker's `addr`).
pub fn link_port(hg: &Herdgate) -> u16 {
    hg.addr.parse::<SocketAddr>().unwrap().port()
}

/// Poll (blocking, bounded) until `cond` holds: for process state that has
/// no event to await (a metric, a status field).
pub fn eventually(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    eventually_or(what, within, cond, String::new)
}

/// [`eventually`], with `why()` (the state that was waited on) in the
/// panic message when it does not happen.
pub fn eventually_or(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
    why: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("{what}: not within {within:?}\n{}", why());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
