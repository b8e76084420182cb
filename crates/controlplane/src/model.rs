//! Records returned by the control plane.

use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub id: u64,
    pub path: String,
    pub parent_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    pub id: u64,
    pub path: String,
    pub group_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub id: u64,
    pub name: String,
    pub project_id: u64,
    pub project_path: String,
    /// 0 until a configuration is set.
    pub config_version: u64,
    pub created_at: i64,
}

/// One of an agent's tokens (never its secret, which only its hash is kept of).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvironmentRecord {
    pub id: u64,
    pub project_id: u64,
    pub project_path: String,
    pub name: String,
    pub slug: String,
    pub tier: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
