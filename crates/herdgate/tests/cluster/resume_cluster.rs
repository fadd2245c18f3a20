//! Recovery across a cluster (docs/PROTOCOL.md "History and resume"): an
//! edge drained under a pusher-js client, which resumes on the other edge
//! with nothing lost; then the room's owner killed -9, after which the
//! client is told `recovered: false` (the new owner has not the history),
//! never a silent gap. Real etcd, real processes, tests/compat/resume/cluster.test.mjs.

use herdgate_testkit::cluster::Cluster;
use std::path::Path;
use std::process::Command;

#[test]
fn a_client_resumes_across_an_edge_drain_and_is_told_of_a_worker_kill() {
    let _serial = crate::SERIAL.blocking_lock();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let cluster = Cluster::start(1, 2, 2);
    let channel = "chat-across-the-cluster";
    let owner = cluster.owner(1, channel);
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-timeout=90000"])
        .arg("resume/cluster.test.mjs")
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", cluster.edge(1).port())
        .env("HERDGATE_EDGE1_PORT", cluster.edge(0).port())
        .env("HERDGATE_EDGE2_PORT", cluster.edge(1).port())
        .env("HERDGATE_EDGE1_PID", cluster.edge(0).pid().to_string())
        .env(
            "HERDGATE_OWNER_PID",
            cluster.worker(owner).pid().to_string(),
        )
        .env("HERDGATE_CHANNEL", channel)
        .env("HERDGATE_APP_ID", "100001")
        .env("HERDGATE_APP_KEY", "test-key")
        .env("HERDGATE_APP_SECRET", "test-secret")
        .output()
        .expect("node is needed for the resume tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "cluster.test.mjs failed");
    assert!(stdout.contains("# fail 0"), "did not report zero failures");
}
