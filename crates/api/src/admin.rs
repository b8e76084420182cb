//! The admin API (kas's API listener, under [`PREFIX`], admin token as bearer): what
//! each endpoint takes and answers. Paths are relative to [`PREFIX`].

use crate::records::{Agent, AgentToken, Job};
use crate::Identity;
use serde::{Deserialize, Serialize};

/// Where the admin API lives on the API listener.
pub const PREFIX: &str = "/api/v1";

/// The endpoints, relative to [`PREFIX`].
pub mod paths {
    /// GET: every group. POST [`super::CreatePath`]: a group (and missing parents).
    pub const GROUPS: &str = "/groups";
    /// GET: every project. POST [`super::CreatePath`]: a project (and missing groups).
    pub const PROJECTS: &str = "/projects";
    /// GET: every agent. POST [`super::AgentName`]: a new agent ([`super::CreatedAgent`]).
    /// DELETE with [`super::AgentName`] as the query: the agent and its tokens.
    pub const AGENTS: &str = "/agents";
    /// GET with [`super::AgentName`] as the query: the agent's tokens. POST
    /// [`super::TokenRequest`]: a new token ([`super::CreatedToken`]).
    pub const AGENT_TOKENS: &str = "/agents/tokens";
    /// POST [`super::TokenRequest`]: revoke the named token.
    pub const REVOKE_AGENT_TOKEN: &str = "/agents/tokens/revoke";
    /// GET with [`super::AgentName`] as the query: [`super::StoredConfig`]. PUT
    /// [`super::SetConfig`]: [`super::ConfigSaved`].
    pub const AGENT_CONFIG: &str = "/agents/config";
    /// GET with [`super::EnvironmentQuery`]: environments. POST
    /// [`super::CreateEnvironment`].
    pub const ENVIRONMENTS: &str = "/environments";
    /// GET: every job. POST [`super::StartJob`]: [`super::StartedJob`].
    pub const JOBS: &str = "/jobs";
    /// GET: [`super::ConnectedAgent`]s on every kas.
    pub const CONNECTED_AGENTS: &str = "/connected-agents";
    /// GET with [`super::ExplainQuery`]: [`super::Explanation`].
    pub const EXPLAIN: &str = "/access/explain";
    /// GET with [`crate::audit::AuditQuery`]: [`crate::audit::AuditEntry`]s.
    pub const AUDIT: &str = "/audit";
    /// GET with [`super::AppsQuery`]: [`super::ClusterApps`]. POST [`super::AppRequest`]:
    /// starts an operation ([`crate::records::ClusterApp`], 202).
    pub const CLUSTER_APPS: &str = "/cluster-apps";
    /// POST [`super::EksPrepare`]: [`super::EksPrepared`] (201).
    pub const EKS_PREPARE: &str = "/eks/prepare";
    /// GET (optionally with [`super::EksName`] as the query): [`crate::records::EksCluster`]s.
    /// POST [`super::EksCreate`]: starts creating (202). DELETE with [`super::EksName`]:
    /// starts deleting (202).
    pub const EKS_CLUSTERS: &str = "/eks/clusters";

    /// POST [`super::FinishJob`]: finishes job `id`.
    pub fn finish_job(id: u64) -> String {
        format!("/jobs/{id}/finish")
    }
}

/// A group or project to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePath {
    pub path: String,
    /// Use this id (to mirror ids from elsewhere); allocated when absent.
    pub id: Option<u64>,
}

/// An agent, by its configuration project and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentName {
    pub project: String,
    pub name: String,
}

/// A new agent and its first token (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedAgent {
    #[serde(flatten)]
    pub agent: Agent,
    pub token: String,
}

/// Names a token of an agent: the new token's name (create), or the name or id of the
/// token to revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    pub project: String,
    pub name: String,
    pub token: Option<String>,
}

/// A new agent token and its secret (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub token: AgentToken,
    pub secret: String,
}

/// An agent's configuration as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConfig {
    pub agent_id: u64,
    pub version: u64,
    /// The config.yaml text.
    pub config: String,
}

/// A config.yaml to validate and store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetConfig {
    pub project: String,
    pub name: String,
    pub config: String,
}

/// A configuration stored: its version, and what kas ignores in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSaved {
    pub version: u64,
    pub warnings: Vec<String>,
}

/// An environment to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEnvironment {
    pub project: String,
    pub name: String,
    /// production, staging, testing, development or other (guessed from the name if absent).
    pub tier: Option<String>,
}

/// Which environments to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentQuery {
    pub project: Option<String>,
}

/// A CI job to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartJob {
    pub project: String,
    pub environment: Option<String>,
    pub user: String,
    /// A new pipeline id is allocated when absent.
    pub pipeline_id: Option<u64>,
    /// The job runs for a protected branch or tag.
    #[serde(default)]
    pub protected: bool,
}

/// A started job: its token (shown once), kubeconfig and the contexts in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedJob {
    #[serde(flatten)]
    pub job: Job,
    pub token: String,
    pub kubeconfig: String,
    pub contexts: Vec<String>,
}

/// How a job ended (`success` when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishJob {
    pub status: Option<String>,
}

/// Where an agent replica runs, as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeta {
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub node_name: String,
    /// The cluster's Kubernetes version.
    #[serde(default)]
    pub kubernetes_version: String,
}

/// One connected agent replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedReplica {
    pub replica_id: String,
    pub agent_version: String,
    /// Its address as the kas holding it sees it (empty for other kas's replicas).
    pub peer: String,
    /// Unix seconds.
    pub connected_since: u64,
    pub config_version: u64,
    pub idle_tunnels: usize,
    /// The kas instance holding the connection (set when there are several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kas: Option<String>,
    #[serde(flatten)]
    pub meta: ReplicaMeta,
    /// Something an admin should know about this replica (such as version skew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One connected agent, on this kas or any other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedAgent {
    pub agent_id: u64,
    pub replicas: Vec<ConnectedReplica>,
    pub idle_tunnels: usize,
    pub busy_tunnels: usize,
}

/// A connected agent with its name, as `GET /connected-agents` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedConnectedAgent {
    pub id: u64,
    pub name: String,
    pub config_project: String,
    #[serde(flatten)]
    pub state: ConnectedAgent,
}

/// Whether jobs of a project (and environment) may use an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub project: String,
    pub environment: Option<String>,
    /// A numeric id, or `<configuration project>:<agent name>` (the kubeconfig context).
    pub agent: String,
    pub user: Option<String>,
    pub job_id: Option<u64>,
    pub pipeline_id: Option<u64>,
    /// As for a job on a protected branch or tag.
    #[serde(default)]
    pub protected: bool,
}

/// The job an explanation is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedJob {
    pub project: String,
    pub environment: Option<String>,
    pub user: String,
    pub job_id: u64,
    pub pipeline_id: u64,
    pub protected: bool,
}

/// The agent an explanation is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedAgent {
    pub id: u64,
    pub name: String,
    pub config_project: String,
    pub context: String,
}

/// The proxy's own decision for a job and an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    pub job: ExplainedJob,
    pub agent: ExplainedAgent,
    /// Allowed: the `ci_access` entry that admits the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Allowed: `agent`, `ci_job` or `impersonate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_as: Option<String>,
    /// Allowed: the namespace the job's kubeconfig context selects.
    #[serde(default)]
    pub default_namespace: Option<String>,
    /// Allowed: the impersonated identity (`None`: the agent's own).
    #[serde(default)]
    pub identity: Option<Identity>,
    /// Denied: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Which agent's managed applications to list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppsQuery {
    /// An agent id or `<configuration project>:<name>`.
    pub agent: String,
}

/// An application of kas's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    pub name: String,
    pub description: String,
    /// The Helm chart (`<repo> <chart>`, an OCI reference, or one bundled with kas).
    pub chart: String,
    /// The version installed when none is asked for.
    pub default_version: String,
}

/// An agent's managed applications and what the catalogue offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterApps {
    pub agent_id: u64,
    pub catalogue: Vec<CatalogueEntry>,
    /// Applications installed (or being or once installed) in the agent's cluster.
    pub apps: Vec<crate::records::ClusterApp>,
}

/// An operation to start on a managed application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRequest {
    /// An agent id or `<configuration project>:<name>`.
    pub agent: String,
    pub app: String,
    pub operation: crate::records::AppOperation,
    /// The chart version (install, upgrade); the catalogue's when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// Helm values (YAML) over the catalogue's defaults (install, upgrade).
    #[serde(default)]
    pub values: Option<String>,
}

/// POST to [`paths::EKS_PREPARE`]: a new EKS cluster record and its external id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksPrepare {
    pub name: String,
    /// The project the cluster (and its agent) belongs to.
    pub project: String,
}

/// What the user needs to create the provisioning role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksPrepared {
    pub cluster: crate::records::EksCluster,
    /// kas's own AWS account, which the role must trust.
    pub account_id: String,
    pub external_id: String,
    /// The role's trust policy, ready to paste.
    pub trust_policy: String,
}

/// POST to [`paths::EKS_CLUSTERS`]: create the prepared cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksCreate {
    pub name: String,
    pub spec: crate::records::EksSpec,
}

/// GET or DELETE [`paths::EKS_CLUSTERS`] with this query: one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksName {
    pub name: String,
}
