//! The types of kas's HTTP APIs, shared by kas (which serves them), kasctl and the
//! application client library (which call them): the admin API's requests, answers and
//! paths ([`admin`]), the records they carry ([`records`]), the audit trail's entries
//! ([`audit`]) and the application API's ([`application`]), and the JSON error body
//! every one of them answers failures with ([`ErrorBody`]).
//!
//! Plain serde types: no I/O, no HTTP client or server.

pub mod admin;
pub mod application;
pub mod audit;
pub mod clock;
pub mod error;
pub mod records;

pub use records::{
    Agent, AgentToken, AppOperation, AppState, ClusterApp, EksCluster, EksEvent, EksSpec, EksState,
    EnvironmentRecord, Group, Job, JobStatus, Project,
};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An identity the cluster sees through impersonation, as the audit trail and
/// `kasctl access explain` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The body of a failed admin or application API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Safe to show: never an upstream body or an internal detail.
    pub error: String,
    /// The HTTP status again (the application API adds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

/// The token of an `Authorization` header value `Bearer <token>` (the scheme
/// case-insensitive, as RFC 9110 says; surrounding spaces ignored). `None` for another
/// scheme or an empty token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token(" BEARER abc"), Some("abc"));
        for refused in ["Basic abc", "Bearer", "Bearer  ", "Bearerabc", "", "abc"] {
            assert_eq!(bearer_token(refused), None, "{refused:?}");
        }
    }
}
