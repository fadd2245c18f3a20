//! One test binary for everything that runs herdgate in this process or as
//! one light process: the protocol and its clients (pusher-js, the Node and
//! Python SDKs), the HTTP API and its fallback transports, webhooks, parity
//! features, resume, config, the real client address, TLS and the fuzzers'
//! regressions. One link instead of eleven; tests of different modules run
//! side by side like those of one module always did.
// Real processes in real time: the clock rule (clippy.toml) is the server's.
#![allow(clippy::disallowed_types)]

mod big_presence;
mod compat;
mod config;
mod conflation;
mod deflate;
mod fuzz_regressions;
mod grants;
mod http_api;
mod http_fallback;
mod moderation;
mod parity;
mod protocol;
mod realaddr;
mod resume;
mod tallies;
mod tls;
mod webhooks;
mod write_window;
