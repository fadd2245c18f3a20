//! Every herdgate-load scenario, small, against a real herdgate process: the
//! load tool cannot rot, and the numbers it reports add up.

use herdgate_testkit::process::Herdgate;
use serde_json::Value;
use std::process::Command;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""
[limits]
# Every simulated client comes from one address.
max_handshakes_per_ip = 0
[shutdown]
deregister_delay = "0s"
drain_period = "0s"
[[apps]]
id = "100001"
key = "herdgate-demo-key"
secret = "herdgate-demo-secret"
"#;

fn run(server: &Herdgate, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let out = Command::new(env!("CARGO_BIN_EXE_herdgate-load"))
        .args(args)
        .args(["--url", &format!("ws://{}", server.addr)])
        .args(["--server-pid", &server.pid().to_string()])
        .arg("--quiet")
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "herdgate-load {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains('|'), "a Markdown summary is printed: {md}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn n(v: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

#[test]
fn every_scenario_runs_and_adds_up() {
    let server = Herdgate::start(CONFIG);

    let r = run(
        &server,
        &[
            "idle",
            "-n",
            "300",
            "--rate",
            "1000",
            "--channels",
            "10",
            "--duration",
            "0.5",
        ],
    );
    assert_eq!(n(&r, "connections.established"), 300.0);
    assert!(
        n(&r, "server.rss_per_conn_kib") > 0.0,
        "RSS per connection is reported"
    );

    let r = run(
        &server,
        &[
            "fanout",
            "-n",
            "200",
            "--rate",
            "2000",
            "--publish-rate",
            "20",
            "--duration",
            "1",
        ],
    );
    assert_eq!(n(&r, "connections.established"), 200.0);
    assert!(n(&r, "delivery.expected") >= 200.0);
    // One timeline point per second of the run, with the deliveries in it.
    let timeline = r["timeline"].as_array().expect("a timeline");
    assert!(!timeline.is_empty());
    let in_timeline: f64 = timeline
        .iter()
        .map(|p| p["delivered"].as_f64().unwrap())
        .sum();
    assert!(in_timeline <= n(&r, "delivery.delivered"));
    assert_eq!(n(&r, "delivery.delivered"), n(&r, "delivery.expected"));
    assert_eq!(n(&r, "delivery.missing"), 0.0);
    assert_eq!(n(&r, "delivery.duplicates"), 0.0);
    assert!(n(&r, "delivery.latency_ms.max") >= n(&r, "delivery.latency_ms.p50"));

    let r = run(
        &server,
        &[
            "rooms",
            "-n",
            "200",
            "--channels",
            "20",
            "--per-conn",
            "2",
            "--channel-kind",
            "presence",
            "--publish-rate",
            "40",
            "--duration",
            "1",
        ],
    );
    assert_eq!(n(&r, "connections.subscribed"), 200.0);
    assert_eq!(n(&r, "delivery.missing"), 0.0);
    assert_eq!(n(&r, "delivery.delivered"), n(&r, "delivery.expected"));

    let r = run(&server, &["storm", "-n", "500", "--duration", "0.5"]);
    assert_eq!(n(&r, "connections.established"), 500.0);

    let r = run(
        &server,
        &[
            "churn",
            "-n",
            "100",
            "--rate",
            "50",
            "--publish-rate",
            "10",
            "--duration",
            "1",
        ],
    );
    assert!(
        n(&r, "connections.recycled") > 0.0,
        "churn closes and reopens sockets"
    );
    assert_eq!(n(&r, "connections.refused"), 0.0);
}

/// `floor` needs no server: every round writes one frame to every socket,
/// and its cost is the writer thread's own CPU time.
#[test]
fn the_floor_writes_one_frame_per_socket_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("floor.json");
    let out = Command::new(env!("CARGO_BIN_EXE_herdgate-load"))
        .args(["floor", "-n", "50", "--rounds", "20", "--rate", "0"])
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(n(&r, "writes"), 1000.0);
    assert_eq!(n(&r, "frame_bytes"), 122.0);
    assert!(
        n(&r, "writes_per_cpu_s") > 0.0 && n(&r, "cpu_s") > 0.0,
        "{r}"
    );
    // A frame that would need an extended header is refused by name.
    let bad = Command::new(env!("CARGO_BIN_EXE_herdgate-load"))
        .args(["floor", "-n", "1", "--payload", "200"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--payload 200"));
}

/// `--svg-out` draws the run: latency over time and its distribution.
#[test]
fn charts_are_drawn_from_the_run() {
    let server = Herdgate::start(CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_herdgate-load"))
        .args([
            "fanout",
            "-n",
            "50",
            "--rate",
            "1000",
            "--publish-rate",
            "20",
        ])
        .args(["--duration", "2", "--quiet"])
        .args(["--url", &format!("ws://{}", server.addr)])
        .arg("--svg-out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for chart in ["latency", "cdf"] {
        let path = dir.path().join(format!("run-{chart}.svg"));
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // A drawn line with points, not an empty frame.
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap_or("");
        assert!(points.split(' ').count() >= 2, "{chart}: {svg}");
    }
}
