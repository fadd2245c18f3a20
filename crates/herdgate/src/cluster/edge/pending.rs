//! Requests to workers waiting for their answers, by id. Every waiter
//! removes itself when it is answered or gives up, so the map holds only
//! requests in flight (bounded by the sessions and API requests waiting).

use crate::cluster::link::Reply;
use crate::types::{ConnId, RoomKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

pub(super) enum Waiter {
    /// A request answered by [`Reply`] to whoever waits.
    Reply(oneshot::Sender<Reply>),
    /// A registration: its answer goes to the room's actor, in link order.
    Register { room: RoomKey, conn: ConnId },
}

#[derive(Default)]
pub(super) struct Pending {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn request(&self) -> (u64, oneshot::Receiver<Reply>) {
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, Waiter::Reply(tx));
        (id, rx)
    }

    pub fn register(&self, room: RoomKey, conn: ConnId) -> u64 {
        let id = self.id();
        self.lock().insert(id, Waiter::Register { room, conn });
        id
    }

    pub fn take(&self, id: u64) -> Option<Waiter> {
        self.lock().remove(&id)
    }

    pub fn cancel(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}
