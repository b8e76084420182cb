//! agentk's own state for its observability endpoint (`--listen-observability`):
//! `/healthz` (alive), `/readyz` (connected to at least one kas) and `/metrics`
//! (OpenMetrics text, prometheus-client). Plain atomics, updated where the state changes.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
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

/// Reads the atomics at scrape time (no second copy of the values).
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let g = |v: &AtomicU64| i64::try_from(v.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let gauges = [
            (
                "agentk_sessions_connected",
                "Sessions (connections to a kas) established",
                &s.sessions_connected,
            ),
            (
                "agentk_tunnels_idle",
                "Idle tunnels waiting for a request",
                &s.tunnels_idle,
            ),
            (
                "agentk_tunnels_open",
                "Tunnels open (idle or busy)",
                &s.tunnels_open,
            ),
            (
                "agentk_config_version",
                "Version of the configuration applied last",
                &s.config_version,
            ),
        ];
        for (name, help, v) in gauges {
            ConstGauge::new(g(v)).encode(enc.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        // The encoder adds `_total` to counter samples.
        let counters = [
            (
                "agentk_exchanges",
                "Requests served through tunnels",
                &s.exchanges,
            ),
            (
                "agentk_exchanges_failed",
                "Requests that ended their tunnel (cancelled, failed or upgraded)",
                &s.exchanges_failed,
            ),
            (
                "agentk_config_applied",
                "Configurations applied",
                &s.config_applied,
            ),
            (
                "agentk_reconnects",
                "Sessions that ended and were dialed again",
                &s.reconnects,
            ),
        ];
        for (name, help, v) in counters {
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(enc.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

impl Stats {
    /// The OpenMetrics text exposition.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector(self.clone())));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
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
                        if req.uri().path() == "/metrics" {
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                            );
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_openmetrics_text() {
        let stats = Arc::new(Stats::default());
        stats.exchanges.fetch_add(3, Ordering::Relaxed);
        stats.tunnels_idle.fetch_add(2, Ordering::Relaxed);
        let text = stats.render();
        assert!(text.contains("# TYPE agentk_exchanges counter\n"), "{text}");
        assert!(text.contains("\nagentk_exchanges_total 3\n"), "{text}");
        assert!(text.contains("\nagentk_tunnels_idle 2\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
