//! The Kubernetes API proxy for CI jobs: `Authorization: Bearer ci:<agent id>:<job token>`
//! in, an authorized request down the agent's tunnel out, with the impersonation the
//! agent's `ci_access` decides. Also builds the kubeconfig a job uses.
//!
//! It does not terminate TLS or own sockets (the server does), and it never forwards
//! the client's `Authorization` or `Impersonate-*` headers.

pub mod audit;
mod kubeconfig;
mod proxy;
mod status;
mod token;

pub use kubeconfig::{authorized_agents, context_name, job_kubeconfig, KubeconfigError};
pub use proxy::{
    new_request_id, upstream_head, upstream_path, K8sProxy, Observed, ProxyBody, ProxyObserver,
    ProxyOptions,
};
pub use status::status_response;
pub use token::{parse_ci_token, CiToken, TokenError};
