//! The routing end of the private API: [`Peers::open`] gives a [`Tunnel`] to the kas
//! holding the chosen connection, so the proxy streams through it exactly as through a
//! local agent tunnel. It is a `Gateway.ForwardMany` stream: after a clean exchange it
//! goes back to a pool and carries the next request to the same connection, as agent
//! tunnels do, so a forwarded request costs no stream set-up.

use super::auth::PrivateAuth;
use super::{GATEWAY_WAIT, RELAY_FRAMES};
use futures::{FutureExt, StreamExt};
use kas_proto::v1::gateway_client::GatewayClient;
use kas_proto::{GATEWAY_AGENT_METADATA, GATEWAY_CONNECTION_METADATA};
use kas_tunnel::{outbound_channel, retire, Inbound, Outbound, Tunnel, TunnelPool};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// How long the routing kas keeps an unused forwarding stream.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle forwarding streams kept per agent connection; more are closed.
const POOL_MAX: usize = 64;

/// Clients for the other kas replicas' private APIs (one HTTP/2 connection each) and
/// the forwarding streams that are open to them.
pub struct Peers {
    auth: Arc<PrivateAuth>,
    channels: Mutex<HashMap<String, GatewayClient<Channel>>>,
    pool: Arc<StreamPool>,
    /// `pool` as the home of the tunnels it hands out (made once, not per request).
    pool_home: Weak<dyn TunnelPool>,
    streams_opened: AtomicU64,
    exchanges: AtomicU64,
}

/// Why a remote connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad private API URL {url}: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the gateway kas refused: {0}")]
    Refused(Box<Status>),
    #[error("the gateway kas did not answer in time")]
    Timeout,
}

/// Counts of forwarding to other kas replicas, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Exchanges sent to another kas.
    pub exchanges: u64,
    /// Streams opened to other kas for them (fewer than `exchanges` when reused).
    pub streams_opened: u64,
    /// Streams open and idle now, kept for the next request.
    pub idle_streams: usize,
}

/// An idle forwarding stream, kept for the next request to its connection.
struct IdleStream {
    since: Instant,
    agent_id: u64,
    inbound: Inbound,
    outbound: Outbound,
}

/// Idle `ForwardMany` streams by label (`<private URL>#<connection>`).
#[derive(Default)]
struct StreamPool {
    idle: Mutex<HashMap<Arc<str>, Vec<IdleStream>>>,
}

impl StreamPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<IdleStream>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used live stream of `label`, if any.
    fn take(&self, agent_id: u64, label: &str) -> Option<IdleStream> {
        let mut retired = Vec::new();
        let found = {
            let mut map = self.lock();
            let list = map.get_mut(label)?;
            let mut found = None;
            while let Some(mut s) = list.pop() {
                if s.outbound.is_closed() {
                    continue; // the stream broke: nothing left to close
                }
                // An idle stream has nothing to read: anything there (its end, an
                // error) means the gateway ended it.
                if s.agent_id != agent_id
                    || s.since.elapsed() >= POOL_IDLE
                    || s.inbound.next().now_or_never().is_some()
                {
                    retired.push(s);
                    continue;
                }
                found = Some(s);
                break;
            }
            if list.is_empty() {
                map.remove(label);
            }
            found
        };
        for s in retired {
            retire(s.inbound, s.outbound);
        }
        found
    }

    /// Closes streams unused for [`POOL_IDLE`].
    fn sweep(&self) {
        let mut retired = Vec::new();
        {
            let mut map = self.lock();
            for list in map.values_mut() {
                let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|s| s.since.elapsed() >= POOL_IDLE);
                *list = keep;
                retired.extend(old);
            }
            map.retain(|_, l| !l.is_empty());
        }
        for s in retired {
            retire(s.inbound, s.outbound);
        }
    }

    fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

impl TunnelPool for StreamPool {
    fn give_back(&self, agent_id: u64, label: &Arc<str>, inbound: Inbound, outbound: Outbound) {
        let extra = {
            let mut map = self.lock();
            let list = map.entry(label.clone()).or_default();
            list.push(IdleStream {
                since: Instant::now(),
                agent_id,
                inbound,
                outbound,
            });
            // Past the cap, close the least recently used.
            (list.len() > POOL_MAX).then(|| list.remove(0))
        };
        if let Some(s) = extra {
            retire(s.inbound, s.outbound);
        }
    }
}

impl Peers {
    pub fn new(auth: Arc<PrivateAuth>) -> Self {
        let pool = Arc::new(StreamPool::default());
        // Closes streams nobody used for a while (their connection may be gone).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(POOL_IDLE / 3).await;
                    match weak.upgrade() {
                        Some(p) => p.sweep(),
                        None => return,
                    }
                }
            });
        }
        let pool_home: Weak<dyn TunnelPool> = {
            let strong: Arc<dyn TunnelPool> = pool.clone();
            Arc::downgrade(&strong)
        };
        Peers {
            auth,
            channels: Mutex::default(),
            pool,
            pool_home,
            streams_opened: AtomicU64::new(0),
            exchanges: AtomicU64::new(0),
        }
    }

    /// Forwarding so far.
    pub fn stats(&self) -> ForwardStats {
        ForwardStats {
            exchanges: self.exchanges.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            idle_streams: self.pool.len(),
        }
    }

    fn client(&self, url: &str) -> Result<GatewayClient<Channel>, OpenError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(url) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|source| OpenError::Url {
                url: url.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A dead or frozen peer is noticed within 20 s (forwards to it fail over).
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        let c = GatewayClient::new(ep.connect_lazy())
            .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
        map.insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// Opens a forwarded exchange to `connection` of `agent_id` on the kas at `url`.
    ///
    /// `eager`: the request cannot be sent again (it has a body), so wait until the
    /// gateway accepted a new stream: a refusal is then known before any of the
    /// request is sent. Otherwise an idle stream to that connection is used when there
    /// is one, or the request head travels with a new stream's opening, saving a round
    /// trip; either way a failure shows up as the tunnel closing before the response
    /// head, and the proxy retries elsewhere.
    pub async fn open(
        &self,
        url: &str,
        agent_id: u64,
        connection: &str,
        eager: bool,
    ) -> Result<Tunnel, OpenError> {
        let label: Arc<str> = Arc::from(format!("{url}#{connection}"));
        if !eager {
            if let Some(s) = self.pool.take(agent_id, &label) {
                self.exchanges.fetch_add(1, Ordering::Relaxed);
                return Ok(Tunnel::pooled(
                    agent_id,
                    label,
                    s.inbound,
                    s.outbound,
                    self.pool_home.clone(),
                ));
            }
        }
        let (inbound, out) = self.open_stream(url, agent_id, connection, eager).await?;
        self.count_open();
        Ok(Tunnel::pooled(
            agent_id,
            label,
            inbound,
            out,
            self.pool_home.clone(),
        ))
    }

    fn count_open(&self) {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.exchanges.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens one `ForwardMany` stream; see [`Peers::open`].
    async fn open_stream(
        &self,
        url: &str,
        agent_id: u64,
        connection: &str,
        eager: bool,
    ) -> Result<(Inbound, Outbound), OpenError> {
        let mut client = self.client(url)?;
        let (out, stream) = outbound_channel(RELAY_FRAMES);
        let frames = stream
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok()));
        let mut req = Request::new(frames);
        let md = req.metadata_mut();
        let bearer = format!("Bearer {}", self.auth.token());
        let pairs = [
            ("authorization", bearer),
            (GATEWAY_AGENT_METADATA, agent_id.to_string()),
            (GATEWAY_CONNECTION_METADATA, connection.to_string()),
        ];
        for (k, v) in pairs {
            let v = v.parse().map_err(|_| {
                OpenError::Refused(Box::new(Status::invalid_argument("bad metadata")))
            })?;
            md.insert(k, v);
        }
        let call = async move {
            match tokio::time::timeout(GATEWAY_WAIT * 2, client.forward_many(req)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(
                    "the gateway kas did not answer in time",
                )),
            }
        };
        if eager {
            let resp = call.await.map_err(|s| OpenError::Refused(Box::new(s)))?;
            return Ok((Box::pin(resp.into_inner()), out));
        }
        let inbound = futures::stream::once(call).flat_map(|r| match r {
            Ok(resp) => resp.into_inner().boxed(),
            Err(status) => futures::stream::once(std::future::ready(Err(status))).boxed(),
        });
        Ok((Box::pin(inbound), out))
    }
}
