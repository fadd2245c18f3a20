//! Edges and workers on many hosts, no central broker.
//!
//! `role = "edge"` nodes hold client sockets and the HTTP API; `role =
//! "worker"` nodes own rooms; every edge places every room on the same
//! worker by consistent hashing over the same worker list. docs/CLUSTER.md
//! describes layouts and failure behaviour, docs/LINK.md the link.

pub mod edge;
pub mod link;
pub mod tls;
pub mod worker_node;
