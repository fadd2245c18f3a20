//! permessage-deflate (RFC 7692, docs/PROTOCOL.md "Compression") with
//! clients that share no code with herdgate: Node's `ws` and a raw socket
//! client inflating with Node's zlib (tests/compat/deflate/deflate.test.mjs),
//! against a real herdgate process. pusher-js in Chromium is in
//! `ops::browser`.

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

#[test]
fn compressing_and_plain_clients_share_a_room_and_bombs_are_refused() {
    let hg = Herdgate::start(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[limits]
max_message_bytes = 65536
[[apps]]
id = "717171"
key = "deflate-key"
secret = "deflate-secret"
"#,
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-timeout=60000"])
        .arg("deflate/deflate.test.mjs")
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", hg.port())
        .env("HERDGATE_ADMIN_URL", format!("http://{}", hg.admin_addr()))
        .env("HERDGATE_APP_ID", "717171")
        .env("HERDGATE_APP_KEY", "deflate-key")
        .env("HERDGATE_APP_SECRET", "deflate-secret")
        .output()
        .expect("node is needed for the compression tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deflate.test.mjs failed");
    assert!(
        stdout.contains("# pass 3") && stdout.contains("# fail 0"),
        "all three cases ran and passed"
    );
}
