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
//! Accepted connections are served on [`ConnRuntimes`] (single-threaded runtimes, one
//! per worker thread), the accept loop on the runtime that called [`serve`].
//!
//! The socket's file descriptor is released only when the connection really ends:
//! the cap's permit lives in the I/O object, which an upgraded connection (exec,
//! port-forward) carries into its splice.

mod conn;
mod runtimes;
mod stats;
pub mod tls;

pub use conn::ConnControl;
pub use runtimes::ConnRuntimes;
pub use stats::{CloseReason, ListenerCounts, ListenerStats};

use conn::{connection, Counted, Shared};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use stats::RateLimitedLog;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
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
    /// Where accepted connections are served.
    pub runtimes: Arc<ConnRuntimes>,
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
    let runtimes = l.runtimes;
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
        // The socket moves to the runtime that serves it (see `ConnRuntimes`).
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(listener = shared.name, %peer, error = %e, "cannot hand the connection over; closed");
                continue;
            }
        };
        let shared = shared.clone();
        runtimes.spawn(async move {
            let stream = match TcpStream::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(listener = shared.name, %peer, error = %e, "cannot serve the connection; closed");
                    return;
                }
            };
            shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
            shared.stats.open.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let io = Counted {
                io: stream,
                _permit: permit,
                stats: shared.stats.clone(),
            };
            connection(shared, io, peer).await;
        });
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

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
