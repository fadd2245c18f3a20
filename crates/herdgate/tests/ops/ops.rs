//! Operations behaviour of a real herdgate process: live reload (SIGHUP),
//! graceful drain (SIGTERM), sd_notify and the systemd units.
//!
//! Every wait is on an event (a log line, a frame, a datagram, an HTTP
//! answer, the process's exit) with a deadline; the only poll is `/readyz`
//! right after SIGTERM, which has no event to await.

use futures_util::StreamExt;
use herdgate_testkit::process::Herdgate;
use herdgate_testkit::{admin_get, Api, Client, Event};
use serde_json::json;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const APP_ID: &str = "100001";
const KEY: &str = "ops-key";
const SECRET_A: &str = "secret-a";
const SECRET_B: &str = "secret-b";
/// Deadline for log lines and frames that should come promptly.
const SOON: Duration = Duration::from_secs(5);

/// A config on loopback port 0 (public and admin) with the one app.
fn config(secret: &str, extra: &str) -> String {
    config_on("127.0.0.1:0", secret, extra)
}

fn config_on(listen: &str, secret: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "127.0.0.1:0"
workers = 2

{extra}

[[apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{secret}"
"#
    )
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/app/{KEY}?protocol=7&client=ops-test&version=1.0")
}

fn api(addr: SocketAddr, secret: &str) -> Api {
    Api {
        tls: None,
        addr,
        app_id: APP_ID.into(),
        key: KEY.into(),
        secret: secret.into(),
    }
}

/// Subscribe with a channel auth signed by `secret`; the answer.
async fn subscribe_signed(c: &mut Client, channel: &str, secret: &str) -> Event {
    let auth = pusher_sign::channel_auth(KEY, secret, &c.socket_id, channel, None);
    c.send(json!({"event": "pusher:subscribe",
                  "data": {"channel": channel, "auth": auth}}))
        .await;
    c.next_event().await
}

async fn assert_subscribed(c: &mut Client, channel: &str, secret: &str) {
    let e = subscribe_signed(c, channel, secret).await;
    assert_eq!(
        e.event, "pusher_internal:subscription_succeeded",
        "{channel} signed with {secret}: {:?}",
        e.raw
    );
    assert_eq!(e.channel.as_deref(), Some(channel));
}

async fn assert_refused(c: &mut Client, channel: &str, secret: &str) {
    let e = subscribe_signed(c, channel, secret).await;
    assert_eq!(
        e.event, "pusher:subscription_error",
        "{channel} signed with {secret} should be refused: {:?}",
        e.raw
    );
    assert_eq!(e.data["type"], "AuthError", "{:?}", e.raw);
    assert_eq!(e.data["status"], 401, "{:?}", e.raw);
}

/// `GET /channels` signed with `secret`: the status.
async fn api_status(addr: SocketAddr, secret: &str) -> u16 {
    api(addr, secret)
        .request("GET", "/channels", &[], "")
        .await
        .status
}

/// `Herdgate::wait_log` from an async (multi-thread) test.
fn wait_log(hg: &Herdgate, needle: &str) -> String {
    tokio::task::block_in_place(|| hg.wait_log(needle, SOON))
}

/// Poll `/readyz` (every 10 ms: it has no event to await) until it answers
/// 503; it must answer 200 until then, and flip `within`.
async fn readyz_turns_503(admin: SocketAddr, within: Duration) {
    let start = Instant::now();
    loop {
        let (status, body) = admin_get(admin, "/readyz").await;
        if status == 503 {
            return;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            start.elapsed() < within,
            "/readyz still 200 after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publish through the API and check that `c` receives it.
async fn assert_delivered(c: &mut Client, api: &Api, channel: &str, payload: &str) {
    api.publish(channel, "ops-event", payload, None).await;
    let e = c.expect("ops-event").await;
    assert_eq!(e.channel.as_deref(), Some(channel));
    assert_eq!(e.data, json!(payload));
}

// ---------------------------------------------------------------------------
// 1. SIGHUP with a rotated app secret
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_app_secret_live() {
    let hg = Herdgate::start(&config(SECRET_A, ""));
    let addr = hg.socket_addr();
    let mut old = Client::connect(&ws_url(addr)).await;
    assert_subscribed(&mut old, "private-ops", SECRET_A).await;
    assert_eq!(api_status(addr, SECRET_A).await, 200);
    assert_eq!(api_status(addr, SECRET_B).await, 401);

    std::fs::write(&hg.config_path, config(SECRET_B, "")).unwrap();
    hg.signal(libc::SIGHUP);
    let line = wait_log(&hg, "config reloaded");
    assert!(
        !line.contains("needs_restart"),
        "only the secret changed: {line}"
    );

    // The socket that subscribed under secret A was authorized by a secret
    // the live config no longer has: it is told why and closed 4203
    // (reconnect now, and authorize again).
    let e = old.expect("pusher:error").await;
    assert_eq!(e.data["code"], 4203, "{:?}", e.raw);
    assert_eq!(old.expect_close().await, Some(4203));
    // The API now wants B.
    assert_eq!(api_status(addr, SECRET_A).await, 401);
    assert_eq!(api_status(addr, SECRET_B).await, 200);
    let r = api(addr, SECRET_A)
        .request(
            "POST",
            "/events",
            &[],
            &json!({"name": "x", "channels": ["private-ops"], "data": "old secret"}).to_string(),
        )
        .await;
    assert_eq!(
        r.status, 401,
        "publish signed with the old secret: {:?}",
        r.body
    );
    // A new socket: A is refused, B succeeds, and it gets the next publish.
    let mut new = Client::connect(&ws_url(addr)).await;
    assert_refused(&mut new, "private-ops", SECRET_A).await;
    assert_subscribed(&mut new, "private-ops", SECRET_B).await;
    assert_subscribed(&mut new, "private-two", SECRET_B).await;
    assert_delivered(
        &mut new,
        &api(addr, SECRET_B),
        "private-ops",
        "after rotation",
    )
    .await;
}

// ---------------------------------------------------------------------------
// 2. SIGHUP with an invalid config
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_config_keeps_the_running_one() {
    let hg = Herdgate::start(&config(SECRET_A, ""));
    let addr = hg.socket_addr();
    let mut before = Client::connect(&ws_url(addr)).await;
    assert_subscribed(&mut before, "private-keep", SECRET_A).await;

    // An unknown key: the parse pass stops there, with line and column.
    std::fs::write(
        &hg.config_path,
        config(
            SECRET_B,
            "[limits]\nmax_connections = 0\nmax_conections = 5\n",
        ),
    )
    .unwrap();
    hg.signal(libc::SIGHUP);
    wait_log(&hg, "config reload rejected");
    let line = wait_log(&hg, "limits.max_conections");
    assert!(
        line.contains("line ") && line.contains("unknown field"),
        "{line}"
    );

    // Values that parse but do not validate: every error, by dotted key.
    let bad = config(SECRET_B, "[limits]\nmax_connections = 0\n")
        .replace(&format!("secret = \"{SECRET_B}\""), "secret = \"\"");
    std::fs::write(&hg.config_path, bad).unwrap();
    hg.signal(libc::SIGHUP);
    wait_log(&hg, "config reload rejected");
    let lines = [
        wait_log(&hg, "limits.max_connections"),
        wait_log(&hg, "apps[0].secret"),
    ];
    assert!(lines[0].contains("must be greater than zero"), "{lines:?}");
    assert!(lines[1].contains("must not be empty"), "{lines:?}");

    // The old config is still in force: secret A, and max_connections is not 0.
    assert_eq!(api_status(addr, SECRET_A).await, 200);
    assert_eq!(api_status(addr, SECRET_B).await, 401);
    assert_delivered(&mut before, &api(addr, SECRET_A), "private-keep", "still A").await;
    let mut after = Client::connect(&ws_url(addr)).await;
    assert_subscribed(&mut after, "private-keep", SECRET_A).await;
    let (status, metrics) = admin_get(hg.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let invalid = metrics
        .lines()
        .find(|l| l.starts_with("herdgate_config_reloads_total") && l.contains("invalid"))
        .unwrap_or_else(|| panic!("no invalid-reload counter in\n{metrics}"));
    assert!(invalid.ends_with(" 2"), "{invalid}");
}

// ---------------------------------------------------------------------------
// 3. SIGHUP with a changed listen address
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_listen_address_needs_a_restart() {
    let hg = Herdgate::start(&config(SECRET_A, ""));
    let addr = hg.socket_addr();
    // A port nobody listens on (free a moment ago).
    let other = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = Client::connect(&ws_url(addr)).await;
    assert_subscribed(&mut c, "private-stay", SECRET_A).await;

    std::fs::write(&hg.config_path, config_on(&other.to_string(), SECRET_B, "")).unwrap();
    hg.signal(libc::SIGHUP);
    let line = wait_log(&hg, "config reloaded");
    assert!(
        line.contains("needs_restart") && line.contains("server.listen"),
        "{line}"
    );
    assert!(!line.contains("apps"), "the secret is applied live: {line}");

    // Still serving on the old address, with the new secret applied: the
    // socket authorized by the old one is closed (4203), a fresh one
    // authorizes with the new one.
    assert_eq!(c.expect_close().await, Some(4203));
    let mut fresh = Client::connect(&ws_url(addr)).await;
    assert_subscribed(&mut fresh, "private-stay", SECRET_B).await;
    assert_delivered(
        &mut fresh,
        &api(addr, SECRET_B),
        "private-stay",
        "same address",
    )
    .await;
    let (status, _) = admin_get(hg.admin_addr(), "/readyz").await;
    assert_eq!(status, 200);
    // And not on the new one.
    let err = TcpStream::connect(other)
        .await
        .expect_err("nothing listens on the new address");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

// ---------------------------------------------------------------------------
// 4. SIGTERM: deregister, then a jittered drain with 4200
// ---------------------------------------------------------------------------

const N_CLIENTS: usize = 60;

/// How a tracked socket ended: its close code, or what happened instead.
type Closed = Result<u16, String>;

/// Wait for the socket's close frame; report its code (or how the socket
/// ended otherwise) and arrival time, then keep reading so the close
/// handshake completes and the server-side session ends.
async fn track_close(
    mut c: Client,
    i: usize,
    tx: tokio::sync::mpsc::Sender<(usize, Closed, Instant)>,
) {
    use tokio_tungstenite::tungstenite::Message;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), c.ws.next()).await {
            Err(_) => break Err("no close within 15 s".to_string()),
            Ok(Some(Ok(Message::Close(Some(f))))) => break Ok(u16::from(f.code)),
            Ok(Some(Ok(Message::Close(None)))) => break Err("close frame without a code".into()),
            Ok(Some(Ok(Message::Text(t)))) => break Err(format!("unexpected frame {t}")),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break Err(format!("websocket error: {e}")),
            Ok(None) => break Err("connection ended without a close frame".into()),
        }
    };
    let _ = tx.send((i, closed, Instant::now())).await;
    let _ =
        tokio::time::timeout(SOON, async { while let Some(Ok(_)) = c.ws.next().await {} }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_deregisters_then_drains_with_jittered_4200() {
    // Wide enough that a busy machine's scheduling does not decide.
    let deregister = Duration::from_secs(2);
    let drain = Duration::from_secs(3);
    let grace = Duration::from_secs(2);
    let mut hg = Herdgate::start(&config(
        SECRET_A,
        "[shutdown]\nderegister_delay = \"2s\"\ndrain_period = \"3s\"\ngrace = \"2s\"\n",
    ));
    let addr = hg.socket_addr();
    let admin = hg.admin_addr();
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    let mut clients = Vec::with_capacity(N_CLIENTS);
    for i in 0..N_CLIENTS {
        let mut c = Client::connect(&ws_url(addr)).await;
        let e = subscribe_signed(&mut c, &format!("room-{}", i % 6), SECRET_A).await;
        assert_eq!(e.event, "pusher_internal:subscription_succeeded");
        clients.push(c);
    }
    // One message per client at most: bounded by the client count.
    let (tx, mut closes) = tokio::sync::mpsc::channel(64);
    for (i, c) in clients.into_iter().enumerate() {
        tokio::spawn(track_close(c, i, tx.clone()));
    }

    let t0 = Instant::now();
    hg.signal(libc::SIGTERM);

    // /readyz turns 503 first...
    readyz_turns_503(admin, deregister).await;
    let ready_503_at = t0.elapsed();
    // ...while no socket has been closed yet.
    assert!(
        closes.try_recv().is_err(),
        "a socket closed before /readyz turned 503"
    );

    // During the deregister delay new connections are still accepted.
    let mut late = Client::connect(&ws_url(addr)).await;
    let e = subscribe_signed(&mut late, "room-late", SECRET_A).await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");
    let late_connected_at = t0.elapsed();
    assert!(
        late_connected_at < deregister,
        "the late client connected only at {late_connected_at:?}, not within the deregister delay"
    );
    tokio::spawn(track_close(late, N_CLIENTS, tx.clone()));
    drop(tx);
    let total = N_CLIENTS + 1;

    // Every socket closes with 4200; once a few have, the listener is closed.
    let mut at = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + deregister + drain + grace;
    while at.len() < total {
        let (i, closed, when) = tokio::time::timeout_at(deadline, closes.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {total} sockets closed by the deadline",
                    at.len()
                )
            })
            .expect("a tracker ended without reporting");
        assert_eq!(closed, Ok(4200), "client {i}");
        at.push(when.duration_since(t0));
        if at.len() == 5 {
            let err = TcpStream::connect(addr)
                .await
                .expect_err("the listener should be closed once sockets are draining");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    }
    at.sort();

    let status = hg
        .wait_exit(
            (deregister + drain + grace + Duration::from_secs(2)).saturating_sub(t0.elapsed()),
        )
        .await
        .expect("herdgate exits within deregister + drain + grace + 2s");
    let exited_at = t0.elapsed();

    // The timeline, for the record.
    let bucket = Duration::from_millis(500);
    let buckets = (at.last().unwrap().as_millis() / bucket.as_millis()) as usize + 1;
    let mut counts = vec![0usize; buckets];
    for t in &at {
        counts[(t.as_millis() / bucket.as_millis()) as usize] += 1;
    }
    println!(
        "drain timeline ({total} sockets; SIGTERM at 0; deregister {deregister:?}, drain {drain:?}, grace {grace:?}):"
    );
    println!("  /readyz 503 at {ready_503_at:?}; late client connected at {late_connected_at:?}");
    for (b, n) in counts.iter().enumerate() {
        println!(
            "  {:>4.1}-{:>4.1} s {:>3} {}",
            b as f64 * 0.5,
            (b + 1) as f64 * 0.5,
            n,
            "#".repeat(*n)
        );
    }
    let (first, last) = (at[0], *at.last().unwrap());
    println!("  first close {first:?}, last close {last:?}, exit {status} at {exited_at:?}");

    assert!(status.success(), "exit status {status}");
    assert!(
        first >= deregister,
        "a socket closed at {first:?}, inside the deregister delay"
    );
    assert!(
        last <= deregister + drain + Duration::from_secs(1),
        "the last close came at {last:?}, after the drain period"
    );
    assert!(
        last - first >= Duration::from_millis(1500),
        "closes span only {:?} of the {drain:?} drain period",
        last - first
    );
    let window = Duration::from_millis(300);
    let densest = (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window).count())
        .max()
        .unwrap();
    assert!(
        densest * 2 <= total,
        "{densest} of {total} closes within one {window:?} window"
    );
}

// ---------------------------------------------------------------------------
// 5. A second SIGTERM exits at once
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let mut hg = Herdgate::start(&config(
        SECRET_A,
        "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"60s\"\ngrace = \"10s\"\n",
    ));
    let mut c = Client::connect(&ws_url(hg.socket_addr())).await;
    let e = subscribe_signed(&mut c, "room", SECRET_A).await;
    assert_eq!(e.event, "pusher_internal:subscription_succeeded");

    hg.signal(libc::SIGTERM);
    wait_log(&hg, "draining");
    // Draining for real: not ready (the "draining" line comes a moment before
    // /readyz flips, hence the poll), still alive and running.
    readyz_turns_503(hg.admin_addr(), Duration::from_secs(1)).await;
    assert_eq!(admin_get(hg.admin_addr(), "/livez").await.0, 200);
    assert!(hg.child.try_wait().unwrap().is_none());

    let t = Instant::now();
    hg.signal(libc::SIGTERM);
    let status = hg
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("exits within 3 s of the second signal, not after the 60 s drain");
    assert_eq!(status.code(), Some(130), "{status}");
    println!("second SIGTERM: exit {status} after {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------
// 6. sd_notify: READY, WATCHDOG, RELOADING/READY, STOPPING
// ---------------------------------------------------------------------------

struct NotifyRx {
    socket: UnixDatagram,
    /// Every datagram received, with its arrival time.
    seen: Vec<(Instant, String)>,
}

impl NotifyRx {
    /// The next datagram satisfying `want`, skipping others; panics at the deadline.
    fn until(
        &mut self,
        what: &str,
        within: Duration,
        want: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {within:?}; received: {:?}",
                self.seen
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
                    let now = Instant::now();
                    self.seen.push((now, msg.clone()));
                    if want(&msg) {
                        return (now, msg);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
    }
}

fn monotonic_usec() -> u64 {
    herdgate::sys::monotonic_time().as_micros() as u64
}

#[test]
fn sd_notify_ready_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let mut rx = NotifyRx {
        socket: UnixDatagram::bind(&path).unwrap(),
        seen: Vec::new(),
    };
    let hg = Herdgate::start_custom(
        &config(
            SECRET_A,
            "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"0s\"\n",
        ),
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path)
                .env("WATCHDOG_USEC", "400000")
                // The child's pid is unknown before the spawn: no WATCHDOG_PID,
                // which systemd also omits unless asked to.
                .env_remove("WATCHDOG_PID");
        },
    );

    let (_, first) = rx.until("a first datagram", SOON, |_| true);
    assert_eq!(first, "READY=1", "the first notification must be READY=1");
    let is_watchdog = |m: &str| m == "WATCHDOG=1";
    let w: Vec<Instant> = (0..11)
        .map(|i| {
            rx.until(
                &format!("WATCHDOG=1 #{}", i + 1),
                Duration::from_secs(2),
                is_watchdog,
            )
            .0
        })
        .collect();
    // Pings every WATCHDOG_USEC / 2 = 200 ms: the mean of nine gaps after
    // the immediate first ping is neither a busy loop nor the full watchdog
    // period. (A mean, so one late wake-up of this test does not decide.)
    let mean = (w[10] - w[1]) / 9;
    assert!(
        mean >= Duration::from_millis(150) && mean < Duration::from_millis(300),
        "mean watchdog gap {mean:?} for WATCHDOG_USEC=400000"
    );

    let before = monotonic_usec();
    hg.signal(libc::SIGHUP);
    let (_, reloading) = rx.until("RELOADING=1", SOON, |m| m.starts_with("RELOADING=1"));
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{reloading:?}: {e}"));
    assert!(
        before <= usec && usec <= monotonic_usec(),
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC at the reload ({before}..)"
    );
    rx.until("READY=1 after the reload", SOON, |m| m == "READY=1");
    hg.wait_log("config reloaded", SOON);

    hg.signal(libc::SIGTERM);
    let (_, stopping) = rx.until("STOPPING=1", SOON, |m| m.starts_with("STOPPING=1"));
    assert_eq!(stopping, "STOPPING=1");
    let unexpected: Vec<_> = rx
        .seen
        .iter()
        .map(|(_, m)| m)
        .filter(|m| {
            !(m.as_str() == "READY=1"
                || m.as_str() == "WATCHDOG=1"
                || m.as_str() == "STOPPING=1"
                || m.starts_with("RELOADING=1\nMONOTONIC_USEC=")
                || m.starts_with("STATUS="))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected notifications: {unexpected:?}"
    );
}

// ---------------------------------------------------------------------------
// 7. systemd-analyze verify
// ---------------------------------------------------------------------------

#[test]
fn systemd_units_verify() {
    use std::process::Command;
    let have = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        // In CI (scripts/test installs it) a missing tool is a failure, not a pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is not installed (scripts/test installs it: apt-get install systemd)"
        );
        println!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let units = [
        "herdgate.service",
        "herdgate.socket",
        "herdgate-admin.socket",
    ];
    let verify = |dir: &std::path::Path| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(units.iter().map(|u| dir.join(u)))
            .current_dir(dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // The units as shipped: the only complaint allowed is the binary that is
    // not installed on this machine.
    let (_, text) = verify(&herdgate_testkit::process::repo_path("systemd"));
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("/usr/local/bin/herdgate is not executable"),
            "systemd-analyze verify: {line}\n(full output:\n{text})"
        );
    }

    // With the binary path pointing at the built herdgate: no output at all.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("herdgate");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_herdgate"), &bin).unwrap();
    let mut replaced = 0;
    for u in units {
        let text = std::fs::read_to_string(herdgate_testkit::process::repo_path(&format!(
            "systemd/{u}"
        )))
        .unwrap();
        replaced += text.matches("/usr/local/bin/herdgate").count();
        std::fs::write(
            dir.path().join(u),
            text.replace("/usr/local/bin/herdgate", bin.to_str().unwrap()),
        )
        .unwrap();
    }
    assert!(
        replaced >= 2,
        "ExecStartPre= and ExecStart= name the binary"
    );
    let (ok, text) = verify(dir.path());
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// 8. Signals right after start-up
// ---------------------------------------------------------------------------

/// Once herdgate has said it listens (and, under systemd, sent READY=1), a
/// SIGHUP must reload and a SIGTERM must drain: neither may kill it with the
/// signal's default action because its handler is not installed yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_right_after_the_listening_line_are_handled() {
    let hg = Herdgate::start(&config(SECRET_A, ""));
    hg.signal(libc::SIGHUP);
    wait_log(&hg, "config reloaded");
    let mut c = Client::connect(&ws_url(hg.socket_addr())).await;
    assert_subscribed(&mut c, "private-up", SECRET_A).await;

    let mut hg = Herdgate::start(&config(
        SECRET_A,
        "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"0s\"\ngrace = \"1s\"\n",
    ));
    hg.signal(libc::SIGTERM);
    let status = hg
        .wait_exit(SOON)
        .await
        .expect("exits after a drain of 0s + 1s grace");
    assert_eq!(
        status.code(),
        Some(0),
        "killed by the signal instead of draining: {status}"
    );
}

// ---------------------------------------------------------------------------
// 9. A reloaded drain period applies to sockets that were already open
// ---------------------------------------------------------------------------

/// Drain settings are read from the live config (reload.rs): sockets opened
/// under `drain_period = "60s"` must close within the reloaded 1 s, not be cut
/// off without a close frame when the shutdown deadline (1 s + grace) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_drain_period_applies_to_open_sockets() {
    let mut hg = Herdgate::start(&config(
        SECRET_A,
        "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"60s\"\ngrace = \"1s\"\n",
    ));
    let addr = hg.socket_addr();
    // One message per client at most: bounded by the client count.
    let (tx, mut closes) = tokio::sync::mpsc::channel(64);
    for i in 0..20 {
        let mut c = Client::connect(&ws_url(addr)).await;
        let e = subscribe_signed(&mut c, "room", SECRET_A).await;
        assert_eq!(e.event, "pusher_internal:subscription_succeeded");
        tokio::spawn(track_close(c, i, tx.clone()));
    }
    drop(tx);
    std::fs::write(
        &hg.config_path,
        config(
            SECRET_A,
            "[shutdown]\nderegister_delay = \"0s\"\ndrain_period = \"1s\"\ngrace = \"1s\"\n",
        ),
    )
    .unwrap();
    hg.signal(libc::SIGHUP);
    wait_log(&hg, "config reloaded");

    let t0 = Instant::now();
    hg.signal(libc::SIGTERM);
    let (mut late, mut reports) = (Vec::new(), 0);
    while let Some((i, closed, when)) = closes.recv().await {
        reports += 1;
        let at = when.duration_since(t0);
        // Far below the 60 s it was; a socket cut off at the shutdown
        // deadline (1 s + 1 s grace) has no 4200.
        if closed != Ok(4200) || at > Duration::from_secs(4) {
            late.push((i, closed, at));
        }
    }
    assert_eq!(reports, 20, "every tracker reports");
    assert!(
        late.is_empty(),
        "sockets not closed with 4200 within the reloaded 1 s drain period: {late:?}"
    );
    let status = hg.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}");
}

/// Socket activation: herdgate serves on the listening socket it is handed
/// (fd 3, LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES as systemd sets them) instead
/// of binding `listen` itself, so a restart never closes the listening socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_uses_the_inherited_listener() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = inherited.local_addr().unwrap().port();
    let fd = inherited.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("herdgate.toml");
    // `listen` names another port: the inherited socket must win.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"s3cret\"\n"
    );
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = std::process::Command::new("sh");
    // `exec` keeps the shell's pid, so $$ is herdgate's pid, as LISTEN_PID must be.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=public exec \"$0\" --config \"$1\"",
    ])
    .arg(env!("CARGO_BIN_EXE_herdgate"))
    .arg(&cfg)
    .env("RUST_LOG", "info")
    .stdout(std::process::Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; fd 3 is where systemd puts the first socket.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut saw_inherited = false;
    let addr = loop {
        let line = lines
            .next()
            .expect("herdgate exited before listening")
            .unwrap();
        saw_inherited |= line.contains("listening socket passed by systemd");
        if let Some(a) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
        {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    assert!(saw_inherited, "herdgate said it took the inherited socket");
    assert_eq!(addr, format!("127.0.0.1:{port}"));
    drop(inherited); // only herdgate holds it now
    let mut c = Client::connect(&ws_url(addr.parse().unwrap())).await;
    c.send(serde_json::json!({"event":"pusher:ping"})).await;
    c.expect("pusher:pong").await;
    let _ = child.kill();
    let _ = child.wait();
}
