//! Admission and load shedding: herdgate rates itself `normal → pressured →
//! degraded → critical` from what it measures, and in each state sheds the
//! least important work first while the core (existing sockets, essential
//! broadcasts) keeps flowing. Clients are told with a `herdgate:status`
//! event, so a front end can show "limited interaction" instead of a spinner.
//! docs/OVERLOAD.md explains the states, signals and actions to operators.

mod machine;
mod monitor;

pub use machine::{reasons, LoadState, Machine, Signal, StepDown, Tuning};
pub use monitor::{spawn_monitor, Sampled};

use crate::protocol::{self, Frame};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use tokio::sync::watch;

/// What sessions are told when the state changes.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: LoadState,
    /// The `herdgate:status` frame for this state.
    pub frame: Frame,
    /// The node is draining: each socket picks its moment to close. Carried
    /// here so sessions watch one node-wide signal, not two.
    pub closing: bool,
    /// Counts config reloads: a session checks its app against the live
    /// config when it moves (a reload may have revoked it).
    pub reloads: u64,
}

pub struct Overload {
    /// Shared with readers outside the node's state ([`Overload::state_reader`]).
    state: std::sync::Arc<AtomicU8>,
    /// The state admission is rated by (signals but `connections`, quick to
    /// recover): `actions.refuse_connections` applies to it.
    admission: AtomicU8,
    status: watch::Sender<Status>,
    /// New sessions admitted since start (the monitor derives the rate).
    pub admitted: AtomicU64,
    /// The last sample, for `/status`.
    last: Mutex<Snapshot>,
}

/// The last sample: signals and reasons.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Snapshot {
    pub signals: Vec<Signal>,
    pub reasons: Vec<String>,
}

impl Default for Overload {
    fn default() -> Self {
        let (status, _) = watch::channel(Status {
            state: LoadState::Normal,
            frame: status_frame(LoadState::Normal, &[]),
            closing: false,
            reloads: 0,
        });
        Overload {
            state: std::sync::Arc::new(AtomicU8::new(0)),
            admission: AtomicU8::new(0),
            status,
            admitted: AtomicU64::new(0),
            last: Mutex::default(),
        }
    }
}

pub fn status_frame(state: LoadState, limited: &[&str]) -> Frame {
    let data = serde_json::json!({ "state": state.as_str(), "limited": limited });
    protocol::event("herdgate:status", None, &data.to_string())
}

impl Overload {
    pub fn state(&self) -> LoadState {
        LoadState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A reader of the state for parts built before the node (webhooks).
    pub fn state_reader(&self) -> Box<dyn Fn() -> LoadState + Send + Sync> {
        let state = self.state.clone();
        Box::new(move || LoadState::from_u8(state.load(Ordering::Relaxed)))
    }

    /// The state new connections are admitted by.
    pub fn admission_state(&self) -> LoadState {
        LoadState::from_u8(self.admission.load(Ordering::Relaxed))
    }

    pub fn set_admission(&self, state: LoadState) {
        self.admission.store(state as u8, Ordering::Relaxed);
        metrics::gauge!("herdgate_admission_state").set(state as u8 as f64);
    }

    /// Sessions watch this to forward state changes to their client.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub fn set(&self, state: LoadState, limited: &[&str]) {
        self.state.store(state as u8, Ordering::Relaxed);
        metrics::gauge!("herdgate_load_state").set(state as u8 as f64);
        self.status.send_modify(|s| {
            s.state = state;
            s.frame = status_frame(state, limited);
        });
    }

    /// Tell every session the node is draining.
    pub fn begin_closing(&self) {
        self.status.send_modify(|s| s.closing = true);
    }

    /// Tell every session a reload put a new config in force.
    pub fn reloaded(&self) {
        self.status.send_modify(|s| s.reloads += 1);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, snap: Snapshot) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = snap;
    }
}

/// Count one shed action (low-cardinality reason).
pub fn shed(action: &'static str) {
    metrics::counter!("herdgate_shed_total", "action" => action).increment(1);
}
