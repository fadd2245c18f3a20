//! systemd socket activation: `LISTEN_PID`, `LISTEN_FDS` and
//! `LISTEN_FDNAMES` describe listening sockets passed as fds 3, 4, ….
//! [`listen_fds`] and [`listen_fds_named`] take them.
//!
//! Why not a dependency: as with `sd_notify` (see [`crate::notify`]), the
//! protocol is a few lines over `std` and the [`crate::sys`] wrappers.
//!
//! `unsafe` here: one line, [`OwnedFd::from_raw_fd`], which claims fds 3, …
//! as this process's. Only this module knows that claim is sound (systemd
//! passed them to our pid, and they are taken once), so it cannot move into
//! a safe wrapper in `sys`.
//!
//! Environment: [`listen_fds`] and [`listen_fd_names`] unset the `LISTEN_*`
//! variables (so a child process cannot mistake them for its own), which is
//! only sound before other threads exist — call them from `main` before the
//! tokio runtime is built.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

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
        // SAFETY: systemd handed this fd to this process (LISTEN_PID
        // matched) and FDS_TAKEN guarantees it is claimed only once. An fd
        // that turns out closed makes the checks below fail with EBADF.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = crate::sys::set_cloexec(owned.as_fd()) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: passed fd is unusable");
            // Not ours to close: leave it as it was passed.
            let _ = owned.into_raw_fd();
            continue;
        }
        if let Err(e) = check_tcp_listener(owned.as_fd()) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: passed fd is not a listening TCP socket (check ListenStream= in the socket unit)");
            let _ = owned.into_raw_fd();
            continue;
        }
        let listener = TcpListener::from(owned);
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!(fd, name = %name, error = %e, "socket activation: cannot make fd non-blocking");
            continue;
        }
        out.push((name.clone(), listener));
    }
    out
}

fn getsockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    crate::sys::get_opt(fd, libc::SOL_SOCKET, opt)
}

/// Ok if `fd` is a listening `SOCK_STREAM` socket in `AF_INET`/`AF_INET6`.
fn check_tcp_listener(fd: BorrowedFd<'_>) -> io::Result<()> {
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
        check_tcp_listener(tcp.as_fd()).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(check_tcp_listener(udp.as_fd()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).unwrap();
        assert!(check_tcp_listener(unix.as_fd()).is_err());
        let client = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        assert!(check_tcp_listener(client.as_fd()).is_err());
    }
}
