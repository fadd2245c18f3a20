//! Every call the server makes into libc (and its one CPU intrinsic), each
//! behind one safe wrapper: the rest of the crate is `#![deny(unsafe_code)]`.
//!
//! The wrappers' argument types are what make each call sound: buffers are
//! slices, descriptors are borrowed ([`BorrowedFd`], so a closed one cannot
//! be passed without `unsafe` at the caller), and out-parameters are locals
//! of the wrapper. Socket options go through one [`set_opt`]/[`get_opt`]
//! pair (integer options only: every option herdgate touches is an `int`).
//! The clocks the standard library does not offer (`CLOCK_BOOTTIME`, the
//! thread's CPU time, the raw `CLOCK_MONOTONIC` value systemd compares) go
//! through one [`clock`]; the clocks the code otherwise uses are in
//! [`crate::clock`].
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

/// Raise the soft open-files limit to the hard limit; returns `(soft, hard)` after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            lim = raised;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// `sysconf(name)`, 0 if the value is unknown.
fn sysconf(name: libc::c_int) -> u64 {
    // SAFETY: sysconf has no preconditions; an unknown name answers -1.
    let v = unsafe { libc::sysconf(name) };
    v.max(0) as u64
}

/// The size of a memory page in bytes.
pub fn page_size() -> u64 {
    sysconf(libc::_SC_PAGESIZE)
}

/// Physical memory in bytes (pages × page size).
pub fn physical_memory() -> u64 {
    sysconf(libc::_SC_PHYS_PAGES) * page_size()
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// Return free heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and releases the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `setsockopt(fd, level, name, &value)` for an `int` option.
pub fn set_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow; setsockopt reads exactly the one
    // c_int the pointer and length describe, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(fd, level, name)` for an `int` option.
pub fn get_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow; getsockopt writes at most `len`
    // bytes (one c_int) into `value` and the actual length into `len`, both
    // locals that outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TCP_NOTSENT_LOWAT`: the kernel holds at most this many unsent bytes for
/// the socket, so a slow reader's backlog stays in the caller's (counted)
/// queue. Best effort: an error leaves the kernel default.
pub fn set_notsent_lowat(socket: &impl AsFd, bytes: u32) {
    let v = bytes.min(libc::c_int::MAX as u32) as libc::c_int;
    if let Err(e) = set_opt(
        socket.as_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        v,
    ) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
}

/// Set `FD_CLOEXEC` on a descriptor (no-op if it is set already).
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow; F_GETFD/F_SETFD read and set its
    // descriptor flags and touch no memory of ours.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::FD_CLOEXEC == 0
            && libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `send(fd, buf, MSG_DONTWAIT | MSG_NOSIGNAL)`: write what the kernel takes
/// now, never wait, never raise SIGPIPE. On the fan-out path (see
/// [`crate::outbound::direct`]): inlined, one syscall.
#[inline]
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is open for the borrow; send reads `buf.len()` bytes from
    // `buf`, a live slice.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `shutdown(fd, SHUT_WR)`: the peer reads EOF after what was written.
pub fn shutdown_write(socket: &impl AsFd) -> io::Result<()> {
    // SAFETY: the descriptor is open for the borrow; shutdown takes a
    // descriptor and a flag and touches no memory of ours.
    if unsafe { libc::shutdown(socket.as_fd().as_raw_fd(), libc::SHUT_WR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `clock_gettime(id)` as a duration since that clock's origin; zero if the
/// clock does not exist here (the three below exist on every Linux herdgate
/// runs on).
fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a local that
    // outlives the call; an unknown clock is an error (EINVAL), not UB.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// `CLOCK_MONOTONIC` since its (boot-time) origin: the raw value systemd
/// compares `MONOTONIC_USEC` against. For measuring durations use
/// [`crate::clock`]'s `Instant`.
pub fn monotonic_time() -> Duration {
    clock(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_BOOTTIME` since boot: monotonic and, unlike `CLOCK_MONOTONIC`,
/// counting time the machine spent suspended (a lease's clock).
pub fn boot_time() -> Duration {
    clock(libc::CLOCK_BOOTTIME)
}

/// Ask the CPU to fetch the cache line at `p` (a hint: any address is
/// fine, nothing is read and nothing faults).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    // (Needs `unsafe` before Rust 1.87, where sse intrinsics became safe.)
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_options_round_trip_and_errors_are_errors() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_opt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).unwrap();
        assert_eq!(
            get_opt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap(),
            1
        );
        set_notsent_lowat(&s, 16 * 1024);
        assert_eq!(
            get_opt(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT).unwrap(),
            16 * 1024
        );
        assert_eq!(
            get_opt(l.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap(),
            1
        );
        assert!(get_opt(s.as_fd(), libc::SOL_SOCKET, -1).is_err());
        assert_eq!(send_nonblocking(s.as_fd(), b"hi").unwrap(), 2);
        shutdown_write(&s).unwrap();
        set_cloexec(s.as_fd()).unwrap();
    }

    #[test]
    fn clocks_move_forward() {
        let (m, b) = (monotonic_time(), boot_time());
        assert!(m > Duration::ZERO && b >= m);
        assert!(monotonic_time() >= m && boot_time() >= b);
        assert!(page_size() >= 4096 && physical_memory() > page_size());
        assert!(rss_bytes().unwrap() > 0);
    }
}
