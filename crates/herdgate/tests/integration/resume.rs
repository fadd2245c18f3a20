//! Missed-message recovery (docs/PROTOCOL.md "History and resume") with the
//! real pusher-js, the `clients/js/herdgate-resume` plugin and the official
//! Node SDK, against real herdgate processes: tests/compat/resume/*.test.mjs.

use herdgate_testkit::process::Herdgate;
use std::path::Path;
use std::process::Command;

const APP: &str = r#"
[[apps]]
id = "515151"
key = "resume-key"
secret = "resume-secret"
"#;

fn node_suite(file: &str, envs: &[(&str, String)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    herdgate_testkit::npm_ci(&dir);
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-timeout=60000"])
        .arg(format!("resume/{file}"))
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .envs(envs.iter().map(|(k, v)| (k, v.as_str())))
        .output()
        .expect("node is needed for the resume tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{file} failed");
    assert!(
        stdout.contains("# fail 0"),
        "{file} did not report zero failures"
    );
}

#[test]
fn pusher_js_with_the_plugin_resumes_and_plain_pusher_js_sees_pusher_frames() {
    let on = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}history_max_events = 100\n"
    ));
    let off = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}history_max_events = 0\n"
    ));
    let reloadable = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n{APP}history_max_events = 100\n"
    ));
    node_suite(
        "standalone.test.mjs",
        &[
            ("HERDGATE_PORT", on.port().to_string()),
            ("HERDGATE_PLAIN_PORT", off.port().to_string()),
            ("HERDGATE_RELOAD_PORT", reloadable.port().to_string()),
            ("HERDGATE_RELOAD_PID", reloadable.pid().to_string()),
            (
                "HERDGATE_RELOAD_CONFIG",
                reloadable.config_path.display().to_string(),
            ),
            ("HERDGATE_APP_ID", "515151".into()),
            ("HERDGATE_APP_KEY", "resume-key".into()),
            ("HERDGATE_APP_SECRET", "resume-secret".into()),
        ],
    );
}
