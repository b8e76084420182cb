//! The kubeconfig a CI job gets: one context per agent it may use.

use base64::Engine;
use kas_authz::{decide, Allowed, Decision, JobContext};
use kas_controlplane::AgentInfo;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("could not render the kubeconfig")]
pub struct KubeconfigError(#[source] serde_yaml_ng::Error);

#[derive(Serialize)]
struct Config {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: Vec<NamedCluster>,
    users: Vec<NamedUser>,
    contexts: Vec<NamedContext>,
    preferences: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Serialize)]
struct Cluster {
    server: String,
    #[serde(
        rename = "certificate-authority-data",
        skip_serializing_if = "Option::is_none"
    )]
    ca_data: Option<String>,
}

#[derive(Serialize)]
struct NamedUser {
    name: String,
    user: User,
}

#[derive(Serialize)]
struct User {
    token: String,
}

#[derive(Serialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Serialize)]
struct Context {
    cluster: String,
    user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

/// The agents whose `ci_access` admits `job`, with what each decided.
pub fn authorized_agents(
    job: &JobContext,
    agents: &[Arc<AgentInfo>],
) -> Vec<(Arc<AgentInfo>, Allowed)> {
    agents
        .iter()
        .filter_map(|a| match decide(&a.agent, &a.config, job) {
            Decision::Allow(allowed) => Some((a.clone(), allowed)),
            Decision::Deny(_) => None,
        })
        .collect()
}

/// Renders the kubeconfig of a job: cluster `kas` at `server_url` (with the CA when
/// TLS is on), one user `agent:<id>` with token `ci:<id>:<job token>` and one context
/// `<config project path>:<agent name>` per agent in `authorized`
/// ([`authorized_agents`]). No context is selected: the job picks one with `kubectl
/// config use-context`.
pub fn job_kubeconfig(
    job_token: &str,
    authorized: &[(Arc<AgentInfo>, Allowed)],
    server_url: &str,
    ca_pem: Option<&str>,
) -> Result<String, KubeconfigError> {
    let mut users = Vec::new();
    let mut contexts = Vec::new();
    for (a, allowed) in authorized {
        let user = format!("agent:{}", a.agent.id);
        users.push(NamedUser {
            name: user.clone(),
            user: User {
                token: format!("ci:{}:{}", a.agent.id, job_token),
            },
        });
        contexts.push(NamedContext {
            name: context_name(a),
            context: Context {
                cluster: "kas".into(),
                user,
                namespace: allowed.default_namespace.clone(),
            },
        });
    }
    let cfg = Config {
        api_version: "v1",
        kind: "Config",
        clusters: vec![NamedCluster {
            name: "kas".into(),
            cluster: Cluster {
                server: server_url.to_string(),
                ca_data: ca_pem.map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
            },
        }],
        users,
        contexts,
        preferences: Default::default(),
    };
    serde_yaml_ng::to_string(&cfg).map_err(KubeconfigError)
}

/// The kubeconfig context of an agent: `<config project path>:<agent name>`.
pub fn context_name(a: &AgentInfo) -> String {
    format!("{}:{}", a.agent.config_project.path, a.agent.name)
}
