//! The admin API on kas's API listener (used by `kasctl`), authenticated by the admin
//! token. JSON in, JSON out; errors are `{"error": "..."}` with a fitting status.
//!
//! Every request that changes something (POST, PUT, DELETE) leaves an audit record
//! (`kind: admin`) in the audit trail: who (the admin token's id), what, on what, when,
//! and the outcome, successful or not.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use kas_api::admin::{self, paths};
use kas_api::audit::{AdminKind, AdminRecord, AuditEntry, AuditQuery};
use kas_api::error::Error;
use kas_api::{Agent, AgentToken, EnvironmentRecord, Group, Job, JobStatus, Project};
use kas_controlplane::{ControlPlane, Error as CpError, StartJob};
use kas_router::AgentRouter;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

mod cluster;
mod eks;

/// Shared state of the admin API.
pub struct AdminState {
    pub cp: Arc<dyn ControlPlane>,
    pub router: Arc<AgentRouter>,
    /// The audit trail: admin actions are recorded in it, and `kasctl audit` reads it.
    pub audit: Arc<crate::audit::AuditLog>,
    pub admin_token_hash: [u8; 32],
    pub k8s_proxy_url: String,
    pub k8s_proxy_ca_pem: Option<String>,
    /// Limits on `ci_access` entries of agent configurations (kas settings).
    pub ci_access_limits: kas_authz::CiAccessLimits,
    /// kas's own calls to agents' clusters (managed namespaces).
    pub clusters: crate::cluster::Clusters,
    /// Managed applications.
    pub apps: Arc<crate::cluster::apps::Apps>,
    /// EKS clusters (None: `--eks` is off).
    pub eks: Option<Arc<crate::cluster::eks::Eks>>,
}

/// An admin API failure: kas's one error type, answered as `{"error": ...}`.
pub struct ApiError(Error);

impl From<CpError> for ApiError {
    fn from(e: CpError) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body(false))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Who made an admin request: the admin token's id (the first bytes of its hash, so
/// records can name it without holding it) and the client's address.
#[derive(Debug, Clone)]
pub struct Actor {
    pub token_id: String,
    pub peer: Option<String>,
}

/// What an admin handler did, for its audit record (a response extension).
#[derive(Debug, Clone, Default)]
pub struct Audited {
    pub action: &'static str,
    /// What it acted on, e.g. `acme/agents:prod`.
    pub target: String,
    pub agent_id: Option<u64>,
    pub job_id: Option<u64>,
    pub project: Option<String>,
    /// More facts (never secrets).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Audited {
    fn new(action: &'static str, target: impl Into<String>) -> Self {
        Audited {
            action,
            target: target.into(),
            ..Default::default()
        }
    }
    fn detail(mut self, k: &str, v: impl Serialize) -> Self {
        self.details
            .insert(k.to_string(), serde_json::to_value(v).unwrap_or_default());
        self
    }
}

/// A JSON answer with its audit record.
type AuditedJson<T> = Result<(Extension<Audited>, Json<T>), ApiError>;

fn audited<T>(a: Audited, v: T) -> AuditedJson<T> {
    Ok((Extension(a), Json(v)))
}

/// The id an admin token goes by in audit records.
pub fn admin_token_id(hash: &[u8; 32]) -> String {
    format!("admin-token:{}", hex::encode(&hash[..4]))
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(kas_api::bearer_token)
        .ok_or_else(|| {
            ApiError(Error::unauthenticated(
                "missing admin token (Authorization: Bearer <token>)",
            ))
        })?;
    let h = kas_controlplane::hash_token(presented.trim());
    if bool::from(h.ct_eq(&state.admin_token_hash)) {
        Ok(())
    } else {
        Err(ApiError(Error::unauthenticated("invalid admin token")))
    }
}

/// The admin API router.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route(paths::GROUPS, get(list_groups).post(create_group))
        .route(paths::PROJECTS, get(list_projects).post(create_project))
        .route(
            paths::AGENTS,
            get(list_agents).post(create_agent).delete(delete_agent),
        )
        .route(
            paths::AGENT_TOKENS,
            get(list_agent_tokens).post(create_agent_token),
        )
        .route(paths::REVOKE_AGENT_TOKEN, post(revoke_agent_token))
        .route(
            paths::AGENT_CONFIG,
            get(get_agent_config).put(set_agent_config),
        )
        .route(
            paths::ENVIRONMENTS,
            get(list_environments).post(create_environment),
        )
        .route(paths::JOBS, get(list_jobs).post(start_job))
        .route("/jobs/:id/finish", post(finish_job))
        .route(paths::CONNECTED_AGENTS, get(connected_agents))
        .route(paths::EXPLAIN, get(explain))
        .route(paths::AUDIT, get(audit))
        .route(
            paths::CLUSTER_APPS,
            get(cluster::list_apps).post(cluster::start_app),
        )
        .route(paths::EKS_PREPARE, post(eks::prepare))
        .route(
            paths::EKS_CLUSTERS,
            get(eks::show).post(eks::create).delete(eks::delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_admin,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new()
        .nest(admin::PREFIX, api)
        .fallback(|| async { ApiError(Error::not_found("no such API endpoint")) })
}

async fn auth(
    State(state): State<Arc<AdminState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorized(&state, req.headers()) {
        Ok(()) => {
            let peer = req
                .extensions()
                .get::<Arc<crate::listeners::ConnControl>>()
                .map(|c| c.peer.to_string());
            req.extensions_mut().insert(Actor {
                token_id: admin_token_id(&state.admin_token_hash),
                peer,
            });
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Records every changing admin request (after authentication) in the audit trail.
async fn audit_admin(
    State(state): State<Arc<AdminState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let changes = matches!(
        *req.method(),
        http::Method::POST | http::Method::PUT | http::Method::DELETE | http::Method::PATCH
    );
    if !changes {
        return next.run(req).await;
    }
    let actor = req.extensions().get::<Actor>().cloned();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let done = resp
        .extensions()
        .get::<Audited>()
        .cloned()
        .unwrap_or_default();
    let code = resp.status().as_u16();
    let r = AdminRecord {
        time: kas_api::clock::unix_secs_f64(),
        kind: AdminKind::Admin,
        actor: actor.as_ref().map(|a| a.token_id.clone()),
        peer: actor.and_then(|a| a.peer),
        method,
        path,
        code,
        outcome: if code < 400 { "ok" } else { "failed" }.into(),
        action: (!done.action.is_empty()).then(|| done.action.to_string()),
        target: (!done.action.is_empty()).then_some(done.target),
        agent_id: done.agent_id,
        job_id: done.job_id,
        project: done.project,
        details: (!done.details.is_empty()).then_some(done.details),
    };
    state.audit.record_admin(&r);
    resp
}

async fn create_group(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::CreatePath>,
) -> AuditedJson<Group> {
    let g = s.cp.create_group(&r.path, r.id).await?;
    audited(Audited::new("group.create", &g.path).detail("id", g.id), g)
}

async fn list_groups(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<Group>> {
    Ok(Json(s.cp.list_groups().await?))
}

async fn create_project(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::CreatePath>,
) -> AuditedJson<Project> {
    let p = s.cp.create_project(&r.path, r.id).await?;
    let mut a = Audited::new("project.create", &p.path).detail("id", p.id);
    a.project = Some(p.path.clone());
    audited(a, p)
}

async fn list_projects(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<Project>> {
    Ok(Json(s.cp.list_projects().await?))
}

fn agent_audit(action: &'static str, agent: &Agent) -> Audited {
    let mut a = Audited::new(action, agent.context());
    a.agent_id = Some(agent.id);
    a.project = Some(agent.project_path.clone());
    a
}

async fn create_agent(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::AgentName>,
) -> AuditedJson<admin::CreatedAgent> {
    let (agent, token) = s.cp.create_agent(&r.project, &r.name).await?;
    audited(
        agent_audit("agent.create", &agent),
        admin::CreatedAgent {
            agent,
            token: token.expose().to_string(),
        },
    )
}

async fn delete_agent(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<admin::AgentName>,
) -> AuditedJson<Agent> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let deleted = s.cp.delete_agent(a.id).await?;
    audited(agent_audit("agent.delete", &deleted), deleted)
}

async fn create_agent_token(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::TokenRequest>,
) -> AuditedJson<admin::CreatedToken> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let (token, secret) = s.cp.create_agent_token(a.id, r.token.as_deref()).await?;
    audited(
        agent_audit("agent.token.create", &a)
            .detail("token", &token.name)
            .detail("token_id", token.id),
        admin::CreatedToken {
            token,
            secret: secret.expose().to_string(),
        },
    )
}

async fn list_agent_tokens(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<admin::AgentName>,
) -> ApiResult<Vec<AgentToken>> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    Ok(Json(s.cp.list_agent_tokens(a.id).await?))
}

async fn revoke_agent_token(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::TokenRequest>,
) -> AuditedJson<AgentToken> {
    let token = r.token.ok_or_else(|| {
        ApiError(Error::bad_request(
            "name the token to revoke (`token`: its name or id)",
        ))
    })?;
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let revoked = s.cp.revoke_agent_token(a.id, &token).await?;
    audited(
        agent_audit("agent.token.revoke", &a)
            .detail("token", &revoked.name)
            .detail("token_id", revoked.id),
        revoked,
    )
}

async fn list_agents(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<Agent>> {
    Ok(Json(s.cp.list_agents().await?))
}

async fn get_agent_config(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<admin::AgentName>,
) -> ApiResult<admin::StoredConfig> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let info =
        s.cp.agent_info(a.id)
            .await?
            .ok_or_else(|| ApiError(Error::not_found("agent not found")))?;
    Ok(Json(admin::StoredConfig {
        agent_id: a.id,
        version: info.config_version,
        config: info.config_yaml.clone(),
    }))
}

async fn set_agent_config(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::SetConfig>,
) -> AuditedJson<admin::ConfigSaved> {
    let context = format!("{}:{}", r.project, r.name);
    let stored =
        s.cp.set_agent_config(&r.project, &r.name, &r.config, &s.ci_access_limits)
            .await;
    let (version, warnings) = match stored {
        Ok(x) => x,
        Err(CpError::Config(c)) => {
            let problems: Vec<String> = c.problems.iter().map(|p| format!("  - {p}")).collect();
            return Err(ApiError(Error::bad_request(format!(
                "invalid agent configuration:\n{}",
                problems.join("\n")
            ))));
        }
        Err(e) => return Err(e.into()),
    };
    for w in &warnings {
        tracing::warn!(agent = %context, version, warning = %w, "agent configuration stored with a warning");
    }
    let mut a = Audited::new("agent.config.set", &context).detail("version", version);
    a.project = Some(r.project.clone());
    if let Ok(agent) = s.cp.get_agent(&r.project, &r.name).await {
        a.agent_id = Some(agent.id);
    }
    let warnings = warnings.iter().map(ToString::to_string).collect();
    audited(a, admin::ConfigSaved { version, warnings })
}

async fn create_environment(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::CreateEnvironment>,
) -> AuditedJson<EnvironmentRecord> {
    let e =
        s.cp.create_environment(&r.project, &r.name, r.tier.as_deref())
            .await?;
    let mut a = Audited::new(
        "environment.create",
        format!("{}:{}", e.project_path, e.name),
    )
    .detail("tier", &e.tier);
    a.project = Some(e.project_path.clone());
    audited(a, e)
}

async fn list_environments(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<admin::EnvironmentQuery>,
) -> ApiResult<Vec<EnvironmentRecord>> {
    Ok(Json(s.cp.list_environments(q.project.as_deref()).await?))
}

async fn start_job(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<admin::StartJob>,
) -> AuditedJson<admin::StartedJob> {
    let (job, token) =
        s.cp.start_job(&StartJob {
            project: r.project,
            environment: r.environment,
            username: r.user,
            pipeline_id: r.pipeline_id,
            protected_ref: r.protected,
        })
        .await?;
    let ctx =
        s.cp.authenticate_job(token.expose())
            .await?
            .ok_or_else(|| ApiError(Error::internal("the new job is not running")))?;
    let mut authorized = kas_k8s_proxy::authorized_agents(&ctx, &s.cp.all_agent_infos().await?);
    if let Err(e) = cluster::prepare_namespaces(&s, &ctx, &mut authorized).await {
        // The job never gets a kubeconfig: it ends here.
        if let Err(f) = s.cp.finish_job(job.id, JobStatus::Failed).await {
            tracing::error!(error = %f, job_id = job.id, "cannot end a job whose start failed");
        }
        return Err(e);
    }
    let contexts: Vec<String> = authorized
        .iter()
        .map(|(a, _)| kas_k8s_proxy::context_name(a))
        .collect();
    let kubeconfig = kas_k8s_proxy::job_kubeconfig(
        token.expose(),
        &authorized,
        &s.k8s_proxy_url,
        s.k8s_proxy_ca_pem.as_deref(),
    )
    .map_err(|e| ApiError(Error::internal(e.to_string())))?;
    let mut a = Audited::new("job.start", format!("job {}", job.id))
        .detail("user", &job.username)
        .detail("environment", &job.environment)
        .detail("pipeline_id", job.pipeline_id)
        .detail("contexts", &contexts);
    a.job_id = Some(job.id);
    a.project = Some(job.project_path.clone());
    audited(
        a,
        admin::StartedJob {
            job,
            token: token.expose().to_string(),
            kubeconfig,
            contexts,
        },
    )
}

async fn finish_job(
    State(s): State<Arc<AdminState>>,
    Path(id): Path<u64>,
    body: Option<Json<admin::FinishJob>>,
) -> AuditedJson<Job> {
    let status = body
        .and_then(|b| b.0.status)
        .unwrap_or_else(|| "success".into());
    let status = JobStatus::parse(&status)
        .filter(|s| *s != JobStatus::Running)
        .ok_or_else(|| {
            ApiError(Error::bad_request(format!(
                "status `{status}` is invalid: use success, failed or canceled"
            )))
        })?;
    let job = s.cp.finish_job(id, status).await?;
    let mut a =
        Audited::new("job.finish", format!("job {}", job.id)).detail("status", job.status.as_str());
    a.job_id = Some(job.id);
    a.project = Some(job.project_path.clone());
    audited(a, job)
}

async fn list_jobs(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<Job>> {
    Ok(Json(s.cp.list_jobs().await?))
}

async fn connected_agents(
    State(s): State<Arc<AdminState>>,
) -> ApiResult<Vec<admin::NamedConnectedAgent>> {
    let names: HashMap<u64, (String, String)> =
        s.cp.list_agents()
            .await?
            .into_iter()
            .map(|a| (a.id, (a.name, a.project_path)))
            .collect();
    Ok(Json(
        s.router
            .connected_agents()
            .await
            .into_iter()
            .map(|c| {
                let (name, config_project) = names.get(&c.agent_id).cloned().unwrap_or_default();
                admin::NamedConnectedAgent {
                    id: c.agent_id,
                    name,
                    config_project,
                    state: c,
                }
            })
            .collect(),
    ))
}

/// Whether jobs of a project (and environment) may use an agent, which `ci_access`
/// entry decides, and the identity the cluster would see: the proxy's own decision
/// function on the same data.
async fn explain(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<admin::ExplainQuery>,
) -> ApiResult<admin::Explanation> {
    use kas_authz::{decide, Decision, EntryKind};
    let mut job =
        s.cp.job_context(q.project.trim(), q.environment.as_deref())
            .await?;
    job.job_id = q.job_id.unwrap_or(1);
    job.pipeline_id = q.pipeline_id.unwrap_or(1);
    job.username = q.user.clone().unwrap_or_else(|| "user".into());
    job.protected_ref = q.protected;
    let agent_id = cluster::resolve_agent(s.cp.as_ref(), &q.agent).await?;
    let agent =
        s.cp.agent_info(agent_id)
            .await?
            .ok_or_else(|| ApiError(Error::not_found(format!("agent {agent_id} not found"))))?;
    let mut out = admin::Explanation {
        allowed: false,
        job: admin::ExplainedJob {
            project: job.project.path.clone(),
            environment: job.environment.as_ref().map(|e| e.name.clone()),
            user: job.username.clone(),
            job_id: job.job_id,
            pipeline_id: job.pipeline_id,
            protected: job.protected_ref,
        },
        agent: admin::ExplainedAgent {
            id: agent.agent.id,
            name: agent.agent.name.clone(),
            config_project: agent.agent.config_project.path.clone(),
            context: kas_k8s_proxy::context_name(&agent),
        },
        decided_by: None,
        access_as: None,
        default_namespace: None,
        identity: None,
        reason: None,
    };
    match decide(&agent.agent, &agent.config, &job) {
        Decision::Allow(a) => {
            out.allowed = true;
            out.decided_by = Some(match a.kind {
                EntryKind::Project => format!("ci_access.projects[{}] ({})", a.index, a.entry_id),
                EntryKind::Group => format!("ci_access.groups[{}] ({})", a.index, a.entry_id),
                EntryKind::ConfigProject => {
                    format!("the agent's configuration project ({})", a.entry_id)
                }
            });
            out.access_as = Some(a.mode.as_str().to_string());
            out.default_namespace = a.default_namespace;
            out.identity = a.identity.as_ref().map(|i| i.to_api());
        }
        Decision::Deny(reason) => out.reason = Some(reason.to_string()),
    }
    Ok(Json(out))
}

async fn audit(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Vec<AuditEntry>> {
    let Some(path) = s.audit.file().cloned() else {
        return Err(ApiError(Error::not_found(
            "this kas writes its audit trail to stdout; query it where its logs are collected",
        )));
    };
    let records = tokio::task::spawn_blocking(move || crate::audit::read(&path, &q))
        .await
        .map_err(|e| ApiError(Error::internal(e.to_string())))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the audit log");
            ApiError(Error::internal("cannot read the audit log"))
        })?;
    Ok(Json(records))
}
