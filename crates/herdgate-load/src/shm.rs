//! State shared between the controller and the socket workers, possibly across processes.
//!
//! Past ~19k sockets one process runs out of file descriptors, so sockets live in child
//! processes while the controller (the parent) publishes. Counting missing deliveries needs,
//! at publish time, the number of sockets subscribed to the channel in *all* processes, and
//! receivers in every process must credit the same publish record. Both live here, in one
//! shared memory mapping of plain atomics (a file under /dev/shm mapped by every process, or
//! an anonymous mapping when everything runs in one process):
//!
//! * a header of phase flags and live counters (for the progress line and phase changes),
//! * `chan_subs[M]`: sockets currently subscribed per channel,
//! * the publish ledger: a ring of `LEDGER_CAP` records, each `(id << 24 | delivered)` plus the
//!   expected count, so memory stays bounded however long the run; a record is finalised
//!   (missing/extra computed) when its slot is reused or at the end of the run,
//! * a live delivery-latency histogram for the progress line's p99.
//!
//! Final results do not come from here: each worker reports its own counts and histograms
//! (JSON from children) and the controller merges them.
//!
//! `unsafe` here: the mapping is memory the compiler cannot see into (mmap,
//! munmap, and views of it as atomics), so this module keeps its own.

use crate::hist::NBUCKETS;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

const MAGIC: u64 = 0x6865_7264_6c6f_6164; // "herdload"
pub const LEDGER_CAP: usize = 1 << 20;
const DELIVERED_BITS: u32 = 24;
const DELIVERED_MASK: u64 = (1 << DELIVERED_BITS) - 1;
const ID_MASK: u64 = (1 << (64 - DELIVERED_BITS)) - 1;

/// Initial phase (the zeroed mapping).
#[allow(dead_code)]
pub const PHASE_CONNECTING: u64 = 0;
pub const PHASE_MEASURING: u64 = 1;
/// Publishing stopped, deliveries draining; sockets stay open (churn pauses).
pub const PHASE_DRAINING: u64 = 2;
pub const PHASE_STOP: u64 = 3;

/// Header at the start of the mapping. All fields start at zero.
#[repr(C)]
pub struct Header {
    magic: AtomicU64,
    channels: AtomicU64,
    pub phase: AtomicU64,
    pub workers_connected: AtomicU64,
    pub attempted: AtomicU64,
    pub established: AtomicU64,
    pub open: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub delivered: AtomicU64,
}

/// A finalised publish record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settled {
    pub expected: u64,
    pub delivered: u64,
}

pub struct Shm {
    ptr: *mut u8,
    len: usize,
    channels: usize,
    path: Option<PathBuf>,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for Shm {}
// SAFETY: as for Send: shared access is through atomics only.
unsafe impl Sync for Shm {}

fn align(n: usize) -> usize {
    (n + 63) & !63
}

struct Offsets {
    subs: usize,
    state: usize,
    expected: usize,
    hist: usize,
    len: usize,
}

fn offsets(channels: usize) -> Offsets {
    let subs = align(std::mem::size_of::<Header>());
    let state = align(subs + channels * 4);
    let expected = align(state + LEDGER_CAP * 8);
    let hist = align(expected + LEDGER_CAP * 4);
    let len = align(hist + NBUCKETS * 8);
    Offsets {
        subs,
        state,
        expected,
        hist,
        len,
    }
}

impl Shm {
    /// Anonymous shared mapping for a single-process run.
    pub fn anonymous(channels: usize) -> Result<Shm> {
        let len = offsets(channels).len;
        let ptr = map(len, -1)?;
        let shm = Shm {
            ptr,
            len,
            channels,
            path: None,
        };
        shm.init();
        Ok(shm)
    }

    /// New file-backed mapping that child processes open with [`Shm::open`]; removed on drop.
    pub fn create(channels: usize) -> Result<Shm> {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "herdgate-load-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let len = offsets(channels).len;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(len as u64)?;
        let ptr = map(len, std::os::fd::AsRawFd::as_raw_fd(&file));
        let ptr = match ptr {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let shm = Shm {
            ptr,
            len,
            channels,
            path: Some(path),
        };
        shm.init();
        Ok(shm)
    }

    /// Maps the controller's file (child side); checks it was made for the same run shape.
    pub fn open(path: &Path, channels: usize) -> Result<Shm> {
        let len = offsets(channels).len;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.metadata()?.len() != len as u64 {
            bail!("{}: size mismatch (different --channels?)", path.display());
        }
        let ptr = map(len, std::os::fd::AsRawFd::as_raw_fd(&file))?;
        let shm = Shm {
            ptr,
            len,
            channels,
            path: None,
        };
        if shm.header().magic.load(Acquire) != MAGIC
            || shm.header().channels.load(Acquire) != channels as u64
        {
            bail!(
                "{}: not a herdgate-load region for this run",
                path.display()
            );
        }
        Ok(shm)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn init(&self) {
        self.header().channels.store(self.channels as u64, Release);
        self.header().magic.store(MAGIC, Release);
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a zero-initialised, 64-aligned Header.
        unsafe { &*(self.ptr as *const Header) }
    }

    fn slice<T>(&self, offset: usize, n: usize) -> &[T] {
        debug_assert!(offset + n * std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds of the live mapping, aligned, atomics are valid for any bit pattern.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset) as *const T, n) }
    }

    /// Sockets currently subscribed, per channel index.
    pub fn chan_subs(&self) -> &[AtomicU32] {
        self.slice(offsets(self.channels).subs, self.channels)
    }

    /// Live delivery-latency bucket counts (µs), for the progress line.
    pub fn live_hist(&self) -> &[AtomicU64] {
        self.slice(offsets(self.channels).hist, NBUCKETS)
    }

    fn ledger(&self) -> (&[AtomicU64], &[AtomicU32]) {
        let o = offsets(self.channels);
        (
            self.slice(o.state, LEDGER_CAP),
            self.slice(o.expected, LEDGER_CAP),
        )
    }

    /// Registers publish `id` (ids start at 1) expecting `expected` deliveries, before it is sent.
    /// Returns the record it displaced, if any, now final.
    pub fn ledger_register(&self, id: u64, expected: u32) -> Option<Settled> {
        let (state, exp) = self.ledger();
        let i = (id as usize) & (LEDGER_CAP - 1);
        let old_expected = exp[i].load(Acquire);
        exp[i].store(expected, Release);
        let old = state[i].swap((id & ID_MASK) << DELIVERED_BITS, AcqRel);
        (old != 0).then_some(Settled {
            expected: old_expected as u64,
            delivered: old & DELIVERED_MASK,
        })
    }

    /// Marks publish `id` as never sent (the API refused it): nothing is expected any more.
    pub fn ledger_cancel(&self, id: u64) {
        let (state, exp) = self.ledger();
        let i = (id as usize) & (LEDGER_CAP - 1);
        if state[i].load(Acquire) >> DELIVERED_BITS == id & ID_MASK {
            exp[i].store(0, Release);
        }
    }

    /// Credits one delivery of publish `id`; false when the record is gone (delivered too late).
    pub fn ledger_deliver(&self, id: u64) -> bool {
        let (state, _) = self.ledger();
        let i = (id as usize) & (LEDGER_CAP - 1);
        let mut s = state[i].load(Acquire);
        loop {
            if id == 0 || s >> DELIVERED_BITS != id & ID_MASK {
                return false;
            }
            if s & DELIVERED_MASK == DELIVERED_MASK {
                return true; // saturated; cannot happen below 16M sockets per channel
            }
            match state[i].compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// Finalises and clears every remaining record (end of run, after the drain).
    pub fn ledger_settle_all(&self) -> Vec<Settled> {
        let (state, exp) = self.ledger();
        let mut out = Vec::new();
        for i in 0..LEDGER_CAP {
            let s = state[i].swap(0, AcqRel);
            if s != 0 {
                out.push(Settled {
                    expected: exp[i].load(Acquire) as u64,
                    delivered: s & DELIVERED_MASK,
                });
            }
        }
        out
    }
}

fn map(len: usize, fd: libc::c_int) -> Result<*mut u8> {
    let flags = if fd < 0 {
        libc::MAP_SHARED | libc::MAP_ANONYMOUS
    } else {
        libc::MAP_SHARED
    };
    // SAFETY: fresh mapping of `len` bytes; checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!(
            "mmap of {len} bytes failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(p as *mut u8)
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` returned.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_deliveries_and_settles_on_reuse() {
        let shm = Shm::anonymous(4).unwrap();
        assert_eq!(shm.ledger_register(1, 3), None);
        assert!(shm.ledger_deliver(1));
        assert!(shm.ledger_deliver(1));
        assert!(!shm.ledger_deliver(2), "unregistered id");
        let displaced = shm.ledger_register(1 + LEDGER_CAP as u64, 5).unwrap();
        assert_eq!(
            displaced,
            Settled {
                expected: 3,
                delivered: 2
            }
        );
        assert!(!shm.ledger_deliver(1), "too late after reuse");
        shm.ledger_register(7, 2);
        shm.ledger_cancel(7);
        let mut all = shm.ledger_settle_all();
        all.sort_by_key(|s| s.expected);
        assert_eq!(
            all,
            vec![
                Settled {
                    expected: 0,
                    delivered: 0
                },
                Settled {
                    expected: 5,
                    delivered: 0
                }
            ]
        );
        assert!(shm.ledger_settle_all().is_empty());
    }

    #[test]
    fn file_mapping_is_shared_between_mappers() {
        let a = Shm::create(3).unwrap();
        let path = a.path().unwrap().to_path_buf();
        let b = Shm::open(&path, 3).unwrap();
        assert!(Shm::open(&path, 4).is_err());
        a.chan_subs()[2].fetch_add(9, Relaxed);
        assert_eq!(b.chan_subs()[2].load(Relaxed), 9);
        b.ledger_register(42, 1);
        assert!(a.ledger_deliver(42));
        drop(b);
        drop(a);
        assert!(!path.exists());
    }
}
