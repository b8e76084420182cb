//! Idle tunnels of connected agents, held by the kas that accepted them.

use crate::body::TunnelBody;
use crate::frame::{pump_body, PumpError};
use crate::queue;
use crate::ExchangeError;
use crate::Inbound;
use bytes::Bytes;
use kas_api::clock::unix_secs;
use kas_proto::v1::{
    agent_frame, server_frame, AgentFrame, AgentMeta, RequestHead, ResponseHead, ServerFrame,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

type OutItem = Result<Box<ServerFrame>, Box<Status>>;

/// Sender half of the kas -> agent direction of one tunnel. Items are boxed so that
/// the queue's room (allocated on the first frame, kept while the tunnel lives) is small:
/// kas holds one per idle tunnel of every connected agent.
#[derive(Clone)]
pub struct Outbound(queue::Sender<OutItem>);

impl Outbound {
    /// Sends a frame; false when the tunnel is gone.
    pub async fn send(&self, frame: ServerFrame) -> bool {
        self.0.send(Ok(Box::new(frame))).await.is_ok()
    }

    /// Ends the stream with an error status (the agent cancels the exchange).
    pub async fn cancel(&self, status: Status) {
        let _ = self.0.send(Err(Box::new(status))).await;
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// kas's request bodies and upgraded bytes go to the agent as frames.
impl crate::frame::FrameSink for Outbound {
    async fn data(&self, data: bytes::Bytes) -> bool {
        self.send(crate::frame::server_data(data)).await
    }

    async fn end(&self) -> bool {
        self.send(crate::frame::server_end()).await
    }

    async fn abort(&self, _reason: &str) {
        self.cancel(Status::cancelled("request body failed")).await;
    }
}

/// The kas -> agent stream of one tunnel, as the gRPC response.
pub struct OutboundStream(queue::Receiver<OutItem>);

// The gRPC response stream's item is tonic's (large) Status by its definition.
#[allow(clippy::result_large_err)]
impl futures::Stream for OutboundStream {
    type Item = Result<ServerFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(|b| *b).map_err(|e| *e)))
    }
}

/// A new tunnel direction with room for `capacity` frames in flight.
pub fn outbound_channel(capacity: usize) -> (Outbound, OutboundStream) {
    let (tx, rx) = queue::channel(capacity);
    (Outbound(tx), OutboundStream(rx))
}

/// What kas knows about one connected agentk replica.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    pub replica_id: String,
    pub agent_version: String,
    pub peer: String,
    /// Where it runs, as it reports it.
    pub meta: AgentMeta,
}

/// One connected replica, as [`TunnelRegistry::snapshot`] shows it.
#[derive(Debug, Clone)]
pub struct ReplicaSnapshot {
    pub info: ReplicaInfo,
    /// Unix seconds.
    pub connected_since: u64,
    pub config_version: u64,
    pub idle_tunnels: usize,
}

/// One connected agent, as [`TunnelRegistry::snapshot`] shows it.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    pub agent_id: u64,
    pub replicas: Vec<ReplicaSnapshot>,
    pub idle_tunnels: usize,
    pub busy_tunnels: usize,
}

struct IdleTunnel {
    replica: Arc<str>,
    inbound: Inbound,
    outbound: Outbound,
}

struct ReplicaState {
    info: ReplicaInfo,
    since: u64,
    config_version: u64,
}

#[derive(Default)]
struct AgentEntry {
    /// FIFO so consecutive requests spread over replicas.
    idle: VecDeque<IdleTunnel>,
    waiters: VecDeque<oneshot::Sender<Tunnel>>,
    replicas: HashMap<Arc<str>, ReplicaState>,
    busy: Arc<AtomicUsize>,
}

impl AgentEntry {
    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.waiters.is_empty() && self.replicas.is_empty()
    }
}

/// The agent connections this kas holds. Shared by the agent listener (which offers
/// tunnels) and the proxies (which acquire them).
#[derive(Default)]
pub struct TunnelRegistry {
    agents: Mutex<HashMap<u64, AgentEntry>>,
    next_replica_seq: AtomicU64,
}

/// Why no tunnel could be had.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcquireError {
    #[error("the agent is not connected")]
    NotConnected,
    #[error("the agent is connected but has no free tunnel")]
    NoFreeTunnel,
}

/// Registration of a replica; dropping it (when the replica's configuration stream
/// ends) forgets the replica and closes its idle tunnels.
pub struct ReplicaGuard {
    registry: Weak<TunnelRegistry>,
    agent_id: u64,
    replica: Arc<str>,
}

impl Drop for ReplicaGuard {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            r.remove_replica(self.agent_id, &self.replica);
        }
    }
}

impl ReplicaGuard {
    pub fn connection_key(&self) -> &Arc<str> {
        &self.replica
    }
}

impl TunnelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AgentEntry>> {
        // A panic while holding this lock leaves only plain data behind; keep serving.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connected replica. The same replica id connecting twice (a
    /// reconnect racing the old connection's teardown) gets a distinct key.
    pub fn add_replica(self: &Arc<Self>, agent_id: u64, info: ReplicaInfo) -> ReplicaGuard {
        let seq = self.next_replica_seq.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(format!("{}#{seq}", info.replica_id));
        let mut agents = self.lock();
        agents.entry(agent_id).or_default().replicas.insert(
            key.clone(),
            ReplicaState {
                info,
                since: unix_secs(),
                config_version: 0,
            },
        );
        ReplicaGuard {
            registry: Arc::downgrade(self),
            agent_id,
            replica: key,
        }
    }

    fn remove_replica(&self, agent_id: u64, replica: &Arc<str>) {
        let mut agents = self.lock();
        if let Some(e) = agents.get_mut(&agent_id) {
            e.replicas.remove(replica);
            e.idle.retain(|t| &t.replica != replica);
            if e.is_empty() {
                agents.remove(&agent_id);
            }
        }
    }

    /// Records the configuration version a replica acknowledged, and what it reported
    /// about itself (when it did).
    pub fn acknowledged(
        &self,
        agent_id: u64,
        replica: &Arc<str>,
        version: u64,
        meta: Option<AgentMeta>,
    ) {
        if let Some(r) = self
            .lock()
            .get_mut(&agent_id)
            .and_then(|e| e.replicas.get_mut(replica))
        {
            r.config_version = version;
            if let Some(m) = meta {
                r.info.meta = m;
            }
        }
    }

    /// Offers an idle tunnel of a registered replica: handed to a waiting request at
    /// once, or kept until one arrives.
    pub fn offer(
        self: &Arc<Self>,
        agent_id: u64,
        replica: &Arc<str>,
        inbound: Inbound,
        outbound: Outbound,
    ) {
        let mut agents = self.lock();
        let Some(entry) = agents.get_mut(&agent_id) else {
            return;
        };
        if !entry.replicas.contains_key(replica) {
            // The replica's registration is gone; dropping the streams closes the tunnel.
            return;
        }
        let mut idle = IdleTunnel {
            replica: replica.clone(),
            inbound,
            outbound,
        };
        while let Some(w) = entry.waiters.pop_front() {
            match w.send(Tunnel::new(self, agent_id, idle, &entry.busy)) {
                Ok(()) => return,
                Err(t) => idle = t.into_idle(),
            }
        }
        entry.idle.push_back(idle);
    }

    /// Takes an idle tunnel of the agent, waiting up to `wait` for one to be offered.
    pub async fn acquire(
        self: &Arc<Self>,
        agent_id: u64,
        wait: Duration,
    ) -> Result<Tunnel, AcquireError> {
        let rx = {
            let mut agents = self.lock();
            let entry = agents.entry(agent_id).or_default();
            while let Some(t) = entry.idle.pop_front() {
                if !t.outbound.is_closed() {
                    return Ok(Tunnel::new(self, agent_id, t, &entry.busy));
                }
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push_back(tx);
            rx
        };
        let res = tokio::time::timeout(wait, rx).await;
        match res {
            Ok(Ok(t)) => Ok(t),
            _ => {
                let mut agents = self.lock();
                let connected = match agents.get_mut(&agent_id) {
                    Some(e) => {
                        e.waiters.retain(|w| !w.is_closed());
                        let c = !e.replicas.is_empty();
                        if e.is_empty() {
                            agents.remove(&agent_id);
                        }
                        c
                    }
                    None => false,
                };
                Err(if connected {
                    AcquireError::NoFreeTunnel
                } else {
                    AcquireError::NotConnected
                })
            }
        }
    }

    /// Takes an idle tunnel of one connection (replica key), without waiting; `None`
    /// when that connection has no idle tunnel (or is gone).
    pub fn try_acquire_from(self: &Arc<Self>, agent_id: u64, replica: &str) -> Option<Tunnel> {
        let mut agents = self.lock();
        let entry = agents.get_mut(&agent_id)?;
        loop {
            let pos = entry.idle.iter().position(|t| &*t.replica == replica)?;
            let t = entry.idle.remove(pos)?;
            if !t.outbound.is_closed() {
                return Some(Tunnel::new(self, agent_id, t, &entry.busy));
            }
        }
    }

    /// Keys of the agent's connections (replicas) held here.
    pub fn connection_keys(&self, agent_id: u64) -> Vec<Arc<str>> {
        self.lock()
            .get(&agent_id)
            .map(|e| e.replicas.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether any replica of the agent is connected here.
    pub fn is_connected(&self, agent_id: u64) -> bool {
        self.lock()
            .get(&agent_id)
            .is_some_and(|e| !e.replicas.is_empty())
    }

    /// Connected agents and their replicas.
    pub fn snapshot(&self) -> Vec<AgentSnapshot> {
        let agents = self.lock();
        let mut out: Vec<AgentSnapshot> = agents
            .iter()
            .filter(|(_, e)| !e.replicas.is_empty())
            .map(|(id, e)| {
                let mut replicas: Vec<ReplicaSnapshot> = e
                    .replicas
                    .iter()
                    .map(|(k, r)| ReplicaSnapshot {
                        info: r.info.clone(),
                        connected_since: r.since,
                        config_version: r.config_version,
                        idle_tunnels: e
                            .idle
                            .iter()
                            .filter(|t| &t.replica == k && !t.outbound.is_closed())
                            .count(),
                    })
                    .collect();
                replicas.sort_by(|a, b| a.info.replica_id.cmp(&b.info.replica_id));
                AgentSnapshot {
                    agent_id: *id,
                    idle_tunnels: replicas.iter().map(|r| r.idle_tunnels).sum(),
                    busy_tunnels: e.busy.load(Ordering::Relaxed),
                    replicas,
                }
            })
            .collect();
        out.sort_by_key(|a| a.agent_id);
        out
    }
}

/// Where a tunnel that carried a clean exchange goes back to, for tunnels that are not
/// an agent's own (streams relayed through something else, pooled by their owner).
pub trait TunnelPool: Send + Sync {
    /// Takes back a tunnel whose exchange ended cleanly; `label` is the one it was
    /// made with.
    fn give_back(&self, agent_id: u64, label: &Arc<str>, inbound: Inbound, outbound: Outbound);
}

/// Where a tunnel returns after a clean exchange.
#[derive(Clone)]
pub(crate) enum Home {
    /// An agent's tunnel: back to this kas's registry.
    Registry(Weak<TunnelRegistry>),
    /// Another pool's (see [`TunnelPool`]).
    Pool(Weak<dyn TunnelPool>),
}

/// Ends a tunnel stream cleanly when it is not going to be used again: closes the
/// request direction and reads the far end's close, instead of dropping the stream
/// (which resets it; HTTP/2 peers limit how many resets they accept).
pub fn retire(inbound: Inbound, outbound: Outbound) {
    drop(outbound);
    let mut inbound = inbound;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = crate::next_frame(&mut inbound).await {}
        })
        .await;
    });
}

/// A tunnel taken out of the registry for one exchange. Dropping it closes the tunnel.
pub struct Tunnel {
    home: Home,
    agent_id: u64,
    replica: Arc<str>,
    inbound: Inbound,
    outbound: Outbound,
    busy: BusyGuard,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("agent_id", &self.agent_id)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// Counts a tunnel as busy while it lives.
pub(crate) struct BusyGuard(Arc<AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tunnel {
    fn new(
        registry: &Arc<TunnelRegistry>,
        agent_id: u64,
        t: IdleTunnel,
        busy: &Arc<AtomicUsize>,
    ) -> Self {
        busy.fetch_add(1, Ordering::Relaxed);
        Tunnel {
            home: Home::Registry(Arc::downgrade(registry)),
            agent_id,
            replica: t.replica,
            inbound: t.inbound,
            outbound: t.outbound,
            busy: BusyGuard(busy.clone()),
        }
    }

    /// A tunnel of another pool (labelled `label`; see [`TunnelPool`]) that carries one
    /// exchange after another: after a clean exchange it goes back to `pool`.
    pub fn pooled(
        agent_id: u64,
        label: Arc<str>,
        inbound: Inbound,
        outbound: Outbound,
        pool: Weak<dyn TunnelPool>,
    ) -> Tunnel {
        Tunnel {
            home: Home::Pool(pool),
            agent_id,
            replica: label,
            inbound,
            outbound,
            busy: BusyGuard(Arc::new(AtomicUsize::new(1))),
        }
    }

    fn into_idle(self) -> IdleTunnel {
        // Handing back an unused tunnel: the busy guard drops and uncounts it.
        IdleTunnel {
            replica: self.replica,
            inbound: self.inbound,
            outbound: self.outbound,
        }
    }

    pub fn agent_id(&self) -> u64 {
        self.agent_id
    }

    /// The connection key the tunnel belongs to (for a pooled tunnel, its label).
    pub fn connection_key(&self) -> &Arc<str> {
        &self.replica
    }

    /// Sends the request head and streams `body` (unless the request is an upgrade or
    /// the head says `end_of_body`, in which case `body` is ignored),
    /// then waits for the agent's response head. The response body (or, after a 101,
    /// the agent -> client byte stream) is read from the returned [`TunnelBody`].
    pub async fn round_trip<B>(
        mut self,
        head: RequestHead,
        body: B,
    ) -> Result<(ResponseHead, TunnelBody), ExchangeError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let upgrade = head.upgrade;
        let complete = head.end_of_body;
        if !self
            .outbound
            .send(ServerFrame {
                msg: Some(server_frame::Msg::RequestHead(head)),
            })
            .await
        {
            return Err(ExchangeError::TunnelClosed);
        }
        let request_sent = Arc::new(AtomicBool::new(complete));
        let pump = (!upgrade && !complete).then(|| {
            let (out, sent) = (self.outbound.clone(), request_sent.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                match pump_body(body, &out).await {
                    Ok(()) => sent.store(true, Ordering::SeqCst),
                    Err(PumpError::Body(e)) => {
                        tracing::debug!(error = %e, "request body failed; cancelling the exchange");
                    }
                    Err(PumpError::Closed) => {}
                }
            }))
        });
        let first = crate::next_frame(&mut self.inbound).await;
        let head = match first {
            Ok(Some(AgentFrame {
                msg: Some(agent_frame::Msg::ResponseHead(h)),
            })) => h,
            Ok(Some(AgentFrame {
                msg: Some(agent_frame::Msg::Error(e)),
            })) => return Err(ExchangeError::from_proto(e)),
            Ok(Some(other)) => {
                return Err(ExchangeError::Protocol(format!(
                    "expected a response head, got {other:?}"
                )))
            }
            Ok(None) => return Err(ExchangeError::TunnelClosed),
            Err(status) => {
                tracing::debug!(%status, "tunnel failed before the response head");
                return Err(ExchangeError::TunnelClosed);
            }
        };
        // After a clean exchange the tunnel goes back to the pool; upgraded ones never do.
        let reuse = (!upgrade).then(|| Reuse {
            home: self.home.clone(),
            agent_id: self.agent_id,
            replica: self.replica.clone(),
            request_sent,
        });
        let inline = head.end_of_body.then(|| head.body.clone());
        Ok((
            head,
            TunnelBody::new(self.inbound, self.outbound, pump, self.busy, reuse, inline),
        ))
    }
}

/// What a [`TunnelBody`] needs to hand its tunnel back after a clean exchange.
pub(crate) struct Reuse {
    pub(crate) home: Home,
    pub(crate) agent_id: u64,
    pub(crate) replica: Arc<str>,
    /// Set once the whole request body (and its EndOfBody) went to the agent.
    pub(crate) request_sent: Arc<AtomicBool>,
}

impl Reuse {
    pub(crate) fn give_back(self, inbound: Inbound, outbound: Outbound) {
        if !self.request_sent.load(Ordering::SeqCst) {
            return;
        }
        match self.home {
            Home::Registry(r) => {
                if let Some(r) = r.upgrade() {
                    r.offer(self.agent_id, &self.replica, inbound, outbound);
                }
            }
            Home::Pool(p) => match p.upgrade() {
                Some(p) => p.give_back(self.agent_id, &self.replica, inbound, outbound),
                None => retire(inbound, outbound),
            },
        }
    }
}
