//! The harness's libc calls, each behind one safe wrapper (the crate is
//! `#![deny(unsafe_code)]`; only this module may hold `unsafe`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of CPU times
/// in /proc.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; an unknown name answers -1.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK): {ticks}");
    ticks as f64
}

/// Send `sig` to the process `pid` (a child of the test).
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A descriptor that becomes readable when the process `pid` exits
/// (`pidfd_open(2)`, Linux ≥ 5.3). `pid` must be an unreaped child, so the
/// pid cannot have been reused.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open: open, and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Wait up to `within` for `fd` to become readable (`poll(2)`, retried on
/// EINTR); whether it did.
pub fn wait_readable(fd: &OwnedFd, within: Duration) -> bool {
    let ms = within.as_millis().min(i32::MAX as u128) as i32;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, a local, for an fd open for the borrow.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return rc > 0;
        }
    }
}
