//! The private API's exchange forwarding, both ends.
//!
//! Routing kas: [`Peers::open`] gives a [`Tunnel`] to the kas holding the chosen
//! connection, so the proxy streams through it exactly as through a local agent
//! tunnel. It is a `Gateway.ForwardMany` stream: after a clean exchange it goes back
//! to a pool and carries the next request to the same connection, as agent tunnels
//! do, so a forwarded request costs no stream set-up (a kas that predates
//! `ForwardMany` gets one `Gateway.Forward` stream per exchange). Gateway kas:
//! [`GatewayService`] takes an idle tunnel of the named connection (never looking
//! anywhere else, so requests cannot loop) and relays frames between the two streams,
//! returning the agent's tunnel to its pool after a clean exchange.

use crate::jwt::PrivateAuth;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http_body::Frame;
use http_body_util::{Empty, StreamBody};
use kas_proto::v1::gateway_client::GatewayClient;
use kas_proto::v1::gateway_server::Gateway;
use kas_proto::v1::{
    agent_frame, server_frame, tunnel_error, AgentFrame, Data, EndOfBody, RequestHead, ServerFrame,
    TunnelError,
};
use kas_proto::{GATEWAY_AGENT_METADATA, GATEWAY_CONNECTION_METADATA};
use kas_tunnel::{
    outbound_channel, retire, ExchangeError, Inbound, Outbound, Tunnel, TunnelPool, TunnelRegistry,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

/// How long a forwarded exchange may wait on the gateway for a busy connection.
const GATEWAY_WAIT: Duration = Duration::from_secs(5);
/// How long the routing kas keeps an unused forwarding stream.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle forwarding streams kept per agent connection; more are closed.
const POOL_MAX: usize = 64;
/// Frames queued in each direction of a relay: with Data frames of up to 256 KiB this
/// bounds what one forwarded exchange holds in memory at 1 MiB per direction.
const RELAY_FRAMES: usize = 4;
/// How long a kas that answered `ForwardMany` with UNIMPLEMENTED is not asked again.
const LEGACY_RECHECK: Duration = Duration::from_secs(300);

/// The gateway end; served on the private listener behind JWT authentication.
pub struct GatewayService {
    registry: Arc<TunnelRegistry>,
    shutdown: watch::Receiver<bool>,
}

impl GatewayService {
    /// `shutdown` turning true ends idle `ForwardMany` streams, so that a stopping kas
    /// is not kept waiting by streams that would only carry future requests.
    pub fn new(registry: Arc<TunnelRegistry>, shutdown: watch::Receiver<bool>) -> Self {
        GatewayService { registry, shutdown }
    }

    /// The agent and connection a forwarded stream names; refused at once when this
    /// kas does not hold that connection.
    // The error goes straight back to tonic as the call's status.
    #[allow(clippy::result_large_err)]
    fn target(&self, req: &Request<Streaming<ServerFrame>>) -> Result<(u64, String), Status> {
        let agent_id: u64 = metadata(req, GATEWAY_AGENT_METADATA)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing or bad {GATEWAY_AGENT_METADATA}"))
            })?;
        let connection = metadata(req, GATEWAY_CONNECTION_METADATA)
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing {GATEWAY_CONNECTION_METADATA}"))
            })?
            .to_string();
        if !holds(&self.registry, agent_id, &connection) {
            return Err(Status::unavailable(
                "this kas does not hold that agent connection",
            ));
        }
        Ok((agent_id, connection))
    }
}

/// Whether this kas holds `connection` of `agent_id`.
fn holds(registry: &TunnelRegistry, agent_id: u64, connection: &str) -> bool {
    registry
        .connection_keys(agent_id)
        .iter()
        .any(|k| **k == *connection)
}

fn metadata<'a>(req: &'a Request<Streaming<ServerFrame>>, key: &str) -> Option<&'a str> {
    req.metadata().get(key).and_then(|v| v.to_str().ok())
}

/// An idle tunnel of the named connection, or (when it is here but busy) of any of
/// this kas's own connections of the agent; `None` when the connection is gone.
async fn take_tunnel(
    registry: &Arc<TunnelRegistry>,
    agent_id: u64,
    connection: &str,
) -> Option<Tunnel> {
    if let Some(t) = registry.try_acquire_from(agent_id, connection) {
        return Some(t);
    }
    if !holds(registry, agent_id, connection) {
        return None;
    }
    registry.acquire(agent_id, GATEWAY_WAIT).await.ok()
}

type FrameSender = mpsc::Sender<Result<AgentFrame, Status>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type ForwardStream = Relayed;
    type ForwardManyStream = Relayed;

    async fn forward(
        &self,
        req: Request<Streaming<ServerFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let (agent_id, connection) = self.target(&req)?;
        let tunnel = take_tunnel(&self.registry, agent_id, &connection)
            .await
            .ok_or_else(|| Status::unavailable("the agent connection went away"))?;
        let (tx, rx) = mpsc::channel(RELAY_FRAMES);
        let inbound = RequestStream::new(req.into_inner());
        Ok(Response::new(Relayed {
            relay: Some(Box::pin(relay_once(tunnel, inbound, tx))),
            rx,
        }))
    }

    async fn forward_many(
        &self,
        req: Request<Streaming<ServerFrame>>,
    ) -> Result<Response<Self::ForwardManyStream>, Status> {
        let (agent_id, connection) = self.target(&req)?;
        let (tx, rx) = mpsc::channel(RELAY_FRAMES);
        let inbound = RequestStream::new(req.into_inner());
        let relay = relay_many(
            self.registry.clone(),
            agent_id,
            connection,
            inbound,
            tx,
            self.shutdown.clone(),
        );
        Ok(Response::new(Relayed {
            relay: Some(Box::pin(relay)),
            rx,
        }))
    }
}

/// The gateway's response stream, which also drives the relay: polled by the task that
/// writes the response, so each frame reaches HTTP/2 without waking another task.
pub struct Relayed {
    relay: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    rx: mpsc::Receiver<Result<AgentFrame, Status>>,
}

impl futures::Stream for Relayed {
    type Item = Result<AgentFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(relay) = self.relay.as_mut() {
            if relay.as_mut().poll(cx).is_ready() {
                // Done: its sender is dropped, so `rx` ends after the queued frames.
                self.relay = None;
            }
        }
        self.rx.poll_recv(cx)
    }
}

/// The request direction of a forwarded stream. Dropped before its end, it is read to
/// its end in the background: a dropped HTTP/2 stream is reset, and a peer that sees
/// too many resets closes the whole kas-to-kas connection.
struct RequestStream {
    stream: Option<Streaming<ServerFrame>>,
}

impl RequestStream {
    fn new(stream: Streaming<ServerFrame>) -> Self {
        RequestStream {
            stream: Some(stream),
        }
    }

    /// The next frame; `Ok(None)` once the routing kas closed its direction.
    async fn message(&mut self) -> Result<Option<ServerFrame>, Status> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(None);
        };
        let m = s.message().await;
        if !matches!(m, Ok(Some(_))) {
            // Ended (or broken): nothing left to read.
            self.stream = None;
        }
        m
    }

    /// Drops the stream as it is (resetting it if still open).
    fn abandon(mut self) {
        self.stream = None;
    }

    /// Reads to the end (briefly).
    async fn drain(mut self) {
        if let Some(s) = self.stream.take() {
            drain(s).await;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(drain(s));
            }
        }
    }
}

/// Reads a request direction to its end, giving up after a few seconds.
async fn drain(mut s: Streaming<ServerFrame>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = s.message().await {}
    })
    .await;
}

/// The request body as it arrives from the routing kas. At its end the request stream
/// goes to `back` (to carry the next exchange) or, without `back`, is read to its end.
fn body_from_frames(
    inbound: RequestStream,
    back: Option<oneshot::Sender<RequestStream>>,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, String>>> {
    StreamBody::new(futures::stream::unfold(
        Some((inbound, back)),
        |st| async move {
            let (mut inbound, back) = st?;
            match inbound.message().await {
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::Data(d)),
                })) => Some((Ok(Frame::data(d.data)), Some((inbound, back)))),
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::EndOfBody(_)),
                })) => {
                    match back {
                        Some(back) => {
                            let _ = back.send(inbound);
                        }
                        // The routing kas closes its side right after; see it close,
                        // so the stream ends cleanly instead of being reset.
                        None => inbound.drain().await,
                    }
                    None
                }
                Ok(_) => Some((Err("the request body ended early".to_string()), None)),
                Err(s) => Some((Err(s.to_string()), None)),
            }
        },
    ))
}

async fn send(tx: &FrameSender, msg: agent_frame::Msg) -> bool {
    tx.send(Ok(AgentFrame { msg: Some(msg) })).await.is_ok()
}

/// `Forward`: one exchange, then the stream ends.
async fn relay_once(tunnel: Tunnel, mut inbound: RequestStream, tx: FrameSender) {
    let head = match inbound.message().await {
        Ok(Some(ServerFrame {
            msg: Some(server_frame::Msg::RequestHead(h)),
        })) => h,
        _ => return,
    };
    if let Some(rest) = relay(tunnel, head, inbound, &tx, false).await {
        // The routing kas closes its direction once the request is complete.
        rest.drain().await;
    }
}

/// `ForwardMany`: exchanges one after another until the routing kas closes the stream,
/// an exchange does not end cleanly, the connection goes away or this kas stops.
async fn relay_many(
    registry: Arc<TunnelRegistry>,
    agent_id: u64,
    connection: String,
    mut inbound: RequestStream,
    tx: FrameSender,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.wait_for(|s| *s) => {
                // This kas is stopping and its connections with it: no need to wait
                // for the routing kas to close its side.
                inbound.abandon();
                return;
            }
        };
        let head = match next {
            Ok(Some(ServerFrame {
                msg: Some(server_frame::Msg::RequestHead(h)),
            })) => h,
            _ => return,
        };
        // Without a tunnel the stream ends before a response head: the routing kas
        // sees the tunnel close and sends the request elsewhere.
        let Some(tunnel) = take_tunnel(&registry, agent_id, &connection).await else {
            return;
        };
        let upgrade = head.upgrade;
        match relay(tunnel, head, inbound, &tx, true).await {
            Some(rest) if !upgrade => inbound = rest,
            _ => return,
        }
    }
}

/// Relays one exchange. Returns the request stream when the exchange ended cleanly
/// and `keep` asks for it (the stream carries the next exchange), or when the request
/// direction is still open without `keep` (for the caller to see it close).
async fn relay(
    tunnel: Tunnel,
    head: RequestHead,
    inbound: RequestStream,
    tx: &FrameSender,
    keep: bool,
) -> Option<RequestStream> {
    let bodyless = head.upgrade || head.end_of_body;
    let (back_tx, back_rx) = oneshot::channel();
    let (res, rest) = if bodyless {
        (
            tunnel.round_trip(head, Empty::<Bytes>::new()).await,
            Some(inbound),
        )
    } else {
        let body = body_from_frames(inbound, keep.then_some(back_tx));
        (tunnel.round_trip(head, body).await, None)
    };
    let (rhead, mut body) = match res {
        Ok(x) => x,
        Err(ExchangeError::Agent { code, message }) => {
            send(tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
            return None;
        }
        // Ending the stream without a head tells the routing kas the tunnel broke
        // before the response started (it may retry elsewhere).
        Err(_) => return None,
    };
    let inline = rhead.end_of_body;
    let switching = rhead.status == 101;
    if !send(tx, agent_frame::Msg::ResponseHead(rhead)).await {
        return None;
    }
    let (up, rest) = match (switching, rest, body.outbound()) {
        (true, Some(mut rest), Some(out)) => (
            Some(crate::AbortOnDrop(tokio::spawn(async move {
                while let Ok(Some(f)) = rest.message().await {
                    let end = matches!(f.msg, Some(server_frame::Msg::EndOfBody(_)));
                    if !out.send(f).await || end {
                        return;
                    }
                }
            }))),
            None,
        ),
        (_, rest, _) => (None, rest),
    };
    loop {
        match body.next_chunk().await {
            Ok(Some(data)) => {
                if !inline && !send(tx, agent_frame::Msg::Data(Data { data })).await {
                    return None;
                }
            }
            Ok(None) => {
                if !inline && !send(tx, agent_frame::Msg::EndOfBody(EndOfBody {})).await {
                    return None;
                }
                break;
            }
            Err(e) => {
                let (code, message) = match e {
                    ExchangeError::Agent { code, message } => (code, message),
                    other => (
                        tunnel_error::Code::UpstreamAborted as i32,
                        other.to_string(),
                    ),
                };
                send(tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
                return None;
            }
        }
    }
    if let Some(mut up) = up {
        // Keep relaying the client's bytes until the client side ends too; an
        // upgraded stream is never reused.
        let _ = (&mut up.0).await;
        return None;
    }
    match rest {
        Some(rest) => Some(rest),
        // The request body's end hands the stream back; the agent normally answers
        // only after it, so this is immediate.
        None if keep => tokio::time::timeout(GATEWAY_WAIT, back_rx)
            .await
            .ok()
            .and_then(|r| r.ok()),
        None => None,
    }
}

/// Clients for the other kas replicas' private APIs (one HTTP/2 connection each) and
/// the forwarding streams that are open to them.
pub struct Peers {
    auth: Arc<PrivateAuth>,
    channels: Mutex<HashMap<String, GatewayClient<Channel>>>,
    pool: Arc<StreamPool>,
    /// `pool` as the home of the tunnels it hands out (made once, not per request).
    pool_home: Weak<dyn TunnelPool>,
    /// What each peer is known to serve, by private API URL.
    modes: Modes,
    streams_opened: AtomicU64,
    exchanges: AtomicU64,
}

/// What a peer serves: `ForwardMany`, or (an older kas, as seen at that time) only
/// `Forward`.
#[derive(Clone, Copy)]
enum PeerMode {
    Many,
    Legacy(Instant),
}

type Modes = Arc<Mutex<HashMap<String, PeerMode>>>;

fn set_mode(modes: &Modes, url: &str, mode: PeerMode) {
    modes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(url.to_string(), mode);
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
            modes: Arc::default(),
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

    /// What the kas at `url` is known to serve; `None` when not known (a kas seen to
    /// predate `ForwardMany` is asked again after a while: it may have been upgraded).
    fn mode(&self, url: &str) -> Option<PeerMode> {
        let mut map = self.modes.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(url).copied() {
            Some(PeerMode::Legacy(at)) if at.elapsed() >= LEGACY_RECHECK => {
                map.remove(url);
                None
            }
            m => m,
        }
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
        let mode = self.mode(url);
        let many = !matches!(mode, Some(PeerMode::Legacy(_)));
        // Until a peer is known to serve ForwardMany, the first stream waits for its
        // answer, so an older kas's UNIMPLEMENTED costs no request.
        let res = self
            .open_stream(url, agent_id, connection, many, eager || mode.is_none())
            .await;
        let (inbound, out) = match res {
            Err(OpenError::Refused(s)) if many && s.code() == Code::Unimplemented => {
                let (inbound, out) = self
                    .open_stream(url, agent_id, connection, false, eager)
                    .await?;
                self.count_open();
                return Ok(Tunnel::remote(agent_id, label, inbound, out));
            }
            other => other?,
        };
        self.count_open();
        if !many {
            return Ok(Tunnel::remote(agent_id, label, inbound, out));
        }
        if mode.is_none() {
            set_mode(&self.modes, url, PeerMode::Many);
        }
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

    /// Opens one `ForwardMany` (`many`) or `Forward` stream; see [`Peers::open`].
    async fn open_stream(
        &self,
        url: &str,
        agent_id: u64,
        connection: &str,
        many: bool,
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
        let (modes, url) = (self.modes.clone(), url.to_string());
        let call = async move {
            let call = async {
                if many {
                    client.forward_many(req).await
                } else {
                    client.forward(req).await
                }
            };
            let res = match tokio::time::timeout(GATEWAY_WAIT * 2, call).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(
                    "the gateway kas did not answer in time",
                )),
            };
            if let Err(s) = &res {
                if many && s.code() == Code::Unimplemented {
                    tracing::info!(peer = %url, "the other kas predates ForwardMany; one stream per forwarded request");
                    set_mode(&modes, &url, PeerMode::Legacy(Instant::now()));
                }
            }
            res
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
