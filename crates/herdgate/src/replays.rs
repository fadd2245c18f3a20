//! First answers to keyed HTTP API publishes (`X-Idempotency-Key`, or
//! `idempotency_key` in the body), per app: a retry with the same key and
//! body gets the first answer and publishes nothing. A leaf module, so the
//! composition root (`state`) holds it without importing `http`. Bounded:
//! [`REPLAY_MAX`] keys per app for [`REPLAY_WINDOW`], the oldest forgotten
//! first.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The key was used with another body within the window (HTTP 409).
#[derive(Debug)]
pub struct Conflict;

/// Idempotency keys are remembered this long...
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);
/// ...at most this many per app (the oldest forgotten first).
pub const REPLAY_MAX: usize = 10_000;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// First answers to keyed publishes, per app, for [`REPLAY_WINDOW`].
#[derive(Default)]
pub struct Replays {
    by_app: std::sync::Mutex<HashMap<Arc<str>, AppReplays>>,
}

#[derive(Default)]
struct AppReplays {
    /// key → (hash of the body, the answer, when).
    answers: HashMap<String, (u64, Value, tokio::time::Instant)>,
    order: std::collections::VecDeque<(String, tokio::time::Instant)>,
}

impl Replays {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, AppReplays>> {
        self.by_app.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first answer for `key` if its body was the same; a conflict if not.
    pub fn get(&self, app: &Arc<str>, key: &str, body: u64) -> Result<Option<Value>, Conflict> {
        let mut all = self.lock();
        let Some(r) = all.get_mut(app) else {
            return Ok(None);
        };
        r.expire();
        match r.answers.get(key) {
            Some((h, v, _)) if *h == body => Ok(Some(v.clone())),
            Some(_) => Err(Conflict),
            None => Ok(None),
        }
    }

    pub fn put(&self, app: &Arc<str>, key: String, body: u64, answer: Value) {
        let mut all = self.lock();
        let r = all.entry(app.clone()).or_default();
        r.expire();
        while r.order.len() >= REPLAY_MAX {
            if let Some((k, at)) = r.order.pop_front() {
                if r.answers.get(&k).is_some_and(|a| a.2 == at) {
                    r.answers.remove(&k);
                }
            }
        }
        let now = tokio::time::Instant::now();
        r.order.push_back((key.clone(), now));
        r.answers.insert(key, (body, answer, now));
    }
}

impl AppReplays {
    fn expire(&mut self) {
        while let Some((k, at)) = self.order.front() {
            if at.elapsed() < REPLAY_WINDOW {
                break;
            }
            if self.answers.get(k).is_some_and(|a| a.2 == *at) {
                self.answers.remove(k);
            }
            self.order.pop_front();
        }
    }
}
