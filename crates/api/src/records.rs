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
