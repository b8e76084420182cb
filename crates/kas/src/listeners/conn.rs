//! One accepted connection: its socket (holding its place under the listener's cap),
//! its requests in flight, and the timers that close it (TLS handshake, first request,
//! idle, maximum age), with [`ConnControl`] for handlers.

use super::{stopped, CloseReason, HttpService, Limits, ListenerStats, CLOSE_GRACE};
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use kas_telemetry::quiet::{first_of, First};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

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

/// Everything one listener's connections share.
pub(super) struct Shared<S> {
    pub(super) name: &'static str,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) svc: S,
    pub(super) limits: Limits,
    pub(super) stats: Arc<ListenerStats>,
    pub(super) builder: auto::Builder<TokioExecutor>,
    /// Whether handlers get a [`ConnControl`] in their requests' extensions.
    pub(super) conn_control: bool,
    /// Flips at shutdown: every connection closes gracefully.
    pub(super) shutdown: watch::Receiver<bool>,
    /// Cancelled when the grace period is over: every connection closes now.
    pub(super) hard_stop: CancellationToken,
}

/// A connection's socket, holding its place under the listener's cap until dropped.
pub(super) struct Counted {
    pub(super) io: TcpStream,
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) stats: Arc<ListenerStats>,
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
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        if let Some(c) = &self.control {
            req.extensions_mut().insert(c.clone());
        }
        TrackedFuture {
            inner: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of a counted request: the inner service's, unboxed (hyper
    /// keeps one slot per connection for it; a box here would be allocated and copied
    /// into for every request).
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<hyper::Response<B>, E>>,
{
    type Output = Result<hyper::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        // Polled again after Ready only by a broken caller: the request then ends
        // uncounted rather than panicking.
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|body| TrackedBody {
            body,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until dropped.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _guard: Option<InFlight>,
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
///
/// The task lives as long as the connection (for an agent, days), so its own state is
/// kept small: the handshake and the serving loop are boxed, each allocated only while
/// it runs, instead of both sitting in the task for its whole life (6 KiB before, per
/// connection).
pub(super) async fn connection<S: HttpService>(
    shared: Arc<Shared<S>>,
    io: Counted,
    peer: SocketAddr,
) {
    let serve = match &shared.tls {
        None => boxed_serve(&shared, io, peer),
        Some(acceptor) => match boxed_handshake(&shared, acceptor, io, peer).await {
            Some(tls) => boxed_serve(&shared, tls, peer),
            None => return,
        },
    };
    serve.await
}

// Plain functions, so that each future is built in their frame and moved to the heap:
// built inside the async fn, it would take room in the task's state anyway.
fn boxed_serve<'a, S, I>(shared: &'a Shared<S>, io: I, peer: SocketAddr) -> BoxFuture<'a, ()>
where
    S: HttpService,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let control = shared
        .conn_control
        .then(|| Arc::new(ConnControl::new(peer)));
    let svc = Tracked {
        inner: shared.svc.clone(),
        activity: activity.clone(),
        control: control.clone(),
    };
    // Boxed on its own: passed by value, the connection (with a TLS stream, over 1 KiB)
    // would be kept twice in the serving future.
    let conn = Box::pin(
        shared
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc),
    );
    Box::pin(serve_conn(shared, conn, activity, control, peer))
}

fn boxed_handshake<'a, S: HttpService>(
    shared: &'a Shared<S>,
    acceptor: &'a TlsAcceptor,
    io: Counted,
    peer: SocketAddr,
) -> BoxFuture<'a, Option<tokio_rustls::server::TlsStream<Counted>>> {
    Box::pin(handshake(shared, acceptor, io, peer))
}

/// The TLS handshake within the listener's deadline; `None` (logged) if it failed.
async fn handshake<S>(
    shared: &Shared<S>,
    acceptor: &TlsAcceptor,
    io: Counted,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<Counted>> {
    let handshake = acceptor.accept(io);
    let tls = tokio::select! {
        r = tokio::time::timeout(shared.limits.handshake_timeout, handshake) => r,
        _ = shared.hard_stop.cancelled() => return None,
    };
    match tls {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(listener = shared.name, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            shared.stats.count_close(CloseReason::Handshake);
            tracing::debug!(listener = shared.name, %peer, "TLS handshake timed out");
            None
        }
    }
}

type Conn<'a, I, S> =
    Pin<Box<auto::UpgradeableConnection<'a, TokioIo<I>, Tracked<S>, TokioExecutor>>>;

async fn serve_conn<S, I>(
    shared: &Shared<S>,
    mut conn: Conn<'_, I, S>,
    activity: Arc<Activity>,
    control: Option<Arc<ConnControl>>,
    peer: SocketAddr,
) where
    S: HttpService,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.limits;
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
        // The connection is polled on every wake of the task, its deadline and
        // signals only when they woke it (see `first_of`).
        let event = {
            let watch = async {
                tokio::select! {
                    () = timer.as_mut() => Watch::Deadline,
                    () = stopped(&mut shutdown), if closing.is_none() => Watch::Shutdown,
                    () = shared.hard_stop.cancelled() => Watch::HardStop,
                    () = closed.cancelled() => Watch::Closed,
                }
            };
            tokio::pin!(watch);
            first_of(conn.as_mut(), watch).await
        };
        match event {
            First::Busy(r) => {
                if let Err(e) = r {
                    tracing::debug!(listener = shared.name, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            First::Quiet(Watch::Deadline) => {
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
                        if activity.seen.load(Ordering::Relaxed)
                            && now >= since + limits.idle_timeout
                        {
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
                    next = next
                        .min((since + limits.idle_timeout).max(now + Duration::from_millis(10)));
                }
                if let Some((at, _)) = max_age {
                    next = next.min(at);
                }
                if let Some(t) = closing {
                    next = next.min(t);
                }
                timer.as_mut().reset(next.into());
            }
            First::Quiet(Watch::Shutdown) => {
                conn.as_mut().graceful_shutdown();
                if let Some(c) = &control {
                    c.draining.send_replace(true);
                }
                // The listener's grace period (hard_stop) bounds the rest.
                closing = Some(Instant::now() + Duration::from_secs(24 * 3600));
            }
            First::Quiet(Watch::HardStop) => return,
            First::Quiet(Watch::Closed) => {
                shared.stats.count_close(CloseReason::Closed);
                return;
            }
        }
    }
}

/// What besides its own end can stop or change a connection.
enum Watch {
    /// The timer went off: a deadline may have passed (see `serve_conn`).
    Deadline,
    /// kas is shutting down: close gracefully.
    Shutdown,
    /// The shutdown grace period is over.
    HardStop,
    /// The connection was closed from outside (its agent token was revoked).
    Closed,
}
