//! The agent listener's gRPC service: authenticates agentk replicas, streams their
//! configuration, and hands their tunnels to the tunnel crate's acceptor (which checks
//! their handshake and keeps them in the registry).
//!
//! Every stream an agent opens is authenticated by its token and counted against the
//! token's rate limit. Each connection is remembered under the token it was made with,
//! so that revoking the token (or deleting the agent) on any kas replica closes every
//! connection made with it here. A configuration stream ends, so the agent reconnects,
//! when kas shuts down or the connection reached its maximum age.

// gRPC handlers answer with tonic::Status, which is large by design.
#![allow(clippy::result_large_err)]

use crate::listeners::ConnControl;
use futures::FutureExt;
use kas_controlplane::{AgentAuth, AgentInfo, Change, ControlPlane};
use kas_proto::v1::agent_server::Agent;
use kas_proto::v1::{AgentConfiguration, AgentFrame, ConfigAck};
use kas_proto::{AGENT_VERSION_METADATA, REPLICA_ID_METADATA};
use kas_router::{AgentRouter, RateLimiter};
use kas_tunnel::queue;
use kas_tunnel::server::{check_protocol, first_message, Acceptor, Registered};
use kas_tunnel::{ReplicaInfo, TunnelRegistry};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status, Streaming};

/// How long a revoked token's configuration streams get to deliver the reason before
/// their connections are closed.
const REVOKE_NOTICE: Duration = Duration::from_millis(250);
/// A token's last use is written at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Settings of the agent service.
#[derive(Debug, Clone)]
pub struct AgentServiceOptions {
    /// Time for the first message of a configuration stream or tunnel.
    pub handshake_timeout: Duration,
    /// New streams per token and minute (0: unlimited).
    pub streams_per_token_per_minute: u32,
}

/// Implements `kas.agent.v1.Agent`.
pub struct AgentService {
    cp: Arc<dyn ControlPlane>,
    router: Arc<AgentRouter>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Takes the replicas' tunnels (and knows which replica each joins).
    tunnels: Arc<Acceptor>,
    /// Connections by the token they were made with.
    connections: Arc<Connections>,
    rate: Option<RateLimiter>,
    /// When each token's last use was written.
    touched: Mutex<HashMap<u64, Instant>>,
    /// Flips to true when kas shuts down; configuration streams end with UNAVAILABLE so
    /// agents reconnect (elsewhere, once there are several kas).
    shutdown: watch::Receiver<bool>,
    /// Ends the task closing revoked connections when the service goes.
    _revoker: crate::AbortOnDrop,
}

/// `token id -> (agent id, connections made with the token)`.
type ByToken = HashMap<u64, (u64, Vec<Weak<ConnControl>>)>;

/// Connections per token.
#[derive(Default)]
struct Connections {
    by_token: Mutex<ByToken>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, ByToken> {
        self.by_token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `conn` authenticated with `token_id` (once per connection).
    fn remember(&self, agent_id: u64, token_id: u64, conn: &Arc<ConnControl>) {
        let mut map = self.lock();
        let (_, list) = map.entry(token_id).or_insert((agent_id, Vec::new()));
        list.retain(|w| w.strong_count() > 0);
        if !list.iter().any(|w| w.as_ptr() == Arc::as_ptr(conn)) {
            list.push(Arc::downgrade(conn));
        }
        // Forget tokens whose connections are all gone (bounded by live connections).
        if map.len() > 64 && map.len().is_power_of_two() {
            map.retain(|_, (_, l)| l.iter().any(|w| w.strong_count() > 0));
        }
    }

    /// Takes the live connections matching `pick(token id, agent id)`.
    fn take(&self, pick: impl Fn(u64, u64) -> bool) -> Vec<Arc<ConnControl>> {
        let mut map = self.lock();
        let mut out = Vec::new();
        map.retain(|token, (agent, list)| {
            if pick(*token, *agent) {
                out.extend(list.iter().filter_map(Weak::upgrade));
                false
            } else {
                true
            }
        });
        out
    }

    /// Agent and token ids with live connections.
    fn tokens(&self) -> Vec<(u64, u64)> {
        self.lock()
            .iter()
            .filter(|(_, (_, l))| l.iter().any(|w| w.strong_count() > 0))
            .map(|(t, (a, _))| (*a, *t))
            .collect()
    }
}

/// Closes `conns` after [`REVOKE_NOTICE`], logging why.
fn close_later(conns: Vec<Arc<ConnControl>>, why: &'static str) {
    if conns.is_empty() {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(REVOKE_NOTICE).await;
        for c in &conns {
            tracing::info!(peer = %c.peer, reason = why, "closing an agent connection");
            c.close();
        }
    });
}

/// Closes the connections of revoked tokens and deleted agents as their changes arrive
/// (and, after a resync, of every token no longer active).
async fn revoker(cp: Arc<dyn ControlPlane>, connections: Arc<Connections>) {
    let mut changes = cp.subscribe();
    loop {
        match changes.recv().await {
            Ok(Change::AgentTokenRevoked { token_id, .. }) => {
                close_later(connections.take(|t, _| t == token_id), "token revoked");
            }
            Ok(Change::AgentDeleted { agent_id }) => {
                close_later(connections.take(|_, a| a == agent_id), "agent deleted");
            }
            Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                recheck(cp.as_ref(), &connections).await;
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Closes connections whose token is no longer active (changes may have been missed).
async fn recheck(cp: &dyn ControlPlane, connections: &Connections) {
    let mut agents: HashMap<u64, Vec<u64>> = HashMap::new();
    for (agent, token) in connections.tokens() {
        agents.entry(agent).or_default().push(token);
    }
    for (agent, tokens) in agents {
        let active: Vec<u64> = match cp.list_agent_tokens(agent).await {
            Ok(list) => list
                .into_iter()
                .filter(|t| t.is_active())
                .map(|t| t.id)
                .collect(),
            Err(e) => {
                tracing::warn!(agent_id = agent, error = %e, "cannot recheck agent tokens");
                continue;
            }
        };
        let gone: Vec<u64> = tokens.into_iter().filter(|t| !active.contains(t)).collect();
        close_later(connections.take(|t, _| gone.contains(&t)), "token revoked");
    }
}

impl AgentService {
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        router: Arc<AgentRouter>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
        opts: AgentServiceOptions,
    ) -> Self {
        let connections = Arc::new(Connections::default());
        let revoker =
            crate::AbortOnDrop::new(tokio::spawn(revoker(cp.clone(), connections.clone())));
        AgentService {
            cp,
            metrics,
            tunnels: Arc::new(Acceptor::new(
                router.registry().clone(),
                opts.handshake_timeout,
            )),
            rate: (opts.streams_per_token_per_minute > 0)
                .then(|| router.rate_limiter("agent-token", opts.streams_per_token_per_minute)),
            router,
            connections,
            touched: Mutex::default(),
            shutdown,
            _revoker: revoker,
        }
    }

    /// The agent behind the request's token, after the token's rate limit; remembers
    /// the connection under the token.
    async fn authenticate(
        &self,
        md: &tonic::metadata::MetadataMap,
        conn: Option<&Arc<ConnControl>>,
    ) -> Result<(Arc<AgentAuth>, String, String), Status> {
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(kas_api::bearer_token)
            .ok_or_else(|| {
                Status::unauthenticated("missing agent token (authorization: Bearer <token>)")
            })?;
        let auth = self
            .cp
            .authenticate_agent(token)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "control plane failed while authenticating an agent");
                Status::unavailable("kas cannot reach its control plane")
            })?
            .ok_or_else(|| Status::unauthenticated("invalid agent token"))?;
        if let Some(rate) = &self.rate {
            if !rate.allow(auth.token_id).await {
                self.metrics.agent_rate_limited.inc();
                tracing::info!(
                    agent_id = auth.info.agent.id,
                    token_id = auth.token_id,
                    "agent token over its connection rate limit"
                );
                return Err(Status::resource_exhausted(
                    "too many connections with this agent token; retry later",
                ));
            }
        }
        if let Some(conn) = conn {
            self.connections
                .remember(auth.info.agent.id, auth.token_id, conn);
        }
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
        Ok((auth, replica, version))
    }

    /// Writes the token's last use, at most once per [`TOUCH_EVERY`].
    fn touch(&self, token_id: u64) {
        {
            let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if t.get(&token_id)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if t.len() > 100_000 {
                t.clear();
            }
            t.insert(token_id, Instant::now());
        }
        let cp = self.cp.clone();
        tokio::spawn(async move {
            if let Err(e) = cp.touch_agent_token(token_id).await {
                tracing::debug!(token_id, error = %e, "cannot record the token's last use");
            }
        });
    }
}

fn config_message(info: &AgentInfo) -> AgentConfiguration {
    let logging = &info.config.observability.logging;
    AgentConfiguration {
        agent_id: info.agent.id,
        agent_name: info.agent.name.clone(),
        config_project_path: info.agent.config_project.path.clone(),
        version: info.config_version,
        config_yaml: info.config_yaml.clone(),
        log_level: logging.level.clone().unwrap_or_default(),
        grpc_log_level: logging.grpc_level.clone().unwrap_or_default(),
        service_access: info.config.allowed_services(),
    }
}

/// What a replica reported about itself, bounded (it is shown to admins).
fn replica_meta(m: kas_proto::v1::AgentMeta) -> kas_proto::v1::AgentMeta {
    let clip = |s: String| s.chars().take(253).collect::<String>();
    kas_proto::v1::AgentMeta {
        pod_name: clip(m.pod_name),
        pod_namespace: clip(m.pod_namespace),
        node_name: clip(m.node_name),
        kubernetes_version: clip(m.kubernetes_version),
    }
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;
type ConfigSender = queue::Sender<Result<Box<AgentConfiguration>, Box<Status>>>;

/// What one configuration stream needs while it lives.
struct ConfigStream {
    cp: Arc<dyn ControlPlane>,
    registry: Arc<TunnelRegistry>,
    /// The replica's registration, dropped (the replica forgotten) when the stream ends.
    registration: kas_router::Registration,
    /// Lets the replica's tunnels in while the stream lives.
    _tunnels: Registered,
    metrics: Arc<crate::metrics::Metrics>,
    agent_id: u64,
    replica_id: String,
    token_id: u64,
    key: Arc<str>,
    inbound: Streaming<ConfigAck>,
    tx: ConfigSender,
    shutdown: watch::Receiver<bool>,
    /// The connection's draining signal (maximum age), if known.
    draining: Option<watch::Receiver<bool>>,
}

async fn fail(tx: &ConfigSender, status: Status) {
    let _ = tx.send(Err(Box::new(status))).await;
}

impl ConfigStream {
    /// Pushes configurations and records acknowledgements until the stream ends.
    ///
    /// This task lives as long as the agent stays connected, so its state is kept small:
    /// the stream's fields stay in their box (an async fn keeps a by-value argument
    /// twice), and the rare steps (a changed configuration, a failure) are boxed.
    async fn run(mut self: Box<Self>, info: Arc<AgentInfo>) {
        let mut changes = self.cp.subscribe();
        let mut sent = 0u64;
        let mut latest = Some(info);
        loop {
            if let Some(i) = latest.take() {
                if i.config_version != sent || sent == 0 {
                    sent = i.config_version;
                    if self
                        .tx
                        .send(Ok(Box::new(config_message(&i))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    self.metrics.config_pushes.inc();
                }
            }
            tokio::select! {
                ack = self.inbound.message() => match ack {
                    Ok(Some(a)) => self.acknowledged(a),
                    _ => break,
                },
                change = changes.recv() => {
                    match on_change(self.cp.as_ref(), self.agent_id, self.token_id, change).boxed().await {
                        Ok(Some(i)) => latest = Some(i),
                        Ok(None) => {}
                        Err(status) => {
                            fail(&self.tx, status).boxed().await;
                            break;
                        }
                    }
                },
                _ = crate::listeners::stopped(&mut self.shutdown) => {
                    fail(&self.tx, Status::unavailable("kas is shutting down; reconnect")).boxed().await;
                    break;
                }
                _ = async { match self.draining.as_mut() {
                    Some(d) => crate::listeners::stopped(d).await,
                    None => std::future::pending().await,
                } } => {
                    fail(&self.tx, Status::unavailable("the connection reached its maximum age; reconnect")).boxed().await;
                    break;
                }
                _ = self.tx.closed() => break,
            }
        }
        // Dropping the stream ends the replica's registrations.
        tracing::info!(agent_id = self.agent_id, replica = %self.replica_id, "agent replica disconnected");
    }

    fn acknowledged(&mut self, a: ConfigAck) {
        let meta = a.meta.map(replica_meta);
        if let Some(m) = &meta {
            self.registration.set_meta(m);
        }
        self.registry
            .acknowledged(self.agent_id, &self.key, a.applied_version, meta);
    }
}

/// What a control plane change means for a configuration stream: a newer
/// configuration to push, nothing, or why the stream must end.
async fn on_change(
    cp: &dyn ControlPlane,
    agent_id: u64,
    token_id: u64,
    change: Result<Change, broadcast::error::RecvError>,
) -> Result<Option<Arc<AgentInfo>>, Status> {
    let relevant = match change {
        Ok(Change::AgentConfig { agent_id: id }) | Ok(Change::AgentDeleted { agent_id: id }) => {
            id == agent_id
        }
        Ok(Change::AgentTokenRevoked { token_id: t, .. }) => {
            if t == token_id {
                return Err(Status::unauthenticated("the agent token was revoked"));
            }
            false
        }
        Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
        Ok(Change::JobFinished { .. }) => false,
        Err(broadcast::error::RecvError::Closed) => {
            return Err(Status::unavailable("kas is shutting down; reconnect"))
        }
    };
    if !relevant {
        return Ok(None);
    }
    match cp.agent_info(agent_id).await {
        Ok(Some(i)) => Ok(Some(i)),
        Ok(None) => Err(Status::unauthenticated("the agent was deleted")),
        Err(e) => {
            tracing::warn!(agent_id, error = %e, "could not load changed agent configuration");
            Ok(None)
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type ConfigureStream = BoxStream<AgentConfiguration>;
    type TunnelStream = kas_tunnel::OutboundStream;

    async fn configure(
        &self,
        request: Request<Streaming<ConfigAck>>,
    ) -> Result<Response<Self::ConfigureStream>, Status> {
        let conn = request.extensions().get::<Arc<ConnControl>>().cloned();
        let (auth, replica_id, agent_version) =
            self.authenticate(request.metadata(), conn.as_ref()).await?;
        let peer = conn
            .as_ref()
            .map(|c| c.peer.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = first_message(
            &mut inbound,
            self.tunnels.handshake_timeout(),
            "configuration stream",
        )
        .await?;
        check_protocol(first.protocol_version)?;
        self.touch(auth.token_id);
        let info = auth.info.clone();
        let agent_id = info.agent.id;
        if let Some(skew) = crate::version_skew(&agent_version) {
            tracing::warn!(agent_id, replica = %replica_id, agent_version = %agent_version, "{skew}");
        }
        let meta = first.meta.map(replica_meta).unwrap_or_default();
        let guard = self.router.add_replica(
            agent_id,
            ReplicaInfo {
                replica_id: replica_id.clone(),
                agent_version,
                peer,
                meta,
            },
        );
        let key = guard.connection_key().clone();
        let registry = self.tunnels.registry().clone();
        registry.acknowledged(agent_id, &key, first.applied_version, None);
        let tunnels = self.tunnels.register(agent_id, &replica_id, key.clone());
        tracing::info!(agent_id, replica = %replica_id, "agent replica connected");

        // Boxed items: small room per agent replica.
        let (tx, rx) = queue::channel(4);
        let stream = ConfigStream {
            cp: self.cp.clone(),
            registry,
            registration: guard,
            _tunnels: tunnels,
            metrics: self.metrics.clone(),
            agent_id,
            replica_id,
            token_id: auth.token_id,
            key: key.clone(),
            inbound,
            tx,
            shutdown: self.shutdown.clone(),
            draining: conn.map(|c| c.draining()),
        };
        // The stream owns the replica's registrations: they end when the stream ends.
        tokio::spawn(Box::new(stream).run(info));
        let stream = tokio_stream::StreamExt::map(rx, |r| r.map(|b| *b).map_err(|e| *e));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tunnel(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let conn = request.extensions().get::<Arc<ConnControl>>().cloned();
        let (auth, replica_id, _) = self.authenticate(request.metadata(), conn.as_ref()).await?;
        let rx = self
            .tunnels
            .accept(auth.info.agent.id, replica_id, request.into_inner())
            .await?;
        Ok(Response::new(rx))
    }
}
