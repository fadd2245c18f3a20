//! herdgate as operators run it: real processes under reload, drain,
//! sd_notify and the systemd units; the status page and the lobby demo in
//! Chromium; and the shipped artifacts (container image, Kubernetes
//! manifests, Debian package) of the etcd build.
// Real processes in real time: the clock rule (clippy.toml) is the server's.
#![allow(clippy::disallowed_types)]

mod browser;
mod ops;
#[cfg(feature = "etcd")]
mod ship;
