//! A process-wide byte counter that many cores update without contending:
//! each thread adds to its own cache line, readers sum the shards.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

const SHARDS: usize = 16;

#[repr(align(64))]
struct Shard(AtomicI64);

pub struct ShardedCounter {
    shards: [Shard; SHARDS],
}

/// Bytes waiting in all sockets' outbound queues.
pub static OUTBOUND_BYTES: ShardedCounter = ShardedCounter {
    shards: [const { Shard(AtomicI64::new(0)) }; SHARDS],
};

static NEXT: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn my_shard() -> usize {
    MINE.with(|m| {
        if m.get() == usize::MAX {
            m.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        m.get()
    })
}

impl ShardedCounter {
    pub fn add(&self, n: i64) {
        self.shards[my_shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_threads() {
        static C: ShardedCounter = ShardedCounter {
            shards: [const { Shard(AtomicI64::new(0)) }; SHARDS],
        };
        let handles: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        C.add(3);
                    }
                    C.add(-1000)
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(C.sum(), 8 * 2000);
    }
}
