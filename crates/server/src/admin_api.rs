//! The admin API on kas's API listener (used by `kasctl`), authenticated by the admin
//! token. JSON in, JSON out; errors are `{"error": "..."}` with a fitting status.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    /// The audit file, when audit records go to a file.
    pub audit_file: Option<std::path::PathBuf>,
    pub admin_token_hash: [u8; 32],
    pub k8s_proxy_url: String,
    pub k8s_proxy_ca_pem: Option<String>,
}

/// Errors of the admin API, mapped to status codes here and nowhere else.
pub struct ApiError(StatusCode, String);

impl From<CpError> for ApiError {
    fn from(e: CpError) -> Self {
        match e {
            CpError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            CpError::AlreadyExists(m) => ApiError(StatusCode::CONFLICT, m),
            CpError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
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

fn authorized(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
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
        .route("/agents", get(list_agents).post(create_agent))
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
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new()
        .nest("/api/v1", api)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into()) })
}

async fn auth(
    State(state): State<Arc<AdminState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorized(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct PathReq {
    path: String,
    id: Option<u64>,
}

async fn create_group(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<PathReq>,
) -> ApiResult<kas_controlplane::Group> {
    Ok(Json(s.cp.create_group(&r.path, r.id).await?))
}

async fn list_groups(State(s): State<Arc<AdminState>>) -> ApiResult<Vec<kas_controlplane::Group>> {
    Ok(Json(s.cp.list_groups().await?))
}

async fn create_project(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<PathReq>,
) -> ApiResult<kas_controlplane::Project> {
    Ok(Json(s.cp.create_project(&r.path, r.id).await?))
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

async fn create_agent(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<AgentReq>,
) -> ApiResult<CreatedAgent> {
    let (agent, token) = s.cp.create_agent(&r.project, &r.name).await?;
    Ok(Json(CreatedAgent {
        agent,
        token: token.expose().to_string(),
    }))
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
) -> Result<Json<serde_json::Value>, ApiError> {
    match s.cp.set_agent_config(&r.project, &r.name, &r.config).await {
        Ok((version, warnings)) => Ok(Json(json!({
            "version": version,
            "warnings": warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }))),
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
) -> ApiResult<kas_controlplane::EnvironmentRecord> {
    Ok(Json(
        s.cp.create_environment(&r.project, &r.name, r.tier.as_deref())
            .await?,
    ))
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
) -> ApiResult<StartedJob> {
    let (job, token) =
        s.cp.start_job(&StartJob {
            project: r.project,
            environment: r.environment,
            username: r.user,
            pipeline_id: r.pipeline_id,
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
    Ok(Json(StartedJob {
        job,
        token: token.expose().to_string(),
        kubeconfig,
        contexts,
    }))
}

#[derive(Deserialize, Default)]
struct FinishReq {
    status: Option<String>,
}

async fn finish_job(
    State(s): State<Arc<AdminState>>,
    Path(id): Path<u64>,
    body: Option<Json<FinishReq>>,
) -> ApiResult<kas_controlplane::Job> {
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
    Ok(Json(s.cp.finish_job(id, status).await?))
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

/// Connected agents on this kas and, with a shared registry, on every other kas.
pub(crate) async fn connected_everywhere(router: &KasRouter) -> Vec<ConnectedAgent> {
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
    let Some(path) = s.audit_file.clone() else {
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
