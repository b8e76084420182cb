//! Admin endpoints of kas's own work in agents' clusters: managed applications, and
//! the managed namespaces a job start prepares.

use super::{AdminState, ApiError, ApiResult, Audited};
use crate::cluster::{apps, namespaces};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use kas_api::admin::{AppRequest, AppsQuery, ClusterApps};
use kas_api::error::{Error, Kind, Origin};
use kas_authz::{Allowed, JobContext};
use kas_controlplane::{AgentInfo, ClusterApp, ControlPlane};
use std::sync::Arc;

/// The agent an id or `<configuration project>:<name>` names.
pub(super) async fn resolve_agent(cp: &dyn ControlPlane, agent: &str) -> Result<u64, ApiError> {
    let agent = agent.trim();
    if let Ok(id) = agent.parse::<u64>() {
        return Ok(id);
    }
    let (project, name) = agent.rsplit_once(':').ok_or_else(|| {
        ApiError(Error::bad_request(format!(
            "agent `{agent}`: use an id or <configuration project>:<name>"
        )))
    })?;
    Ok(cp.get_agent(project, name).await?.id)
}

pub(super) async fn list_apps(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<AppsQuery>,
) -> ApiResult<ClusterApps> {
    let agent_id = resolve_agent(s.cp.as_ref(), &q.agent).await?;
    if s.cp.agent_info(agent_id).await?.is_none() {
        return Err(ApiError(Error::not_found(format!(
            "agent {agent_id} not found"
        ))));
    }
    Ok(Json(ClusterApps {
        agent_id,
        catalogue: apps::catalogue_entries(),
        apps: s.cp.list_apps(Some(agent_id)).await?,
    }))
}

pub(super) async fn start_app(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<AppRequest>,
) -> Result<(StatusCode, Extension<Audited>, Json<ClusterApp>), ApiError> {
    let agent_id = resolve_agent(s.cp.as_ref(), &r.agent).await?;
    let app = s
        .apps
        .start(apps::AppRequest {
            agent_id,
            app: r.app.clone(),
            operation: r.operation,
            version: r.version,
            values: r.values,
        })
        .await
        .map_err(ApiError)?;
    let mut a = Audited::new(
        "cluster_app.start",
        format!("agent {agent_id} application {}", app.name),
    )
    .detail("operation", app.operation.as_str())
    .detail("version", &app.version)
    .detail("pod", &app.pod);
    a.agent_id = Some(agent_id);
    Ok((StatusCode::ACCEPTED, Extension(a), Json(app)))
}

/// For each agent of `authorized` whose configuration has `managed_namespaces`, and a
/// job with an environment: ensures the environment's namespace and binding in the
/// agent's cluster and makes it the job's namespace there. Fails with the first agent
/// whose cluster cannot be prepared (the job would get a kubeconfig that cannot work).
pub(super) async fn prepare_namespaces(
    s: &AdminState,
    job: &JobContext,
    authorized: &mut [(Arc<AgentInfo>, Allowed)],
) -> Result<(), ApiError> {
    let Some(env) = &job.environment else {
        return Ok(());
    };
    for (agent, allowed) in authorized.iter_mut() {
        let Some(managed) = &agent.config.managed_namespaces else {
            continue;
        };
        let ns = namespaces::namespace_name(&job.project.path, job.project.id, &env.slug);
        let group = namespaces::environment_group(job.project.id, &env.slug);
        namespaces::ensure(
            &s.clusters,
            agent.agent.id,
            &ns,
            &managed.cluster_role,
            &group,
        )
        .await
        .map_err(|e| {
            ApiError(Error::new(
                Kind::BadGateway,
                Origin::Agent,
                format!(
                    "cannot prepare namespace `{ns}` in the cluster of agent {} ({}): {}",
                    agent.agent.id,
                    kas_k8s_proxy::context_name(agent),
                    e.code
                ),
            ))
        })?;
        allowed.default_namespace = Some(ns);
    }
    Ok(())
}
