//! The agent listener's gRPC service: authenticates agentk replicas, streams their
//! configuration, and hands their idle tunnels to the [`TunnelRegistry`].

// gRPC handlers answer with tonic::Status, which is large by design.
#![allow(clippy::result_large_err)]

use kas_controlplane::{AgentInfo, Change, ControlPlane};
use kas_proto::v1::agent_server::Agent;
use kas_proto::v1::{agent_frame, AgentConfiguration, AgentFrame, ConfigAck};
use kas_proto::{AGENT_VERSION_METADATA, PROTOCOL_VERSION, REPLICA_ID_METADATA};
use kas_router::Router;
use kas_tunnel::{ReplicaInfo, TunnelRegistry};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type ReplicaKey = (u64, String);

/// Implements `kas.agent.v1.Agent`.
pub struct AgentService {
    cp: Arc<dyn ControlPlane>,
    router: Arc<Router>,
    metrics: Arc<crate::metrics::Metrics>,
    registry: Arc<TunnelRegistry>,
    /// (agent id, replica id) -> registry key of the replica's live configuration stream.
    replicas: Arc<Mutex<HashMap<ReplicaKey, Arc<str>>>>,
    /// Flips to true when kas shuts down; configuration streams end with UNAVAILABLE so
    /// agents reconnect (elsewhere, once there are several kas).
    shutdown: watch::Receiver<bool>,
}

impl AgentService {
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        router: Arc<Router>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AgentService {
            cp,
            metrics,
            registry: router.registry().clone(),
            router,
            replicas: Default::default(),
            shutdown,
        }
    }

    async fn authenticate(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<(Arc<AgentInfo>, String, String), Status> {
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing agent token (authorization: Bearer <token>)")
            })?;
        let info = self
            .cp
            .authenticate_agent(token.trim())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "control plane failed while authenticating an agent");
                Status::unavailable("kas cannot reach its control plane")
            })?
            .ok_or_else(|| Status::unauthenticated("invalid agent token"))?;
        let replica = md
            .get(REPLICA_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing or invalid {REPLICA_ID_METADATA}"))
            })?
            .to_string();
        let version = md
            .get(AGENT_VERSION_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .chars()
            .take(64)
            .collect();
        Ok((info, replica, version))
    }
}

fn check_protocol(v: u32) -> Result<(), Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "agent speaks tunnel protocol version {v}, this kas speaks {PROTOCOL_VERSION}; use matching versions of agentk and kas"
        )))
    }
}

fn config_message(info: &AgentInfo) -> AgentConfiguration {
    AgentConfiguration {
        agent_id: info.agent.id,
        agent_name: info.agent.name.clone(),
        config_project_path: info.agent.config_project.path.clone(),
        version: info.config_version,
        config_yaml: info.config_yaml.clone(),
    }
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type ConfigureStream = BoxStream<AgentConfiguration>;
    type TunnelStream = kas_tunnel::OutboundStream;

    async fn configure(
        &self,
        request: Request<Streaming<ConfigAck>>,
    ) -> Result<Response<Self::ConfigureStream>, Status> {
        let (info, replica_id, agent_version) = self.authenticate(request.metadata()).await?;
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("configuration stream closed before its first message")
        })?;
        check_protocol(first.protocol_version)?;
        let agent_id = info.agent.id;
        let guard = self.router.add_replica(
            agent_id,
            ReplicaInfo {
                replica_id: replica_id.clone(),
                agent_version,
                peer,
            },
        );
        let key = guard.replica_key().clone();
        self.registry
            .set_config_version(agent_id, &key, first.applied_version);
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((agent_id, replica_id.clone()), key.clone());
        tracing::info!(agent_id, replica = %replica_id, "agent replica connected");

        // Boxed items: a channel allocates room for 32 items up front, per agent replica.
        let (tx, rx) = mpsc::channel::<Result<Box<AgentConfiguration>, Box<Status>>>(4);
        let cp = self.cp.clone();
        let registry = self.registry.clone();
        let replicas = self.replicas.clone();
        let mut shutdown = self.shutdown.clone();
        let mut changes = cp.subscribe();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            // Owns the replica's registration: it ends when this task ends.
            let _guard = guard;
            let mut sent = 0u64;
            let mut latest = Some(info);
            loop {
                if let Some(i) = latest.take() {
                    if i.config_version != sent || sent == 0 {
                        sent = i.config_version;
                        if tx.send(Ok(Box::new(config_message(&i)))).await.is_err() {
                            break;
                        }
                        metrics.config_pushes.inc();
                    }
                }
                tokio::select! {
                    ack = inbound.message() => match ack {
                        Ok(Some(a)) => registry.set_config_version(agent_id, &key, a.applied_version),
                        _ => break,
                    },
                    change = changes.recv() => {
                        let relevant = match change {
                            Ok(Change::AgentConfig { agent_id: id }) => id == agent_id,
                            Ok(Change::Resync) => true,
                            Ok(_) => false,
                            Err(broadcast::error::RecvError::Lagged(_)) => true,
                            Err(broadcast::error::RecvError::Closed) => break,
                        };
                        if relevant {
                            match cp.agent_info(agent_id).await {
                                Ok(Some(i)) => latest = Some(i),
                                Ok(None) => {
                                    let _ = tx.send(Err(Box::new(Status::unauthenticated("the agent was deleted")))).await;
                                    break;
                                }
                                Err(e) => tracing::warn!(agent_id, error = %e, "could not load changed agent configuration"),
                            }
                        }
                    }
                    _ = crate::serve::stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Box::new(Status::unavailable("kas is shutting down; reconnect")))).await;
                        break;
                    }
                    _ = tx.closed() => break,
                }
            }
            let mut map = replicas.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&(agent_id, replica_id.clone())) == Some(&key) {
                map.remove(&(agent_id, replica_id.clone()));
            }
            drop(map);
            tracing::info!(agent_id, replica = %replica_id, "agent replica disconnected");
        });
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |r| {
            r.map(|b| *b).map_err(|e| *e)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tunnel(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let (info, replica_id, _) = self.authenticate(request.metadata()).await?;
        let agent_id = info.agent.id;
        let key = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(agent_id, replica_id))
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition("open the configuration stream before tunnels")
            })?;
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(AgentFrame {
                msg: Some(agent_frame::Msg::Hello(h)),
            }) => check_protocol(h.protocol_version)?,
            _ => return Err(Status::invalid_argument("a tunnel must start with Hello")),
        }
        // Small: the request body pump waits here, which is the backpressure.
        let (tx, rx) = kas_tunnel::outbound_channel(4);
        self.registry.offer(agent_id, &key, Box::pin(inbound), tx);
        Ok(Response::new(rx))
    }
}
