//! Which agents are connected, to this kas and (with a shared registry) to every other:
//! what `kasctl agents`, the agents page and the application API list.

use crate::AgentRouter;
use kas_api::admin::{ConnectedAgent, ConnectedReplica, ReplicaMeta};
use kas_proto::v1::AgentMeta;

/// This build's version (kas and agentk share it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A warning when an agent's version is more than one minor version away from kas's
/// (or of another major version); such agents are served, but may miss or misread
/// features.
pub fn version_skew(agent_version: &str) -> Option<String> {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.trim().trim_start_matches('v').split(['.', '-', '+']);
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    let (km, kn) = parse(VERSION)?;
    let Some((am, an)) = parse(agent_version) else {
        return Some(format!(
            "agent version `{agent_version}` is unknown; kas is {VERSION}"
        ));
    };
    (am != km || an.abs_diff(kn) > 1).then(|| {
        format!(
            "agent version {agent_version} is more than one minor version away from kas {VERSION}; upgrade the agent (or kas)"
        )
    })
}

/// What a replica reported about itself, as the admin API shows it.
pub fn replica_meta(m: &AgentMeta) -> ReplicaMeta {
    ReplicaMeta {
        pod_name: m.pod_name.clone(),
        pod_namespace: m.pod_namespace.clone(),
        node_name: m.node_name.clone(),
        kubernetes_version: m.kubernetes_version.clone(),
    }
}

impl AgentRouter {
    /// Connected agents on this kas and, with a shared registry, on every other kas,
    /// each replica with a warning when its version is too far from kas's.
    pub async fn connected_agents(&self) -> Vec<ConnectedAgent> {
        let own = self.kas_id().map(str::to_string);
        let mut agents: Vec<ConnectedAgent> = self
            .registry()
            .snapshot()
            .into_iter()
            .map(|a| ConnectedAgent {
                agent_id: a.agent_id,
                idle_tunnels: a.idle_tunnels,
                busy_tunnels: a.busy_tunnels,
                replicas: a
                    .replicas
                    .into_iter()
                    .map(|r| ConnectedReplica {
                        warning: version_skew(&r.info.agent_version),
                        meta: replica_meta(&r.info.meta),
                        replica_id: r.info.replica_id,
                        agent_version: r.info.agent_version,
                        peer: r.info.peer,
                        connected_since: r.connected_since,
                        config_version: r.config_version,
                        idle_tunnels: r.idle_tunnels,
                        kas: own.clone(),
                    })
                    .collect(),
            })
            .collect();
        match self.connections().await {
            None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "shared registry unavailable; listing this kas's agents only");
            }
            Some(Ok(conns)) => {
                let elsewhere = conns
                    .into_iter()
                    .filter(|c| Some(&c.kas_id) != own.as_ref());
                for c in elsewhere {
                    let replica = ConnectedReplica {
                        warning: version_skew(&c.agent_version),
                        replica_id: c.replica_id,
                        agent_version: c.agent_version,
                        peer: String::new(),
                        connected_since: c.since,
                        config_version: 0,
                        idle_tunnels: 0,
                        kas: Some(c.kas_id),
                        meta: c.meta,
                    };
                    match agents.iter_mut().find(|a| a.agent_id == c.agent_id) {
                        Some(a) => a.replicas.push(replica),
                        None => agents.push(ConnectedAgent {
                            agent_id: c.agent_id,
                            replicas: vec![replica],
                            idle_tunnels: 0,
                            busy_tunnels: 0,
                        }),
                    }
                }
                agents.sort_by_key(|a| a.agent_id);
            }
        }
        agents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_more_than_one_minor_apart_are_flagged() {
        let (major, minor) = {
            let mut it = VERSION.split('.');
            let m: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let n: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            (m, n)
        };
        assert_eq!(version_skew(VERSION), None);
        assert_eq!(version_skew(&format!("v{major}.{}.9", minor + 1)), None);
        assert!(version_skew(&format!("{major}.{}.0", minor + 2)).is_some());
        assert!(version_skew(&format!("{}.{minor}.0", major + 1)).is_some());
        assert!(version_skew("unknown").is_some());
    }
}
