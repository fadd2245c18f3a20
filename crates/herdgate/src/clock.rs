//! The clock rule: which clock measures what.
//!
//! - **Durations inside the server** (deadlines, rates, ages, pacing) are
//!   measured with [`Instant`], tokio's: outside tests it *is* std's
//!   `Instant` (no cost), and in tests it obeys paused time
//!   (`#[tokio::test(start_paused = true)]`), so a test that moves the
//!   clock moves every deadline and measurement at once. std's `Instant`
//!   would keep real time in the middle of a paused test; clippy bans it in
//!   this crate (`clippy.toml`). `tokio::time::Instant::now()` also works
//!   outside a runtime (it reads std's clock there).
//! - **Wall-clock time** only for timestamps that leave the process or come
//!   from outside it: webhooks' `time_ms`, the API's `auth_timestamp`
//!   window, certificate dates, the status page. Read here, by
//!   [`unix_now`], the one place `SystemTime` is allowed.
//! - Clocks std does not offer (`CLOCK_BOOTTIME` for leases, a thread's CPU
//!   time, systemd's raw `CLOCK_MONOTONIC`) are in [`crate::sys`].

use std::time::Duration;

pub use tokio::time::Instant;

/// Wall-clock time since the Unix epoch (zero for a clock set before 1970).
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
pub fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
