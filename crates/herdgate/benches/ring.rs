//! Ring lookup: the cost every subscribe, publish and client event pays to
//! find its room's owner.

use criterion::{criterion_group, criterion_main, Criterion};
use herdgate::ring::{Ring, DEFAULT_VNODES};
use std::hint::black_box;

fn ring_lookup(c: &mut Criterion) {
    let channels: Vec<String> = (0..1024).map(|i| format!("presence-room-{i}")).collect();
    for workers in [2, 16] {
        let ring = Ring::new(workers, DEFAULT_VNODES);
        let mut i = 0;
        c.bench_function(&format!("ring_owner/{workers}_workers"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(ring.owner(black_box("100001"), &channels[i]))
            })
        });
    }
}

criterion_group!(benches, ring_lookup);
criterion_main!(benches);
