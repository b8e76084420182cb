//! A typed client of kas's admin API: one method per endpoint, taking and returning
//! the `kas-api` types kas serves.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kas_api::admin::{self, paths};
use kas_api::audit::{AuditEntry, AuditQuery};
use kas_api::{Agent, AgentToken, EnvironmentRecord, ErrorBody, Group, Job, Project};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// kas's admin API at `base`, with the admin token.
pub struct AdminClient {
    base: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// `path?query` with the query encoded from `q`.
fn with_query<Q: Serialize>(path: &str, q: &Q) -> Result<String> {
    let query = serde_urlencoded::to_string(q).context("encoding the query")?;
    Ok(if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    })
}

impl AdminClient {
    pub fn new(base: &str, token: String) -> Self {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let uri = format!("{}{}{path_and_query}", self.base, admin::PREFIX);
        let data = match body {
            Some(b) => serde_json::to_vec(b).context("encoding the request")?,
            None => Vec::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .with_context(|| format!("invalid server URL `{}`", self.base))?;
        let resp = self.http.request(req).await.with_context(|| {
            format!(
                "cannot reach kas at {} (is it running? set --server or KASCTL_SERVER)",
                self.base
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading kas's answer")?
            .to_bytes();
        if !status.is_success() {
            let msg = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => e.error,
                Err(_) => String::from_utf8_lossy(&bytes).trim().to_string(),
            };
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("kas answered {path_and_query} with unexpected JSON"))
    }

    async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path_and_query, None).await
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.call(method, path, Some(body)).await
    }

    pub async fn create_group(&self, r: &admin::CreatePath) -> Result<Group> {
        self.send(Method::POST, paths::GROUPS, r).await
    }

    pub async fn groups(&self) -> Result<Vec<Group>> {
        self.get(paths::GROUPS).await
    }

    pub async fn create_project(&self, r: &admin::CreatePath) -> Result<Project> {
        self.send(Method::POST, paths::PROJECTS, r).await
    }

    pub async fn projects(&self) -> Result<Vec<Project>> {
        self.get(paths::PROJECTS).await
    }

    pub async fn create_agent(&self, r: &admin::AgentName) -> Result<admin::CreatedAgent> {
        self.send(Method::POST, paths::AGENTS, r).await
    }

    pub async fn agents(&self) -> Result<Vec<Agent>> {
        self.get(paths::AGENTS).await
    }

    pub async fn delete_agent(&self, r: &admin::AgentName) -> Result<Agent> {
        let path = with_query(paths::AGENTS, r)?;
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    pub async fn create_token(&self, r: &admin::TokenRequest) -> Result<admin::CreatedToken> {
        self.send(Method::POST, paths::AGENT_TOKENS, r).await
    }

    pub async fn tokens(&self, r: &admin::AgentName) -> Result<Vec<AgentToken>> {
        self.get(&with_query(paths::AGENT_TOKENS, r)?).await
    }

    pub async fn revoke_token(&self, r: &admin::TokenRequest) -> Result<AgentToken> {
        self.send(Method::POST, paths::REVOKE_AGENT_TOKEN, r).await
    }

    pub async fn config(&self, r: &admin::AgentName) -> Result<admin::StoredConfig> {
        self.get(&with_query(paths::AGENT_CONFIG, r)?).await
    }

    pub async fn set_config(&self, r: &admin::SetConfig) -> Result<admin::ConfigSaved> {
        self.send(Method::PUT, paths::AGENT_CONFIG, r).await
    }

    pub async fn create_environment(
        &self,
        r: &admin::CreateEnvironment,
    ) -> Result<EnvironmentRecord> {
        self.send(Method::POST, paths::ENVIRONMENTS, r).await
    }

    pub async fn environments(
        &self,
        q: &admin::EnvironmentQuery,
    ) -> Result<Vec<EnvironmentRecord>> {
        self.get(&with_query(paths::ENVIRONMENTS, q)?).await
    }

    pub async fn start_job(&self, r: &admin::StartJob) -> Result<admin::StartedJob> {
        self.send(Method::POST, paths::JOBS, r).await
    }

    pub async fn finish_job(&self, id: u64, r: &admin::FinishJob) -> Result<Job> {
        self.send(Method::POST, &paths::finish_job(id), r).await
    }

    pub async fn jobs(&self) -> Result<Vec<Job>> {
        self.get(paths::JOBS).await
    }

    pub async fn connected_agents(&self) -> Result<Vec<admin::NamedConnectedAgent>> {
        self.get(paths::CONNECTED_AGENTS).await
    }

    pub async fn explain(&self, q: &admin::ExplainQuery) -> Result<admin::Explanation> {
        self.get(&with_query(paths::EXPLAIN, q)?).await
    }

    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.get(&with_query(paths::AUDIT, q)?).await
    }

    pub async fn cluster_apps(&self, q: &admin::AppsQuery) -> Result<admin::ClusterApps> {
        self.get(&with_query(paths::CLUSTER_APPS, q)?).await
    }

    pub async fn start_cluster_app(&self, r: &admin::AppRequest) -> Result<kas_api::ClusterApp> {
        self.send(Method::POST, paths::CLUSTER_APPS, r).await
    }

    pub async fn eks_prepare(&self, r: &admin::EksPrepare) -> Result<admin::EksPrepared> {
        self.send(Method::POST, paths::EKS_PREPARE, r).await
    }

    pub async fn eks_create(&self, r: &admin::EksCreate) -> Result<kas_api::EksCluster> {
        self.send(Method::POST, paths::EKS_CLUSTERS, r).await
    }

    pub async fn eks_delete(&self, r: &admin::EksName) -> Result<kas_api::EksCluster> {
        self.call::<(), _>(Method::DELETE, &with_query(paths::EKS_CLUSTERS, r)?, None)
            .await
    }

    pub async fn eks_clusters(&self, name: Option<&str>) -> Result<Vec<kas_api::EksCluster>> {
        match name {
            Some(n) => {
                let q = admin::EksName {
                    name: n.to_string(),
                };
                self.get(&with_query(paths::EKS_CLUSTERS, &q)?).await
            }
            None => self.get(paths::EKS_CLUSTERS).await,
        }
    }
}
