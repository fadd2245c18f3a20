//! The publisher: server-SDK side of the load, through the HTTP API.
//!
//! `--publishers` workers each keep one HTTP/1.1 keep-alive connection (plain or TLS, via
//! hyper's low-level client over our own [`Conn`]) with one request in flight, and each paces
//! itself at `publish_rate / publishers`. A worker that falls more than a second behind skips
//! the missed events (counted) instead of bursting, so the offered rate stays honest.
//!
//! Every event is registered in the shared ledger *before* it is sent, with the number of
//! sockets subscribed to its channel at that moment as the expected deliveries. Its data is
//! `{"seq":<per-channel seq>,"id":<ledger id>,"t":<unix µs>,"pad":"xx…"}` (a JSON string).

use crate::cli::{Plan, Scenario};
use crate::hist::{AtomicHist, Hist};
use crate::net::{self, Conn};
use crate::shm::{Settled, Shm};
use crate::socket::{now_micros, wait_shutdown};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use pusher_sign as sign;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Totals of finalised ledger records.
#[derive(Default, Debug)]
pub struct LedgerTotals {
    pub records: AtomicU64,
    pub expected: AtomicU64,
    pub credited: AtomicU64,
    pub missing: AtomicU64,
    pub extra: AtomicU64,
}

impl LedgerTotals {
    pub fn absorb(&self, s: Settled) {
        self.records.fetch_add(1, Relaxed);
        self.expected.fetch_add(s.expected, Relaxed);
        self.credited.fetch_add(s.delivered, Relaxed);
        self.missing
            .fetch_add(s.expected.saturating_sub(s.delivered), Relaxed);
        self.extra
            .fetch_add(s.delivered.saturating_sub(s.expected), Relaxed);
    }
}

#[derive(Default, Clone, Debug, Serialize, Deserialize)]
pub struct PublishStats {
    pub attempted: u64,
    pub ok: u64,
    pub failed_by_status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub skipped: u64,
    pub api_us: Hist,
}

struct Shared {
    plan: Arc<Plan>,
    shm: Arc<Shm>,
    totals: Arc<LedgerTotals>,
    tls: Option<TlsConnector>,
    next_id: AtomicU64,
    chan_seq: Vec<AtomicU64>,
    pad: String,
    path: String,
    attempted: AtomicU64,
    ok: AtomicU64,
    skipped: AtomicU64,
    api: AtomicHist,
    maps: Mutex<(BTreeMap<u16, u64>, BTreeMap<String, u64>)>,
}

impl Shared {
    fn error(&self, label: &str) {
        *self
            .maps
            .lock()
            .unwrap()
            .1
            .entry(label.to_string())
            .or_default() += 1;
    }
}

/// The padding of each event: `len` bytes of one letter, or of JSON-like
/// records (escaped inside the data string, as a real app's would be).
fn pad(len: usize, json: bool) -> String {
    if !json {
        return "x".repeat(len);
    }
    let mut s = String::with_capacity(len + 128);
    let mut i = 0u64;
    while s.len() < len {
        // Numbers vary as real stats do (a cheap mix, not one repeated record).
        let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        s.push_str(&format!(
            "{{'id':'player-{i}','name':'Player {i}','team':'{}','goals':{},'assists':{},'minutes':{},'rating':{}.{}}}",
            if h & 1 == 0 { "home" } else { "away" },
            h % 4,
            (h >> 3) % 5,
            (h >> 7) % 91,
            5 + (h >> 11) % 5,
            (h >> 15) % 10
        ));
        i += 1;
    }
    s.truncate(len);
    s
}

/// Publishes until `stop` turns true; returns what happened.
pub async fn run(
    plan: Arc<Plan>,
    shm: Arc<Shm>,
    totals: Arc<LedgerTotals>,
    stop: watch::Receiver<bool>,
) -> PublishStats {
    let shared = Arc::new(Shared {
        tls: plan.tls.clone().map(TlsConnector::from),
        next_id: AtomicU64::new(1),
        chan_seq: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        // The data string without padding is ~60 bytes.
        pad: pad(plan.payload.saturating_sub(60), plan.payload_json),
        path: format!("{}/apps/{}/events", plan.api.base_path, plan.app_id),
        attempted: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        api: AtomicHist::default(),
        maps: Mutex::default(),
        plan,
        shm,
        totals,
    });
    let workers = shared.plan.publishers;
    let rate = shared.plan.publish_rate / workers as f64;
    if rate > 0.0 {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..workers {
            let offset = Duration::from_secs_f64(w as f64 / shared.plan.publish_rate);
            set.spawn(publish_loop(shared.clone(), rate, offset, stop.clone()));
        }
        while set.join_next().await.is_some() {}
    }
    let maps = shared.maps.lock().unwrap().clone();
    PublishStats {
        attempted: shared.attempted.load(Relaxed),
        ok: shared.ok.load(Relaxed),
        failed_by_status: maps.0,
        errors: maps.1,
        skipped: shared.skipped.load(Relaxed),
        api_us: shared.api.snapshot(),
    }
}

async fn publish_loop(
    s: Arc<Shared>,
    rate: f64,
    offset: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now() + offset;
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wait_shutdown(&mut stop) => break,
        }
        let now = Instant::now();
        if now > next + Duration::from_secs(1) {
            let missed = ((now - next).as_secs_f64() / interval.as_secs_f64()) as u64;
            s.skipped.fetch_add(missed, Relaxed);
            next = now;
        }
        next += interval;
        if sender.as_ref().is_none_or(|x| x.is_closed()) {
            sender = match connect(&s).await {
                Ok(x) => Some(x),
                Err(label) => {
                    s.error(&label);
                    s.skipped.fetch_add(1, Relaxed);
                    // Back off a little so a dead API does not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        }
        let channel = match s.plan.scenario {
            Scenario::Fanout => 0,
            _ => rng.random_range(0..s.plan.channels),
        };
        if !publish_one(&s, sender.as_mut().unwrap(), channel).await {
            sender = None;
        }
    }
}

async fn connect(s: &Shared) -> Result<SendRequest<Full<Bytes>>, String> {
    let conn: Conn = net::connect(&s.plan.api, None, s.tls.as_ref())
        .await
        .map_err(|e| format!("api_{}", e.label()))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|_| "api_handshake".to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one event; false when the connection should be replaced.
async fn publish_one(s: &Shared, sender: &mut SendRequest<Full<Bytes>>, channel: usize) -> bool {
    let p = &s.plan;
    let id = s.next_id.fetch_add(1, Relaxed);
    let seq = s.chan_seq[channel].fetch_add(1, Relaxed) + 1;
    let expected = s.shm.chan_subs()[channel].load(Relaxed);
    if let Some(old) = s.shm.ledger_register(id, expected) {
        s.totals.absorb(old);
    }
    s.attempted.fetch_add(1, Relaxed);
    let data = format!(
        r#"{{"seq":{seq},"id":{id},"t":{},"pad":"{}"}}"#,
        now_micros(),
        s.pad
    );
    let body =
        serde_json::json!({ "name": "load", "channels": [p.channel_name(channel)], "data": data })
            .to_string();
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let query = sign::signed_query("POST", &s.path, &p.key, &p.secret, ts, body.as_bytes(), &[]);
    let request = http::Request::post(format!("{}?{query}", s.path))
        .header(http::header::HOST, p.api.authority())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let t0 = Instant::now();
    let outcome = async {
        sender.ready().await.map_err(|_| "api_connection_lost")?;
        let resp = sender
            .send_request(request)
            .await
            .map_err(|_| "api_request_failed")?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.map_err(|_| "api_body")?;
        Ok::<u16, &str>(status)
    }
    .await;
    match outcome {
        Ok(status) if (200..300).contains(&status) => {
            s.api.record(t0.elapsed().as_micros() as u64);
            s.ok.fetch_add(1, Relaxed);
            true
        }
        Ok(status) => {
            s.shm.ledger_cancel(id);
            *s.maps.lock().unwrap().0.entry(status).or_default() += 1;
            true
        }
        Err(label) => {
            s.shm.ledger_cancel(id);
            s.error(label);
            false
        }
    }
}
