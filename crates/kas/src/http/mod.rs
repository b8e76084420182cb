//! kas's HTTP surfaces (axum routers): the API listener's admin API ([`admin`]),
//! application API ([`application`]) and agents page ([`agents_page`]); the
//! observability listener ([`observability`]); and the authentication in front of the
//! private kas-to-kas API ([`private`]).

pub mod admin;
pub mod agents_page;
pub mod application;
pub mod observability;
pub mod private;

use crate::audit::AuditLog;
use crate::config::Config;
use kas_controlplane::ControlPlane;
use kas_router::AgentRouter;
use std::sync::Arc;

/// What the API listener's routes share.
pub struct ApiParts {
    pub cp: Arc<dyn ControlPlane>,
    pub router: Arc<AgentRouter>,
    pub audit: Arc<AuditLog>,
    pub admin_token_hash: [u8; 32],
    pub k8s_proxy_url: String,
    pub k8s_proxy_ca_pem: Option<String>,
    /// EKS clusters (None: off).
    pub eks: Option<Arc<crate::cluster::eks::Eks>>,
}

/// The API listener's routes: the admin API, the agents page and (when configured) the
/// application API; and the managed applications, which kas runs in the background
/// through the application API in process. Returns the integration log's writer with
/// them (keep it until shutdown: dropping it writes the lines still queued).
pub fn api_router(
    parts: ApiParts,
    config: &Config,
) -> (
    axum::Router,
    Arc<crate::cluster::apps::Apps>,
    Option<kas_telemetry::batch::Flush>,
) {
    let app_config = config.application.as_ref();
    let (log, flush) =
        application::IntegrationLog::new(app_config.and_then(|a| a.integration_log_file.clone()));
    let app_state = |secret: &[u8]| {
        Arc::new(application::AppState {
            cp: parts.cp.clone(),
            router: parts.router.clone(),
            decoding: jsonwebtoken::DecodingKey::from_secret(secret),
            validation: application::validation(),
            agent_wait: config.agent_wait_timeout,
            log: log.clone(),
        })
    };
    // kas's own calls sign with a secret that never leaves this process.
    let internal_secret: [u8; 32] = rand::random();
    let clusters = crate::cluster::Clusters::new(
        application::router(app_state(&internal_secret)),
        &internal_secret,
    );
    let apps = crate::cluster::apps::Apps::new(parts.cp.clone(), clusters.clone(), log.clone());
    let state = Arc::new(admin::AdminState {
        cp: parts.cp.clone(),
        router: parts.router.clone(),
        audit: parts.audit,
        admin_token_hash: parts.admin_token_hash,
        k8s_proxy_url: parts.k8s_proxy_url,
        k8s_proxy_ca_pem: parts.k8s_proxy_ca_pem,
        ci_access_limits: config.agent.ci_access_limits,
        clusters,
        apps: apps.clone(),
        eks: parts.eks,
    });
    let page = Arc::new(agents_page::PageState::new(
        parts.cp.clone(),
        parts.router.clone(),
        parts.admin_token_hash,
    ));
    let mut api = admin::router(state).merge(
        axum::Router::new()
            .route("/ui/agents", axum::routing::get(agents_page::page))
            .with_state(page),
    );
    if let Some(app) = app_config {
        api = api.merge(application::router(app_state(&app.secret)));
    }
    (api, apps, flush)
}
