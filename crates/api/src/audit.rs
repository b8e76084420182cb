//! The audit trail's entries: one per request through the Kubernetes API proxy
//! ([`RequestRecord`]) and one per changing admin call ([`AdminRecord`]), each one JSON
//! line; and the filters of `GET /audit` ([`AuditQuery`]).

use crate::Identity;
use serde::{Deserialize, Serialize};

/// One request through the Kubernetes API proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Unix seconds (with fraction) when the request arrived.
    pub time: f64,
    pub request_id: String,
    pub job_id: u64,
    pub pipeline_id: u64,
    pub project: String,
    pub environment: Option<String>,
    pub user: String,
    pub agent_id: u64,
    pub access_as: String,
    /// `None` for `access_as: agent`.
    pub impersonated: Option<Identity>,
    pub verb: String,
    pub path: String,
    pub code: u16,
    /// Response body bytes sent to the client (0 for upgraded connections).
    pub bytes: u64,
    pub duration_ms: f64,
    /// False when the client went away (or the stream broke) before the body ended.
    pub completed: bool,
}

/// The `kind` of an [`AdminRecord`] (request records carry none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminKind {
    Admin,
}

/// One admin call that changes something (POST, PUT, DELETE), successful or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub time: f64,
    pub kind: AdminKind,
    /// The admin token's id (`admin-token:<8 hex>`), never the token.
    pub actor: Option<String>,
    /// The client's address.
    pub peer: Option<String>,
    pub method: String,
    pub path: String,
    pub code: u16,
    /// `ok` or `failed`.
    pub outcome: String,
    /// What was done, e.g. `agent.token.revoke` (absent when the call failed early).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// What it was done to, e.g. `acme/agents:prod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// More facts (never secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditEntry {
    Admin(AdminRecord),
    Request(RequestRecord),
}

impl AuditEntry {
    /// `admin` or `request`.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEntry::Admin(_) => "admin",
            AuditEntry::Request(_) => "request",
        }
    }

    pub fn time(&self) -> f64 {
        match self {
            AuditEntry::Admin(r) => r.time,
            AuditEntry::Request(r) => r.time,
        }
    }

    pub fn job_id(&self) -> Option<u64> {
        match self {
            AuditEntry::Admin(r) => r.job_id,
            AuditEntry::Request(r) => Some(r.job_id),
        }
    }

    pub fn agent_id(&self) -> Option<u64> {
        match self {
            AuditEntry::Admin(r) => r.agent_id,
            AuditEntry::Request(r) => Some(r.agent_id),
        }
    }

    pub fn project(&self) -> Option<&str> {
        match self {
            AuditEntry::Admin(r) => r.project.as_deref(),
            AuditEntry::Request(r) => Some(&r.project),
        }
    }

    /// Whether the entry passes the query's filters (not its limit).
    pub fn matches(&self, q: &AuditQuery) -> bool {
        q.kind.as_deref().is_none_or(|k| k == self.kind())
            && q.job.is_none_or(|j| self.job_id() == Some(j))
            && q.agent.is_none_or(|a| self.agent_id() == Some(a))
            && q.project.as_deref().is_none_or(|p| {
                self.project()
                    .is_some_and(|vp| vp.eq_ignore_ascii_case(p.trim_matches('/')))
            })
            && q.since.is_none_or(|s| self.time() >= s)
    }
}

/// Filters of `GET /audit` (`kasctl audit`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// `admin` (admin actions) or `request` (proxy requests); both when absent.
    pub kind: Option<String>,
    pub job: Option<u64>,
    pub project: Option<String>,
    pub agent: Option<u64>,
    /// Unix seconds.
    pub since: Option<f64>,
    /// The newest this many matches (default 1000).
    pub limit: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_either_kind_read_back() {
        let request = r#"{"time":1.5,"request_id":"r","job_id":3,"pipeline_id":4,"project":"a/b","environment":null,"user":"u","agent_id":7,"access_as":"ci_job","impersonated":{"username":"gitlab:ci_job:3","groups":["g"],"extra":{}},"verb":"list","path":"/api/v1/pods","code":200,"bytes":10,"duration_ms":1.0,"completed":true}"#;
        let admin = r#"{"time":2.0,"kind":"admin","actor":"admin-token:0011aabb","peer":null,"method":"POST","path":"/api/v1/agents","code":200,"outcome":"ok","action":"agent.create","target":"a/b:prod","agent_id":7}"#;
        let r: AuditEntry = serde_json::from_str(request).expect("request");
        let a: AuditEntry = serde_json::from_str(admin).expect("admin");
        assert_eq!((r.kind(), a.kind()), ("request", "admin"));
        let by_agent = AuditQuery {
            agent: Some(7),
            ..Default::default()
        };
        assert!(r.matches(&by_agent) && a.matches(&by_agent));
        let admin_only = AuditQuery {
            kind: Some("admin".into()),
            project: Some("A/B/".into()),
            ..Default::default()
        };
        assert!(!r.matches(&admin_only));
        assert!(!a.matches(&admin_only), "the admin record names no project");
        // What is written reads back the same.
        assert_eq!(
            serde_json::to_value(&r).expect("json"),
            serde_json::from_str::<serde_json::Value>(request).expect("json")
        );
    }
}
