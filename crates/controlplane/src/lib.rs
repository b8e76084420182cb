//! The control plane: what GitLab is to kas. Groups, projects, agents and their
//! configuration, environments and CI jobs, and the lookups kas makes on the request
//! path (agent token -> agent, job token -> running job).
//!
//! [`ControlPlane`] is the seam; [`SqliteControlPlane`] is the embedded default (one
//! SQLite file in kas's data dir) and [`PostgresControlPlane`] the shared one (several
//! kas replicas on one database); both run the same logic ([`SqlControlPlane`]). It does not route requests or talk to agents.
//! Tokens are generated here, returned once, and stored only as SHA-256 hashes.

mod agent_tokens;
mod apps;
mod cached;
mod eks;
mod model;
mod postgres;
mod slug;
mod sql;
mod sqlite;
mod store;
mod token;

pub use cached::CachingControlPlane;
pub use model::*;
pub use postgres::{Postgres, PostgresControlPlane};
pub use slug::{environment_slug, guess_tier, TIERS};
pub use sqlite::{Sqlite, SqliteControlPlane};
pub use store::SqlControlPlane;
pub use token::{hash_token, new_token, Secret, TokenKind};

use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Errors of control plane operations, classified so the API layer maps them to
/// status codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    /// The operation conflicts with the current state (a limit is reached).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Config(#[from] kas_authz::ConfigError),
    #[error("control plane storage error")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for kas_api::error::Error {
    /// How a control plane error reaches a caller; storage errors are logged here and
    /// shown only as such.
    fn from(e: Error) -> Self {
        use kas_api::error::{Error as E, Kind, Origin};
        match e {
            Error::NotFound(m) => E::not_found(m),
            Error::AlreadyExists(m) | Error::Conflict(m) => {
                E::new(Kind::Conflict, Origin::Client, m)
            }
            Error::Invalid(m) => E::bad_request(m),
            Error::Config(c) => E::bad_request(c.to_string()),
            Error::Storage(s) => {
                tracing::error!(error = %s, "control plane storage error");
                E::internal("control plane storage error; see kas logs")
            }
        }
    }
}

/// Active tokens an agent may have at once: one in use and one to rotate to.
pub const MAX_ACTIVE_AGENT_TOKENS: usize = 2;

/// A change other components react to (caches, connected agents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AgentConfig {
        agent_id: u64,
    },
    JobFinished {
        job_id: u64,
    },
    /// Connections made with this token must close.
    AgentTokenRevoked {
        agent_id: u64,
        token_id: u64,
    },
    /// The agent is gone, with its tokens: every connection of it must close.
    AgentDeleted {
        agent_id: u64,
    },
    /// Anything may have changed (notifications may have been missed).
    Resync,
}

/// The control plane seam. Admin operations take paths as users type them.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    async fn create_group(&self, path: &str, id: Option<u64>) -> Result<Group>;
    async fn list_groups(&self) -> Result<Vec<Group>>;
    async fn create_project(&self, path: &str, id: Option<u64>) -> Result<Project>;
    async fn list_projects(&self) -> Result<Vec<Project>>;
    async fn create_agent(&self, project: &str, name: &str) -> Result<(Agent, Secret)>;
    async fn list_agents(&self) -> Result<Vec<Agent>>;
    /// Deletes an agent and its tokens (its connections close: [`Change::AgentDeleted`]).
    async fn delete_agent(&self, agent_id: u64) -> Result<Agent>;
    /// A new token for an agent (at most [`MAX_ACTIVE_AGENT_TOKENS`] active at once).
    async fn create_agent_token(
        &self,
        agent_id: u64,
        name: Option<&str>,
    ) -> Result<(AgentToken, Secret)>;
    /// An agent's tokens, revoked ones included, oldest first.
    async fn list_agent_tokens(&self, agent_id: u64) -> Result<Vec<AgentToken>>;
    /// Revokes the agent's token named (or numbered) `token` ([`Change::AgentTokenRevoked`]).
    async fn revoke_agent_token(&self, agent_id: u64, token: &str) -> Result<AgentToken>;
    /// Records that a token was used now.
    async fn touch_agent_token(&self, token_id: u64) -> Result<()>;
    async fn get_agent(&self, project: &str, name: &str) -> Result<Agent>;
    /// Validates (with `limits` on `ci_access`) and stores an agent's config.yaml;
    /// returns the new version and warnings.
    async fn set_agent_config(
        &self,
        project: &str,
        name: &str,
        yaml: &str,
        limits: &kas_authz::CiAccessLimits,
    ) -> Result<(u64, Vec<kas_authz::ConfigWarning>)>;
    async fn create_environment(
        &self,
        project: &str,
        name: &str,
        tier: Option<&str>,
    ) -> Result<EnvironmentRecord>;
    async fn list_environments(&self, project: Option<&str>) -> Result<Vec<EnvironmentRecord>>;
    async fn start_job(&self, req: &StartJob) -> Result<(Job, Secret)>;
    async fn finish_job(&self, id: u64, status: JobStatus) -> Result<Job>;
    async fn list_jobs(&self) -> Result<Vec<Job>>;

    /// The agent an active token belongs to, if any.
    async fn authenticate_agent(&self, token: &str) -> Result<Option<Arc<AgentAuth>>>;
    /// An agent with its parsed configuration.
    async fn agent_info(&self, agent_id: u64) -> Result<Option<Arc<AgentInfo>>>;
    /// Every agent with its parsed configuration (to build a job's kubeconfig).
    async fn all_agent_infos(&self) -> Result<Vec<Arc<AgentInfo>>>;
    /// The running job a job token belongs to; `None` for unknown or finished jobs.
    async fn authenticate_job(&self, token: &str) -> Result<Option<Arc<kas_authz::JobContext>>>;
    /// What a job of `project` (in `environment`) would look like to authorization:
    /// the project, its group chain and the environment, as for a running job; the
    /// job's own fields (ids, user, protected) are the caller's to fill in.
    async fn job_context(
        &self,
        project: &str,
        environment: Option<&str>,
    ) -> Result<kas_authz::JobContext>;

    /// Starts an operation on a managed application, unless one is running or the
    /// application's state does not allow it ([`Error::Conflict`]).
    async fn begin_app_operation(&self, op: &StartAppOperation) -> Result<ClusterApp>;
    /// Records how the running operation ended, and drops its lease.
    async fn finish_app_operation(
        &self,
        agent_id: u64,
        name: &str,
        outcome: &AppOutcome,
    ) -> Result<ClusterApp>;
    /// Extends `owner`'s lease on a running operation until `until` (0 releases it);
    /// false when the operation no longer runs under `owner`.
    async fn renew_app_lease(
        &self,
        agent_id: u64,
        name: &str,
        owner: &str,
        until: i64,
    ) -> Result<bool>;
    /// Takes over, for `owner` until `until`, running operations whose lease ran out.
    async fn claim_app_operations(&self, owner: &str, until: i64) -> Result<Vec<ClusterApp>>;
    /// Managed applications of one agent, or of every agent.
    async fn list_apps(&self, agent_id: Option<u64>) -> Result<Vec<ClusterApp>>;

    /// A new EKS cluster record in `project`, with a fresh external id, waiting for its
    /// provisioning role.
    async fn prepare_eks(&self, name: &str, project: &str) -> Result<EksCluster>;
    /// Starts creating a prepared (or errored) cluster under `owner`'s lease.
    async fn request_eks(
        &self,
        name: &str,
        spec: &EksSpec,
        owner: &str,
        lease_until: i64,
    ) -> Result<EksWork>;
    /// Starts deleting a cluster under `owner`'s lease.
    async fn delete_eks(&self, name: &str, owner: &str, lease_until: i64) -> Result<EksWork>;
    /// Saves the worker's progress; false when `owner` no longer holds the lease.
    async fn save_eks(&self, owner: &str, work: &EksWork, lease_until: i64) -> Result<bool>;
    /// Takes over, for `owner` until `until`, clusters with work whose lease ran out.
    async fn claim_eks(&self, owner: &str, until: i64) -> Result<Vec<EksWork>>;
    async fn get_eks(&self, name: &str) -> Result<EksCluster>;
    async fn list_eks(&self) -> Result<Vec<EksCluster>>;

    /// Changes made from now on.
    fn subscribe(&self) -> broadcast::Receiver<Change>;
}
