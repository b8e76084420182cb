//! Speaking to kas's agent listener directly, as a raw gRPC client would: to test what
//! kas does with streams a real agentk would never send.

use kas_proto::v1::agent_client::AgentClient;
use tonic::transport::Channel;

/// A client of the agent listener at `url` (`grpc://host:port`).
pub async fn agent_client(url: &str) -> AgentClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .expect("agent listener URL")
        .connect()
        .await
        .expect("connect to the agent listener");
    AgentClient::new(channel)
}

/// A request carrying `stream`, authenticated with agent `token` as replica `replica`.
pub fn agent_request<S>(token: &str, replica: &str, stream: S) -> tonic::Request<S> {
    let mut r = tonic::Request::new(stream);
    let md = r.metadata_mut();
    md.insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().expect("token"),
    );
    md.insert(
        kas_proto::REPLICA_ID_METADATA,
        replica.parse().expect("replica id"),
    );
    r
}
