//! The agent's own access to its cluster's API, configured by `kube`'s [`Config`]: the
//! pod's ServiceAccount in a cluster (its token re-read as it rotates, its CA re-read as
//! it rotates), or a kubeconfig outside one, with everything `kube` supports there:
//! bearer tokens and token files, client certificates, exec credential plugins (their
//! tokens refreshed before they expire), CA data, `tls-server-name` and (discouraged)
//! `insecure-skip-tls-verify`.
//!
//! It does not use `kube`'s client: requests to the API are forwarded byte for byte,
//! upgrades included, on a plain HTTP/1.1 connection pool with `kube`'s TLS connector
//! and authentication layer.

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kube::client::middleware::AuthLayer;
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Config;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tower::{Layer, ServiceExt};

/// Request body type towards the cluster.
pub type UpstreamBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long connecting to the API server may take when the configuration does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("in-cluster configuration: {0}; outside a cluster pass --kubeconfig")]
    InCluster(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("cluster client: {0}")]
    Client(String),
}

/// Where the cluster's API is and how to authenticate to it.
#[derive(Clone)]
pub struct ClusterAccess {
    config: Config,
}

impl std::fmt::Debug for ClusterAccess {
    /// The server only: the configuration holds credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAccess")
            .field("server", &self.config.cluster_url)
            .finish_non_exhaustive()
    }
}

/// An HTTP/1.1 client for the cluster (HTTP/1.1 so upgrades work), adding the agent's
/// credentials to every request when it has some.
#[derive(Clone)]
pub struct ClusterClient {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
    auth: Option<std::sync::Arc<AuthLayer>>,
}

impl ClusterClient {
    /// Sends `req`; an `Authorization` header it carries is replaced by the agent's.
    /// (Boxed: the layered service's future defeats the `Send` inference of callers.)
    pub fn request(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<Incoming>, BoxError>> {
        match &self.auth {
            None => {
                let sent = self.http.request(req);
                Box::pin(async move { sent.await.map_err(BoxError::from) })
            }
            Some(auth) => {
                // Layering clones the pool handle and the credential source. Both arms
                // of kube's layer must fail with one error type.
                let http = self.http.clone().map_err(BoxError::from);
                Box::pin(ServiceExt::<Request<UpstreamBody>>::oneshot(
                    auth.layer(http),
                    req,
                ))
            }
        }
    }
}

/// The cluster of the context in use, if it names a proxy.
fn proxied_cluster(kubeconfig: &Kubeconfig, context: Option<&str>) -> Option<String> {
    let context = context.or(kubeconfig.current_context.as_deref())?;
    let cluster = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)?
        .context
        .as_ref()?
        .cluster
        .clone();
    let named = kubeconfig.clusters.iter().find(|c| c.name == cluster)?;
    named.cluster.as_ref()?.proxy_url.as_ref()?;
    Some(cluster)
}

impl ClusterAccess {
    /// Access as `config` describes.
    pub fn new(mut config: Config) -> Result<Self, ClusterConfigError> {
        // These would act on every forwarded request behind kas's back.
        if config.auth_info.impersonate.is_some()
            || config.auth_info.impersonate_groups.is_some()
            || config.auth_info.impersonate_uid.is_some()
            || config.auth_info.impersonate_user_extra.is_some()
        {
            return Err(ClusterConfigError::Unsupported(
                "the cluster configuration impersonates (`as`, `as-groups`...): agentk impersonates per request as kas decides; remove it".into(),
            ));
        }
        // kube takes HTTPS_PROXY for the cluster too; agentk's proxy settings are for
        // reaching kas, and the cluster's API is reached directly (as before `kube`).
        config.proxy_url = None;
        Ok(ClusterAccess { config })
    }

    /// In-cluster configuration from the pod's ServiceAccount.
    pub fn in_cluster() -> Result<Self, ClusterConfigError> {
        let config =
            Config::incluster().map_err(|e| ClusterConfigError::InCluster(e.to_string()))?;
        Self::new(config)
    }

    /// From a kubeconfig file (its current context, or `context`).
    pub async fn from_kubeconfig(
        path: &Path,
        context: Option<&str>,
    ) -> Result<Self, ClusterConfigError> {
        let err = |e: &dyn std::fmt::Display| ClusterConfigError::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| err(&e))?;
        if let Some(cluster) = proxied_cluster(&kubeconfig, context) {
            return Err(err(&format!(
                "cluster `{cluster}` names a proxy-url; agentk reaches the cluster's API directly, remove it"
            )));
        }
        let options = KubeConfigOptions {
            context: context.map(str::to_string),
            ..Default::default()
        };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| err(&e))?;
        Self::new(config)
    }

    /// The API server's URL.
    pub fn server(&self) -> &Uri {
        &self.config.cluster_url
    }

    /// A pooled client for the cluster's API, with the agent's credentials.
    pub fn client(&self) -> Result<ClusterClient, ClusterConfigError> {
        let auth = self
            .config
            .auth_layer()
            .map_err(|e| ClusterConfigError::Client(e.to_string()))?;
        Ok(ClusterClient {
            http: Self::http(&self.config)?,
            auth: auth.map(std::sync::Arc::new),
        })
    }

    /// A client for in-cluster services: it trusts the cluster's CA but never presents
    /// the agent's credentials (services must not receive them).
    pub fn service_client(&self) -> Result<ClusterClient, ClusterConfigError> {
        let mut config = self.config.clone();
        config.auth_info = Default::default();
        Ok(ClusterClient {
            http: Self::http(&config)?,
            auth: None,
        })
    }

    fn http(
        config: &Config,
    ) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>, ClusterConfigError>
    {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout.unwrap_or(CONNECT_TIMEOUT)));
        let connector = config
            .rustls_https_connector_with_connector(http)
            .map_err(|e| ClusterConfigError::Client(e.to_string()))?;
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:6443\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\nusers:\n- name: u\n  user: {token: abc}\n";

    async fn load(text: &str, context: Option<&str>) -> Result<ClusterAccess, ClusterConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("kc.yaml");
        std::fs::write(&p, text).expect("write");
        ClusterAccess::from_kubeconfig(&p, context).await
    }

    #[tokio::test]
    async fn kubeconfig_context_and_refusals() {
        let a = load(KUBECONFIG, None).await.expect("parse");
        assert_eq!(a.server().to_string(), "http://127.0.0.1:6443/");
        assert!(!format!("{a:?}").contains("abc"), "{a:?}");
        let e = load(KUBECONFIG, Some("missing")).await.expect_err("error");
        assert!(e.to_string().contains("missing"), "{e}");
        let impersonating = KUBECONFIG.replace("{token: abc}", "{token: abc, as: root}");
        let e = load(&impersonating, None).await.expect_err("error");
        assert!(e.to_string().contains("impersonates"), "{e}");
        let proxied = KUBECONFIG.replace(
            "server: http",
            "proxy-url: http://proxy:3128\n    server: http",
        );
        let e = load(&proxied, None).await.expect_err("error");
        assert!(e.to_string().contains("proxy-url"), "{e}");
        let e = load("clusters: [", None).await.expect_err("error");
        assert!(e.to_string().contains("kc.yaml"), "{e}");
    }
}
