//! Attacks and load: the hostile inputs docs/PROTOCOL.md answers, the abuse
//! suite of docs/SECURITY.md (an honest client gets through each attack),
//! overload and shedding, and the 5,000-socket smoke test. One binary: they
//! load the machine in the same way and were written to share it.
// Real processes in real time: the clock rule (clippy.toml) is the server's.
#![allow(clippy::disallowed_types)]

mod abuse;
mod hostile;
mod overload;
mod smoke;
