//! Test support: a **test** Kubernetes API server (not a cluster: it speaks just enough
//! of the API for kubectl and client libraries to work, and records the identity and
//! impersonation headers it receives), and helpers that run the real kas, agentk and
//! kasctl binaries for end-to-end tests.

pub mod apiserver;
pub mod certs;
pub mod fixture;
pub mod grpc;
pub mod http;
pub mod moto;
pub mod pods;
pub mod procs;
pub mod prometheus;
pub mod replicas;
pub mod services;
pub mod sockets;
pub mod story;
pub mod time;

pub use apiserver::{Recorded, TestApiServer, User};
