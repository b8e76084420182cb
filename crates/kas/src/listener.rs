//! Accepting and serving connections on one listener, so that no client can stop kas
//! or hold its resources forever.
//!
//! Every listener (agents, proxy, API, observability, private) is served by
//! [`serve`], which:
//! - never ends on an accept error (out of file descriptors, aborted handshakes): it
//!   counts the error, logs it at most once per [`LOG_EVERY`] and backs off, so an
//!   exhausted process recovers by itself once connections go away;
//! - caps the connections open at once ([`Limits::max_connections`]); a connection over
//!   the cap is closed at once and counted;
//! - drops a connection that does not finish its TLS handshake, or send its first
//!   request (HTTP/2: its preface and first stream), in time, and closes (gracefully:
//!   GOAWAY / after the response) one that has no request in flight for the idle
//!   timeout;
//! - on the agent listener, ends connections at a maximum age (with jitter, GOAWAY
//!   first, a hard close after a grace period) so agents rebalance across replicas,
//!   and lets handlers close one connection on demand ([`ConnControl`]), which is how a
//!   revoked token's connections go away.
//!
//! The socket's file descriptor is released only when the connection really ends:
//! the cap's permit lives in the I/O object, which an upgraded connection (exec,
//! port-forward) carries into its splice.

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Repeated warnings (accept errors, refused connections) are logged at most this often
/// per listener; the metrics count every one.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a connection asked to close gracefully (idle) may take before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Connection limits and timeouts of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are closed on arrival.
    pub max_connections: usize,
    /// Time for the TLS handshake (TLS listeners only).
    pub handshake_timeout: Duration,
    /// Time from accepting (after TLS) to the first request.
    pub first_request_timeout: Duration,
    /// A connection without a request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Agent listener: the age at which a connection is asked to go away.
    pub max_age: Option<MaxAge>,
}

/// The maximum age of a connection: after `age` (+-10 % jitter, so agents that
/// connected together do not all reconnect together) the connection gets a GOAWAY and
/// its long-lived streams are told to end; after `grace` more it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge {
    pub age: Duration,
    pub grace: Duration,
}

/// Which protocols a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (with upgrades) and HTTP/2: the proxy, the API, observability.
    Http,
    /// HTTP/2 only, with large windows and frames and keepalive pings that drop a dead
    /// peer within `ping_interval + ping_timeout`: gRPC (agents, other kas).
    Grpc {
        ping_interval: Duration,
        ping_timeout: Duration,
    },
}

/// Why kas closed a connection (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Handshake,
    FirstRequest,
    Idle,
    MaxAge,
    Closed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Handshake,
        CloseReason::FirstRequest,
        CloseReason::Idle,
        CloseReason::MaxAge,
        CloseReason::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Handshake => "handshake_timeout",
            CloseReason::FirstRequest => "first_request_timeout",
            CloseReason::Idle => "idle_timeout",
            CloseReason::MaxAge => "max_age",
            CloseReason::Closed => "closed_by_kas",
        }
    }
}

/// Counts of one listener, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: AtomicI64,
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    refused: AtomicU64,
    closed: [AtomicU64; 5],
}

/// A snapshot of [`ListenerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerCounts {
    pub open: i64,
    pub accepted: u64,
    pub accept_errors: u64,
    pub refused: u64,
    /// By [`CloseReason::ALL`] order.
    pub closed: [u64; 5],
}

impl ListenerStats {
    pub fn counts(&self) -> ListenerCounts {
        ListenerCounts {
            open: self.open.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
        }
    }

    fn count_close(&self, r: CloseReason) {
        let i = CloseReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One connection, as its request handlers see it (a request extension on listeners
/// that ask for it): the peer, and the means to end the connection.
#[derive(Debug)]
pub struct ConnControl {
    pub peer: SocketAddr,
    draining: watch::Sender<bool>,
    close: CancellationToken,
}

impl ConnControl {
    fn new(peer: SocketAddr) -> Self {
        ConnControl {
            peer,
            draining: watch::Sender::new(false),
            close: CancellationToken::new(),
        }
    }

    /// Turns true when the connection is going away (maximum age, shutdown): handlers
    /// end their long-lived streams so the client reconnects.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Closes the connection now, with every stream on it.
    pub fn close(&self) {
        self.close.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }
}

/// Logs a repeated warning at most once per [`LOG_EVERY`], saying how many were not
/// logged in between.
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    fn new() -> Self {
        RateLimitedLog {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns how many were suppressed since the last logged one, or `None` when this
    /// one is to be suppressed too.
    fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if t.elapsed() < LOG_EVERY => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(Instant::now());
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Everything one listener's connections share.
struct Shared<S> {
    name: &'static str,
    tls: Option<TlsAcceptor>,
    svc: S,
    limits: Limits,
    stats: Arc<ListenerStats>,
    builder: auto::Builder<TokioExecutor>,
    /// Whether handlers get a [`ConnControl`] in their requests' extensions.
    conn_control: bool,
    /// Flips at shutdown: every connection closes gracefully.
    shutdown: watch::Receiver<bool>,
    /// Cancelled when the grace period is over: every connection closes now.
    hard_stop: CancellationToken,
}

/// One listener to serve: see the module docs.
pub struct Listener<S> {
    pub name: &'static str,
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub svc: S,
    pub limits: Limits,
    pub protocol: Protocol,
    pub stats: Arc<ListenerStats>,
    /// Put a [`ConnControl`] in every request's extensions.
    pub conn_control: bool,
}

fn builder(protocol: Protocol) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new());
    match protocol {
        Protocol::Http => {
            b.http2()
                .timer(TokioTimer::new())
                .initial_stream_window_size(4 * 1024 * 1024)
                .initial_connection_window_size(16 * 1024 * 1024)
                .max_frame_size(kas_proto::MAX_H2_FRAME)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20));
        }
        Protocol::Grpc {
            ping_interval,
            ping_timeout,
        } => {
            b = b.http2_only();
            b.http2()
                .timer(TokioTimer::new())
                .initial_stream_window_size(4 * 1024 * 1024)
                .initial_connection_window_size(64 * 1024 * 1024)
                .max_frame_size(kas_proto::MAX_H2_FRAME)
                .keep_alive_interval(ping_interval)
                .keep_alive_timeout(ping_timeout);
        }
    }
    b
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service a listener can serve: HTTP requests in, HTTP responses out, shareable
/// between connections.
pub trait HttpService:
    hyper::service::Service<
        Request<Incoming>,
        Response = hyper::Response<Self::ResponseBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
    type ResponseBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type ResponseBody = B;
}

/// Accept errors that concern one connection only (the next accept may well work).
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// Serves `l` until `shutdown` turns true, then stops accepting, asks every connection
/// to close gracefully and waits for them up to `grace`; connections still open after
/// that are closed. Returns only then: no accept error ends it.
pub async fn serve<S: HttpService>(
    l: Listener<S>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let max = l.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let shared = Arc::new(Shared {
        name: l.name,
        tls: l.tls,
        svc: l.svc,
        limits: l.limits,
        stats: l.stats,
        builder: builder(l.protocol),
        conn_control: l.conn_control,
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
    });
    let listener = l.listener;
    let accept_log = RateLimitedLog::new();
    let refuse_log = RateLimitedLog::new();
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::ZERO;
                x
            }
            Err(e) => {
                shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = accept_log.admit() {
                    tracing::warn!(listener = shared.name, error = %e, suppressed, "accept failed; backing off and serving on");
                }
                if transient(&e) {
                    continue;
                }
                // Out of file descriptors or memory: give connections time to go away.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = stopped(&mut shutdown) => break,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = refuse_log.admit() {
                tracing::warn!(listener = shared.name, %peer, max_connections = max, suppressed, "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        shared.stats.open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let io = Counted {
            io: stream,
            _permit: permit,
            stats: shared.stats.clone(),
        };
        tokio::spawn(connection(shared.clone(), io, peer));
    }
    drop(listener);
    // Drain: every connection holds a permit until its socket is closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => {}
        _ = tokio::time::sleep(grace) => {
            tracing::info!(listener = shared.name, "grace period over; closing remaining connections");
            shared.hard_stop.cancel();
        }
    }
}

/// A connection's socket, holding its place under the listener's cap until dropped.
struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Requests in flight on one connection, and whether one ever arrived.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    seen: AtomicBool,
    /// Milliseconds after `started` when the last request ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            seen: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection became idle, if it is.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::Relaxed);
        Some(self.started + Duration::from_millis(ms))
    }
}

/// One request in flight: from the service call until its response body is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.started.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The listener's service, counting requests in flight and handing out the
/// connection's [`ConnControl`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    control: Option<Arc<ConnControl>>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        if let Some(c) = &self.control {
            req.extensions_mut().insert(c.clone());
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| TrackedBody {
                body,
                _guard: guard,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until dropped.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _guard: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `started + age`, give or take 10 %.
fn jittered(started: Instant, age: Duration) -> Instant {
    started + age.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// Serves one accepted connection until it ends or kas ends it.
async fn connection<S: HttpService>(shared: Arc<Shared<S>>, io: Counted, peer: SocketAddr) {
    let limits = &shared.limits;
    match &shared.tls {
        None => serve_conn(&shared, TokioIo::new(io), peer).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(io);
            let hard = shared.hard_stop.clone();
            let tls = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, handshake) => r,
                _ = hard.cancelled() => return,
            };
            match tls {
                Ok(Ok(s)) => serve_conn(&shared, TokioIo::new(s), peer).await,
                Ok(Err(e)) => {
                    tracing::debug!(listener = shared.name, %peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    shared.stats.count_close(CloseReason::Handshake);
                    tracing::debug!(listener = shared.name, %peer, "TLS handshake timed out");
                }
            }
        }
    }
}

async fn serve_conn<S, I>(shared: &Shared<S>, io: TokioIo<I>, peer: SocketAddr)
where
    S: HttpService,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.limits;
    let activity = Arc::new(Activity::new());
    let control = shared
        .conn_control
        .then(|| Arc::new(ConnControl::new(peer)));
    let svc = Tracked {
        inner: shared.svc.clone(),
        activity: activity.clone(),
        control: control.clone(),
    };
    let conn = shared.builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let started = activity.started;
    let first_request = started + limits.first_request_timeout;
    let mut max_age = limits.max_age.map(|m| (jittered(started, m.age), m.grace));
    // Set once kas asked the connection to close gracefully: when it must be gone.
    let mut closing: Option<Instant> = None;
    let mut shutdown = shared.shutdown.clone();
    let never = CancellationToken::new();
    let closed = control.as_ref().map(|c| &c.close).unwrap_or(&never);
    let first_check = max_age.map_or(first_request, |(at, _)| at.min(first_request));
    let timer = tokio::time::sleep_until(first_check.into());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = shared.name, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = timer.as_mut() => {
                let now = Instant::now();
                if closing.is_some_and(|t| now >= t) {
                    return;
                }
                if !activity.seen.load(Ordering::Relaxed) && now >= first_request {
                    shared.stats.count_close(CloseReason::FirstRequest);
                    tracing::debug!(listener = shared.name, %peer, "no request in time; closing");
                    return;
                }
                if closing.is_none() {
                    if let Some(since) = activity.idle_since() {
                        if activity.seen.load(Ordering::Relaxed) && now >= since + limits.idle_timeout {
                            shared.stats.count_close(CloseReason::Idle);
                            conn.as_mut().graceful_shutdown();
                            closing = Some(now + CLOSE_GRACE);
                        }
                    }
                }
                if let Some((at, grace)) = max_age {
                    if now >= at {
                        max_age = None;
                        if closing.is_none() {
                            shared.stats.count_close(CloseReason::MaxAge);
                            tracing::debug!(listener = shared.name, %peer, "connection reached its maximum age; asking the peer to reconnect");
                            conn.as_mut().graceful_shutdown();
                            if let Some(c) = &control {
                                c.draining.send_replace(true);
                            }
                            closing = Some(now + grace);
                        }
                    }
                }
                // Next check: the earliest deadline still ahead.
                let mut next = now + limits.idle_timeout;
                if !activity.seen.load(Ordering::Relaxed) {
                    next = next.min(first_request);
                } else if let Some(since) = activity.idle_since() {
                    next = next.min((since + limits.idle_timeout).max(now + Duration::from_millis(10)));
                }
                if let Some((at, _)) = max_age {
                    next = next.min(at);
                }
                if let Some(t) = closing {
                    next = next.min(t);
                }
                timer.as_mut().reset(next.into());
            }
            _ = stopped(&mut shutdown), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                if let Some(c) = &control {
                    c.draining.send_replace(true);
                }
                // The listener's grace period (hard_stop) bounds the rest.
                closing = Some(Instant::now() + Duration::from_secs(24 * 3600));
            }
            _ = shared.hard_stop.cancelled() => return,
            _ = closed.cancelled() => {
                shared.stats.count_close(CloseReason::Closed);
                return;
            }
        }
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
