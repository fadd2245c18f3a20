//! Hot paths below the network: protocol decode/encode, channel auth
//! verification, and local fan-out of one event to 10,000 sockets' queues
//! and the writer tasks waiting on them.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herdgate::outbound::Outbound;
use herdgate::protocol;
use std::hint::black_box;
use std::sync::Arc;

fn decode_encode(c: &mut Criterion) {
    let subscribe = r#"{"event":"pusher:subscribe","data":{"channel":"presence-lobby","auth":"key:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4","channel_data":"{\"user_id\":\"10\"}"}}"#;
    c.bench_function("decode/subscribe", |b| {
        b.iter(|| {
            let f = protocol::parse_frame(black_box(subscribe)).unwrap();
            black_box(protocol::parse_data::<protocol::SubscribeData>("s", f.data).unwrap())
        })
    });
    let client = r#"{"event":"client-typing","channel":"private-chat","data":{"typing":true,"who":"someone"}}"#;
    c.bench_function("decode/client_event", |b| {
        b.iter(|| black_box(protocol::parse_frame(black_box(client)).unwrap()))
    });
    let data = r#"{"seq":1,"t":1700000000000000,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    c.bench_function("encode/api_event_100B", |b| {
        b.iter(|| {
            black_box(protocol::event(
                "update",
                Some("session-42"),
                black_box(data),
            ))
        })
    });
}

fn auth(c: &mut Criterion) {
    let message = herdgate::auth::channel_string("1234.1234", "private-foobar", None);
    let token = format!("key:{}", herdgate::auth::sign("secret", &message));
    c.bench_function("auth/verify_channel_token", |b| {
        b.iter(|| {
            black_box(herdgate::auth::verify_token(
                "key",
                "secret",
                black_box(&message),
                &token,
            ))
        })
    });
}

/// One event to 10,000 sockets' queues, each with its writer task waiting
/// on it: a push wakes the task, which takes the frame and marks it
/// written. What is measured ends when every task has taken its frame, so it
/// includes the wakeups and the scheduling of 10,000 tasks on the runtime's
/// two threads, not only the pushes (the write syscalls are not included:
/// the load tool's `fanout` scenario measures those end to end).
fn fan_out(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queues: Vec<Arc<Outbound>> = (0..SUBSCRIBERS)
        .map(|_| Arc::new(Outbound::new(1024, 1 << 20)))
        .collect();
    let taken = Arc::new(tokio::sync::Semaphore::new(0));
    for q in &queues {
        let (q, taken) = (q.clone(), taken.clone());
        rt.spawn(async move {
            loop {
                q.ready().await;
                let frames = q.drain().frames;
                q.written();
                black_box(frames);
                taken.add_permits(1);
            }
        });
    }
    let frame = protocol::event("update", Some("room"), &"x".repeat(60));
    let mut g = c.benchmark_group("fan_out");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    g.bench_function("one_event_to_10k_waiting_tasks", |b| {
        b.iter(|| {
            rt.block_on(async {
                for q in &queues {
                    black_box(q.push(&frame));
                }
                taken
                    .acquire_many(SUBSCRIBERS as u32)
                    .await
                    .expect("open")
                    .forget();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, decode_encode, auth, fan_out);
criterion_main!(benches);
