//! kas, the agent server: wires the control plane, the agent listener, the
//! Kubernetes API proxy, the admin API and the observability endpoints together.
//!
//! [`Kas::start`] prepares the data dir ([`setup`]), binds every listener (so a bad
//! address fails before anything serves), then serves until [`Kas::shutdown`]: each
//! listener through [`listeners::serve`] (limits, timeouts, graceful drain), with the
//! agent service ([`agents`]), the CI proxy (`kas-k8s-proxy`) or the HTTP APIs
//! ([`http`]) behind it. It holds no request logic itself: that lives in
//! `kas-k8s-proxy`, `kas-router`, `kas-tunnel` and `kas-controlplane`.

mod agents;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod heap;
pub mod http;
pub mod listeners;
pub mod metrics;
mod setup;

pub use kas_router::{version_skew, VERSION};

use crate::audit::AuditLog;
use crate::config::Config;
use crate::listeners::{tls, ConnRuntimes, HttpService, Limits, Protocol};
use crate::metrics::Metrics;
use kas_controlplane::ControlPlane;
use kas_k8s_proxy::{K8sProxy, ProxyOptions};
use kas_proto::v1::agent_server::AgentServer;
use kas_router::{AgentRouter, GatewayService, PrivateAuth, RedisOptions, RedisRegistry};
use kas_tunnel::TunnelRegistry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

/// How long in-flight requests may take to finish after shutdown begins.
const GRACE: Duration = Duration::from_secs(10);

/// A spawned task aborted when this handle is dropped.
pub(crate) type AbortOnDrop = AbortOnDropHandle<()>;

/// Why kas could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind the {name} listener on {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    ControlPlane(#[from] kas_controlplane::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("agent listener TLS: {0}")]
    AgentTls(#[from] tonic::transport::Error),
    #[error("shared agent registry: {0}")]
    Redis(#[from] kas_router::RedisError),
    #[error("private API: {0}")]
    PrivateSecret(#[from] kas_router::private::SecretError),
    #[error("cannot start the threads that serve connections: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Where a running kas listens, and what a user needs to reach it.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub agent: SocketAddr,
    pub agent_tls: bool,
    pub api: SocketAddr,
    pub k8s_proxy: SocketAddr,
    pub observability: SocketAddr,
    /// The private kas-to-kas API (only with a shared registry).
    pub private: Option<SocketAddr>,
    /// This kas's instance id in the shared registry.
    pub kas_id: Option<String>,
    /// The proxy URL handed to jobs.
    pub k8s_proxy_url: String,
    /// The CA that signs the proxy's certificate, when kas generated it.
    pub k8s_proxy_ca_file: Option<PathBuf>,
    pub admin_token_file: PathBuf,
}

/// A running kas. Dropping it does not stop it; call [`Kas::shutdown`].
pub struct Kas {
    pub endpoints: Endpoints,
    router: Arc<AgentRouter>,
    /// Managed application operations this kas follows.
    apps: Arc<cluster::apps::Apps>,
    /// Takes over operations other kas left (stopped first on shutdown).
    resume_apps: Option<AbortOnDrop>,
    /// EKS clusters this kas works on (None: `--eks` is off).
    eks: Option<Arc<cluster::eks::Eks>>,
    resume_eks: Option<AbortOnDrop>,
    shutdown: watch::Sender<bool>,
    /// The listeners; each task returns its listener's name.
    tasks: JoinSet<&'static str>,
    /// Where connections are served; stopped when kas is dropped.
    _runtimes: Arc<ConnRuntimes>,
    /// The audit and integration log writers: dropped last, after the requests that
    /// write to them have ended, so their final records reach the files.
    flush: Vec<kas_telemetry::batch::Flush>,
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { name, addr, source })
}

/// Every listener, bound.
struct Bound {
    agent: TcpListener,
    api: TcpListener,
    proxy: TcpListener,
    observability: TcpListener,
    private: Option<TcpListener>,
}

impl Bound {
    async fn bind(config: &Config) -> Result<Bound, StartError> {
        Ok(Bound {
            agent: bind("agent", config.listen_agent).await?,
            api: bind("api", config.listen_api).await?,
            proxy: bind("k8s_proxy", config.listen_k8s_proxy).await?,
            observability: bind("observability", config.listen_observability).await?,
            private: match &config.shared {
                Some(_) => Some(bind("private", config.listen_private).await?),
                None => None,
            },
        })
    }

    /// Where the listeners are (port 0 in the configuration resolved).
    fn endpoints(&self, config: &Config) -> Endpoints {
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        Endpoints {
            agent: local(&self.agent, config.listen_agent),
            agent_tls: config.agent_tls.is_some(),
            api: local(&self.api, config.listen_api),
            k8s_proxy: local(&self.proxy, config.listen_k8s_proxy),
            observability: local(&self.observability, config.listen_observability),
            private: self
                .private
                .as_ref()
                .map(|l| local(l, config.listen_private)),
            kas_id: None,
            k8s_proxy_url: String::new(),
            k8s_proxy_ca_file: None,
            admin_token_file: config.data_dir.join("admin-token"),
        }
    }
}

/// How a listener serves its connections.
struct Serving {
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    protocol: Protocol,
    /// Handlers get the connection's [`listeners::ConnControl`].
    conn_control: bool,
}

impl Serving {
    /// Plain HTTP/1.1 and HTTP/2, without TLS.
    fn http(limits: &Limits) -> Self {
        Serving {
            tls: None,
            limits: limits.clone(),
            protocol: Protocol::Http,
            conn_control: false,
        }
    }

    /// gRPC (HTTP/2 only, keepalive pings) for agents and other kas.
    fn grpc(limits: &Limits, agent: &config::AgentSettings) -> Self {
        Serving {
            tls: None,
            limits: limits.clone(),
            protocol: Protocol::Grpc {
                ping_interval: agent.keepalive_interval,
                ping_timeout: agent.keepalive_timeout,
            },
            conn_control: false,
        }
    }
}

/// What every listener is started with, and what they share.
struct Spawner {
    tasks: JoinSet<&'static str>,
    runtimes: Arc<ConnRuntimes>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    cp: Arc<dyn ControlPlane>,
    audit: Arc<AuditLog>,
}

impl Spawner {
    /// Serves `svc` on `listener` until shutdown; the task returns the listener's name.
    fn spawn<S: HttpService>(
        &mut self,
        name: &'static str,
        listener: TcpListener,
        svc: S,
        serving: Serving,
    ) {
        let l = listeners::Listener {
            name,
            listener,
            tls: serving.tls,
            svc,
            limits: serving.limits,
            protocol: serving.protocol,
            stats: self.metrics.listener(name),
            conn_control: serving.conn_control,
            runtimes: self.runtimes.clone(),
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            listeners::serve(l, shutdown, GRACE).await;
            name
        });
    }

    /// The shared registry, the private API listener and a router over them; returns
    /// this kas's instance id too.
    async fn shared(
        &mut self,
        config: &Config,
        sh: &config::SharedConfig,
        private: TcpListener,
        registry: &Arc<TunnelRegistry>,
    ) -> Result<(Arc<AgentRouter>, String), StartError> {
        let kas_id = format!("kas-{:08x}", rand::random::<u32>());
        let url = match &sh.private_url {
            Some(u) => u.clone(),
            None => format!(
                "http://{}",
                private.local_addr().map_err(|source| StartError::Bind {
                    name: "private",
                    addr: config.listen_private,
                    source,
                })?
            ),
        };
        let auth = Arc::new(PrivateAuth::new(&sh.secret, &kas_id)?);
        let redis = RedisRegistry::start(
            RedisOptions {
                url: sh.redis_url.clone(),
                key_prefix: sh.key_prefix.clone(),
                expiry: sh.expiry,
            },
            &kas_id,
        )
        .await?;
        let gateway = GatewayService::new(registry.clone(), self.shutdown.clone());
        let app = http::private::router(gateway, auth.clone());
        let svc = hyper_util::service::TowerToHyperService::new(app);
        self.spawn(
            "private",
            private,
            svc,
            Serving::grpc(&config.limits.private, &config.agent),
        );
        let router = AgentRouter::shared(registry.clone(), redis, &kas_id, &url, auth);
        Ok((router, kas_id))
    }

    /// The agent listener: gRPC over HTTP/2 (TLS when configured), one connection per
    /// agent replica, each with its [`listeners::ConnControl`] for the agent service.
    fn agent(
        &mut self,
        config: &Config,
        listener: TcpListener,
        router: &Arc<AgentRouter>,
    ) -> Result<(), StartError> {
        let service = agents::AgentService::new(
            self.cp.clone(),
            router.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
            agents::AgentServiceOptions {
                handshake_timeout: config.agent.handshake_timeout,
                streams_per_token_per_minute: config.agent.connections_per_token_per_minute,
            },
        );
        let svc = AgentServer::new(service)
            .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
        let mut serving = Serving::grpc(&config.limits.agent, &config.agent);
        serving.conn_control = true;
        if let Some(t) = &config.agent_tls {
            let pem = tls::load_pem(&t.certificate_file, &t.key_file)?;
            serving.tls = Some(tokio_rustls::TlsAcceptor::from(tls::grpc_server_config(
                &pem,
            )?));
        }
        let app = tonic::service::Routes::new(svc).into_axum_router();
        self.spawn(
            "agent",
            listener,
            hyper_util::service::TowerToHyperService::new(app),
            serving,
        );
        Ok(())
    }

    /// The Kubernetes API proxy listener.
    fn proxy(
        &mut self,
        config: &Config,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: &Arc<AgentRouter>,
    ) {
        let proxy = K8sProxy::new(
            self.cp.clone(),
            router.clone(),
            ProxyOptions {
                agent_wait: config.agent_wait_timeout,
                observer: Some(self.metrics.clone()),
                audit: Some(self.audit.clone()),
            },
        );
        let svc = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let mut serving = Serving::http(&config.limits.k8s_proxy);
        serving.tls = tls.map(tokio_rustls::TlsAcceptor::from);
        self.spawn("k8s_proxy", listener, svc, serving);
    }
}

impl Kas {
    /// Opens the data dir and control plane, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Kas, StartError> {
        setup::prepare_data_dir(&config.data_dir)?;
        setup::raise_file_limit(&config.limits);
        let admin_token_hash = setup::admin_token(&config.data_dir)?;
        let cp = setup::open_control_plane(&config).await?;
        let mut bound = Bound::bind(&config).await?;
        let mut endpoints = bound.endpoints(&config);
        let (proxy_tls, ca) = setup::proxy_tls(&config, endpoints.k8s_proxy)?;
        endpoints.k8s_proxy_url = config
            .k8s_proxy_url
            .clone()
            .unwrap_or_else(|| setup::default_proxy_url(proxy_tls.is_some(), endpoints.k8s_proxy));
        endpoints.k8s_proxy_ca_file = ca.as_ref().map(|(_, f)| f.clone());

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (audit, audit_flush) = AuditLog::start(config.audit.clone());
        let mut flush: Vec<_> = audit_flush.into_iter().collect();
        let runtimes =
            ConnRuntimes::start("kas-conn", config.worker_threads).map_err(StartError::Runtime)?;
        let mut spawner = Spawner {
            tasks: JoinSet::new(),
            runtimes: Arc::new(runtimes),
            shutdown: shutdown_rx,
            metrics: Arc::new(Metrics::new()),
            cp: cp.clone(),
            audit: Arc::new(audit),
        };
        let registry = TunnelRegistry::new();
        let router = match (&config.shared, bound.private.take()) {
            (Some(sh), Some(private)) => {
                let (router, kas_id) = spawner.shared(&config, sh, private, &registry).await?;
                endpoints.kas_id = Some(kas_id);
                router
            }
            _ => AgentRouter::local(registry),
        };
        spawner.agent(&config, bound.agent, &router)?;
        spawner.proxy(&config, bound.proxy, proxy_tls, &router);

        let eks = match &config.eks {
            Some(e) => {
                let aws = cluster::eks::aws::Aws::load(e.template.clone()).await;
                let scheme = if endpoints.agent_tls { "grpcs" } else { "grpc" };
                let opts = cluster::eks::EksOptions {
                    poll: e.poll,
                    agent_url: e
                        .agent_url
                        .clone()
                        .unwrap_or_else(|| format!("{scheme}://{}", endpoints.agent)),
                    agentk_image: e.agentk_image.clone(),
                };
                Some(cluster::eks::Eks::new(cp.clone(), aws, opts))
            }
            None => None,
        };
        let resume_eks = eks.as_ref().map(|e| e.resume_in_background());
        let parts = http::ApiParts {
            cp: cp.clone(),
            router: router.clone(),
            audit: spawner.audit.clone(),
            admin_token_hash,
            k8s_proxy_url: endpoints.k8s_proxy_url.clone(),
            k8s_proxy_ca_pem: ca.map(|(pem, _)| pem),
            eks: eks.clone(),
        };
        let (api, apps, log_flush) = http::api_router(parts, &config);
        let resume_apps = Some(apps.resume_in_background());
        flush.extend(log_flush);
        let mut serving = Serving::http(&config.limits.api);
        serving.conn_control = true;
        let api = hyper_util::service::TowerToHyperService::new(api);
        spawner.spawn("api", bound.api, api, serving);

        let obs = http::observability::router(cp, router.clone(), spawner.metrics.clone());
        let obs = hyper_util::service::TowerToHyperService::new(obs);
        let serving = Serving::http(&config.limits.observability);
        spawner.spawn("observability", bound.observability, obs, serving);

        Ok(Kas {
            endpoints,
            router,
            apps,
            resume_apps,
            eks,
            resume_eks,
            shutdown,
            tasks: spawner.tasks,
            _runtimes: spawner.runtimes,
            flush,
        })
    }

    /// Stops accepting, tells agents to reconnect, lets in-flight requests finish
    /// within the grace period, and returns when everything has stopped.
    pub async fn shutdown(mut self) {
        // Leave the shared registry first so other replicas stop routing here.
        self.router.shutdown().await;
        // Hand managed application operations over to the next kas at once.
        self.resume_apps = None;
        self.apps.release().await;
        // EKS work stops here; its leases run out and another kas (or the next
        // start) takes it over.
        self.resume_eks = None;
        if let Some(e) = &self.eks {
            e.stop();
        }
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        // Joins the writer threads after their last write (a few milliseconds at most).
        self.flush.clear();
    }

    /// Serves until shutdown. A listener never ends by itself: if one does (it
    /// panicked), this returns which, and kas must stop with an error.
    pub async fn wait(&mut self) -> ListenerEnded {
        match self.tasks.join_next().await {
            Some(Ok(name)) => ListenerEnded(format!("the {name} listener stopped unexpectedly")),
            Some(Err(e)) => ListenerEnded(format!("a listener failed: {e}")),
            None => ListenerEnded("no listener is running".into()),
        }
    }
}

/// Why kas stopped serving without being asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ListenerEnded(pub String);
