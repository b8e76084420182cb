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
pub mod metrics;
mod serve;
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

/// How long in-flight requests may take to finish after shutdown begins.
const GRACE: Duration = Duration::from_secs(10);

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
    PrivateSecret(#[from] kas_router::jwt::SecretError),
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
    tasks: JoinSet<()>,
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

impl Kas {
    /// Opens the data dir and control plane, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Kas, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let admin_hash = admin_token(&config.data_dir)?;
        let cp: Arc<dyn ControlPlane> = match &config.controlplane_url {
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
                Arc::new(Cached::new(SqliteControlPlane::open(&path)?))
            }
        };

        let agent_l = bind("agent", config.listen_agent).await?;
        let api_l = bind("api", config.listen_api).await?;
        let proxy_l = bind("k8s_proxy", config.listen_k8s_proxy).await?;
        let obs_l = bind("observability", config.listen_observability).await?;
        let private_l = match &config.shared {
            Some(_) => Some(bind("private", config.listen_private).await?),
            None => None,
        };
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let private_addr = private_l.as_ref().map(|l| local(l, config.listen_private));
        let agent_addr = local(&agent_l, config.listen_agent);
        let proxy_addr = local(&proxy_l, config.listen_k8s_proxy);

        let (proxy_tls, ca) = match &config.k8s_proxy_tls {
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
                (
                    Some(tls::server_config(&g.serving)?),
                    Some((g.ca_pem, g.ca_file)),
                )
            }
        };
        let k8s_proxy_url = config.k8s_proxy_url.clone().unwrap_or_else(|| {
            let scheme = if proxy_tls.is_some() { "https" } else { "http" };
            let host = if proxy_addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                proxy_addr.ip().to_string()
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("{scheme}://{host}:{}/k8s-proxy/", proxy_addr.port())
        });
        let endpoints = Endpoints {
            agent: agent_addr,
            agent_tls: config.agent_tls.is_some(),
            api: local(&api_l, config.listen_api),
            k8s_proxy: proxy_addr,
            observability: local(&obs_l, config.listen_observability),
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
        let mut tasks = JoinSet::new();
        let mut endpoints = endpoints;

        // Routing: local only, or shared through Redis and the private API.
        let router = match (&config.shared, private_l, private_addr) {
            (Some(sh), Some(private_l), Some(addr)) => {
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
                let gateway = kas_proto::v1::gateway_server::GatewayServer::new(
                    GatewayService::new(registry.clone(), shutdown_rx.clone()),
                )
                .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
                let verifier = auth.clone();
                let app = tonic::service::Routes::new(gateway)
                    .into_axum_router()
                    .layer(axum::middleware::from_fn(move |req, next| {
                        private_auth(verifier.clone(), req, next)
                    }));
                tasks.spawn(serve::serve_http(
                    private_l,
                    None,
                    hyper_util::service::TowerToHyperService::new(app),
                    shutdown_rx.clone(),
                    GRACE,
                ));
                endpoints.kas_id = Some(kas_id.clone());
                Router::shared(registry.clone(), redis, &kas_id, &url, auth)
            }
            _ => Router::local(registry.clone()),
        };

        // Agent listener (gRPC).
        let agent_svc = AgentServer::new(agent_api::AgentService::new(
            cp.clone(),
            router.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ))
        .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
        let mut server = tonic::transport::Server::builder()
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(64 * 1024 * 1024)
            .max_frame_size(kas_proto::MAX_H2_FRAME)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_nodelay(true);
        if let Some(t) = &config.agent_tls {
            let pem = tls::load_pem(&t.certificate_file, &t.key_file)?;
            server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(pem.cert_pem, pem.key_pem),
            ))?;
        }
        let agent_routes = server.add_service(agent_svc);
        let (mut rx, mut rx2) = (shutdown_rx.clone(), shutdown_rx.clone());
        tasks.spawn(async move {
            // tonic applies its TCP settings only to listeners it binds itself.
            let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(agent_l), |s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            // tonic waits for every stream to end; agents' long-lived streams end when
            // they see the shutdown, and the grace period bounds the wait regardless.
            tokio::select! {
                r = agent_routes.serve_with_incoming_shutdown(incoming, stop) => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "agent listener failed");
                    }
                }
                _ = async { let _ = rx2.wait_for(|s| *s).await; tokio::time::sleep(GRACE).await } => {}
            }
        });

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
        let acceptor = proxy_tls.map(tokio_rustls::TlsAcceptor::from);
        tasks.spawn(serve::serve_http(
            proxy_l,
            acceptor,
            svc,
            shutdown_rx.clone(),
            GRACE,
        ));

        // Admin API.
        let state = Arc::new(admin_api::AdminState {
            cp: cp.clone(),
            router: router.clone(),
            audit_file: match &audit.target {
                audit::AuditTarget::File(p) => Some(p.clone()),
                audit::AuditTarget::Stdout => None,
            },
            admin_token_hash: admin_hash,
            k8s_proxy_url,
            k8s_proxy_ca_pem: ca.map(|(pem, _)| pem),
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
        let api = hyper_util::service::TowerToHyperService::new(api_router);
        tasks.spawn(serve::serve_http(
            api_l,
            None,
            api,
            shutdown_rx.clone(),
            GRACE,
        ));

        // Observability.
        let obs = hyper_util::service::TowerToHyperService::new(observability_router(
            cp.clone(),
            router.clone(),
            metrics.clone(),
        ));
        tasks.spawn(serve::serve_http(
            obs_l,
            None,
            obs,
            shutdown_rx.clone(),
            GRACE,
        ));

        Ok(Kas {
            endpoints,
            router,
            shutdown,
            tasks,
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

    /// Serves until one of the listener tasks ends (it should not) or shutdown.
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
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
