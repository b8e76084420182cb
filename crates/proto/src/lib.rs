//! The wire protocol between kas and agentk: protobuf messages and the generated gRPC
//! client and server for the `kas.agent.v1.Agent` service (agentk <-> kas) and the
//! `kas.agent.v1.Gateway` service (kas <-> kas, the private API).
//!
//! It holds no behaviour beyond the generated code, a few constants and the one path
//! rule both ends apply to service requests ([`service_path_escapes`]); the tunnel
//! semantics live in the `kas-tunnel` crate.

#![allow(clippy::all, clippy::pedantic)]

pub mod codec;

/// Generated from `proto/agent.proto`.
pub mod v1 {
    tonic::include_proto!("kas.agent.v1");
}

/// Version of the tunnel protocol spoken by this build. kas refuses agents that speak
/// another major version with a clear error instead of misinterpreting frames.
pub const PROTOCOL_VERSION: u32 = 1;

/// gRPC metadata key carrying the agentk replica id (a random id per agentk process).
pub const REPLICA_ID_METADATA: &str = "x-agent-replica-id";

/// gRPC metadata key carrying the agentk build version.
pub const AGENT_VERSION_METADATA: &str = "x-agent-version";

/// Private API metadata: the agent a forwarded exchange is for.
pub const GATEWAY_AGENT_METADATA: &str = "x-kas-agent-id";

/// Private API metadata: the connection (on the gateway kas) to use.
pub const GATEWAY_CONNECTION_METADATA: &str = "x-kas-connection";

/// Largest Data frame either side sends. Bodies are split into frames of at most this size.
/// Large enough that bulk bodies cost few messages (256 KiB streamed about 15 % faster
/// than 64 KiB in the benchmark), small enough to bound what one frame holds in memory.
pub const MAX_DATA_FRAME: usize = 256 * 1024;

/// The HTTP/2 frame size kas accepts: one full Data message (with its gRPC and protobuf
/// framing) fits in one HTTP/2 frame.
pub const MAX_H2_FRAME: u32 = MAX_DATA_FRAME as u32 + 1024;

/// Largest encoded message either side accepts (a request or response head can carry
/// large headers; data frames are far smaller).
pub const MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Whether a service path could step outside a path prefix once the service decodes
/// it: `.` or `..` segments (also percent-encoded, `%2e`), an encoded slash or a
/// backslash. kas refuses such prefixes in `service_access`; agentk refuses such
/// request paths.
pub fn service_path_escapes(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower
        .split('/')
        .map(|s| s.replace("%2e", "."))
        .any(|s| s == "." || s == "..")
}
