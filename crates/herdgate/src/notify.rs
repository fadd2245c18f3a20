//! systemd integration: readiness notification and the watchdog (socket
//! activation is in [`crate::activation`]).
//!
//! This speaks the two small systemd protocols directly instead of pulling
//! in `libsystemd` or a wrapper crate:
//!
//! - **`sd_notify`**: one datagram of `KEY=value` lines sent to the unix
//!   socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//!   namespace). [`Notifier`] sends it.
//! - **the watchdog**: `WATCHDOG_USEC` (and optionally `WATCHDOG_PID`) say
//!   how often systemd wants `WATCHDOG=1`. [`watchdog_interval`] reads them.
//!
//! Why not a dependency: each protocol is a few lines over `std` and `libc`,
//! linking `libsystemd` would tie the binary to the build host's shared
//! library, and the wrapper crates either pull in a lot for this or block
//! (a notify send must never stall a tokio worker). Here every send is one
//! non-blocking `sendto`; failures are logged at debug level and otherwise
//! ignored, because systemd integration is optional: without `NOTIFY_SOCKET`
//! the [`Notifier`] does nothing.
//!
//! Environment: [`Notifier::from_env`] and [`watchdog_interval`] only read it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Sends state changes to systemd's notification socket. A no-op when
/// herdgate was not started by systemd with `Type=notify`/`notify-reload`.
/// Cheap to clone; clones share the socket.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Target>>,
}

struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(t) => write!(f, "Notifier({:?})", t.addr),
            None => f.write_str("Notifier(disabled)"),
        }
    }
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or a disabled one when it is unset,
    /// empty or not an address we can use (only unix sockets are supported:
    /// an absolute path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::from_notify_socket(&v),
            _ => Notifier::disabled(),
        }
    }

    /// A notifier that does nothing.
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// A notifier sending to the unix datagram socket bound at `path`
    /// (tests, or a hand-rolled supervisor).
    pub fn at(path: impl AsRef<Path>) -> Notifier {
        match SocketAddr::from_pathname(path.as_ref()) {
            Ok(addr) => Notifier::to_addr(addr),
            Err(e) => {
                tracing::debug!(error = %e, path = %path.as_ref().display(), "sd_notify: unusable socket path");
                Notifier::disabled()
            }
        }
    }

    /// Parse a `NOTIFY_SOCKET` value: `/path` or `@abstract-name`.
    fn from_notify_socket(value: &OsStr) -> Notifier {
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'/') => Notifier::at(value),
            Some(b'@') => Notifier::abstract_name(&bytes[1..]),
            _ => {
                // e.g. systemd ≥254's "vsock:…", or a relative path sd_notify also rejects.
                tracing::debug!(notify_socket = ?value, "sd_notify: unsupported NOTIFY_SOCKET, notifications disabled");
                Notifier::disabled()
            }
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn abstract_name(name: &[u8]) -> Notifier {
        #[cfg(target_os = "android")]
        use std::os::android::net::SocketAddrExt;
        #[cfg(target_os = "linux")]
        use std::os::linux::net::SocketAddrExt;
        match SocketAddr::from_abstract_name(name) {
            Ok(addr) => Notifier::to_addr(addr),
            Err(e) => {
                tracing::debug!(error = %e, "sd_notify: unusable abstract socket name");
                Notifier::disabled()
            }
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn abstract_name(_name: &[u8]) -> Notifier {
        tracing::debug!("sd_notify: abstract sockets are Linux-only, notifications disabled");
        Notifier::disabled()
    }

    fn to_addr(addr: SocketAddr) -> Notifier {
        // std opens sockets with SOCK_CLOEXEC.
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "sd_notify: cannot create socket, notifications disabled");
                return Notifier::disabled();
            }
        };
        Notifier {
            inner: Some(Arc::new(Target { socket, addr })),
        }
    }

    /// Whether notifications go anywhere (false outside systemd).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Send raw `KEY=value` lines (newline-separated) as one datagram.
    /// Never blocks and never fails: errors are logged at debug level.
    pub fn send(&self, state: &str) {
        let Some(t) = &self.inner else { return };
        if let Err(e) = t.socket.send_to_addr(state.as_bytes(), &t.addr) {
            let first = state.lines().next().unwrap_or("");
            tracing::debug!(error = %e, state = first, "sd_notify send failed");
        }
    }

    /// Startup (or a reload) finished: `READY=1`.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload started: `RELOADING=1` with `MONOTONIC_USEC`, which
    /// `Type=notify-reload` (systemd ≥253) requires to match the reload to
    /// its request. Call [`Notifier::ready`] when the reload is done.
    pub fn reloading(&self) {
        if self.inner.is_some() {
            self.send(&reloading_message(monotonic_usec()));
        }
    }

    /// Graceful shutdown started: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Free-form status shown by `systemctl status`: `STATUS=…`. Newlines
    /// are replaced by spaces so the text cannot inject other assignments.
    pub fn status(&self, text: &str) {
        if self.inner.is_some() {
            self.send(&status_message(text));
        }
    }

    /// Watchdog keep-alive: `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Ask for more time for the current start, reload or stop:
    /// `EXTEND_TIMEOUT_USEC=…` (systemd ≥236), e.g. during a long drain.
    pub fn extend_timeout(&self, by: Duration) {
        if self.inner.is_some() {
            self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
        }
    }

    /// If the notifier is enabled and systemd set up a watchdog for us, spawn
    /// a task sending `WATCHDOG=1` every [`watchdog_interval`]. Because the
    /// ping runs as an ordinary task, a runtime that stops scheduling tasks
    /// stops pinging and systemd restarts us. Must be called inside a tokio
    /// runtime.
    pub fn spawn_watchdog(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.is_enabled() {
            return None;
        }
        let every = watchdog_interval()?;
        let notifier = self.clone();
        tracing::debug!(every = ?every, "systemd watchdog enabled");
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                notifier.watchdog();
            }
        }))
    }
}

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

fn status_message(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares reloads against.
fn monotonic_usec() -> u64 {
    u64::try_from(crate::sys::monotonic_time().as_micros()).unwrap_or(u64::MAX)
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, so a ping is
/// never late because of timer jitter. `None` when no watchdog is set up,
/// the value is invalid or zero, or `WATCHDOG_PID` names another process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] over explicit values (pure, for tests).
pub fn watchdog_interval_from(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    our_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = watchdog_pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    let usec: u64 = watchdog_usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    // Never zero: a zero period would make tokio's interval panic.
    Some(Duration::from_micros((usec / 2).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::at(&path);
        (dir, rx, n)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn assert_reloading(msg: &str) {
        let usec = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected reloading message {msg:?}"));
        assert!(
            !usec.is_empty() && usec.bytes().all(|b| b.is_ascii_digit()),
            "{msg:?}"
        );
        assert!(usec.parse::<u64>().unwrap() > 0);
    }

    #[test]
    fn sends_each_state_as_one_datagram() {
        let (_dir, rx, n) = receiver();
        assert!(n.is_enabled());
        n.ready();
        n.status("serving 12 connections");
        n.watchdog();
        n.reloading();
        n.stopping();
        n.send("FDSTORE=0");
        n.extend_timeout(Duration::from_secs(3));
        assert_eq!(recv(&rx), "READY=1");
        assert_eq!(recv(&rx), "STATUS=serving 12 connections");
        assert_eq!(recv(&rx), "WATCHDOG=1");
        assert_reloading(&recv(&rx));
        assert_eq!(recv(&rx), "STOPPING=1");
        assert_eq!(recv(&rx), "FDSTORE=0");
        assert_eq!(recv(&rx), "EXTEND_TIMEOUT_USEC=3000000");
    }

    #[test]
    fn status_cannot_inject_assignments() {
        let (_dir, rx, n) = receiver();
        n.status("draining\nREADY=1\r\n");
        assert_eq!(recv(&rx), "STATUS=draining READY=1  ");
    }

    #[test]
    fn reloading_timestamp_is_monotonic_usec() {
        let before = monotonic_usec();
        let (_dir, rx, n) = receiver();
        n.reloading();
        let msg = recv(&rx);
        assert_reloading(&msg);
        let sent: u64 = msg.rsplit('=').next().unwrap().parse().unwrap();
        assert!(sent >= before && sent <= monotonic_usec());
        assert_eq!(reloading_message(42), "RELOADING=1\nMONOTONIC_USEC=42");
    }

    #[test]
    fn notify_socket_path_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::from_notify_socket(path.as_os_str());
        n.ready();
        assert_eq!(recv(&rx), "READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_namespace_address() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "herdgate-notify-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::from_notify_socket(OsStr::new(&format!("@{name}")));
        assert!(n.is_enabled());
        n.ready();
        n.reloading();
        assert_eq!(recv(&rx), "READY=1");
        assert_reloading(&recv(&rx));
    }

    #[test]
    fn disabled_and_unreachable_notifiers_are_silent() {
        let d = Notifier::disabled();
        assert!(!d.is_enabled());
        d.ready();
        d.status("x");
        d.reloading();
        for bad in ["", "relative/path", "vsock:2:1234"] {
            assert!(
                !Notifier::from_notify_socket(OsStr::new(bad)).is_enabled(),
                "{bad:?}"
            );
        }
        // Nobody bound there: the send fails (ENOENT) and is ignored.
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::at(dir.path().join("nobody.sock"));
        assert!(n.is_enabled());
        n.ready();
        n.stopping();
    }

    #[test]
    fn full_receiver_does_not_block() {
        let (_dir, _rx, n) = receiver();
        // Far more than a unix datagram queue holds; with a blocking socket
        // this would hang once the queue is full.
        let start = tokio::time::Instant::now();
        for _ in 0..10_000 {
            n.watchdog();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn watchdog_interval_parsing() {
        let half = |us| Some(Duration::from_micros(us));
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            half(15_000_000)
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            half(15_000_000)
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("3"), None, 7), half(1));
        assert_eq!(watchdog_interval_from(Some("1"), None, 7), half(1));
    }
}
