//! Runs the pusher-js / pusher (Node SDK) compatibility suite in tests/compat
//! against a real herdgate process. npm packages are installed from the
//! committed lockfile when missing, so `cargo test` works on a fresh machine.

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

const APP: &str = r#"
[[apps]]
id = "424242"
key = "compat-key"
secret = "compat-secret"
subscription_count_events = true
presence_full_members = 20
presence_count_interval = "1s"
"#;

#[test]
fn pusher_js_and_node_sdk_compatibility() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);

    let pki = herdgate_testkit::pki::Pki::new();
    let (cert, key, _) = pki.leaf("localhost", false);
    let ca = pki.ca_pem_path();
    let plain = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}"
    ));
    let tls = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[tls]\ncert = {:?}\nkey = {:?}\n{APP}",
        cert.display().to_string(),
        key.display().to_string()
    ));
    // A cluster for cluster.test.mjs: 3 workers, 2 edges.
    let workers: Vec<Herdgate> = (0..3)
        .map(|_| {
            Herdgate::start(&format!(
                "[server]\nadmin_listen = \"\"\n[cluster]\nrole = \"worker\"\nlink_listen = \"127.0.0.1:0\"\nsecret = \"compat-cluster-secret-0123\"\n{APP}"
            ))
        })
        .collect();
    let list: Vec<String> = workers.iter().map(|w| format!("{:?}", w.addr)).collect();
    let edges: Vec<Herdgate> = (0..2)
        .map(|_| {
            let e = Herdgate::start(&format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cluster]\nrole = \"edge\"\nworkers = [{}]\nsecret = \"compat-cluster-secret-0123\"\n{APP}",
                list.join(", ")
            ));
            for _ in 0..workers.len() {
                while !e.log.recv_timeout(std::time::Duration::from_secs(10)).expect("edge links up").contains("worker link up") {}
            }
            e
        })
        .collect();
    let (host, port) = plain.addr.rsplit_once(':').unwrap();
    let tls_port = tls.port();

    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-timeout=60000"])
        .args(
            std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".test.mjs")),
        )
        .current_dir(&dir)
        .env("HERDGATE_HOST", host)
        .env("HERDGATE_PORT", port)
        .env("HERDGATE_TLS_HOST", "127.0.0.1")
        .env("HERDGATE_TLS_PORT", tls_port)
        .env("NODE_EXTRA_CA_CERTS", &ca)
        .env("HERDGATE_EDGE1_PORT", edges[0].port())
        .env("HERDGATE_EDGE2_PORT", edges[1].port())
        .env("HERDGATE_APP_ID", "424242")
        .env("HERDGATE_APP_KEY", "compat-key")
        .env("HERDGATE_APP_SECRET", "compat-secret")
        .output()
        .expect("node is needed for the client compatibility tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pusher-js compatibility suite failed");
    assert!(
        stdout.contains("# fail 0"),
        "suite did not report zero failures"
    );
}
