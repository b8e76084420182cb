//! Request routing: which kas holds which agent connection, and how a request that
//! entered one kas reaches an agent connected to another.
//!
//! A single kas routes only to its own connections ([`AgentRouter::local`]). With Redis
//! ([`AgentRouter::shared`]) every kas records its connections in a shared registry
//! ([`redis`]); a kas that receives a request for an agent it does not hold (the
//! routing kas) picks a connection from the registry and forwards the exchange over
//! the private API to the kas holding it (the gateway kas, [`private`]), which uses
//! exactly that connection. A request for an agent connected nowhere waits, woken by
//! the registry's pub/sub event the moment the agent connects anywhere.
//!
//! [`AgentRouter::dispatch`] sends one request through the chosen tunnel (retrying on
//! another when one breaks before the answer); [`AgentRouter::connected_agents`] lists the
//! agents connected anywhere. It does not authenticate clients or authorize jobs;
//! that happens before routing.

mod connected;
mod dispatch;
pub mod private;
pub mod rate;
pub mod redis;

pub use connected::{replica_meta, version_skew, VERSION};
pub use dispatch::DispatchError;
pub use private::{ForwardStats, GatewayService, OpenError, Peers, PrivateAuth};
pub use rate::RateLimiter;
pub use redis::{Connection, Event, RedisError, RedisOptions, RedisRegistry};

use kas_api::clock::unix_secs;
use kas_tunnel::{AcquireError, ReplicaGuard, ReplicaInfo, Tunnel, TunnelRegistry};
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Routing across replicas: this kas's identity, the registry and the peers.
struct Shared {
    kas_id: String,
    kas_url: String,
    redis: Arc<RedisRegistry>,
    peers: Peers,
}

/// Picks a tunnel for a request: local first, then another kas; see the crate docs.
pub struct AgentRouter {
    local: Arc<TunnelRegistry>,
    shared: Option<Shared>,
}

/// A connected agent replica's registration, local and (with Redis) shared.
/// Dropping it forgets the replica everywhere.
pub struct Registration {
    local: ReplicaGuard,
    /// The registry and the entry written to it (boxed: kept per connected replica,
    /// and absent without Redis).
    shared: Option<Box<(Arc<RedisRegistry>, Connection)>>,
}

impl Registration {
    /// The connection key (what the private API names).
    pub fn connection_key(&self) -> &Arc<str> {
        self.local.connection_key()
    }

    /// Records what the replica reported about itself (shared with the next refresh).
    pub fn set_meta(&mut self, meta: &kas_proto::v1::AgentMeta) {
        if let Some((redis, c)) = self.shared.as_deref_mut() {
            let meta = replica_meta(meta);
            if c.meta != meta {
                c.meta = meta;
                redis.update(c.clone());
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((redis, c)) = self.shared.as_deref() {
            redis.unregister(c.agent_id, self.local.connection_key());
        }
    }
}

impl AgentRouter {
    /// One kas on its own: only local connections.
    pub fn local(registry: Arc<TunnelRegistry>) -> Arc<AgentRouter> {
        Arc::new(AgentRouter {
            local: registry,
            shared: None,
        })
    }

    /// One of several kas replicas sharing `redis`; `kas_url` is this kas's private
    /// API URL as the other replicas reach it.
    pub fn shared(
        registry: Arc<TunnelRegistry>,
        redis: Arc<RedisRegistry>,
        kas_id: &str,
        kas_url: &str,
        auth: Arc<PrivateAuth>,
    ) -> Arc<AgentRouter> {
        Arc::new(AgentRouter {
            local: registry,
            shared: Some(Shared {
                kas_id: kas_id.to_string(),
                kas_url: kas_url.to_string(),
                redis,
                peers: Peers::new(auth),
            }),
        })
    }

    pub fn registry(&self) -> &Arc<TunnelRegistry> {
        &self.local
    }

    /// This kas's instance id when it shares a registry.
    pub fn kas_id(&self) -> Option<&str> {
        self.shared.as_ref().map(|s| s.kas_id.as_str())
    }

    /// Registers a connected agent replica here and, with Redis, in the registry.
    pub fn add_replica(&self, agent_id: u64, info: ReplicaInfo) -> Registration {
        let local = self.local.add_replica(agent_id, info.clone());
        let shared = self.shared.as_ref().map(|s| {
            let c = Connection {
                agent_id,
                connection: local.connection_key().to_string(),
                kas_id: s.kas_id.clone(),
                kas_url: s.kas_url.clone(),
                replica_id: info.replica_id.clone(),
                agent_version: info.agent_version.clone(),
                since: unix_secs(),
                meta: replica_meta(&info.meta),
            };
            s.redis.register(c.clone());
            Box::new((s.redis.clone(), c))
        });
        Registration { local, shared }
    }

    /// A tunnel to `agent_id`: a local one if this kas holds the agent, else one
    /// through another kas (skipping `avoid`, labels of tunnels that already failed
    /// for this request), else waits up to `wait` for the agent to connect anywhere.
    /// `replayable`: the request can be sent again if a forward fails before the
    /// response starts (then a forward is opened optimistically, see [`Peers::open`]).
    pub async fn acquire(
        &self,
        agent_id: u64,
        wait: Duration,
        avoid: &[Arc<str>],
        replayable: bool,
    ) -> Result<Tunnel, AcquireError> {
        let shared = match &self.shared {
            Some(shared) if !self.local.is_connected(agent_id) => shared,
            _ => return self.local.acquire(agent_id, wait).await,
        };
        // Boxed: the search through the registry and other replicas holds several KiB
        // of state across its awaits, which would otherwise be part of every request's
        // future, including the common one that finds a local tunnel.
        Box::pin(self.acquire_elsewhere(shared, agent_id, wait, avoid, replayable)).await
    }

    /// [`AgentRouter::acquire`] when this kas does not hold the agent (yet).
    async fn acquire_elsewhere(
        &self,
        shared: &Shared,
        agent_id: u64,
        wait: Duration,
        avoid: &[Arc<str>],
        replayable: bool,
    ) -> Result<Tunnel, AcquireError> {
        let deadline = Instant::now() + wait;
        let mut failed: Vec<String> = Vec::new();
        loop {
            // Subscribe before looking, so a connect between the two is not missed.
            let mut events = shared.redis.events();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if self.local.is_connected(agent_id) {
                return self.local.acquire(agent_id, remaining).await;
            }
            match shared.redis.connections(agent_id).await {
                Ok(conns) => {
                    let mut candidates: Vec<&Connection> = conns
                        .iter()
                        .filter(|c| c.kas_id != shared.kas_id)
                        .filter(|c| {
                            let label = format!("{}#{}", c.kas_url, c.connection);
                            !failed.contains(&label) && !avoid.iter().any(|a| **a == *label)
                        })
                        .collect();
                    candidates.shuffle(&mut rand::thread_rng());
                    for c in candidates {
                        let opened = shared
                            .peers
                            .open(&c.kas_url, agent_id, &c.connection, !replayable)
                            .await;
                        match opened {
                            Ok(t) => return Ok(t),
                            Err(e) => {
                                tracing::info!(agent_id, kas = %c.kas_id, connection = %c.connection, error = %e, "route via another kas failed; trying the next");
                                shared.redis.forget(agent_id);
                                failed.push(format!("{}#{}", c.kas_url, c.connection));
                            }
                        }
                    }
                }
                Err(e) => {
                    shared.redis.count_error();
                    tracing::warn!(agent_id, error = %e, "registry lookup failed; only this kas's connections can be used");
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AcquireError::NotConnected);
            }
            tracing::info!(
                agent_id,
                wait_ms = remaining.as_millis() as u64,
                "waiting for the agent to connect"
            );
            tokio::select! {
                r = self.local.acquire(agent_id, remaining) => return r,
                woke = connected_elsewhere(&mut events, agent_id) => {
                    if !woke {
                        // Event source gone (shutting down): wait out the local path.
                        return self.local.acquire(agent_id, deadline.saturating_duration_since(Instant::now())).await;
                    }
                }
            }
        }
    }

    /// A rate limiter counting across every kas sharing the registry (or on this kas
    /// alone without one).
    pub fn rate_limiter(&self, name: &'static str, per_minute: u32) -> RateLimiter {
        RateLimiter::new(
            name,
            per_minute,
            self.shared.as_ref().map(|s| s.redis.clone()),
        )
    }

    /// Every live connection in the shared registry (`None` for a single kas).
    pub async fn connections(&self) -> Option<Result<Vec<Connection>, RedisError>> {
        match &self.shared {
            Some(s) => Some(s.redis.all_connections().await),
            None => None,
        }
    }

    /// Failed operations on the shared registry so far (`None` for a single kas).
    pub fn registry_errors(&self) -> Option<u64> {
        self.shared.as_ref().map(|s| s.redis.errors())
    }

    /// Forwarding to other kas replicas so far (`None` for a single kas).
    pub fn forward_stats(&self) -> Option<ForwardStats> {
        self.shared.as_ref().map(|s| s.peers.stats())
    }

    /// Whether the shared registry (if any) is usable.
    pub async fn ready(&self) -> bool {
        match &self.shared {
            Some(s) => s.redis.ping().await,
            None => true,
        }
    }

    /// Removes this kas's entries from the shared registry (graceful shutdown).
    pub async fn shutdown(&self) {
        if let Some(s) = &self.shared {
            s.redis.shutdown().await;
        }
    }
}

/// Resolves `true` when `agent_id` (or "any agent") connected somewhere; `false` if
/// the event source closed.
async fn connected_elsewhere(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    agent_id: u64,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(Event::Connected(id)) if id == agent_id => return true,
            Ok(Event::Any) => return true,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return true,
            Err(RecvError::Closed) => return false,
        }
    }
}
