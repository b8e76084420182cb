//! The private kas-to-kas API (one `Gateway.ForwardMany` gRPC method on the private
//! listener), both ends, and its authentication.
//!
//! A kas that received a request for an agent it does not hold (the routing kas) picks
//! a connection of the agent from the shared registry and forwards the exchange to the
//! kas holding it (the gateway kas), naming the agent and the exact connection. The
//! routing end is [`Peers`], the gateway end [`GatewayService`]; both speak the tunnel's
//! own frames, so a forwarded exchange is streamed exactly like a local one. Every call
//! carries a short-lived JWT signed with a secret only the replicas share
//! ([`PrivateAuth`]).

pub mod auth;
pub mod gateway;
pub mod peers;

pub use auth::{PrivateAuth, SecretError};
pub use gateway::GatewayService;
pub use peers::{ForwardStats, OpenError, Peers};

use std::time::Duration;

/// How long a forwarded exchange may wait on the gateway for a busy connection.
const GATEWAY_WAIT: Duration = Duration::from_secs(5);
/// Frames queued in each direction of a relay: with Data frames of up to 256 KiB this
/// bounds what one forwarded exchange holds in memory at 1 MiB per direction.
const RELAY_FRAMES: usize = 4;
