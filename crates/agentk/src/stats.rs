//! agentk's own state for its observability endpoint (`--listen-observability`):
//! `/healthz` (alive), `/readyz` (connected to at least one kas) and `/metrics`
//! (Prometheus text format). Plain atomics, updated where the state changes.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters and gauges; see the module docs.
#[derive(Debug, Default)]
pub struct Stats {
    pub sessions_connected: AtomicU64,
    pub tunnels_idle: AtomicU64,
    pub tunnels_open: AtomicU64,
    pub exchanges: AtomicU64,
    pub exchanges_failed: AtomicU64,
    pub config_version: AtomicU64,
    pub config_applied: AtomicU64,
    pub reconnects: AtomicU64,
}

impl Stats {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let metrics: [(&str, &str, &str, u64); 8] = [
            (
                "agentk_sessions_connected",
                "gauge",
                "Sessions (connections to a kas) established",
                g(&self.sessions_connected),
            ),
            (
                "agentk_tunnels_idle",
                "gauge",
                "Idle tunnels waiting for a request",
                g(&self.tunnels_idle),
            ),
            (
                "agentk_tunnels_open",
                "gauge",
                "Tunnels open (idle or busy)",
                g(&self.tunnels_open),
            ),
            (
                "agentk_exchanges_total",
                "counter",
                "Requests served through tunnels",
                g(&self.exchanges),
            ),
            (
                "agentk_exchanges_failed_total",
                "counter",
                "Requests that ended their tunnel (cancelled, failed or upgraded)",
                g(&self.exchanges_failed),
            ),
            (
                "agentk_config_version",
                "gauge",
                "Version of the configuration applied last",
                g(&self.config_version),
            ),
            (
                "agentk_config_applied_total",
                "counter",
                "Configurations applied",
                g(&self.config_applied),
            ),
            (
                "agentk_reconnects_total",
                "counter",
                "Sessions that ended and were dialed again",
                g(&self.reconnects),
            ),
        ];
        for (name, kind, help, v) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }

    fn ready(&self) -> bool {
        self.sessions_connected.load(Ordering::Relaxed) > 0
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, stats: Arc<Stats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let stats = stats.clone();
                    async move {
                        let (code, body) = match req.uri().path() {
                            "/healthz" => (200, "ok\n".to_string()),
                            "/readyz" if stats.ready() => (200, "ready\n".to_string()),
                            "/readyz" => (503, "not connected to kas\n".to_string()),
                            "/metrics" => (200, stats.render()),
                            _ => (404, "not found\n".to_string()),
                        };
                        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
