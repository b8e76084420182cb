//! kas's end of accepting an agent's streams: the handshake every stream starts with
//! (a first message within a deadline, in the protocol version kas speaks), and the
//! tunnels of registered replicas handed to the [`TunnelRegistry`].
//!
//! Who the agent is (its token) and what its configuration stream carries are kas's
//! business; this module only needs the agent id and replica id they establish.

// gRPC handlers answer with tonic::Status, which is large by design.
#![allow(clippy::result_large_err)]

use crate::registry::{outbound_channel, OutboundStream, TunnelRegistry};
use kas_proto::v1::{agent_frame, AgentFrame};
use kas_proto::PROTOCOL_VERSION;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tonic::{Status, Streaming};

/// Frames kas queues towards an agent per tunnel: small, so a request body's pump
/// waits here (the backpressure towards the client).
const OUTBOUND_FRAMES: usize = 4;

/// Refuses an agent that speaks another version of the tunnel protocol.
pub fn check_protocol(v: u32) -> Result<(), Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "agent speaks tunnel protocol version {v}, this kas speaks {PROTOCOL_VERSION}; use matching versions of agentk and kas"
        )))
    }
}

/// The first message of a stream, within `timeout` (`what` names the stream in errors).
pub async fn first_message<T>(
    inbound: &mut Streaming<T>,
    timeout: Duration,
    what: &str,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(Status::invalid_argument(format!(
            "{what} closed before its first message"
        ))),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{what}: no first message within {timeout:?}"
        ))),
    }
}

type Replicas = Mutex<HashMap<(u64, String), Arc<str>>>;

/// Accepts agents' tunnels: each joins the registration of its replica's live
/// configuration stream ([`Acceptor::register`]).
pub struct Acceptor {
    registry: Arc<TunnelRegistry>,
    /// (agent id, replica id) -> registry key of the replica's live configuration stream.
    replicas: Arc<Replicas>,
    handshake_timeout: Duration,
}

/// A replica's place for its tunnels; dropping it (when the configuration stream
/// ends) stops new tunnels from joining.
pub struct Registered {
    replicas: Weak<Replicas>,
    id: (u64, String),
    key: Arc<str>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(r) = self.replicas.upgrade() {
            let mut map = r.lock().unwrap_or_else(|p| p.into_inner());
            // A reconnect of the same replica may have replaced it already.
            if map.get(&self.id) == Some(&self.key) {
                map.remove(&self.id);
            }
        }
    }
}

impl Acceptor {
    pub fn new(registry: Arc<TunnelRegistry>, handshake_timeout: Duration) -> Self {
        Acceptor {
            registry,
            replicas: Arc::default(),
            handshake_timeout,
        }
    }

    pub fn registry(&self) -> &Arc<TunnelRegistry> {
        &self.registry
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// From now on the replica's tunnels join the registration keyed `key`.
    pub fn register(&self, agent_id: u64, replica_id: &str, key: Arc<str>) -> Registered {
        let id = (agent_id, replica_id.to_string());
        self.lock().insert(id.clone(), key.clone());
        Registered {
            replicas: Arc::downgrade(&self.replicas),
            id,
            key,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, String), Arc<str>>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new tunnel of a registered replica: checks its Hello and offers it to the
    /// registry; the returned stream is the kas -> agent direction.
    pub async fn accept(
        &self,
        agent_id: u64,
        replica_id: String,
        mut inbound: Streaming<AgentFrame>,
    ) -> Result<OutboundStream, Status> {
        let key = self
            .lock()
            .get(&(agent_id, replica_id))
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition("open the configuration stream before tunnels")
            })?;
        match first_message(&mut inbound, self.handshake_timeout, "tunnel").await? {
            AgentFrame {
                msg: Some(agent_frame::Msg::Hello(h)),
            } => check_protocol(h.protocol_version)?,
            _ => return Err(Status::invalid_argument("a tunnel must start with Hello")),
        }
        let (tx, rx) = outbound_channel(OUTBOUND_FRAMES);
        self.registry.offer(agent_id, &key, Box::pin(inbound), tx);
        Ok(rx)
    }
}
