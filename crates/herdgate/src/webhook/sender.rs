//! One webhook: its bounded queue and the task that batches, signs, POSTs
//! and retries.
//!
//! Order: one batch at a time, retried until it is answered 2xx or its
//! retry window ends, so the backend sees each channel's events in the
//! order they happened. Bound: the queue holds at most `queue_events`
//! events and `queue_bytes` bytes (including the batch in flight); an event
//! that does not fit is dropped and counted (`reason="queue_full"`) —
//! fan-out never waits for a webhook.

use super::client::{self, Conn};
use super::{Event, Kind};
use crate::config::{WebhookConfig, WebhooksConfig};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest pause between two attempts of one batch.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a webhook is, as configured: compared on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub app: Arc<str>,
    pub key: String,
    pub secret: String,
    pub hook: WebhookConfig,
    pub settings: WebhooksConfig,
}

pub struct Target {
    pub spec: Spec,
    uri: Uri,
    mask: u16,
    headers: HeaderMap,
    queue: Mutex<Queue>,
    wake: Notify,
    pub retired: CancellationToken,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<(Event, Instant)>,
    /// Bytes of the queued events and of the batch in flight.
    bytes: usize,
    /// Events of the batch in flight.
    in_flight: usize,
}

impl Target {
    pub fn new(spec: Spec) -> Result<Target, String> {
        let uri = crate::config::webhook_url(&spec.hook.url).map_err(String::from)?;
        let mask = spec
            .hook
            .event_types
            .iter()
            .filter_map(|t| Kind::from_name(t))
            .fold(0u16, |m, k| m | k.bit());
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.hook.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(&host).map_err(|e| e.to_string())?,
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            "x-pusher-key",
            HeaderValue::from_str(&spec.key).map_err(|e| e.to_string())?,
        );
        Ok(Target {
            spec,
            uri,
            mask,
            headers,
            queue: Mutex::default(),
            wake: Notify::new(),
            retired: CancellationToken::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wants(&self, kind: Kind, channel: &str) -> bool {
        self.mask & kind.bit() != 0 && channel.starts_with(&self.spec.hook.filter.channel_prefix)
    }

    /// Queue `ev`; false (counted) when the queue is full.
    pub fn push(&self, ev: &Event) -> bool {
        let s = &self.spec.settings;
        {
            let mut q = self.lock();
            if q.events.len() >= s.queue_events || q.bytes + ev.json.len() > s.queue_bytes {
                drop(q);
                metrics::counter!("herdgate_webhook_dropped_total", "reason" => "queue_full")
                    .increment(1);
                return false;
            }
            q.bytes += ev.json.len();
            q.events.push_back((ev.clone(), Instant::now()));
        }
        metrics::gauge!("herdgate_webhook_queue_events").increment(1.0);
        self.wake.notify_one();
        true
    }

    /// Events waiting and in flight.
    pub fn depth(&self) -> usize {
        let q = self.lock();
        q.events.len() + q.in_flight
    }

    /// Take the next batch once it is full or its first event waited
    /// `batch_wait`; `None` when retired.
    async fn next_batch(&self) -> Option<Vec<(Event, Instant)>> {
        let s = &self.spec.settings;
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let (len, first) = {
                let q = self.lock();
                (q.events.len(), q.events.front().map(|e| e.1))
            };
            match first {
                Some(first)
                    if len >= s.batch_max_events || first.elapsed() >= s.batch_wait.get() =>
                {
                    let mut q = self.lock();
                    let n = q.events.len().min(s.batch_max_events);
                    q.in_flight = n;
                    return Some(q.events.drain(..n).collect());
                }
                Some(first) => {
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep_until(first + s.batch_wait.get()) => {}
                        _ = self.retired.cancelled() => return None,
                    }
                }
                None => {
                    tokio::select! {
                        _ = woken => {}
                        _ = self.retired.cancelled() => return None,
                    }
                }
            }
        }
    }

    fn release(&self, batch: &[(Event, Instant)]) {
        let bytes: usize = batch.iter().map(|(e, _)| e.json.len()).sum();
        let mut q = self.lock();
        q.bytes -= bytes;
        q.in_flight = 0;
        drop(q);
        metrics::gauge!("herdgate_webhook_queue_events").decrement(batch.len() as f64);
    }

    /// Send until retired.
    pub async fn run(self: Arc<Self>, tls: Arc<rustls::ClientConfig>) {
        let mut conn: Option<Conn> = None;
        while let Some(batch) = self.next_batch().await {
            self.send(&batch, &mut conn, &tls).await;
            self.release(&batch);
        }
        let left = {
            let mut q = self.lock();
            q.bytes = 0;
            q.in_flight = 0;
            std::mem::take(&mut q.events).len()
        };
        if left > 0 {
            metrics::gauge!("herdgate_webhook_queue_events").decrement(left as f64);
            metrics::counter!("herdgate_webhook_dropped_total", "reason" => "removed")
                .increment(left as u64);
        }
    }

    /// One batch: POSTed until a 2xx, or dropped when the retry window ends.
    async fn send(
        &self,
        batch: &[(Event, Instant)],
        conn: &mut Option<Conn>,
        tls: &Arc<rustls::ClientConfig>,
    ) {
        let s = &self.spec.settings;
        let body = body(batch, unix_ms());
        let mut headers = self.headers.clone();
        headers.insert(
            "x-pusher-signature",
            HeaderValue::from_str(&sign(&self.spec.secret, &body)).expect("hex is a header value"),
        );
        let started = Instant::now();
        let mut backoff = Duration::from_secs(1);
        loop {
            let attempt = tokio::select! {
                r = tokio::time::timeout(
                    s.timeout.get(),
                    client::post(conn, &self.uri, tls, &headers, body.clone()),
                ) => r,
                _ = self.retired.cancelled() => return,
            };
            let (label, result) = match attempt {
                Ok(Ok(status)) if status.is_success() => {
                    metrics::counter!("herdgate_webhook_posts_total", "result" => "ok")
                        .increment(1);
                    metrics::counter!("herdgate_webhook_delivered_total")
                        .increment(batch.len() as u64);
                    for (_, at) in batch {
                        metrics::histogram!("herdgate_webhook_latency_seconds")
                            .record(at.elapsed().as_secs_f64());
                    }
                    return;
                }
                Ok(Ok(status)) => ("status", format!("answered {status}")),
                Ok(Err(e)) => ("error", e.to_string()),
                Err(_) => {
                    *conn = None; // a hanging request: never reuse its connection
                    ("timeout", format!("no answer within {:?}", s.timeout.get()))
                }
            };
            metrics::counter!("herdgate_webhook_posts_total", "result" => label).increment(1);
            let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
            if started.elapsed() + pause > s.retry_window.get() {
                tracing::warn!(url = %self.spec.hook.url, events = batch.len(), last = %result,
                    "webhook batch dropped: not delivered within the retry window");
                metrics::counter!("herdgate_webhook_dropped_total", "reason" => "retry_window")
                    .increment(batch.len() as u64);
                return;
            }
            tracing::debug!(url = %self.spec.hook.url, error = %result, retry_in = ?pause, "webhook POST failed");
            metrics::counter!("herdgate_webhook_retries_total").increment(1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.retired.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// `{"time_ms":…,"events":[…]}`, the events already encoded.
fn body(batch: &[(Event, Instant)], time_ms: u64) -> Bytes {
    let mut out =
        String::with_capacity(32 + batch.iter().map(|(e, _)| e.json.len() + 1).sum::<usize>());
    out.push_str("{\"time_ms\":");
    out.push_str(&time_ms.to_string());
    out.push_str(",\"events\":[");
    for (i, (e, _)) in batch.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e.json);
    }
    out.push_str("]}");
    Bytes::from(out)
}

/// `X-Pusher-Signature`: lowercase hex HMAC-SHA256 of the raw body.
fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn unix_ms() -> u64 {
    crate::clock::unix_now().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_pushers_and_the_signature_is_hmac_sha256_hex() {
        let batch = vec![
            (Event::occupied("presence-a"), Instant::now()),
            (
                Event::member(Kind::MemberAdded, "presence-a", "u1"),
                Instant::now(),
            ),
        ];
        let b = body(&batch, 1_700_000_000_000);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["time_ms"], 1_700_000_000_000u64);
        assert_eq!(v["events"][0]["name"], "channel_occupied");
        assert_eq!(v["events"][1]["user_id"], "u1");
        // RFC 4231 test case 2 (key "Jefe").
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
