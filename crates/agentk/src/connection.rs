//! agentk's connection to kas: one HTTP/2 connection per session carrying the
//! configuration stream and a pool of idle tunnels; reconnects with jittered
//! exponential backoff that resets after a stable period.

// tonic::Status is large by design; it is what gRPC calls return.
#![allow(clippy::result_large_err)]

use crate::dial::{Dialer, Proxy, ProxyConfig};
use crate::exchange::Upstream;
use kas_proto::v1::agent_client::AgentClient;
use kas_proto::v1::{AgentConfiguration, AgentFrame, ConfigAck};
use kas_proto::{AGENT_VERSION_METADATA, PROTOCOL_VERSION, REPLICA_ID_METADATA};
use kas_tunnel::agent::{self, AgentOut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::metadata::{Ascii, MetadataKey};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// HTTP/2 pings to kas while the connection is idle. A connection that was busy keeps
/// its h2 buffers until its next frame (`vendor/h2`), so this is also how long an idle
/// agent may keep them after a burst of exchanges.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of the connection to kas.
#[derive(Clone)]
pub struct ConnectOptions {
    /// `grpc://host:port` or `grpcs://host:port`, one or more. A name resolving to
    /// several addresses counts as several kas.
    pub kas_addresses: Vec<String>,
    pub token: String,
    /// PEM CA bundle to trust for `grpcs://` (for a kas with a self-signed certificate).
    pub ca_cert_pem: Option<Vec<u8>>,
    pub min_idle_tunnels: usize,
    pub max_tunnels: usize,
    pub replica_id: String,
    /// Extra headers (gRPC metadata) sent with every stream (`--kas-header`).
    pub kas_headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
    /// The name kas's certificate must carry, when not the address's host.
    pub tls_server_name: Option<String>,
    /// Accept any certificate from kas (`--kas-insecure-skip-tls-verify`).
    pub insecure_skip_tls_verify: bool,
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`.
    pub proxy: ProxyConfig,
}

impl ConnectOptions {
    /// TLS settings towards kas at `host`.
    fn tls(&self, host: &str) -> Result<crate::dial::Tls, SessionError> {
        let config =
            crate::dial::tls_config(self.ca_cert_pem.as_deref(), self.insecure_skip_tls_verify)
                .map_err(SessionError::Dial)?;
        let name = self.tls_server_name.as_deref().unwrap_or(host);
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|_| SessionError::Address(format!("TLS server name `{name}`")))?;
        Ok(crate::dial::Tls {
            config,
            server_name,
        })
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("kas_addresses", &self.kas_addresses)
            .field("token", &"****")
            .field("min_idle_tunnels", &self.min_idle_tunnels)
            .field(
                "kas_headers",
                &self
                    .kas_headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("tls_server_name", &self.tls_server_name)
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("proxy", &self.proxy)
            .field("max_tunnels", &self.max_tunnels)
            .field("replica_id", &self.replica_id)
            .finish()
    }
}

/// The latest configuration the agent applied; observers (tests, future features)
/// watch it.
pub type ConfigWatch = watch::Receiver<Option<AgentConfiguration>>;

/// Errors ending one session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid kas address `{0}`: use grpc://host:port or grpcs://host:port")]
    Address(String),
    #[error("cannot connect to kas: {}", chain(.0))]
    Connect(#[source] tonic::transport::Error),
    #[error("cannot reach kas: {0}")]
    Dial(#[source] crate::dial::DialError),
    #[error("cannot resolve kas address `{0}`: {1}")]
    Resolve(String, #[source] std::io::Error),
    #[error("kas rejected the agent: {}", .0.message())]
    Rejected(Status),
    #[error("connection to kas lost: {}", .0.message())]
    Lost(Status),
    #[error("kas closed the configuration stream")]
    Closed,
}

/// An error with its causes (tonic's transport error says only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// Jittered exponential backoff.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }
    /// The next delay: the current step +-25% jitter; the step doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        base.mul_f64(jitter)
    }
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// One kas to dial: a configured address (resolved to one socket address, unless a
/// proxy resolves it).
#[derive(Clone)]
struct Target {
    tls: bool,
    dialer: Dialer,
}

impl PartialEq for Target {
    fn eq(&self, o: &Self) -> bool {
        self.tls == o.tls
            && self.dialer.host == o.dialer.host
            && self.dialer.port == o.dialer.port
            && self.dialer.addr == o.dialer.addr
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        let d = &self.dialer;
        match &d.proxy {
            Some(p) => write!(
                f,
                "{scheme}://{}:{} (through proxy {})",
                d.host, d.port, p.address
            ),
            None => write!(f, "{scheme}://{}:{} ({})", d.host, d.port, d.addr),
        }
    }
}

fn split_address(addr: &str) -> Result<(bool, &str), SessionError> {
    if let Some(r) = addr.strip_prefix("grpcs://") {
        Ok((true, r))
    } else if let Some(r) = addr.strip_prefix("grpc://") {
        Ok((false, r))
    } else {
        Err(SessionError::Address(addr.to_string()))
    }
}

/// Host and port of `host:port` (IPv6 hosts in brackets).
fn split_host_port(rest: &str) -> Option<(String, u16)> {
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(())?;
    Some((host.to_string(), port.parse().ok()?))
}

/// Every kas the configured addresses name, resolved now (names may change); an
/// address reached through a proxy is resolved by the proxy.
async fn resolve(opts: &ConnectOptions) -> Result<Vec<Target>, SessionError> {
    let mut out = Vec::new();
    let mut last_err = None;
    for a in &opts.kas_addresses {
        let (tls, rest) = split_address(a)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = split_host_port(rest).ok_or_else(|| SessionError::Address(a.clone()))?;
        let tls_settings = match tls {
            true => Some(opts.tls(&host)?),
            false => None,
        };
        let target = |addr, proxy: Option<Proxy>| Target {
            tls,
            dialer: Dialer {
                host: host.clone(),
                port,
                addr,
                proxy,
                tls: tls_settings.clone(),
                timeout: Duration::from_secs(10),
            },
        };
        if let Some(p) = opts.proxy.for_target(&host, port, tls) {
            let t = target(
                std::net::SocketAddr::from(([0, 0, 0, 0], port)),
                Some(p.clone()),
            );
            if !out.contains(&t) {
                out.push(t);
            }
            continue;
        }
        match tokio::net::lookup_host(rest).await {
            Ok(addrs) => {
                for addr in addrs {
                    let t = target(addr, None);
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
            }
            Err(e) => last_err = Some(SessionError::Resolve(a.clone(), e)),
        }
    }
    match (out.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// Connects to `t` (proxy and TLS are the dialer's), with HTTP/2 settings for kas.
async fn connect(t: &Target) -> Result<Channel, SessionError> {
    let d = &t.dialer;
    // The URI only names the authority: the dialer decides where bytes go.
    let host = if d.host.contains(':') {
        format!("[{}]", d.host)
    } else {
        d.host.clone()
    };
    Endpoint::from_shared(format!("http://{host}:{}", d.port))
        .map_err(|_| SessionError::Address(t.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        // A dead or frozen kas is noticed within 20 s, and the agent moves to another.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024)
        .connect_with_connector(d.clone())
        .await
        .map_err(SessionError::Connect)
}

fn with_metadata<T>(opts: &ConnectOptions, msg: T) -> Result<Request<T>, Status> {
    let mut r = Request::new(msg);
    let md = r.metadata_mut();
    let bad =
        |_| Status::invalid_argument("the agent token contains characters not allowed in a header");
    md.insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {}", opts.token)).map_err(bad)?,
    );
    md.insert(
        REPLICA_ID_METADATA,
        MetadataValue::try_from(opts.replica_id.as_str())
            .map_err(|_| Status::invalid_argument("bad replica id"))?,
    );
    md.insert(
        AGENT_VERSION_METADATA,
        MetadataValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    for (k, v) in &opts.kas_headers {
        md.append(k.clone(), v.clone());
    }
    Ok(r)
}

/// Runs agentk's connection until `stop` flips: sessions, reconnects, backoff.
pub async fn run(
    opts: ConnectOptions,
    upstream: Arc<Upstream>,
    config_tx: watch::Sender<Option<AgentConfiguration>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // Replicas start at different kas (spreading their connections) and move on to the
    // next kas whenever a session ends (re-homing when a kas goes away).
    let mut next = rand::random::<usize>();
    // Kas tried since the last good session: no backoff until each was tried once.
    let mut tried = 0usize;
    loop {
        let started = Instant::now();
        let targets = match resolve(&opts).await {
            Ok(t) if !t.is_empty() => t,
            Ok(_) => {
                tracing::error!(addresses = ?opts.kas_addresses, "no kas address resolved");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot resolve kas");
                Vec::new()
            }
        };
        let result = match targets.get(next % targets.len().max(1)) {
            Some(target) => tokio::select! {
                r = session(&opts, target, upstream.clone(), &config_tx) => r,
                _ = stop.wait_for(|s| *s) => return,
            },
            None => Err(SessionError::Closed),
        };
        next = next.wrapping_add(1);
        upstream.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
            tried = 0;
        }
        tried += 1;
        let rejected =
            matches!(&result, Err(SessionError::Rejected(s)) if s.code() == Code::Unauthenticated);
        if !rejected && targets.len() > 1 && tried < targets.len() {
            // Another kas may well be up: try it at once.
            if let Err(e) = &result {
                tracing::warn!(error = %e, "disconnected from kas; trying the next one");
            }
            continue;
        }
        tried = 0;
        let delay = match &result {
            Err(SessionError::Rejected(s)) if s.code() == Code::Unauthenticated => {
                tracing::error!(error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                    "kas rejected the agent token; check --token-file");
                // A bad token will not fix itself quickly; wait the longest step.
                backoff.next_delay().max(Duration::from_secs(5))
            }
            Err(e) => {
                tracing::warn!(error = %e, "disconnected from kas");
                backoff.next_delay()
            }
            Ok(()) => backoff.next_delay(),
        };
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting to kas");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn classify(s: Status) -> SessionError {
    match s.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::InvalidArgument => SessionError::Rejected(s),
        _ => SessionError::Lost(s),
    }
}

/// One connection: configuration stream plus tunnel pool, until either breaks.
async fn session(
    opts: &ConnectOptions,
    target: &Target,
    upstream: Arc<Upstream>,
    config_tx: &watch::Sender<Option<AgentConfiguration>>,
) -> Result<(), SessionError> {
    let channel = connect(target).await?;
    let mut client = AgentClient::new(channel.clone())
        .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
    let applied = config_tx.borrow().as_ref().map(|c| c.version).unwrap_or(0);
    let (ack_tx, ack_rx) = mpsc::channel(4);
    // The cluster's version is read once (a slow cluster delays the first session by
    // at most this much; the version then follows with a later acknowledgement).
    let meta = upstream.meta(Duration::from_secs(3)).await;
    let _ = ack_tx
        .send(ConfigAck {
            protocol_version: PROTOCOL_VERSION,
            applied_version: applied,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            meta: Some(meta),
        })
        .await;
    let req = with_metadata(opts, ReceiverStream::new(ack_rx)).map_err(SessionError::Rejected)?;
    let mut configs = client.configure(req).await.map_err(classify)?.into_inner();
    // The first configuration proves the token is good; only then open tunnels.
    let first = configs
        .message()
        .await
        .map_err(classify)?
        .ok_or(SessionError::Closed)?;
    apply(first, &upstream, config_tx, &ack_tx).await;
    tracing::info!(kas = %target, "connected to kas");

    let pool = Arc::new(Pool {
        idle: AtomicUsize::new(0),
        total: AtomicUsize::new(0),
        wake: Notify::new(),
        stats: upstream.stats.clone(),
    });
    // Counts this session as connected while it lives.
    let _connected = Connected::new(upstream.stats.clone());
    // Every tunnel task of this session; on the session's end they are left to finish.
    let mut tunnels = JoinSet::new();
    let manager = async {
        loop {
            while pool.idle.load(Ordering::SeqCst) < opts.min_idle_tunnels
                && pool.total.load(Ordering::SeqCst) < opts.max_tunnels
            {
                pool.idle.fetch_add(1, Ordering::SeqCst);
                pool.total.fetch_add(1, Ordering::SeqCst);
                pool.stats.tunnels_idle.fetch_add(1, Ordering::Relaxed);
                pool.stats.tunnels_open.fetch_add(1, Ordering::Relaxed);
                tunnels.spawn(tunnel(
                    opts.clone(),
                    client.clone(),
                    upstream.clone(),
                    pool.clone(),
                ));
            }
            tokio::select! {
                _ = pool.wake.notified() => {}
                Some(_) = tunnels.join_next() => {}
            }
        }
    };
    let configs_loop = async {
        loop {
            match configs.message().await {
                Ok(Some(c)) => apply(c, &upstream, config_tx, &ack_tx).await,
                Ok(None) => return SessionError::Closed,
                Err(s) => return classify(s),
            }
        }
    };
    let err = tokio::select! {
        e = configs_loop => e,
        _ = manager => SessionError::Closed,
    };
    // Exchanges in flight finish on their own (a stopping kas drains them within its
    // grace period; a dead one breaks them): only the pool stops here. Idle tunnels end
    // when kas closes them.
    tunnels.detach_all();
    Err(err)
}

async fn apply(
    c: AgentConfiguration,
    upstream: &Upstream,
    config_tx: &watch::Sender<Option<AgentConfiguration>>,
    ack_tx: &mpsc::Sender<ConfigAck>,
) {
    let version = c.version;
    upstream.configure(&c);
    upstream
        .stats
        .config_version
        .store(c.version, Ordering::Relaxed);
    upstream
        .stats
        .config_applied
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(agent_id = c.agent_id, agent = %c.agent_name, version, "applied agent configuration");
    config_tx.send_replace(Some(c));
    let meta = upstream.meta(Duration::ZERO).await;
    let _ = ack_tx
        .send(ConfigAck {
            protocol_version: PROTOCOL_VERSION,
            applied_version: version,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            meta: Some(meta),
        })
        .await;
}

struct Pool {
    idle: AtomicUsize,
    total: AtomicUsize,
    wake: Notify,
    stats: Arc<crate::stats::Stats>,
}

/// A live session, counted in the stats while it lives.
struct Connected(Arc<crate::stats::Stats>);

impl Connected {
    fn new(stats: Arc<crate::stats::Stats>) -> Self {
        stats.sessions_connected.fetch_add(1, Ordering::Relaxed);
        Connected(stats)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.sessions_connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tunnel's place in the pool; counts it out when its task ends, however it ends.
struct TunnelSlot {
    pool: Arc<Pool>,
    idle: bool,
}

impl TunnelSlot {
    fn busy(&mut self) {
        if self.idle {
            self.idle = false;
            self.pool.idle.fetch_sub(1, Ordering::SeqCst);
            self.pool.stats.tunnels_idle.fetch_sub(1, Ordering::Relaxed);
            self.pool.wake.notify_one();
        }
    }

    fn idle(&mut self) {
        if !self.idle {
            self.idle = true;
            self.pool.idle.fetch_add(1, Ordering::SeqCst);
            self.pool.stats.tunnels_idle.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl agent::TunnelState for TunnelSlot {
    fn busy(&mut self) {
        TunnelSlot::busy(self);
        self.pool.stats.exchanges.fetch_add(1, Ordering::Relaxed);
    }

    fn idle(&mut self) {
        TunnelSlot::idle(self);
    }

    fn failed(&mut self) {
        self.pool
            .stats
            .exchanges_failed
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.busy();
        self.pool.total.fetch_sub(1, Ordering::SeqCst);
        self.pool.stats.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        self.pool.wake.notify_one();
    }
}

/// One tunnel: opened with Hello, then serving exchanges until kas or an exchange
/// ends it.
async fn tunnel(
    opts: ConnectOptions,
    mut client: AgentClient<Channel>,
    upstream: Arc<Upstream>,
    pool: Arc<Pool>,
) {
    let mut slot = TunnelSlot { pool, idle: true };
    let (tx, rx) = mpsc::channel::<AgentFrame>(4);
    let _ = tx.send(agent::hello()).await;
    let Ok(req) = with_metadata(&opts, ReceiverStream::new(rx)) else {
        return;
    };
    let inbound = match client.tunnel(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::debug!(error = %s, "opening a tunnel failed");
            // Pace retries: the session is most likely ending.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    agent::serve(inbound, AgentOut(tx), upstream.as_ref(), &mut slot).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(
            d[0] >= Duration::from_millis(75) && d[0] <= Duration::from_millis(125),
            "{d:?}"
        );
        assert!(d[3] >= Duration::from_millis(600), "{d:?}");
        assert!(d[5] <= Duration::from_millis(1250), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
