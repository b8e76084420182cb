//! kas, the agent server: wires the control plane, the agent listener, the
//! Kubernetes API proxy, the admin API and the observability endpoints together.
//!
//! [`Kas::start`] binds every listener (so a bad address fails before anything
//! serves), then serves until [`Kas::shutdown`]. It holds no request logic itself:
//! that lives in `kas-k8s-proxy`, `kas-tunnel` and `kas-controlplane`.

mod admin_api;
mod agent_api;
mod agents_page;
pub mod application_api;
pub mod audit;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod tls;

use crate::config::{Config, ProxyTls};
use kas_controlplane::{Cached, ControlPlane, PostgresControlPlane, SqliteControlPlane};
use kas_k8s_proxy::{K8sProxy, ProxyOptions};
use kas_proto::v1::agent_server::AgentServer;
use kas_router::{GatewayService, PrivateAuth, RedisOptions, RedisRegistry, Router};
use kas_tunnel::TunnelRegistry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    router: Arc<Router>,
    shutdown: watch::Sender<bool>,
    /// The listeners; each task returns its listener's name.
    tasks: JoinSet<&'static str>,
    /// The audit and integration log writers: dropped last, after the requests that
    /// write to them have ended, so their final records reach the files.
    flush: Vec<kas_telemetry::batch::Flush>,
}

fn admin_token(data_dir: &Path) -> Result<[u8; 32], StartError> {
    let path = data_dir.join("admin-token");
    let err = |source| StartError::DataDir {
        path: path.clone(),
        source,
    };
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = kas_controlplane::new_token(kas_controlplane::TokenKind::Admin);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            use std::io::Write;
            let mut f = opts.open(&path).map_err(err)?;
            f.write_all(format!("{}\n", t.expose()).as_bytes())
                .map_err(err)?;
            t.expose().to_string()
        }
    };
    Ok(kas_controlplane::hash_token(&token))
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { name, addr, source })
}

fn host_list(addr: SocketAddr, url: Option<&str>) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !addr.ip().is_unspecified() {
        hosts.push(addr.ip().to_string());
    }
    if let Some(h) = url
        .and_then(|u| u.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(str::to_string))
    {
        hosts.push(h.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.is_empty() {
            hosts.push(h);
        }
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

pub use kas_router::{version_skew, VERSION};

/// The bearer token of an `Authorization` header value (scheme case-insensitive).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Creates the data dir (0700) or tightens an existing one's permissions: it holds the
/// control plane, the admin token and generated keys.
fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 unless it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map(drop)
}

/// Makes every file kas keeps in the data dir readable by its owner only (SQLite
/// creates its files with the process umask).
fn restrict_data_files(dir: &Path) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let entries = std::fs::read_dir(dir).map_err(|source| StartError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| StartError::DataDir { path, source })?;
            }
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (15,000 agents need as many
/// descriptors), and warns when the listeners' caps exceed what is left.
fn raise_file_limit(limits: &config::ListenerLimits) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            let wanted = limits.total() as u64;
            if n < wanted {
                tracing::warn!(
                    open_files = n,
                    connection_caps = wanted,
                    "the open-file limit is below the listeners' connection caps; connections beyond it wait until others close (raise `ulimit -n` or lower connections.*.max)"
                );
            } else {
                tracing::debug!(open_files = n, "open-file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

async fn open_control_plane(config: &Config) -> Result<Arc<dyn ControlPlane>, StartError> {
    Ok(match &config.controlplane_url {
        Some(url) => {
            let url = url.clone();
            // Connecting and migrating block; keep them off the async workers.
            let pg = tokio::task::spawn_blocking(move || PostgresControlPlane::connect(&url))
                .await
                .map_err(|e| kas_controlplane::Error::Storage(Box::new(e)))??;
            Arc::new(Cached::new(pg))
        }
        None => {
            let path = config.data_dir.join("controlplane.sqlite");
            // SQLite gives its -wal and -shm files the database file's permissions.
            create_private_file(&path).map_err(|source| StartError::DataDir {
                path: path.clone(),
                source,
            })?;
            let cp = Arc::new(Cached::new(SqliteControlPlane::open(&path)?));
            restrict_data_files(&config.data_dir)?;
            cp
        }
    })
}

/// The proxy's TLS settings and the CA to hand to clients (PEM text and file).
type ProxyTlsSetup = (Option<Arc<rustls::ServerConfig>>, Option<(String, PathBuf)>);

fn proxy_tls(config: &Config, proxy_addr: SocketAddr) -> Result<ProxyTlsSetup, StartError> {
    Ok(match &config.k8s_proxy_tls {
        ProxyTls::Plaintext => (None, None),
        ProxyTls::Files(f) => {
            let pem = tls::load_pem(&f.certificate_file, &f.key_file)?;
            let ca = match &f.ca_file {
                Some(p) => Some((tls::read_pem_text(p)?, p.clone())),
                None => None,
            };
            (Some(tls::server_config(&pem)?), ca)
        }
        ProxyTls::Generated => {
            let g = tls::generated_proxy_tls(
                &config.data_dir,
                &host_list(proxy_addr, config.k8s_proxy_url.as_deref()),
            )?;
            restrict_data_files(&config.data_dir)?;
            (
                Some(tls::server_config(&g.serving)?),
                Some((g.ca_pem, g.ca_file)),
            )
        }
    })
}

/// The proxy URL handed to jobs when none is configured.
fn default_proxy_url(tls: bool, addr: SocketAddr) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    format!("{scheme}://{host}:{}/k8s-proxy/", addr.port())
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
}

/// What `Kas::start` spawns listeners with.
struct Spawner {
    tasks: JoinSet<&'static str>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<metrics::Metrics>,
}

impl Spawner {
    /// Serves `svc` on `listener` until shutdown; the task returns the listener's name.
    #[allow(clippy::too_many_arguments)]
    fn spawn<S: listener::HttpService>(
        &mut self,
        name: &'static str,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        svc: S,
        limits: &listener::Limits,
        protocol: listener::Protocol,
        conn_control: bool,
    ) {
        let stats = self.metrics.listener(name);
        let l = listener::Listener {
            name,
            listener,
            tls,
            svc,
            limits: limits.clone(),
            protocol,
            stats,
            conn_control,
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            listener::serve(l, shutdown, GRACE).await;
            name
        });
    }
}

impl Kas {
    /// Opens the data dir and control plane, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Kas, StartError> {
        prepare_data_dir(&config.data_dir)?;
        raise_file_limit(&config.limits);
        let admin_hash = admin_token(&config.data_dir)?;
        let cp = open_control_plane(&config).await?;
        let bound = Bound::bind(&config).await?;
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let private_addr = bound
            .private
            .as_ref()
            .map(|l| local(l, config.listen_private));
        let proxy_addr = local(&bound.proxy, config.listen_k8s_proxy);
        let (proxy_tls, ca) = proxy_tls(&config, proxy_addr)?;
        let k8s_proxy_url = config
            .k8s_proxy_url
            .clone()
            .unwrap_or_else(|| default_proxy_url(proxy_tls.is_some(), proxy_addr));
        let mut endpoints = Endpoints {
            agent: local(&bound.agent, config.listen_agent),
            agent_tls: config.agent_tls.is_some(),
            api: local(&bound.api, config.listen_api),
            k8s_proxy: proxy_addr,
            observability: local(&bound.observability, config.listen_observability),
            private: private_addr,
            kas_id: None,
            k8s_proxy_url: k8s_proxy_url.clone(),
            k8s_proxy_ca_file: ca.as_ref().map(|(_, f)| f.clone()),
            admin_token_file: config.data_dir.join("admin-token"),
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let registry = TunnelRegistry::new();
        let metrics = Arc::new(metrics::Metrics::new());
        let (audit, audit_flush) = audit::AuditLog::start(config.audit.clone());
        let audit = Arc::new(audit);
        let mut flush: Vec<kas_telemetry::batch::Flush> = audit_flush.into_iter().collect();
        let mut spawner = Spawner {
            tasks: JoinSet::new(),
            shutdown: shutdown_rx.clone(),
            metrics: metrics.clone(),
        };

        let router = match (&config.shared, bound.private, private_addr) {
            (Some(sh), Some(private_l), Some(addr)) => {
                let (router, kas_id) =
                    start_shared(&config, sh, private_l, addr, &registry, &mut spawner).await?;
                endpoints.kas_id = Some(kas_id);
                router
            }
            _ => Router::local(registry.clone()),
        };

        spawn_agent_listener(&config, bound.agent, &cp, &router, &mut spawner)?;

        // Kubernetes API proxy.
        let proxy = K8sProxy::new(
            cp.clone(),
            router.clone(),
            ProxyOptions {
                agent_wait: config.agent_wait_timeout,
                observer: Some(metrics.clone()),
                audit: Some(audit.clone()),
            },
        );
        let svc = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        spawner.spawn(
            "k8s_proxy",
            bound.proxy,
            proxy_tls.map(tokio_rustls::TlsAcceptor::from),
            svc,
            &config.limits.k8s_proxy,
            listener::Protocol::Http,
            false,
        );

        // Admin API (and the application API and agents page on the same listener).
        let state = Arc::new(admin_api::AdminState {
            cp: cp.clone(),
            router: router.clone(),
            audit: audit.clone(),
            admin_token_hash: admin_hash,
            k8s_proxy_url,
            k8s_proxy_ca_pem: ca.map(|(pem, _)| pem),
            ci_access_limits: config.agent.ci_access_limits,
        });
        let page = Arc::new(agents_page::PageState::new(
            cp.clone(),
            router.clone(),
            admin_hash,
        ));
        let mut api_router = admin_api::router(state).merge(
            axum::Router::new()
                .route("/ui/agents", axum::routing::get(agents_page::page))
                .with_state(page),
        );
        if let Some(app) = &config.application {
            let (log, log_flush) =
                application_api::IntegrationLog::new(app.integration_log_file.clone());
            flush.extend(log_flush);
            let app_state = Arc::new(application_api::AppState {
                cp: cp.clone(),
                router: router.clone(),
                decoding: jsonwebtoken::DecodingKey::from_secret(&app.secret),
                validation: application_api::validation(),
                agent_wait: config.agent_wait_timeout,
                log,
            });
            api_router = api_router.merge(application_api::router(app_state));
        }
        spawner.spawn(
            "api",
            bound.api,
            None,
            hyper_util::service::TowerToHyperService::new(api_router),
            &config.limits.api,
            listener::Protocol::Http,
            true,
        );

        // Observability.
        let obs = hyper_util::service::TowerToHyperService::new(observability_router(
            cp.clone(),
            router.clone(),
            metrics.clone(),
        ));
        spawner.spawn(
            "observability",
            bound.observability,
            None,
            obs,
            &config.limits.observability,
            listener::Protocol::Http,
            false,
        );

        Ok(Kas {
            endpoints,
            router,
            shutdown,
            tasks: spawner.tasks,
            flush,
        })
    }

    /// Stops accepting, tells agents to reconnect, lets in-flight requests finish
    /// within the grace period, and returns when everything has stopped.
    pub async fn shutdown(mut self) {
        // Leave the shared registry first so other replicas stop routing here.
        self.router.shutdown().await;
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

/// The shared registry, the private API listener and the router over them.
async fn start_shared(
    config: &Config,
    sh: &config::SharedConfig,
    private_l: TcpListener,
    addr: SocketAddr,
    registry: &Arc<TunnelRegistry>,
    spawner: &mut Spawner,
) -> Result<(Arc<Router>, String), StartError> {
    let kas_id = format!("kas-{:08x}", rand::random::<u32>());
    let url = sh
        .private_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
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
    let gateway = kas_proto::v1::gateway_server::GatewayServer::new(GatewayService::new(
        registry.clone(),
        spawner.shutdown.clone(),
    ))
    .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
    .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
    let verifier = auth.clone();
    let app = tonic::service::Routes::new(gateway)
        .into_axum_router()
        .layer(axum::middleware::from_fn(move |req, next| {
            private_auth(verifier.clone(), req, next)
        }));
    spawner.spawn(
        "private",
        private_l,
        None,
        hyper_util::service::TowerToHyperService::new(app),
        &config.limits.private,
        grpc_protocol(&config.agent),
        false,
    );
    let router = Router::shared(registry.clone(), redis, &kas_id, &url, auth);
    Ok((router, kas_id))
}

fn grpc_protocol(agent: &config::AgentSettings) -> listener::Protocol {
    listener::Protocol::Grpc {
        ping_interval: agent.keepalive_interval,
        ping_timeout: agent.keepalive_timeout,
    }
}

/// The agent listener: gRPC over HTTP/2 (TLS when configured), one connection per
/// agent replica, each with its [`listener::ConnControl`] for the agent service.
fn spawn_agent_listener(
    config: &Config,
    agent_l: TcpListener,
    cp: &Arc<dyn ControlPlane>,
    router: &Arc<Router>,
    spawner: &mut Spawner,
) -> Result<(), StartError> {
    let agent_svc = AgentServer::new(agent_api::AgentService::new(
        cp.clone(),
        router.clone(),
        spawner.metrics.clone(),
        spawner.shutdown.clone(),
        agent_api::AgentServiceOptions {
            handshake_timeout: config.agent.handshake_timeout,
            streams_per_token_per_minute: config.agent.connections_per_token_per_minute,
        },
    ))
    .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
    .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
    let tls = match &config.agent_tls {
        Some(t) => {
            let pem = tls::load_pem(&t.certificate_file, &t.key_file)?;
            Some(tokio_rustls::TlsAcceptor::from(tls::grpc_server_config(
                &pem,
            )?))
        }
        None => None,
    };
    let app = tonic::service::Routes::new(agent_svc).into_axum_router();
    spawner.spawn(
        "agent",
        agent_l,
        tls,
        hyper_util::service::TowerToHyperService::new(app),
        &config.limits.agent,
        grpc_protocol(&config.agent),
        true,
    );
    Ok(())
}

/// Lets only other kas replicas (a valid private API JWT) through; 401 otherwise.
async fn private_auth(
    auth: Arc<PrivateAuth>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.verify(header) {
        Ok(_) => next.run(req).await,
        Err(reason) => {
            tracing::warn!(%reason, "private API: refused a request without a valid token");
            (
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthorized: this API is for kas replicas only\n",
            )
                .into_response()
        }
    }
}

fn observability_router(
    cp: Arc<dyn ControlPlane>,
    router: Arc<Router>,
    metrics: Arc<metrics::Metrics>,
) -> axum::Router {
    use axum::routing::get;
    let r = router.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let (m, r) = (metrics.clone(), r.clone());
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(&r),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let (cp, router) = (cp.clone(), router.clone());
                async move {
                    if !router.ready().await {
                        tracing::warn!("not ready: shared agent registry (Redis) unusable");
                        return (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "shared agent registry unavailable\n",
                        );
                    }
                    match cp.list_groups().await {
                        Ok(_) => (axum::http::StatusCode::OK, "ready\n"),
                        Err(e) => {
                            tracing::warn!(error = %e, "not ready: control plane unusable");
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "control plane unavailable\n",
                            )
                        }
                    }
                }
            }),
        )
}
