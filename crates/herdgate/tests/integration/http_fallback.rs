//! pusher-js's HTTP fallback transports (`xhr_streaming`, `xhr_polling`)
//! against real herdgate processes: tests/compat/fallback/*.test.mjs
//! (docs/PROTOCOL.md "HTTP fallback transports").

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

const APP: &str =
    "[[apps]]\nid = \"616161\"\nkey = \"fallback-key\"\nsecret = \"fallback-secret\"\n";

#[test]
fn pusher_js_over_xhr_streaming_and_xhr_polling() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let open = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}"
    ));
    let capped = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[limits]\nmax_connections = 1\nwrite_timeout = \"1s\"\n{APP}"
    ));
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-timeout=60000"])
        .arg("fallback/fallback.test.mjs")
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", open.port())
        .env("HERDGATE_CAPPED_PORT", capped.port())
        .env("HERDGATE_APP_ID", "616161")
        .env("HERDGATE_APP_KEY", "fallback-key")
        .env("HERDGATE_APP_SECRET", "fallback-secret")
        .output()
        .expect("node is needed for the fallback tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fallback.test.mjs failed");
    assert!(stdout.contains("# fail 0"), "did not report zero failures");
}
