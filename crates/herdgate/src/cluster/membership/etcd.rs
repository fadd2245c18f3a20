//! Membership from etcd: leases, registration, one revision-ordered view.
//!
//! Keys, all under `cluster.etcd.prefix` (`<p>`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<p>/meta` | `{"ring":"fnv1a64-chain","link_version":3}` | none: written once, compared by every node |
//! | `<p>/workers/<id>` | `{"addr":…,"vnodes":…,"state":…}` | the worker's |
//! | `<p>/edges/<id>` | `{"addr":…}` | the edge's |
//! | `<p>/tls/ticket_keys` | `{"keys":[{"sealed":…,"from":…}]}` | none: the edges' shared TLS ticket keys, sealed (see [`super::ticket_keys`]); not part of the view |
//!
//! Each node keeps its key alive with a lease renewed every
//! `keepalive_interval`; a worker's [`Fence`] stays valid until the send time
//! of the last renewal etcd answered, plus the TTL it answered, minus
//! `fence_margin` — etcd's own expiry can only be later. A key that already
//! exists is another process with the same id: the new one waits for it to
//! go, it never steals it.
//!
//! Every node lists `<p>/` once and then watches it from the next revision;
//! each watch response is applied whole and becomes one [`View`]. A
//! compacted watch is answered by listing again. No per-message traffic
//! goes to etcd: keepalives at nodes × 2/s and one watch per node.

use super::{boot_nanos, Contact, Control, Fence, Membership};
use crate::cluster::view::{NodeId, View, WorkerInfo};
use crate::config::EtcdConfig;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The most ring points a worker entry may claim: `cluster.weight`'s
/// upper bound (validated at every node's start).
const MAX_VNODES: u32 = 1024;

pub const RING_FORMAT: &str = "fnv1a64-chain";

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd: {0}")]
    Other(String),
}

/// What this node registers.
#[derive(Debug, Clone)]
pub enum Registration {
    Worker(WorkerInfo),
    Edge { addr: String },
}

/// Start registering and watching in the background; the view is empty
/// (rev 0: no room has an owner) until the first list arrives, and a worker
/// is fenced until its key is registered. etcd that cannot be reached yet
/// is retried; a cluster whose ring format differs is refused (logged, the
/// node stays stale and fenced).
pub fn start(
    cfg: &EtcdConfig,
    node: NodeId,
    reg: Registration,
    stop: CancellationToken,
) -> Membership {
    let (view_tx, view_rx) = watch::channel(Arc::new(View::empty()));
    let (inc_tx, inc_rx) = watch::channel(0i64);
    let fence = Arc::new(match reg {
        Registration::Worker(_) => Fence::closed(),
        Registration::Edge { .. } => Fence::always(),
    });
    let stale = Arc::new(AtomicBool::new(true));
    // Two keepalives without an answer: lost. A worker's fence runs out at
    // lease - fence_margin, later (validation keeps room for a heartbeat),
    // so the witnesses speak before it does.
    let contact = Arc::new(Contact::new(cfg.keepalive_interval.get() * 2));
    let (control_tx, control_rx) = mpsc::channel(16);
    let cfg = cfg.clone();
    let (f, st, ct) = (fence.clone(), stale.clone(), contact.clone());
    let touch = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.request_timeout.get())
            .with_timeout(cfg.request_timeout.get())
            // etcd refuses client pings more often than every 5 s by default.
            .with_keep_alive(Duration::from_secs(5), cfg.request_timeout.get())
            .with_require_leader(true);
        let client = loop {
            let r = Client::connect(&cfg.endpoints, Some(options.clone())).await;
            let r = match r {
                Ok(c) => check_meta(&c, &cfg.prefix).await.map(|()| c),
                Err(e) => Err(e.into()),
            };
            match r {
                Ok(c) => break c,
                Err(EtcdError::Other(e)) => {
                    tracing::error!("{e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "etcd not reachable yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        let prefix = cfg.prefix.clone();
        let watcher = Watcher {
            client: client.clone(),
            prefix: prefix.clone(),
            view: view_tx,
            stale: st,
            stale_after: cfg.lease_ttl.get(),
            stop: stop.clone(),
            contact: ct.clone(),
            touch: touch.clone(),
        };
        tokio::spawn(watcher.run());
        let registrar = Registrar {
            client,
            key: match &reg {
                Registration::Worker(_) => format!("{prefix}/workers/{node}"),
                Registration::Edge { .. } => format!("{prefix}/edges/{node}"),
            },
            reg,
            ttl: cfg.lease_ttl.get(),
            every: cfg.keepalive_interval.get(),
            margin: cfg.fence_margin.get(),
            fence: f,
            incarnation: inc_tx,
            control: control_rx,
            stop,
            dirty: false,
            contact: ct,
            touch,
        };
        registrar.run().await;
    });
    Membership {
        view: view_rx,
        fence,
        stale,
        contact,
        incarnation: inc_rx,
        control: Some(control_tx),
        _keep: None,
    }
}

/// Write `<p>/meta` if absent, and refuse to join a cluster whose ring
/// format differs (a mixed-version cluster would place rooms differently).
async fn check_meta(client: &Client, prefix: &str) -> Result<(), EtcdError> {
    let key = format!("{prefix}/meta");
    let value =
        serde_json::json!({"ring": RING_FORMAT, "link_version": crate::cluster::link::VERSION})
            .to_string();
    let mut c = client.clone();
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(key.as_str(), value, None)])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let r = c.txn(txn).await?;
    if r.succeeded() {
        return Ok(());
    }
    for op in r.op_responses() {
        if let etcd_client::TxnOpResponse::Get(g) = op {
            if let Some(kv) = g.kvs().first() {
                let meta: serde_json::Value =
                    serde_json::from_slice(kv.value()).unwrap_or_default();
                if meta["ring"] != RING_FORMAT {
                    return Err(EtcdError::Other(format!(
                        "{key} says ring {}, this herdgate places rooms by {RING_FORMAT}: refusing to join",
                        meta["ring"]
                    )));
                }
            }
        }
    }
    Ok(())
}

struct Watcher {
    client: Client,
    prefix: String,
    view: watch::Sender<Arc<View>>,
    stale: Arc<AtomicBool>,
    stale_after: Duration,
    stop: CancellationToken,
    contact: Arc<Contact>,
    /// Asks the registrar to write this node's key again (see `list_and_watch`).
    touch: Arc<AtomicBool>,
}

/// The keys of a view, kept between watch responses.
#[derive(Default)]
struct Keys {
    workers: BTreeMap<NodeId, WorkerInfo>,
    edges: BTreeSet<NodeId>,
}

impl Keys {
    fn apply(&mut self, prefix: &str, key: &[u8], value: Option<(&[u8], i64)>) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        let Some(rest) = key.strip_prefix(prefix) else {
            return;
        };
        if let Some(id) = rest.strip_prefix("/workers/") {
            match value {
                Some((v, create_rev)) => match serde_json::from_slice::<WorkerInfo>(v) {
                    Ok(mut w) => {
                        w.incarnation = create_rev;
                        // No more points than a valid `cluster.weight`
                        // gives: a bad entry cannot make every node build
                        // a huge ring.
                        if w.vnodes > MAX_VNODES {
                            tracing::warn!(
                                key,
                                vnodes = w.vnodes,
                                "worker entry over {MAX_VNODES} vnodes: capped"
                            );
                            w.vnodes = MAX_VNODES;
                        }
                        self.workers.insert(NodeId::from(id), w);
                    }
                    Err(e) => {
                        tracing::warn!(key, error = %e, "ignoring an unreadable worker entry")
                    }
                },
                None => {
                    self.workers.remove(id);
                }
            }
        } else if let Some(id) = rest.strip_prefix("/edges/") {
            match value {
                Some(_) => self.edges.insert(NodeId::from(id)),
                None => self.edges.remove(id),
            };
        }
    }

    fn view(&self, rev: i64) -> View {
        View::new(rev.max(0) as u64, self.workers.clone(), self.edges.clone())
    }
}

impl Watcher {
    async fn run(mut self) {
        // When the view was last known to be current.
        let mut current_at = tokio::time::Instant::now();
        let stop = self.stop.clone();
        loop {
            let r = tokio::select! {
                r = self.list_and_watch(&mut current_at) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "etcd watch failed; listing again");
                metrics::counter!("herdgate_etcd_watch_failures_total").increment(1);
            }
            metrics::gauge!("herdgate_etcd_watch_up").set(0.0);
            if current_at.elapsed() >= self.stale_after && !self.stale.swap(true, Ordering::AcqRel)
            {
                tracing::error!(
                    "cannot follow the cluster view: serving no rooms until etcd answers"
                );
                metrics::gauge!("herdgate_view_stale").set(1.0);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// List `<p>/`, publish that view, then watch from the next revision,
    /// publishing each response's view; returns on any failure.
    async fn list_and_watch(
        &mut self,
        current_at: &mut tokio::time::Instant,
    ) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        let list = c
            .get(
                format!("{}/", self.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        self.contact.ok();
        let mut rev = list.header().map_or(0, |h| h.revision());
        let mut keys = Keys::default();
        for kv in list.kvs() {
            keys.apply(
                &self.prefix,
                kv.key(),
                Some((kv.value(), kv.create_revision())),
            );
        }
        self.publish(keys.view(rev));
        // A list is stamped with the store's revision, which writes outside
        // the prefix also advance; nodes that watched hold the same keys at
        // the revision of the last event. Writing our own key again makes
        // an event every node sees, so all meet at one revision again.
        self.touch.store(true, Ordering::Release);
        let mut stream = c
            .watch(
                format!("{}/", self.prefix),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1)
                        .with_progress_notify(),
                ),
            )
            .await?;
        self.stale.store(false, Ordering::Release);
        *current_at = tokio::time::Instant::now();
        metrics::gauge!("herdgate_view_stale").set(0.0);
        metrics::gauge!("herdgate_etcd_watch_up").set(1.0);
        while let Some(resp) = stream.message().await? {
            *current_at = tokio::time::Instant::now();
            self.contact.ok();
            if resp.canceled() {
                return Err(EtcdError::Other(format!(
                    "watch canceled (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            // A view's revision is that of the newest event it holds. Not
            // the response header's: etcd stamps a watch response with the
            // store's revision when it is sent, which may already cover the
            // next event, so two different views would share one revision
            // (and a node would skip the second as "not newer").
            // The TLS ticket keys live under the prefix too, but are no
            // part of the view: their writes make no view (every node
            // skips the same events, so views still meet at one revision).
            let tls = format!("{}/tls/", self.prefix);
            let events: Vec<_> = resp
                .events()
                .iter()
                .filter(|ev| {
                    !ev.kv()
                        .is_some_and(|kv| kv.key().starts_with(tls.as_bytes()))
                })
                .collect();
            if events.is_empty() {
                continue; // created / progress / ticket keys: nothing new
            }
            let mut newest = rev;
            for ev in events {
                let Some(kv) = ev.kv() else { continue };
                newest = newest.max(kv.mod_revision());
                match ev.event_type() {
                    EventType::Put => keys.apply(
                        &self.prefix,
                        kv.key(),
                        Some((kv.value(), kv.create_revision())),
                    ),
                    EventType::Delete => keys.apply(&self.prefix, kv.key(), None),
                }
            }
            rev = newest;
            self.publish(keys.view(rev));
        }
        Err(EtcdError::Other("watch stream ended".into()))
    }

    fn publish(&self, view: View) {
        let changed = {
            let cur = self.view.borrow();
            cur.rev != view.rev || cur.workers != view.workers || cur.edges != view.edges
        };
        if changed {
            metrics::gauge!("herdgate_membership_revision").set(view.rev as f64);
            tracing::info!(
                rev = view.rev,
                workers = ?view.workers.iter().map(|(k, w)| format!("{k}:{}", w.vnodes)).collect::<Vec<_>>(),
                edges = view.edges.len(),
                "membership view"
            );
            self.view.send_replace(Arc::new(view));
        }
    }
}

struct Registrar {
    client: Client,
    key: String,
    reg: Registration,
    ttl: Duration,
    every: Duration,
    margin: Duration,
    fence: Arc<Fence>,
    incarnation: watch::Sender<i64>,
    control: mpsc::Receiver<Control>,
    stop: CancellationToken,
    /// The value changed (a ramp step) and is not written yet.
    dirty: bool,
    contact: Arc<Contact>,
    /// Set by the watcher after a list: write the key again at the next tick.
    touch: Arc<AtomicBool>,
}

enum Ended {
    /// The lease is gone (expired or revoked by someone): register anew.
    LeaseLost,
    /// Asked to leave: done.
    Left,
}

impl Registrar {
    fn value(&self) -> String {
        match &self.reg {
            Registration::Worker(w) => serde_json::to_string(w).expect("serializable"),
            Registration::Edge { addr } => serde_json::json!({ "addr": addr }).to_string(),
        }
    }

    async fn run(mut self) {
        let stop = self.stop.clone();
        let mut lease: Option<i64> = None;
        loop {
            let step = async {
                let id = match lease {
                    Some(id) => id,
                    None => self.register().await?,
                };
                lease = Some(id);
                self.keep(id).await
            };
            let r = tokio::select! {
                r = step => r,
                _ = stop.cancelled() => {
                    self.fence.close();
                    return;
                }
            };
            match r {
                Ok(Ended::Left) => return,
                Ok(Ended::LeaseLost) => {
                    lease = None;
                    self.fence.close();
                    // A new incarnation joins like a new worker: from weight 0.
                    if let Registration::Worker(w) = &mut self.reg {
                        w.vnodes = 0;
                        w.state = "joining".into();
                    }
                    metrics::gauge!("herdgate_fenced").set(1.0);
                    tracing::warn!(key = %self.key, "lease lost: registering again as a new incarnation");
                }
                Err(e) => {
                    // Transient (a leader change, a blip): renew the same lease
                    // again; if this lasts, the fence runs out by itself.
                    tracing::warn!(key = %self.key, error = %e, "etcd keepalive failed; retrying");
                    metrics::counter!("herdgate_etcd_keepalive_failures_total").increment(1);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Grant a lease and create the key under it; another process holding
    /// the key is waited out, never taken over.
    async fn register(&mut self) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let lease = c.lease_grant(self.ttl.as_secs() as i64, None).await?;
        let lease_id = lease.id();
        let granted_at = boot_nanos();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                self.key.as_str(),
                self.value(),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let r = c.txn(txn).await?;
        if !r.succeeded() {
            tracing::warn!(key = %self.key, "another process holds this node id; waiting for it to leave");
            let _ = c.lease_revoke(lease_id).await;
            tokio::time::sleep(self.every).await;
            return Err(EtcdError::Other(format!(
                "{} is held by another process",
                self.key
            )));
        }
        let created = r.header().map_or(0, |h| h.revision());
        self.contact.ok();
        if let Registration::Worker(_) = self.reg {
            self.fence.extend(
                granted_at,
                Duration::from_secs(lease.ttl().max(0) as u64),
                self.margin,
            );
            metrics::gauge!("herdgate_fenced").set(0.0);
        }
        self.dirty = false;
        self.touch.store(false, Ordering::Release);
        self.incarnation.send_replace(created);
        tracing::info!(key = %self.key, incarnation = created, "registered in etcd");
        Ok(lease_id)
    }

    /// Renew `lease_id` until it is lost (`LeaseLost`), we leave (`Left`),
    /// or a transient failure (`Err`: the caller renews the same lease).
    async fn keep(&mut self, lease_id: i64) -> Result<Ended, EtcdError> {
        let mut c = self.client.clone();
        let put = |c: &mut Client, value: String| {
            let mut c = c.clone();
            let key = self.key.clone();
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease_id)))
                    .await
            }
        };
        if self.dirty {
            put(&mut c, self.value()).await?;
            self.dirty = false;
        }
        let (mut keeper, mut answers) = match c.lease_keep_alive(lease_id).await {
            Ok(k) => k,
            // The lease is gone (expired while we could not renew it).
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => return Ok(Ended::LeaseLost),
            Err(e) => return Err(e.into()),
        };
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.touch.swap(false, Ordering::AcqRel) {
                        put(&mut c, self.value()).await?;
                    }
                    let sent = boot_nanos();
                    keeper.keep_alive().await?;
                    let answer = tokio::time::timeout(self.every * 2, answers.message()).await;
                    match answer {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            // The fence first: a frozen worker that sees etcd
                            // answer must find its lease renewed already.
                            if let Registration::Worker(_) = self.reg {
                                self.fence.extend(sent, Duration::from_secs(r.ttl() as u64), self.margin);
                                metrics::gauge!("herdgate_lease_valid_seconds")
                                    .set(self.fence.remaining().as_secs_f64());
                                metrics::gauge!("herdgate_fenced").set(0.0);
                            }
                            self.contact.ok();
                        }
                        Ok(Ok(Some(_))) => return Ok(Ended::LeaseLost), // TTL 0: expired
                        Ok(Ok(None)) => return Err(EtcdError::Other("keepalive stream ended".into())),
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => {
                            return Err(EtcdError::Other("keepalive unanswered".into()));
                        }
                    }
                }
                cmd = self.control.recv() => match cmd {
                    Some(Control::Set { vnodes, state }) => {
                        if let Registration::Worker(w) = &mut self.reg {
                            w.vnodes = vnodes;
                            w.state = state.to_string();
                        }
                        self.dirty = true;
                        put(&mut c, self.value()).await?;
                        self.dirty = false;
                    }
                    Some(Control::Leave { done }) => {
                        let _ = c.lease_revoke(lease_id).await;
                        self.fence.close();
                        let _ = done.send(());
                        return Ok(Ended::Left);
                    }
                    None => {}
                },
            }
        }
    }
}
