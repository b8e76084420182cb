//! What the control plane holds, as the admin API shows it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: u64,
    pub path: String,
    pub parent_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: u64,
    pub path: String,
    pub group_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub id: u64,
    pub name: String,
    pub project_id: u64,
    pub project_path: String,
    /// 0 until a configuration is set.
    pub config_version: u64,
    pub created_at: i64,
}

impl Agent {
    /// `<configuration project>:<name>`, the agent's kubeconfig context.
    pub fn context(&self) -> String {
        format!("{}:{}", self.project_path, self.name)
    }
}

/// One of an agent's tokens (never its secret, which only its hash is kept of).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentToken {
    pub id: u64,
    pub agent_id: u64,
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last connection made with it (recorded at most once a minute).
    pub last_used_at: Option<i64>,
    /// Unix seconds; revoked tokens are kept for the record and never work again.
    pub revoked_at: Option<i64>,
}

impl AgentToken {
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentRecord {
    pub id: u64,
    pub project_id: u64,
    pub project_path: String,
    pub name: String,
    pub slug: String,
    pub tier: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Success,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => JobStatus::Running,
            "success" => JobStatus::Success,
            "failed" => JobStatus::Failed,
            "canceled" => JobStatus::Canceled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub project_id: u64,
    pub project_path: String,
    pub pipeline_id: u64,
    pub environment: Option<String>,
    pub username: String,
    pub status: JobStatus,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Whether the job runs for a protected branch or tag.
    pub protected_ref: bool,
}

/// An operation on a managed application, run by a one-off pod `<operation>-<app>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppOperation {
    Install,
    Upgrade,
    Uninstall,
}

impl AppOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            AppOperation::Install => "install",
            AppOperation::Upgrade => "upgrade",
            AppOperation::Uninstall => "uninstall",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "install" => AppOperation::Install,
            "upgrade" => AppOperation::Upgrade,
            "uninstall" => AppOperation::Uninstall,
            _ => return None,
        })
    }

    /// The state while it runs.
    pub fn running_state(self) -> AppState {
        match self {
            AppOperation::Install => AppState::Installing,
            AppOperation::Upgrade => AppState::Upgrading,
            AppOperation::Uninstall => AppState::Uninstalling,
        }
    }
}

/// Where a managed application stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    Installing,
    Upgrading,
    Uninstalling,
    Installed,
    Errored,
    Uninstalled,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Installing => "installing",
            AppState::Upgrading => "upgrading",
            AppState::Uninstalling => "uninstalling",
            AppState::Installed => "installed",
            AppState::Errored => "errored",
            AppState::Uninstalled => "uninstalled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            AppState::Installing,
            AppState::Upgrading,
            AppState::Uninstalling,
            AppState::Installed,
            AppState::Errored,
            AppState::Uninstalled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Whether an operation is running.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            AppState::Installing | AppState::Upgrading | AppState::Uninstalling
        )
    }
}

/// A managed application in an agent's cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterApp {
    pub agent_id: u64,
    /// The catalogue name (`ingress-nginx`, ...).
    pub name: String,
    pub state: AppState,
    /// The last operation (the running one while the state says so).
    pub operation: AppOperation,
    /// The chart version asked for (installed, once `installed`).
    pub version: Option<String>,
    /// Why the last operation failed (a code, never the cluster's words).
    pub error_code: Option<String>,
    /// The operation's pod in `gitlab-managed-apps`.
    pub pod: String,
    pub updated_at: i64,
    /// The values given with the last install or upgrade (may hold secrets: never
    /// shown by the API).
    #[serde(skip)]
    pub values_yaml: String,
}

/// Where the creation (or deletion) of an EKS cluster stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EksState {
    /// Prepared: waiting for the user to create the provisioning role.
    AwaitingRole,
    AssumingRole,
    CreatingStack,
    /// The CloudFormation stack is being created (10-15 minutes on AWS).
    StackInProgress,
    /// Writing aws-auth and kas's ServiceAccount into the new cluster.
    Configuring,
    /// Registering an agent and installing agentk into the cluster.
    InstallingAgent,
    Ready,
    Errored,
    Deleting,
    Deleted,
}

impl EksState {
    const ALL: [EksState; 10] = [
        EksState::AwaitingRole,
        EksState::AssumingRole,
        EksState::CreatingStack,
        EksState::StackInProgress,
        EksState::Configuring,
        EksState::InstallingAgent,
        EksState::Ready,
        EksState::Errored,
        EksState::Deleting,
        EksState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EksState::AwaitingRole => "awaiting_role",
            EksState::AssumingRole => "assuming_role",
            EksState::CreatingStack => "creating_stack",
            EksState::StackInProgress => "stack_in_progress",
            EksState::Configuring => "configuring",
            EksState::InstallingAgent => "installing_agent",
            EksState::Ready => "ready",
            EksState::Errored => "errored",
            EksState::Deleting => "deleting",
            EksState::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether kas has background work to do for the cluster in this state.
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            EksState::AwaitingRole | EksState::Ready | EksState::Errored | EksState::Deleted
        )
    }
}

/// What the user asks for (`kasctl cluster create eks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksSpec {
    pub region: String,
    /// The provisioning role in the customer's account (trusting kas's account with
    /// the cluster's external id).
    pub role_arn: String,
    pub vpc_id: String,
    pub subnet_ids: Vec<String>,
    pub security_group_id: String,
    /// The cluster management role EKS assumes.
    pub cluster_role_arn: String,
    pub kubernetes_version: String,
    pub instance_type: String,
    pub node_count: u32,
}

/// One event of the cluster's CloudFormation stack (no AWS-written reason: only what
/// happened to which resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksEvent {
    pub time: i64,
    pub resource: String,
    pub status: String,
}

/// An EKS cluster kas creates in a customer's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EksCluster {
    pub id: u64,
    pub name: String,
    pub project_path: String,
    pub state: EksState,
    /// Why it failed: a code, never AWS's or the cluster's words.
    pub error_code: Option<String>,
    /// The external id the provisioning role's trust policy must require.
    pub external_id: String,
    pub spec: Option<EksSpec>,
    pub stack_name: String,
    pub stack_status: Option<String>,
    pub endpoint: Option<String>,
    /// The agent registered for the cluster, once it is.
    pub agent_id: Option<u64>,
    /// Whether temporary AWS credentials are held now (wiped when no longer needed).
    pub holds_credentials: bool,
    pub events: Vec<EksEvent>,
    pub created_at: i64,
    pub updated_at: i64,
}
