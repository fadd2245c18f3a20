//! The cluster as real processes on loopback: static membership, etcd
//! membership (with a real etcd), and resume across edges. One binary whose
//! scenarios run one at a time: each starts several processes on the
//! machine's two cores and judges timings against leases, so two side by
//! side could stall a link past its heartbeats.
// Real processes in real time: the clock rule (clippy.toml) is the server's.
#![allow(clippy::disallowed_types)]

mod cluster;
// The etcd scenarios need the etcd membership compiled in; scripts/test
// builds with `--features herdgate/etcd`.
#[cfg(feature = "etcd")]
mod cluster_etcd;
#[cfg(feature = "etcd")]
mod resume_cluster;
#[cfg(feature = "etcd")]
mod ticket_keys;

/// Held by every scenario of this binary for its whole run. A tokio mutex:
/// the static-membership scenarios are async (`lock().await`), the etcd
/// ones synchronous (`blocking_lock()`, outside any runtime).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
