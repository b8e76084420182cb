//! Connection limits of the listeners and the agent connection's settings, with their
//! defaults (sized for 15,000 agents on one kas) and the file's overrides.

use super::file::{Count, FileConfig, FileLimits};
use super::parse_duration;
use crate::listeners::{Limits, MaxAge};
use std::time::Duration;

/// Connection limits of every listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    pub agent: Limits,
    pub k8s_proxy: Limits,
    pub api: Limits,
    pub observability: Limits,
    pub private: Limits,
}

/// Settings of agent connections beyond the listener's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Time for the first message of a configuration stream or tunnel.
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// New streams per token and minute (0: unlimited).
    pub connections_per_token_per_minute: u32,
    /// Limits on the `ci_access` entries of agents' configurations.
    pub ci_access_limits: kas_authz::CiAccessLimits,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(10),
            connections_per_token_per_minute: 40_000,
            ci_access_limits: kas_authz::CiAccessLimits::default(),
        }
    }
}

impl Default for ListenerLimits {
    /// Sized for 15,000 agents (one connection per agent replica) on one kas.
    fn default() -> Self {
        let l = |max, idle| Limits {
            max_connections: max,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(idle),
            max_age: None,
        };
        let mut agent = l(20_000, 60);
        agent.max_age = Some(MaxAge {
            age: Duration::from_secs(2 * 3600),
            grace: Duration::from_secs(300),
        });
        ListenerLimits {
            agent,
            k8s_proxy: l(10_000, 120),
            api: l(1_000, 60),
            observability: l(256, 60),
            private: l(4_096, 300),
        }
    }
}

impl ListenerLimits {
    /// Every connection the listeners may hold at once.
    pub fn total(&self) -> usize {
        [
            &self.agent,
            &self.k8s_proxy,
            &self.api,
            &self.observability,
            &self.private,
        ]
        .iter()
        .map(|l| l.max_connections)
        .sum()
    }
}

/// A count setting of at least 1: `default` when absent, the problem recorded when invalid.
fn count_setting(
    name: &str,
    value: &Option<Count>,
    default: usize,
    errors: &mut Vec<String>,
) -> usize {
    match value.as_ref().map(|c| (c, c.value())) {
        None => default,
        Some((_, Some(n))) if n > 0 => n,
        Some((c, _)) => {
            errors.push(format!(
                "{name} must be a whole number of at least 1, not {c:?}"
            ));
            default
        }
    }
}

/// A duration setting: `default` when absent, the problem recorded when invalid.
pub(super) fn duration_setting(
    name: &str,
    value: &Option<String>,
    default: Duration,
    min: Duration,
    errors: &mut Vec<String>,
) -> Duration {
    match value.as_deref().map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= min => d,
        Some(Ok(_)) => {
            errors.push(format!(
                "{name} must be at least {}",
                humantime::format_duration(min)
            ));
            default
        }
        Some(Err(e)) => {
            errors.push(format!("{name}: {e}"));
            default
        }
    }
}

/// Applies `connections.<name>` over `limits`.
fn apply_limits(
    name: &str,
    file: &Option<FileLimits>,
    limits: &mut Limits,
    errors: &mut Vec<String>,
) {
    let Some(f) = file else { return };
    let key = |k: &str| format!("connections.{name}.{k}");
    limits.max_connections = count_setting(&key("max"), &f.max, limits.max_connections, errors);
    let ms = Duration::from_millis(1);
    limits.first_request_timeout = duration_setting(
        &key("first_request_timeout"),
        &f.first_request_timeout,
        limits.first_request_timeout,
        ms,
        errors,
    );
    limits.idle_timeout = duration_setting(
        &key("idle_timeout"),
        &f.idle_timeout,
        limits.idle_timeout,
        ms,
        errors,
    );
    limits.handshake_timeout = duration_setting(
        &key("handshake_timeout"),
        &f.handshake_timeout,
        limits.handshake_timeout,
        ms,
        errors,
    );
}

/// The listeners' limits and the agent settings from the file.
pub(super) fn connection_settings(
    file: &FileConfig,
    errors: &mut Vec<String>,
) -> (ListenerLimits, AgentSettings) {
    let mut limits = ListenerLimits::default();
    let c = &file.connections;
    apply_limits("agent", &c.agent, &mut limits.agent, errors);
    apply_limits("k8s_proxy", &c.k8s_proxy, &mut limits.k8s_proxy, errors);
    apply_limits("api", &c.api, &mut limits.api, errors);
    apply_limits(
        "observability",
        &c.observability,
        &mut limits.observability,
        errors,
    );
    apply_limits("private", &c.private, &mut limits.private, errors);
    let a = &file.agent;
    let d = AgentSettings::default();
    let ms = Duration::from_millis(1);
    let default_age = limits.agent.max_age.unwrap_or(MaxAge {
        age: Duration::from_secs(2 * 3600),
        grace: Duration::from_secs(300),
    });
    let age = duration_setting(
        "agent.max_connection_age",
        &a.max_connection_age,
        default_age.age,
        Duration::ZERO,
        errors,
    );
    let grace = duration_setting(
        "agent.max_connection_age_grace",
        &a.max_connection_age_grace,
        default_age.grace,
        Duration::ZERO,
        errors,
    );
    limits.agent.max_age = (!age.is_zero()).then_some(MaxAge { age, grace });
    let settings = AgentSettings {
        handshake_timeout: duration_setting(
            "agent.handshake_timeout",
            &a.handshake_timeout,
            d.handshake_timeout,
            ms,
            errors,
        ),
        keepalive_interval: duration_setting(
            "agent.keepalive_interval",
            &a.keepalive_interval,
            d.keepalive_interval,
            Duration::from_secs(1),
            errors,
        ),
        keepalive_timeout: duration_setting(
            "agent.keepalive_timeout",
            &a.keepalive_timeout,
            d.keepalive_timeout,
            Duration::from_secs(1),
            errors,
        ),
        connections_per_token_per_minute: a
            .connections_per_token_per_minute
            .unwrap_or(d.connections_per_token_per_minute),
        ci_access_limits: kas_authz::CiAccessLimits {
            max_projects: count_setting(
                "agent.max_ci_access_projects",
                &a.max_ci_access_projects,
                d.ci_access_limits.max_projects,
                errors,
            ),
            max_groups: count_setting(
                "agent.max_ci_access_groups",
                &a.max_ci_access_groups,
                d.ci_access_limits.max_groups,
                errors,
            ),
        },
    };
    (limits, settings)
}
