//! herdgate in a real browser: Debian's Chromium, driven by playwright-core
//! from npm (tests/browser, committed lockfile, no browser download), runs
//! the admin listener's status page and the lobby demo (examples/lobby)
//! against a real herdgate process on ephemeral ports.
//!
//! Both scenarios push the node into `degraded` with a real storm of 50
//! sockets: herdgate runs with `max_connections = 100` and connection
//! thresholds `[0.3, 0.45, 0.95]`, so the people's few sockets keep it
//! normal and the storm's 50 make it degraded.
//!
//! Screenshots are saved under `target/browser-artifacts/`; with
//! `HERDGATE_UPDATE_SCREENSHOTS=1` the README's pictures in `docs/` are
//! replaced by this run's. Chromium comes from `HERDGATE_CHROMIUM` or
//! `chromium` on the PATH (scripts/setup installs it); missing, the tests
//! fail, they never skip.

use herdgate_testkit::process::{repo_path, Herdgate};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// One Chromium at a time: the machine may have two cores.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

const APP_ID: &str = "100001";
const KEY: &str = "herdgate-demo-key";
const SECRET: &str = "herdgate-demo-secret";

fn config() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[limits]
max_connections = 100
max_connections_per_ip = 0
[overload]
sample_interval = "100ms"
cooldown = "500ms"
admission_cooldown = "500ms"
connections = [0.3, 0.45, 0.95]
# Only the storm may move the state: a busy machine (Chromium on two cores)
# must not, so the other signals' thresholds are out of reach.
scheduling_lag_ms = [5000.0, 10000.0, 20000.0]
accept_rate = [100000.0, 200000.0, 300000.0]
memory = [0.97, 0.98, 0.99]
[shutdown]
deregister_delay = "0s"
drain_period = "0s"
grace = "0s"
[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
# The lobby's reactions, as the shipped config counts them.
[[apps.tallies]]
prefix = "presence-session-"
events = ["client-reaction"]
field = "emoji"
interval = "1s"
"#
    )
}

/// Debian's Chromium: `HERDGATE_CHROMIUM`, else `chromium` on the PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("HERDGATE_CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "HERDGATE_CHROMIUM={} is not a file",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .expect("Chromium is needed for the browser tests: run scripts/setup (apt-get install chromium) or set HERDGATE_CHROMIUM")
}

fn artifacts() -> PathBuf {
    let dir = repo_path("target/browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The lobby's app server (`node server.mjs`), stopped when dropped.
struct Lobby {
    child: Child,
    url: String,
}

impl Drop for Lobby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lobby {
    fn start(hg: &Herdgate) -> Lobby {
        let dir = repo_path("examples/lobby");
        herdgate_testkit::npm_ci(&dir);
        let (host, port) = hg.addr.rsplit_once(':').unwrap();
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(&dir)
            .env("HERDGATE_HOST", host)
            .env("HERDGATE_PORT", port)
            .env("HERDGATE_APP_ID", APP_ID)
            .env("HERDGATE_APP_KEY", KEY)
            .env("HERDGATE_APP_SECRET", SECRET)
            .env("LOBBY_HOST", "127.0.0.1")
            .env("LOBBY_PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs the lobby's app server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .expect("the lobby exited before listening")
            .unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in the lobby's first line: {first}"))
            .to_string();
        // Keep reading so the lobby never blocks on a full pipe.
        std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| println!("lobby: {l}"))
        });
        Lobby { child, url }
    }
}

/// Run one `*.test.mjs` of tests/browser with node's test runner.
fn run(file: &str, hg: &Herdgate, lobby: Option<&Lobby>) {
    run_with(file, hg, lobby, &[]);
}

fn run_with(file: &str, hg: &Herdgate, lobby: Option<&Lobby>, env: &[(&str, String)]) {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|p| p.into_inner());
    let dir = repo_path("crates/herdgate/tests/browser");
    herdgate_testkit::npm_ci(&dir);
    let mut cmd = Command::new("node");
    cmd.args([
        "--test",
        "--test-concurrency=1",
        "--test-timeout=100000",
        file,
    ])
    .current_dir(&dir)
    .env("HERDGATE_CHROMIUM", chromium())
    .env("HERDGATE_ARTIFACTS", artifacts())
    .env("HERDGATE_ADMIN_URL", format!("http://{}", hg.admin_addr()))
    .env("HERDGATE_API_URL", format!("http://{}", hg.addr))
    .env("HERDGATE_WS_URL", format!("ws://{}", hg.addr))
    .env("HERDGATE_APP_ID", APP_ID)
    .env("HERDGATE_APP_KEY", KEY)
    .env("HERDGATE_APP_SECRET", SECRET)
    .env_remove("HERDGATE_DOCS");
    if std::env::var_os("HERDGATE_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        cmd.env("HERDGATE_DOCS", repo_path("docs"));
    }
    if let Some(l) = lobby {
        cmd.env("LOBBY_URL", &l.url);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("node runs the browser tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{file} failed (screenshots in target/browser-artifacts)"
    );
    assert!(
        stdout.contains("# pass 1") && stdout.contains("# fail 0"),
        "{file} did not pass exactly one test"
    );
}

/// A PNG written by this run, of a size worth committing.
fn assert_png(name: &str, since: std::time::SystemTime) {
    let path = artifacts().join(name);
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.modified().unwrap() >= since,
        "{name} is from an earlier run"
    );
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{name} is not a PNG"
    );
    assert!(
        bytes.len() > 10_000 && bytes.len() < 1_000_000,
        "{name}: {} bytes",
        bytes.len()
    );
}

#[test]
fn status_page_follows_a_storm_in_chromium() {
    let hg = Herdgate::start(&config());
    let since = std::time::SystemTime::now();
    run("status-page.test.mjs", &hg, None);
    assert_png("status-page-storm.png", since);
}

#[test]
fn lobby_demo_works_for_two_people_and_through_a_storm_in_chromium() {
    let hg = Herdgate::start(&config());
    let lobby = Lobby::start(&hg);
    let since = std::time::SystemTime::now();
    run("lobby.test.mjs", &hg, Some(&lobby));
    assert_png("lobby.png", since);
    assert_png("lobby-degraded.png", since);
}

#[test]
fn pusher_js_in_chromium_gets_compressed_events() {
    let hg = Herdgate::start(&config());
    // pusher-js's web build, from the lobby's lockfile.
    let lobby = repo_path("examples/lobby");
    herdgate_testkit::npm_ci(&lobby);
    let pusher_js = lobby.join("node_modules/pusher-js/dist/web/pusher.min.js");
    assert!(pusher_js.is_file(), "{} is missing", pusher_js.display());
    run_with(
        "deflate.test.mjs",
        &hg,
        None,
        &[("HERDGATE_PUSHER_JS", pusher_js.display().to_string())],
    );
}

#[test]
fn status_page_shows_the_cluster_membership_in_chromium() {
    const CLUSTER: &str = r#"
[overload]
enabled = false
[shutdown]
deregister_delay = "0s"
drain_period = "0s"
grace = "0s"
"#;
    let app = format!("[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\n");
    let secret = "browser-cluster-secret-0123";
    let worker = Herdgate::start(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[cluster]\nrole = \"worker\"\nlink_listen = \"127.0.0.1:0\"\nsecret = \"{secret}\"\n{CLUSTER}{app}"
    ));
    let edge = Herdgate::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[cluster]\nrole = \"edge\"\nworkers = [{:?}]\nsecret = \"{secret}\"\n{CLUSTER}{app}",
        worker.addr
    ));
    edge.wait_log("worker link up", std::time::Duration::from_secs(10));
    let since = std::time::SystemTime::now();
    run_with(
        "cluster-status.test.mjs",
        &edge,
        None,
        &[
            (
                "HERDGATE_WORKER_ADMIN_URL",
                format!("http://{}", worker.admin_addr()),
            ),
            ("HERDGATE_WORKER_PID", worker.pid().to_string()),
        ],
    );
    assert_png("status-page-cluster.png", since);
}
