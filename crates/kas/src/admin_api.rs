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
use kas_controlplane::{ControlPlane, Error as CpError, JobStatus, StartJob};
use kas_router::Router as KasRouter;
use kas_tunnel::{ConnectedAgent, ConnectedReplica};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Shared state of the admin API.
pub struct AdminState {
    pub cp: Arc<dyn ControlPlane>,
    pub router: Arc<KasRouter>,
    /// The audit trail: admin actions are recorded in it, and `kasctl audit` reads it.
    pub audit: Arc<crate::audit::AuditLog>,
    pub admin_token_hash: [u8; 32],
    pub k8s_proxy_url: String,
    pub k8s_proxy_ca_pem: Option<String>,
    /// Limits on `ci_access` entries of agent configurations (kas settings).
    pub ci_access_limits: kas_authz::CiAccessLimits,
}

/// Errors of the admin API, mapped to status codes here and nowhere else.
pub struct ApiError(StatusCode, String);

impl From<CpError> for ApiError {
    fn from(e: CpError) -> Self {
        match e {
            CpError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            CpError::AlreadyExists(m) => ApiError(StatusCode::CONFLICT, m),
            CpError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            CpError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            CpError::Config(c) => ApiError(StatusCode::BAD_REQUEST, c.to_string()),
            CpError::Storage(s) => {
                tracing::error!(error = %s, "control plane storage error");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "control plane storage error; see kas logs".into(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
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
        .and_then(crate::bearer)
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing admin token (Authorization: Bearer <token>)".into(),
            )
        })?;
    let h = kas_controlplane::hash_token(presented.trim());
    if bool::from(h.ct_eq(&state.admin_token_hash)) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "invalid admin token".into(),
        ))
    }
}

/// The admin API router.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/groups", get(list_groups).post(create_group))
        .route("/projects", get(list_projects).post(create_project))
        .route(
            "/agents",
            get(list_agents).post(create_agent).delete(delete_agent),
        )
        .route(
            "/agents/tokens",
            get(list_agent_tokens).post(create_agent_token),
        )
        .route("/agents/tokens/revoke", post(revoke_agent_token))
        .route(
            "/agents/config",
            get(get_agent_config).put(set_agent_config),
        )
        .route(
            "/environments",
            get(list_environments).post(create_environment),
        )
        .route("/jobs", get(list_jobs).post(start_job))
        .route("/jobs/:id/finish", post(finish_job))
        .route("/connected-agents", get(connected_agents))
        .route("/access/explain", get(explain))
        .route("/audit", get(audit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_admin,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new()
        .nest("/api/v1", api)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into()) })
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
                .get::<Arc<crate::listener::ConnControl>>()
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
    let done = resp.extensions().get::<Audited>().cloned();
    let code = resp.status().as_u16();
    let mut r = serde_json::Map::new();
    r.insert("time".into(), json!(crate::audit::now_unix()));
    r.insert("kind".into(), json!("admin"));
    r.insert("actor".into(), json!(actor.as_ref().map(|a| &a.token_id)));
    r.insert("peer".into(), json!(actor.and_then(|a| a.peer)));
    r.insert("method".into(), json!(method));
    r.insert("path".into(), json!(path));
    r.insert("code".into(), json!(code));
    r.insert(
        "outcome".into(),
        json!(if code < 400 { "ok" } else { "failed" }),
    );
    if let Some(a) = done {
        r.insert("action".into(), json!(a.action));
        r.insert("target".into(), json!(a.target));
        if let Some(id) = a.agent_id {
            r.insert("agent_id".into(), json!(id));
        }
        if let Some(id) = a.job_id {
            r.insert("job_id".into(), json!(id));
        }
        if let Some(p) = a.project {
            r.insert("project".into(), json!(p));
        }
        if !a.details.is_empty() {
            r.insert("details".into(), serde_json::Value::Object(a.details));
        }
    }
    state.audit.record_value(&serde_json::Value::Object(r));
    resp
}

#[derive(Deserialize)]
struct PathReq {
    path: String,
    id: Option<u64>,
}

async fn create_group(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<PathReq>,
) -> AuditedJson<kas_controlplane::Group> {
    let g = s.cp.create_group(&r.path, r.id).await?;
    audited(Audited::new("group.create", &g.path).detail("id", g.id), g)
}

async fn list_groups(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<kas_controlplane::Group>> {
    Ok(Json(s.cp.list_groups().await?))
}

async fn create_project(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<PathReq>,
) -> AuditedJson<kas_controlplane::Project> {
    let p = s.cp.create_project(&r.path, r.id).await?;
    let mut a = Audited::new("project.create", &p.path).detail("id", p.id);
    a.project = Some(p.path.clone());
    audited(a, p)
}

async fn list_projects(
    State(s): State<Arc<AdminState>>,
) -> ApiResult<Vec<kas_controlplane::Project>> {
    Ok(Json(s.cp.list_projects().await?))
}

#[derive(Deserialize)]
struct AgentReq {
    project: String,
    name: String,
}

#[derive(Serialize)]
struct CreatedAgent {
    #[serde(flatten)]
    agent: kas_controlplane::Agent,
    token: String,
}

fn agent_audit(action: &'static str, agent: &kas_controlplane::Agent) -> Audited {
    let mut a = Audited::new(action, format!("{}:{}", agent.project_path, agent.name));
    a.agent_id = Some(agent.id);
    a.project = Some(agent.project_path.clone());
    a
}

async fn create_agent(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<AgentReq>,
) -> AuditedJson<CreatedAgent> {
    let (agent, token) = s.cp.create_agent(&r.project, &r.name).await?;
    audited(
        agent_audit("agent.create", &agent),
        CreatedAgent {
            agent,
            token: token.expose().to_string(),
        },
    )
}

async fn delete_agent(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<AgentReq>,
) -> AuditedJson<kas_controlplane::Agent> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let deleted = s.cp.delete_agent(a.id).await?;
    audited(agent_audit("agent.delete", &deleted), deleted)
}

#[derive(Deserialize)]
struct TokenReq {
    project: String,
    name: String,
    /// The new token's name (create), or the name or id of the token (revoke).
    token: Option<String>,
}

#[derive(Serialize)]
struct CreatedToken {
    #[serde(flatten)]
    token: kas_controlplane::AgentToken,
    /// Shown once.
    secret: String,
}

async fn create_agent_token(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<TokenReq>,
) -> AuditedJson<CreatedToken> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let (token, secret) = s.cp.create_agent_token(a.id, r.token.as_deref()).await?;
    audited(
        agent_audit("agent.token.create", &a)
            .detail("token", &token.name)
            .detail("token_id", token.id),
        CreatedToken {
            token,
            secret: secret.expose().to_string(),
        },
    )
}

async fn list_agent_tokens(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<AgentReq>,
) -> ApiResult<Vec<kas_controlplane::AgentToken>> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    Ok(Json(s.cp.list_agent_tokens(a.id).await?))
}

async fn revoke_agent_token(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<TokenReq>,
) -> AuditedJson<kas_controlplane::AgentToken> {
    let token = r.token.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "name the token to revoke (`token`: its name or id)".into(),
        )
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

async fn list_agents(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<kas_controlplane::Agent>> {
    Ok(Json(s.cp.list_agents().await?))
}

async fn get_agent_config(
    State(s): State<Arc<AdminState>>,
    Query(r): Query<AgentReq>,
) -> ApiResult<serde_json::Value> {
    let a = s.cp.get_agent(&r.project, &r.name).await?;
    let info =
        s.cp.agent_info(a.id)
            .await?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "agent not found".into()))?;
    Ok(Json(
        json!({ "agent_id": a.id, "version": info.config_version, "config": info.config_yaml }),
    ))
}

#[derive(Deserialize)]
struct ConfigReq {
    project: String,
    name: String,
    config: String,
}

async fn set_agent_config(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<ConfigReq>,
) -> AuditedJson<serde_json::Value> {
    match s
        .cp
        .set_agent_config(&r.project, &r.name, &r.config, &s.ci_access_limits)
        .await
    {
        Ok((version, warnings)) => {
            for w in &warnings {
                tracing::warn!(agent = %format!("{}:{}", r.project, r.name), version, warning = %w, "agent configuration stored with a warning");
            }
            let mut a = Audited::new("agent.config.set", format!("{}:{}", r.project, r.name))
                .detail("version", version);
            a.project = Some(r.project.clone());
            if let Ok(agent) = s.cp.get_agent(&r.project, &r.name).await {
                a.agent_id = Some(agent.id);
            }
            audited(
                a,
                json!({
                    "version": version,
                    "warnings": warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
            )
        }
        Err(CpError::Config(c)) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid agent configuration:\n{}",
                c.problems
                    .iter()
                    .map(|p| format!("  - {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct EnvReq {
    project: String,
    name: String,
    tier: Option<String>,
}

async fn create_environment(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<EnvReq>,
) -> AuditedJson<kas_controlplane::EnvironmentRecord> {
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
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Vec<kas_controlplane::EnvironmentRecord>> {
    Ok(Json(
        s.cp.list_environments(q.get("project").map(String::as_str))
            .await?,
    ))
}

#[derive(Deserialize)]
struct JobReq {
    project: String,
    environment: Option<String>,
    user: String,
    pipeline_id: Option<u64>,
    /// The job runs for a protected branch or tag.
    #[serde(default)]
    protected: bool,
}

#[derive(Serialize)]
struct StartedJob {
    #[serde(flatten)]
    job: kas_controlplane::Job,
    token: String,
    kubeconfig: String,
    contexts: Vec<String>,
}

async fn start_job(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<JobReq>,
) -> AuditedJson<StartedJob> {
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
            .ok_or_else(|| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the new job is not running".into(),
                )
            })?;
    let agents = s.cp.all_agent_infos().await?;
    let contexts = agents
        .iter()
        .filter(|a| {
            matches!(
                kas_authz::decide(&a.agent, &a.config, &ctx),
                kas_authz::Decision::Allow(_)
            )
        })
        .map(|a| format!("{}:{}", a.agent.config_project.path, a.agent.name))
        .collect();
    let kubeconfig = kas_k8s_proxy::job_kubeconfig(
        &ctx,
        token.expose(),
        &agents,
        &s.k8s_proxy_url,
        s.k8s_proxy_ca_pem.as_deref(),
    )
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut a = Audited::new("job.start", format!("job {}", job.id))
        .detail("user", &job.username)
        .detail("environment", &job.environment)
        .detail("pipeline_id", job.pipeline_id)
        .detail("contexts", &contexts);
    a.job_id = Some(job.id);
    a.project = Some(job.project_path.clone());
    audited(
        a,
        StartedJob {
            job,
            token: token.expose().to_string(),
            kubeconfig,
            contexts,
        },
    )
}

#[derive(Deserialize, Default)]
struct FinishReq {
    status: Option<String>,
}

async fn finish_job(
    State(s): State<Arc<AdminState>>,
    Path(id): Path<u64>,
    body: Option<Json<FinishReq>>,
) -> AuditedJson<kas_controlplane::Job> {
    let status = body
        .and_then(|b| b.0.status)
        .unwrap_or_else(|| "success".into());
    let status = JobStatus::parse(&status)
        .filter(|s| *s != JobStatus::Running)
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("status `{status}` is invalid: use success, failed or canceled"),
            )
        })?;
    let job = s.cp.finish_job(id, status).await?;
    let mut a =
        Audited::new("job.finish", format!("job {}", job.id)).detail("status", job.status.as_str());
    a.job_id = Some(job.id);
    a.project = Some(job.project_path.clone());
    audited(a, job)
}

async fn list_jobs(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<kas_controlplane::Job>> {
    Ok(Json(s.cp.list_jobs().await?))
}

#[derive(Serialize)]
struct Connected {
    id: u64,
    name: String,
    config_project: String,
    #[serde(flatten)]
    state: kas_tunnel::ConnectedAgent,
}

async fn connected_agents(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<Connected>> {
    let names: HashMap<u64, (String, String)> =
        s.cp.list_agents()
            .await?
            .into_iter()
            .map(|a| (a.id, (a.name, a.project_path)))
            .collect();
    Ok(Json(
        connected_everywhere(&s.router)
            .await
            .into_iter()
            .map(|c| {
                let (name, config_project) = names.get(&c.agent_id).cloned().unwrap_or_default();
                Connected {
                    id: c.agent_id,
                    name,
                    config_project,
                    state: c,
                }
            })
            .collect(),
    ))
}

/// Connected agents on this kas and, with a shared registry, on every other kas, each
/// replica with a warning when its version is too far from kas's.
pub(crate) async fn connected_everywhere(router: &KasRouter) -> Vec<ConnectedAgent> {
    let mut agents = connected_anywhere(router).await;
    for r in agents.iter_mut().flat_map(|a| a.replicas.iter_mut()) {
        r.warning = crate::version_skew(&r.agent_version);
    }
    agents
}

async fn connected_anywhere(router: &KasRouter) -> Vec<ConnectedAgent> {
    let mut agents = router.registry().snapshot();
    let Some(shared) = router.connections().await else {
        return agents;
    };
    let own = router.kas_id().map(str::to_string);
    for r in agents.iter_mut().flat_map(|a| a.replicas.iter_mut()) {
        r.kas = own.clone();
    }
    let conns = match shared {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "shared registry unavailable; listing this kas's agents only");
            return agents;
        }
    };
    for c in conns
        .into_iter()
        .filter(|c| Some(&c.kas_id) != own.as_ref())
    {
        let replica = ConnectedReplica {
            replica_id: c.replica_id,
            agent_version: c.agent_version,
            peer: String::new(),
            connected_since: c.since,
            config_version: 0,
            idle_tunnels: 0,
            kas: Some(c.kas_id),
            meta: c.meta,
            warning: None,
        };
        match agents.iter_mut().find(|a| a.agent_id == c.agent_id) {
            Some(a) => a.replicas.push(replica),
            None => agents.push(ConnectedAgent {
                agent_id: c.agent_id,
                replicas: vec![replica],
                idle_tunnels: 0,
                busy_tunnels: 0,
            }),
        }
    }
    agents.sort_by_key(|a| a.agent_id);
    agents
}

#[derive(Deserialize)]
struct ExplainReq {
    project: String,
    environment: Option<String>,
    /// A numeric id, or `<configuration project>:<agent name>` (the kubeconfig context).
    agent: String,
    user: Option<String>,
    job_id: Option<u64>,
    pipeline_id: Option<u64>,
    /// As for a job on a protected branch or tag.
    #[serde(default)]
    protected: bool,
}

/// Whether jobs of a project (and environment) may use an agent, which `ci_access`
/// entry decides, and the identity the cluster would see: the proxy's own decision
/// function on the same data.
async fn explain(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<ExplainReq>,
) -> ApiResult<serde_json::Value> {
    use kas_authz::{decide, Decision, EntryKind, Environment, JobContext, Named};
    let not_found = |m: String| ApiError(StatusCode::NOT_FOUND, m);
    let wanted = q.project.trim().trim_matches('/');
    let project =
        s.cp.list_projects()
            .await?
            .into_iter()
            .find(|p| p.path.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| not_found(format!("project `{}` not found", q.project)))?;
    let groups: HashMap<u64, kas_controlplane::Group> =
        s.cp.list_groups()
            .await?
            .into_iter()
            .map(|g| (g.id, g))
            .collect();
    let mut chain = Vec::new();
    let mut next = Some(project.group_id);
    while let Some(id) = next {
        let g = groups.get(&id).ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "group chain broken".into(),
            )
        })?;
        chain.push(Named {
            id: g.id,
            path: g.path.clone(),
        });
        next = g.parent_id;
        if chain.len() > 64 {
            break;
        }
    }
    chain.reverse();
    let environment = match &q.environment {
        None => None,
        Some(name) => {
            let e =
                s.cp.list_environments(Some(&project.path))
                    .await?
                    .into_iter()
                    .find(|e| &e.name == name)
                    .ok_or_else(|| {
                        not_found(format!(
                            "environment `{name}` not found in `{}`",
                            project.path
                        ))
                    })?;
            Some(Environment {
                name: e.name,
                slug: e.slug,
                tier: e.tier,
            })
        }
    };
    let agent_id = match q.agent.parse::<u64>() {
        Ok(id) => id,
        Err(_) => {
            let (proj, name) = q.agent.rsplit_once(':').ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "agent `{}`: use an id or <configuration project>:<name>",
                        q.agent
                    ),
                )
            })?;
            s.cp.get_agent(proj, name).await?.id
        }
    };
    let agent =
        s.cp.agent_info(agent_id)
            .await?
            .ok_or_else(|| not_found(format!("agent {agent_id} not found")))?;
    let job = JobContext {
        job_id: q.job_id.unwrap_or(1),
        pipeline_id: q.pipeline_id.unwrap_or(1),
        project: Named {
            id: project.id,
            path: project.path.clone(),
        },
        groups: chain,
        environment: environment.clone(),
        username: q.user.clone().unwrap_or_else(|| "user".into()),
        protected_ref: q.protected,
    };
    let agent_json = json!({
        "id": agent.agent.id,
        "name": agent.agent.name,
        "config_project": agent.agent.config_project.path,
        "context": format!("{}:{}", agent.agent.config_project.path, agent.agent.name),
    });
    let job_json = json!({
        "project": project.path,
        "environment": environment.as_ref().map(|e| &e.name),
        "user": job.username,
        "job_id": job.job_id,
        "pipeline_id": job.pipeline_id,
        "protected": job.protected_ref,
    });
    Ok(Json(match decide(&agent.agent, &agent.config, &job) {
        Decision::Allow(a) => {
            let decided_by = match a.kind {
                EntryKind::Project => format!("ci_access.projects[{}] ({})", a.index, a.entry_id),
                EntryKind::Group => format!("ci_access.groups[{}] ({})", a.index, a.entry_id),
                EntryKind::ConfigProject => {
                    format!("the agent's configuration project ({})", a.entry_id)
                }
            };
            json!({
                "allowed": true,
                "job": job_json,
                "agent": agent_json,
                "decided_by": decided_by,
                "access_as": a.mode.as_str(),
                "default_namespace": a.default_namespace,
                "identity": a.identity.map(|i| json!({
                    "username": i.username,
                    "uid": i.uid,
                    "groups": i.groups,
                    "extra": i.extra.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                })),
            })
        }
        Decision::Deny(reason) => json!({
            "allowed": false,
            "job": job_json,
            "agent": agent_json,
            "reason": reason.to_string(),
        }),
    }))
}

async fn audit(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<crate::audit::AuditQuery>,
) -> ApiResult<Vec<serde_json::Value>> {
    let Some(path) = s.audit.file().cloned() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this kas writes its audit trail to stdout; query it where its logs are collected"
                .into(),
        ));
    };
    let records = tokio::task::spawn_blocking(move || crate::audit::read(&path, &q))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the audit log");
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot read the audit log".into(),
            )
        })?;
    Ok(Json(records))
}
