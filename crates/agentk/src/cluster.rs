//! The agent's own access to its cluster's API: in-cluster ServiceAccount, or a
//! kubeconfig outside a cluster. Supports bearer tokens (inline or from a file that
//! is re-read as it rotates), client certificates, CA data and (discouraged)
//! `insecure-skip-tls-verify`.

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Request body type towards the cluster.
pub type UpstreamBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("not running in a cluster (KUBERNETES_SERVICE_HOST is not set); pass --kubeconfig")]
    NotInCluster,
    #[error("TLS: {0}")]
    Tls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, ClusterConfigError> {
    std::fs::read(path).map_err(|source| ClusterConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Where the cluster's API is and how to authenticate to it.
#[derive(Clone)]
pub struct ClusterAccess {
    pub server: Uri,
    pub ca_pem: Option<Vec<u8>>,
    pub insecure: bool,
    pub auth: Auth,
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Bearer credentials of the agent.
#[derive(Clone)]
pub enum Auth {
    None,
    Token(String),
    /// Re-read every minute: projected ServiceAccount tokens rotate.
    TokenFile(PathBuf, Arc<Mutex<Option<(Instant, String)>>>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(****)"),
            Auth::TokenFile(p, _) => write!(f, "TokenFile({})", p.display()),
        }
    }
}

impl Auth {
    /// The `Authorization` header value, if any.
    pub fn header(&self) -> Option<HeaderValue> {
        let token = match self {
            Auth::None => return None,
            Auth::Token(t) => t.clone(),
            Auth::TokenFile(path, cache) => {
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                match &*c {
                    Some((at, t)) if at.elapsed() < Duration::from_secs(60) => t.clone(),
                    _ => match std::fs::read_to_string(path) {
                        Ok(t) => {
                            let t = t.trim().to_string();
                            *c = Some((Instant::now(), t.clone()));
                            t
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot read the cluster token file");
                            c.as_ref().map(|(_, t)| t.clone())?
                        }
                    },
                }
            }
        };
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("invalid base64: {e}"))
}

impl ClusterAccess {
    /// In-cluster configuration from the pod's ServiceAccount.
    pub fn in_cluster() -> Result<Self, ClusterConfigError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| ClusterConfigError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let sa = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
        let server = format!("https://{host}:{port}")
            .parse()
            .map_err(|_| ClusterConfigError::NotInCluster)?;
        Ok(ClusterAccess {
            server,
            ca_pem: Some(read(&sa.join("ca.crt"))?),
            insecure: false,
            auth: Auth::TokenFile(sa.join("token"), Default::default()),
            client_identity: None,
        })
    }

    /// From a kubeconfig file (its current context, or `context`).
    pub fn from_kubeconfig(path: &Path, context: Option<&str>) -> Result<Self, ClusterConfigError> {
        let text = read(path)?;
        let err = |message: String| ClusterConfigError::Kubeconfig {
            path: path.to_path_buf(),
            message,
        };
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_slice(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let s = |v: &serde_yaml_ng::Value, k: &str| {
            v.get(k).and_then(|x| x.as_str()).map(str::to_string)
        };
        let find = |list: &str, name: &str, inner: &str| -> Option<serde_yaml_ng::Value> {
            doc.get(list)?
                .as_sequence()?
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
                .and_then(|e| e.get(inner).cloned())
        };
        let ctx_name = context
            .map(str::to_string)
            .or_else(|| s(&doc, "current-context").filter(|c| !c.is_empty()))
            .ok_or_else(|| err("no current-context; pass --context".into()))?;
        let ctx = find("contexts", &ctx_name, "context")
            .ok_or_else(|| err(format!("context `{ctx_name}` not found")))?;
        let cluster_name = s(&ctx, "cluster")
            .ok_or_else(|| err(format!("context `{ctx_name}` names no cluster")))?;
        let cluster = find("clusters", &cluster_name, "cluster")
            .ok_or_else(|| err(format!("cluster `{cluster_name}` not found")))?;
        let server: Uri = s(&cluster, "server")
            .ok_or_else(|| err(format!("cluster `{cluster_name}` has no server")))?
            .parse()
            .map_err(|_| {
                err(format!(
                    "cluster `{cluster_name}` has an invalid server URL"
                ))
            })?;
        let file_or_data = |v: &serde_yaml_ng::Value,
                            file_key: &str,
                            data_key: &str|
         -> Result<Option<Vec<u8>>, ClusterConfigError> {
            if let Some(d) = s(v, data_key) {
                return b64(&d)
                    .map(Some)
                    .map_err(|m| err(format!("{data_key}: {m}")));
            }
            match s(v, file_key) {
                Some(f) => read(&base.join(f)).map(Some),
                None => Ok(None),
            }
        };
        let ca_pem = file_or_data(
            &cluster,
            "certificate-authority",
            "certificate-authority-data",
        )?;
        let insecure = cluster
            .get("insecure-skip-tls-verify")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let (auth, client_identity) = match s(&ctx, "user") {
            None => (Auth::None, None),
            Some(user_name) => {
                let user = find("users", &user_name, "user")
                    .ok_or_else(|| err(format!("user `{user_name}` not found")))?;
                let auth = if let Some(t) = s(&user, "token") {
                    Auth::Token(t)
                } else if let Some(f) = s(&user, "tokenFile") {
                    Auth::TokenFile(base.join(f), Default::default())
                } else {
                    Auth::None
                };
                let cert = file_or_data(&user, "client-certificate", "client-certificate-data")?;
                let key = file_or_data(&user, "client-key", "client-key-data")?;
                let id = match (cert, key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => {
                        return Err(err(format!(
                            "user `{user_name}` needs both a client certificate and key"
                        )))
                    }
                };
                if user.get("exec").is_some() || user.get("auth-provider").is_some() {
                    return Err(err(format!(
                        "user `{user_name}` uses an exec or auth-provider plugin, which agentk does not run; use a token or client certificate"
                    )));
                }
                (auth, id)
            }
        };
        Ok(ClusterAccess {
            server,
            ca_pem,
            insecure,
            auth,
            client_identity,
        })
    }

    /// A pooled HTTP/1.1 client for the cluster (HTTP/1.1 so upgrades work).
    pub fn client(
        &self,
    ) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>, ClusterConfigError>
    {
        self.build_client(true)
    }

    /// A client for in-cluster services: it trusts the cluster's CA but never presents
    /// the agent's client certificate (services must not receive cluster credentials).
    pub fn service_client(
        &self,
    ) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>, ClusterConfigError>
    {
        self.build_client(false)
    }

    fn build_client(
        &self,
        with_identity: bool,
    ) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>, ClusterConfigError>
    {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClusterConfigError::Tls(e.to_string()))?;
        let builder = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(crate::dial::NoVerification(provider)))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(pem) = &self.ca_pem {
                for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let c =
                        c.map_err(|e| ClusterConfigError::Tls(format!("CA certificate: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| ClusterConfigError::Tls(format!("CA certificate: {e}")))?;
                }
            }
            builder.with_root_certificates(roots)
        };
        let identity = self.client_identity.as_ref().filter(|_| with_identity);
        let tls = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = rustls_pemfile::certs(&mut cert.as_slice())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClusterConfigError::Tls(format!("client certificate: {e}")))?;
                let key = rustls_pemfile::private_key(&mut key.as_slice())
                    .map_err(|e| ClusterConfigError::Tls(format!("client key: {e}")))?
                    .ok_or_else(|| ClusterConfigError::Tls("client key: no key found".into()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| ClusterConfigError::Tls(e.to_string()))?
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_token_and_context() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("kc.yaml");
        std::fs::write(
            &p,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:6443\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\nusers:\n- name: u\n  user: {token: abc}\n",
        )
        .expect("write");
        let a = ClusterAccess::from_kubeconfig(&p, None).expect("parse");
        assert_eq!(a.server.to_string(), "http://127.0.0.1:6443/");
        assert_eq!(a.auth.header().expect("h"), "Bearer abc");
        assert!(format!("{:?}", a.auth).contains("****"));
        let e = ClusterAccess::from_kubeconfig(&p, Some("missing"))
            .err()
            .expect("error");
        assert!(e.to_string().contains("`missing`"), "{e}");
    }
}
