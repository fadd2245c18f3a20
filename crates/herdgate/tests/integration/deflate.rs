//! permessage-deflate (RFC 7692, docs/PROTOCOL.md "Compression") with
//! clients that share no code with herdgate: Node's `ws` and a raw socket
//! client inflating with Node's zlib (tests/compat/deflate/deflate.test.mjs),
//! against a real herdgate process. pusher-js in Chromium is in
//! `ops::browser`.

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

const APP: &str = r#"
[limits]
max_message_bytes = 65536
[[apps]]
id = "717171"
key = "deflate-key"
secret = "deflate-secret"
"#;

/// Run tests/compat/deflate/deflate.test.mjs against `hg`, plain or over TLS.
fn run_suite(hg: &Herdgate, tls_ca: Option<&Path>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let mut cmd = Command::new("node");
    cmd.args(["--test", "--test-concurrency=1", "--test-timeout=60000"])
        .arg("deflate/deflate.test.mjs")
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", hg.port())
        .env("HERDGATE_ADMIN_URL", format!("http://{}", hg.admin_addr()))
        .env("HERDGATE_APP_ID", "717171")
        .env("HERDGATE_APP_KEY", "deflate-key")
        .env("HERDGATE_APP_SECRET", "deflate-secret");
    if let Some(ca) = tls_ca {
        cmd.env("HERDGATE_DEFLATE_TLS", "1")
            .env("NODE_EXTRA_CA_CERTS", ca);
    }
    let out = cmd
        .output()
        .expect("node is needed for the compression tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "deflate.test.mjs failed (tls: {})",
        tls_ca.is_some()
    );
    assert!(
        stdout.contains("# pass 3") && stdout.contains("# fail 0"),
        "all three cases ran and passed"
    );
}

#[test]
fn compressing_and_plain_clients_share_a_room_and_bombs_are_refused() {
    let hg = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{APP}"
    ));
    run_suite(&hg, None);
}

/// The same over TLS: the session's writer gathers frames into records
/// there (no vectored writes, no writes in place).
#[test]
fn tls_sockets_compress_the_same() {
    let pki = herdgate_testkit::pki::Pki::new();
    let (cert, key, _) = pki.leaf("localhost", false);
    let hg = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[tls]\ncert = {:?}\nkey = {:?}\n{APP}",
        cert.display().to_string(),
        key.display().to_string()
    ));
    run_suite(&hg, Some(&pki.ca_pem_path()));
}
