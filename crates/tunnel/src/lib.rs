//! Reverse tunnels between kas and agentk: both ends of the tunnel protocol.
//!
//! An agent replica opens gRPC `Tunnel` streams to kas and leaves them idle. kas
//! accepts them ([`server::Acceptor`]), keeps them in the [`TunnelRegistry`], takes one
//! when a request for that agent arrives, and streams one HTTP exchange through it
//! ([`Tunnel::round_trip`]): request head, request body frames, then the agent's
//! response head and body frames ([`TunnelBody`]). agentk serves the exchanges of each
//! of its tunnels with [`agent::serve`]. Both ends cut bodies into frames with
//! [`pump_body`] and carry upgrades (SPDY, WebSocket) after a 101 with [`splice`].
//!
//! Frame sequence on one stream (see `proto/agent.proto`):
//! ```text
//! agent -> kas : Hello
//! kas -> agent : RequestHead, Data*, EndOfBody      (RequestHead{end_of_body}: no body;
//!                                                    upgrade: RequestHead only)
//! agent -> kas : ResponseHead, Data*, EndOfBody     (ResponseHead{end_of_body}: body inline)
//!                | TunnelError
//! after a 101  : Data* both ways, EndOfBody = half-close of that direction
//! ```
//! After a clean exchange (both bodies complete) the stream goes back to the registry
//! and carries the next request. Either side ending its half of the stream early
//! cancels the exchange and retires the tunnel.
//!
//! It does not authenticate or authorize anything and knows nothing of Kubernetes;
//! it does not know about other kas replicas (routing between replicas is separate).

pub mod agent;
mod body;
pub mod frame;
pub mod headers;
pub mod queue;
mod registry;
#[cfg(test)]
mod registry_tests;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use body::TunnelBody;
pub use frame::{pump_body, splice, FrameSink, PumpError};
pub use registry::{
    outbound_channel, retire, AcquireError, AgentSnapshot, Outbound, OutboundStream, ReplicaGuard,
    ReplicaInfo, ReplicaSnapshot, Tunnel, TunnelPool, TunnelRegistry,
};

use kas_proto::v1::TunnelError as ProtoTunnelError;

/// The agent -> kas direction of a tunnel: the agent's gRPC stream, or the stream of
/// whatever relays it (see [`TunnelPool`]).
pub type Inbound = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<kas_proto::v1::AgentFrame, tonic::Status>> + Send>,
>;

/// The next frame of an inbound stream, in `Streaming::message` form.
pub(crate) async fn next_frame(
    inbound: &mut Inbound,
) -> Result<Option<kas_proto::v1::AgentFrame>, tonic::Status> {
    futures::StreamExt::next(inbound).await.transpose()
}

/// Errors of one exchange through a tunnel, classified by origin.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The tunnel broke before the agent answered (the agent went away). Safe to
    /// retry on another tunnel only if the request body was not consumed.
    #[error("the agent closed the tunnel before responding")]
    TunnelClosed,
    /// The agent answered with an error instead of a response.
    #[error("the agent could not complete the request: {message}")]
    Agent { code: i32, message: String },
    /// The agent violated the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ExchangeError {
    pub(crate) fn from_proto(e: ProtoTunnelError) -> Self {
        ExchangeError::Agent {
            code: e.code,
            message: e.message,
        }
    }
}
