//! systemd integration: readiness notification, the watchdog and socket
//! activation.
//!
//! This speaks the three small systemd protocols directly instead of pulling
//! in `libsystemd` or a wrapper crate:
//!
//! - **`sd_notify`**: one datagram of `KEY=value` lines sent to the unix
//!   socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//!   namespace). [`Notifier`] sends it.
//! - **the watchdog**: `WATCHDOG_USEC` (and optionally `WATCHDOG_PID`) say
//!   how often systemd wants `WATCHDOG=1`. [`watchdog_interval`] reads them.
//! - **socket activation**: `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`
//!   describe listening sockets passed as fds 3, 4, …. [`listen_fds`] and
//!   [`listen_fds_named`] take them.
//!
//! Why not a dependency: each protocol is a few lines over `std` and `libc`,
//! linking `libsystemd` would tie the binary to the build host's shared
//! library, and the wrapper crates either pull in a lot for this or block
//! (a notify send must never stall a tokio worker). Here every send is one
//! non-blocking `sendto`; failures are logged at debug level and otherwise
//! ignored, because systemd integration is optional: without `NOTIFY_SOCKET`
//! the [`Notifier`] does nothing, and outside socket activation
//! [`listen_fds`] returns nothing.
//!
//! Environment: [`listen_fds`] and [`listen_fd_names`] unset the `LISTEN_*`
//! variables (so a child process cannot mistake them for its own), which is
//! only sound before other threads exist — call them from `main` before the
//! tokio runtime is built. [`Notifier::from_env`] and [`watchdog_interval`]
//! only read the environment.

use std::ffi::OsStr;
use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
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
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
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

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Socket-activation state, read (and the variables unset) once.
struct Activation {
    count: usize,
    names: Vec<String>,
}

static ACTIVATION: OnceLock<Activation> = OnceLock::new();
static FDS_TAKEN: AtomicBool = AtomicBool::new(false);

fn activation() -> &'static Activation {
    ACTIVATION.get_or_init(|| {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        let count = listen_fd_count(pid.as_deref(), fds.as_deref(), std::process::id());
        let names = parse_fd_names(names.as_deref(), count);
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // Not thread-safe in general; see the module docs (call before
            // the runtime starts).
            std::env::remove_var(var);
        }
        Activation { count, names }
    })
}

/// How many fds systemd passed us: `LISTEN_FDS` if `LISTEN_PID` is our pid,
/// else 0 (pure, for tests).
pub fn listen_fd_count(listen_pid: Option<&str>, listen_fds: Option<&str>, our_pid: u32) -> usize {
    let Some(pid) = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) else {
        return 0;
    };
    if pid != our_pid {
        return 0;
    }
    let n = listen_fds
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    // Never let a bogus count make us walk into fds we do not own.
    n.min((RawFd::MAX - LISTEN_FDS_START) as usize)
}

/// One name per fd from `LISTEN_FDNAMES` (colon-separated); missing names
/// are `"unknown"`, as `sd_listen_fds_with_names` does (pure, for tests).
pub fn parse_fd_names(listen_fdnames: Option<&str>, count: usize) -> Vec<String> {
    let mut names: Vec<String> = match listen_fdnames {
        Some(s) if !s.is_empty() => s.split(':').map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    if count > 0 && !names.is_empty() && names.len() != count {
        tracing::debug!(
            names = names.len(),
            fds = count,
            "LISTEN_FDNAMES does not match LISTEN_FDS"
        );
    }
    names.resize(count, "unknown".to_owned());
    names
}

/// Names of the socket-activated fds (`FileDescriptorName=` in the socket
/// unit), in fd order; empty outside socket activation. Unsets the
/// `LISTEN_*` variables (see the module docs).
pub fn listen_fd_names() -> Vec<String> {
    activation().names.clone()
}

/// The socket-activated listeners, in fd order, as non-blocking
/// close-on-exec std listeners; empty outside socket activation or on a
/// second call. Fds that are not listening TCP sockets are skipped with an
/// error log, so prefer [`listen_fds_named`], which keeps names paired.
/// Unsets the `LISTEN_*` variables (see the module docs).
pub fn listen_fds() -> Vec<TcpListener> {
    listen_fds_named().into_iter().map(|(_, l)| l).collect()
}

/// The socket-activated listeners with their `FileDescriptorName=`. Convert
/// with `tokio::net::TcpListener::from_std` inside the runtime.
pub fn listen_fds_named() -> Vec<(String, TcpListener)> {
    let act = activation();
    if act.count == 0 || FDS_TAKEN.swap(true, Ordering::AcqRel) {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(act.count);
    for (i, name) in act.names.iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        if let Err(e) = set_cloexec(fd) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: passed fd is unusable");
            continue;
        }
        if let Err(e) = check_tcp_listener(fd) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: passed fd is not a listening TCP socket (check ListenStream= in the socket unit)");
            continue;
        }
        // SAFETY: systemd handed this fd to this process (LISTEN_PID matched),
        // it is open and a listening TCP socket (checked above), and FDS_TAKEN
        // guarantees it is wrapped only once.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: cannot make fd non-blocking");
            continue;
        }
        out.push((name.clone(), listener));
    }
    out
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFD/F_SETFD reads and sets fd flags; an invalid fd gives EBADF.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::FD_CLOEXEC == 0
            && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

/// Ok if `fd` is a listening `SOCK_STREAM` socket in `AF_INET`/`AF_INET6`.
fn check_tcp_listener(fd: RawFd) -> io::Result<()> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    if getsockopt_int(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(invalid("not a stream socket"));
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let domain = getsockopt_int(fd, libc::SO_DOMAIN)?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(invalid("not an IPv4/IPv6 socket"));
        }
    }
    if getsockopt_int(fd, libc::SO_ACCEPTCONN)? == 0 {
        return Err(invalid("socket is not listening"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
        let start = std::time::Instant::now();
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

    #[test]
    fn listen_fd_count_checks_pid() {
        assert_eq!(listen_fd_count(Some("42"), Some("2"), 42), 2);
        assert_eq!(listen_fd_count(Some("42"), Some("2"), 43), 0);
        assert_eq!(listen_fd_count(None, Some("2"), 42), 0);
        assert_eq!(listen_fd_count(Some("42"), None, 42), 0);
        assert_eq!(listen_fd_count(Some("42"), Some("two"), 42), 0);
        assert_eq!(listen_fd_count(Some("nope"), Some("2"), 42), 0);
    }

    #[test]
    fn fd_names() {
        assert_eq!(parse_fd_names(Some("public:admin"), 2), ["public", "admin"]);
        assert_eq!(parse_fd_names(None, 2), ["unknown", "unknown"]);
        assert_eq!(parse_fd_names(Some(""), 1), ["unknown"]);
        assert_eq!(parse_fd_names(Some("public"), 2), ["public", "unknown"]);
        assert_eq!(parse_fd_names(Some("a:b:c"), 2), ["a", "b"]);
        assert!(parse_fd_names(Some("public:admin"), 0).is_empty());
    }

    #[test]
    fn only_listening_tcp_sockets_are_accepted() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        check_tcp_listener(tcp.as_raw_fd()).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(check_tcp_listener(udp.as_raw_fd()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).unwrap();
        assert!(check_tcp_listener(unix.as_raw_fd()).is_err());
        let client = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        assert!(check_tcp_listener(client.as_raw_fd()).is_err());
        set_cloexec(tcp.as_raw_fd()).unwrap();
    }
}
