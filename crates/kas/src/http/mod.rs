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
}

/// The API listener's routes: the admin API, the agents page and (when configured) the
/// application API. Returns the integration log's writer with them (keep it until
/// shutdown: dropping it writes the lines still queued).
pub fn api_router(
    parts: ApiParts,
    config: &Config,
) -> (axum::Router, Option<kas_telemetry::batch::Flush>) {
    let state = Arc::new(admin::AdminState {
        cp: parts.cp.clone(),
        router: parts.router.clone(),
        audit: parts.audit,
        admin_token_hash: parts.admin_token_hash,
        k8s_proxy_url: parts.k8s_proxy_url,
        k8s_proxy_ca_pem: parts.k8s_proxy_ca_pem,
        ci_access_limits: config.agent.ci_access_limits,
    });
    let page = Arc::new(agents_page::PageState::new(
        parts.cp.clone(),
        parts.router.clone(),
        parts.admin_token_hash,
    ));
    let api = admin::router(state).merge(
        axum::Router::new()
            .route("/ui/agents", axum::routing::get(agents_page::page))
            .with_state(page),
    );
    let Some(app) = &config.application else {
        return (api, None);
    };
    let (log, flush) = application::IntegrationLog::new(app.integration_log_file.clone());
    let app_state = Arc::new(application::AppState {
        cp: parts.cp,
        router: parts.router,
        decoding: jsonwebtoken::DecodingKey::from_secret(&app.secret),
        validation: application::validation(),
        agent_wait: config.agent_wait_timeout,
        log,
    });
    (api.merge(application::router(app_state)), flush)
}
