//! agentk, the in-cluster agent: dials kas, keeps a pool of idle tunnels, receives its
//! configuration, and serves requests arriving through tunnels against the cluster
//! API with its own credentials and the impersonation kas decided.
//!
//! It accepts no inbound connections except, when asked to, its own observability
//! endpoint (`stats`). It never forwards the caller's credentials
//! or impersonation headers. It does not depend on the kas server crate.

pub mod cluster;
pub mod connection;
pub mod dial;
pub mod exchange;
pub mod stats;

pub use cluster::ClusterAccess;
pub use connection::{run, Backoff, ConfigWatch, ConnectOptions};
pub use exchange::Upstream;
