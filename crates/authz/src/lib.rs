//! The CI access model: the `ci_access` section of an agent's `config.yaml`, its
//! validation, and the pure decision "may this CI job use this agent, and as whom".
//!
//! It also parses `service_access` (which in-cluster services the application may
//! reach through the agent; see [`services`]).
//!
//! Everything here is synchronous and free of I/O so it can be tested exhaustively.
//! It does not look anything up: callers pass the job's project, group chain and
//! environment, and the agent's parsed configuration. It builds the impersonation
//! identity only from that decision, never from client input.

mod config;
mod decide;
mod glob;
pub mod services;

pub use config::{
    parse_agent_config, parse_agent_config_with, AccessAs, AgentConfig, CiAccess, CiAccessLimits,
    ConfigError, ConfigWarning, GroupEntry, ImpersonateIdentity, Logging, ManagedNamespaces,
    Observability, ProjectEntry, LOG_LEVELS, MAX_GROUPS, MAX_PROJECTS,
};
pub use decide::{
    decide, AgentRef, Allowed, Decision, DenyReason, EntryKind, Environment, Identity, JobContext,
    Mode, Named,
};
pub use glob::environment_matches;

/// The first path segment: the root group (or user namespace) of a project or group path.
pub fn root_of(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

/// Whether `path` is `ancestor` itself or lies below it. Paths compare ASCII
/// case-insensitively, as group and project paths do.
pub fn path_within(path: &str, ancestor: &str) -> bool {
    let (p, a) = (path.as_bytes(), ancestor.as_bytes());
    if p.len() < a.len() || !p[..a.len()].eq_ignore_ascii_case(a) {
        return false;
    }
    p.len() == a.len() || p[a.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within() {
        assert!(path_within("a/b/c", "a/b"));
        assert!(path_within("a/b", "a/b"));
        assert!(path_within("A/B/c", "a/b"));
        assert!(!path_within("a/bc", "a/b"));
        assert!(!path_within("a", "a/b"));
        assert_eq!(root_of("acme/x/y"), "acme");
        assert_eq!(root_of("acme"), "acme");
    }
}
