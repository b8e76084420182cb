//! Records returned by the control plane (the admin API's records, and what the
//! request path needs).

use std::sync::Arc;

pub use kas_api::records::{
    Agent, AgentToken, AppOperation, AppState, ClusterApp, EksCluster, EksEvent, EksSpec, EksState,
    EnvironmentRecord, Group, Job, JobStatus, Project,
};

/// An agent authenticated by one of its tokens.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    /// The token the agent presented (connections made with it close when it is revoked).
    pub token_id: u64,
    pub info: Arc<AgentInfo>,
}

/// An agent with its parsed configuration, as the request path needs it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub agent: kas_authz::AgentRef,
    pub config: kas_authz::AgentConfig,
    pub config_yaml: String,
    pub config_version: u64,
}

/// Parameters of a new CI job.
#[derive(Debug, Clone, Default)]
pub struct StartJob {
    pub project: String,
    pub environment: Option<String>,
    pub username: String,
    /// A new pipeline id is allocated when absent.
    pub pipeline_id: Option<u64>,
    /// Whether the job runs for a protected branch or tag.
    pub protected_ref: bool,
}

/// An operation to start on a managed application.
#[derive(Debug, Clone)]
pub struct StartAppOperation {
    pub agent_id: u64,
    pub name: String,
    pub operation: AppOperation,
    pub version: Option<String>,
    pub values_yaml: String,
    /// The kas instance that runs it, and until when (unix seconds) unless renewed.
    pub owner: String,
    pub lease_until: i64,
}

/// How an operation on a managed application ended.
#[derive(Debug, Clone)]
pub struct AppOutcome {
    pub state: AppState,
    pub version: Option<String>,
    pub error_code: Option<String>,
}

/// Temporary AWS credentials from AssumeRole (masked in `Debug`; wiped from the
/// record once no longer needed).
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &"****")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// An EKS cluster as the kas working on it sees it: the record and what only the
/// worker needs.
#[derive(Debug, Clone)]
pub struct EksWork {
    pub cluster: EksCluster,
    pub stack_id: Option<String>,
    /// The cluster's CA (base64 PEM, as EKS gives it).
    pub ca_data: Option<String>,
    pub node_role_arn: Option<String>,
    pub credentials: Option<AwsCredentials>,
    /// Polls of the current step (for backoff).
    pub polls: u32,
}
