//! Prometheus metrics of kas, served as text on the observability listener
//! (`/metrics`). Counters are updated where things happen; the connection gauges are
//! read from the tunnel registry at scrape time, so they cannot drift.

use crate::listeners::{CloseReason, ListenerStats};
use kas_api::error::Failure;
use kas_k8s_proxy::{Observed, ProxyObserver};
use kas_router::AgentRouter;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

// Label values the request path has at hand, with nothing to allocate per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    code: u16,
    access_as: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

/// kas's metrics; see the module docs.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    failures: Family<FailureLabels, Counter>,
    routing_timeouts: Counter,
    control_plane_errors: Counter,
    pub config_pushes: Counter,
    redis_errors: Counter,
    redis_errors_seen: AtomicU64,
    forwarded: Counter,
    forwarded_seen: AtomicU64,
    forward_streams: Counter,
    forward_streams_seen: AtomicU64,
    forward_streams_idle: Gauge,
    agents: Gauge,
    replicas: Gauge,
    tunnels_idle: Gauge,
    tunnels_busy: Gauge,
    /// Agent streams refused by the per-token rate limit.
    pub agent_rate_limited: Counter,
    listeners: Listeners,
}

/// Every listener's counts, by name.
type Listeners = Arc<Mutex<Vec<(&'static str, Arc<ListenerStats>)>>>;

/// A listener counter: metric name, help, and how to read it.
type ListenerCounter = (
    &'static str,
    &'static str,
    fn(&crate::listeners::ListenerCounts) -> u64,
);

/// Connection counts of every listener, read at scrape time.
#[derive(Debug, Default)]
struct ListenersCollector {
    listeners: Listeners,
}

impl Collector for ListenersCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let list: Vec<_> = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, s)| (*n, s.counts()))
            .collect();
        let mut m = enc.encode_descriptor(
            "kas_listener_connections",
            "Connections open on each listener",
            None,
            MetricType::Gauge,
        )?;
        for (name, c) in &list {
            ConstGauge::new(c.open).encode(m.encode_family(&[("listener", *name)])?)?;
        }
        let counters: [ListenerCounter; 3] = [
            ("kas_listener_connections_accepted", "Connections accepted on each listener", |c| c.accepted),
            ("kas_listener_accept_errors", "Failed accepts (such as running out of file descriptors); the listener backs off and serves on", |c| c.accept_errors),
            ("kas_listener_connections_refused", "Connections closed on arrival because the listener was at its connection limit", |c| c.refused),
        ];
        for (metric, help, value) in counters {
            let mut m = enc.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (name, c) in &list {
                ConstCounter::new(value(c)).encode(m.encode_family(&[("listener", *name)])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "kas_listener_connections_closed",
            "Connections kas closed, by listener and reason",
            None,
            MetricType::Counter,
        )?;
        for (name, c) in &list {
            for (i, r) in CloseReason::ALL.iter().enumerate() {
                ConstCounter::new(c.closed[i])
                    .encode(m.encode_family(&[("listener", *name), ("reason", r.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// The heap's figures, read at scrape time (absent without jemalloc).
#[derive(Debug)]
struct HeapCollector;

impl Collector for HeapCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(h) = crate::heap::stats() else {
            return Ok(());
        };
        let gauges = [
            ("kas_heap_allocated_bytes", "Bytes in live heap allocations", h.allocated),
            ("kas_heap_resident_bytes", "Bytes of memory the heap allocator holds (live allocations, its metadata, freed pages not yet returned)", h.resident),
        ];
        for (name, help, v) in gauges {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            failures: Family::default(),
            routing_timeouts: Counter::default(),
            control_plane_errors: Counter::default(),
            config_pushes: Counter::default(),
            redis_errors: Counter::default(),
            redis_errors_seen: AtomicU64::new(0),
            forwarded: Counter::default(),
            forwarded_seen: AtomicU64::new(0),
            forward_streams: Counter::default(),
            forward_streams_seen: AtomicU64::new(0),
            forward_streams_idle: Gauge::default(),
            agents: Gauge::default(),
            replicas: Gauge::default(),
            tunnels_idle: Gauge::default(),
            tunnels_busy: Gauge::default(),
            agent_rate_limited: Counter::default(),
            listeners: Arc::default(),
            registry: Mutex::new(Registry::default()),
        };
        r.register_collector(Box::new(HeapCollector));
        r.register_collector(Box::new(ListenersCollector {
            listeners: m.listeners.clone(),
        }));
        m.register_proxy(&mut r);
        m.register_routing(&mut r);
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    /// The proxy's and the agent listener's series.
    fn register_proxy(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "kas_agent_connections_rate_limited",
            "Agent streams refused because their token was over its per-minute connection limit",
            m.agent_rate_limited.clone(),
        );
        r.register(
            "kas_k8s_proxy_requests",
            "Requests through the Kubernetes API proxy, by response code and access_as mode",
            m.requests.clone(),
        );
        r.register(
            "kas_k8s_proxy_request_duration_seconds",
            "Time from a proxy request's arrival to its response head",
            m.duration.clone(),
        );
        r.register(
            "kas_k8s_proxy_failures",
            "Proxy requests that got no response from an agent, by reason",
            m.failures.clone(),
        );
        r.register(
            "kas_routing_timeouts",
            "Requests that waited for an agent that did not connect (or had no free tunnel) in time",
            m.routing_timeouts.clone(),
        );
        r.register(
            "kas_control_plane_errors",
            "Control plane lookups that failed on the request path",
            m.control_plane_errors.clone(),
        );
        r.register(
            "kas_config_pushes",
            "Agent configurations sent to connected agent replicas",
            m.config_pushes.clone(),
        );
    }

    /// The registry's, the tunnels' and forwarding's series.
    fn register_routing(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "kas_redis_errors",
            "Failed operations on the shared agent registry",
            m.redis_errors.clone(),
        );
        r.register(
            "kas_forwarded_exchanges",
            "Requests this kas forwarded to the kas holding the agent's connection",
            m.forwarded.clone(),
        );
        r.register(
            "kas_forward_streams_opened",
            "Streams opened to other kas replicas for forwarded requests (each carries many)",
            m.forward_streams.clone(),
        );
        r.register(
            "kas_forward_streams_idle",
            "Streams to other kas replicas kept open for the next forwarded request",
            m.forward_streams_idle.clone(),
        );
        r.register(
            "kas_agents_connected",
            "Agents with at least one replica connected to this kas",
            m.agents.clone(),
        );
        r.register(
            "kas_agent_replicas_connected",
            "Agent replicas connected to this kas",
            m.replicas.clone(),
        );
        r.register(
            "kas_tunnels_idle",
            "Idle tunnels held by this kas",
            m.tunnels_idle.clone(),
        );
        r.register(
            "kas_tunnels_busy",
            "Tunnels carrying an exchange",
            m.tunnels_busy.clone(),
        );
    }

    /// The counts of a listener, registered under its name.
    pub fn listener(&self, name: &'static str) -> Arc<ListenerStats> {
        let stats = Arc::new(ListenerStats::default());
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, stats.clone()));
        stats
    }

    /// The text exposition, with the connection gauges read now.
    pub fn render(&self, router: &AgentRouter) -> String {
        let snapshot = router.registry().snapshot();
        self.agents.set(snapshot.len() as i64);
        self.replicas
            .set(snapshot.iter().map(|a| a.replicas.len()).sum::<usize>() as i64);
        self.tunnels_idle
            .set(snapshot.iter().map(|a| a.idle_tunnels).sum::<usize>() as i64);
        self.tunnels_busy
            .set(snapshot.iter().map(|a| a.busy_tunnels).sum::<usize>() as i64);
        catch_up(
            &self.redis_errors,
            &self.redis_errors_seen,
            router.registry_errors().unwrap_or(0),
        );
        if let Some(f) = router.forward_stats() {
            catch_up(&self.forwarded, &self.forwarded_seen, f.exchanges);
            catch_up(
                &self.forward_streams,
                &self.forward_streams_seen,
                f.streams_opened,
            );
            self.forward_streams_idle.set(f.idle_streams as i64);
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Advances `counter` to `total`, a count kept elsewhere (`seen`: what it last saw).
fn catch_up(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.swap(total, Ordering::Relaxed);
    counter.inc_by(total.saturating_sub(before));
}

impl ProxyObserver for Metrics {
    fn request(&self, status: u16, observed: &Observed, head_time: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                code: status,
                access_as: observed.access_as.unwrap_or("none"),
            })
            .inc();
        self.duration.observe(head_time.as_secs_f64());
        if let Some(f) = observed.failure {
            self.failures
                .get_or_create(&FailureLabels { reason: f.as_str() })
                .inc();
            if f.is_routing_timeout() {
                self.routing_timeouts.inc();
            }
            if f == Failure::ControlPlane {
                self.control_plane_errors.inc();
            }
        }
    }
}
