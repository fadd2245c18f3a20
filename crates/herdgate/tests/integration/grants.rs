//! Auth grants (docs/PROTOCOL.md "Auth grants") with the real pusher-js,
//! the `clients/js/herdgate-grants` plugin and the official Node SDK as the
//! app's auth endpoint, against two real herdgate processes serving the
//! same app: tests/compat/grants/grants.test.mjs.

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

const APP: &str = r#"
[[apps]]
id = "616161"
key = "grants-key"
secret = "grants-secret"
auth_grants = true
"#;

#[test]
fn pusher_js_with_the_plugin_takes_its_channels_again_elsewhere_without_the_endpoint() {
    let config = format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}");
    let a = Herdgate::start(&config);
    let b = Herdgate::start(&config);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let out = Command::new("node")
        // pusher-js's node websocket arms a 30 s close timer that nothing
        // clears when a client closes a socket already closed under it (a
        // proxy cut): the run ends with its tests, not with that timer.
        .args([
            "--test",
            "--test-concurrency=1",
            "--test-timeout=60000",
            "--test-force-exit",
        ])
        .arg("grants/grants.test.mjs")
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", b.port())
        .env("HERDGATE_EDGE1_PORT", a.port())
        .env("HERDGATE_EDGE2_PORT", b.port())
        .env("HERDGATE_RELOAD_PID", b.pid().to_string())
        .env(
            "HERDGATE_RELOAD_CONFIG",
            b.config_path.display().to_string(),
        )
        .env("HERDGATE_APP_ID", "616161")
        .env("HERDGATE_APP_KEY", "grants-key")
        .env("HERDGATE_APP_SECRET", "grants-secret")
        .output()
        .expect("node is needed for the grants tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "grants.test.mjs failed");
    assert!(
        stdout.contains("# fail 0"),
        "grants.test.mjs did not report zero failures"
    );
    assert!(stdout.contains("# pass 8"), "all eight cases ran");
}
