//! The load generator's libc calls, each behind one safe wrapper (the
//! crate is `#![deny(unsafe_code)]`; only this module and [`crate::shm`],
//! whose shared mapping is raw memory by nature, may hold `unsafe`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Raises the soft open-files limit to the hard limit (every socket is a
/// descriptor); returns the soft limit in force after (1024 if unknown).
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, a
    // local that outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// CPU time (user + system) of the calling thread, in seconds.
pub fn thread_cpu_s() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are valid;
    // getrusage only writes the struct we pass, a local.
    let r = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut r);
        r
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of CPU times
/// in /proc; 100 if unknown.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; an unknown name answers -1.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// `setsockopt(fd, level, name, &value)` for an `int` option.
pub fn set_opt(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is open for the borrow; setsockopt reads
    // exactly the one c_int the pointer and length describe.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
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
