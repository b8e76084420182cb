//! A client for applications that reach Kubernetes clusters and in-cluster services
//! through kas's application API, following the rules an application needs when the
//! cluster side is not under its control:
//!
//! - one client object reaches several API groups of an agent's cluster (core
//!   `/api/v1`, `/apis/apps/v1`, `/apis/rbac.authorization.k8s.io/v1`, any group by name)
//!   and in-cluster services;
//! - redirects are never followed (a 3xx is an error: following one would let a cluster
//!   point the application anywhere);
//! - errors carry a status code and a kind, never the remote's message or body;
//! - every call has a timeout;
//! - [`ReactiveCache`] keeps cluster calls out of web requests: a handler gets the
//!   cached value or "not ready yet" at once while a background task refreshes.
//!
//! Every call is also logged to the `k8s_integration` tracing target (agent, target,
//! method, path, status, duration, error kind), never with tokens or bodies.
//!
//! It does not talk to clusters directly, hold cluster credentials, or parse
//! Kubernetes objects beyond JSON.

pub use kas_cache::CacheOptions;

/// What [`ReactiveCache::get`] answers (its error says only a code and kind).
pub type Cached<V> = kas_cache::Cached<V, Error>;

/// Keeps cluster calls out of web requests; see [`kas_cache`].
pub type ReactiveCache<K, V> = kas_cache::ReactiveCache<K, V, Error>;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kas_api::clock::unix_secs;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use kas_api::application::AgentState;
use kas_api::application::{AUDIENCE, PREFIX};
/// Lifetime of the tokens this client signs.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// What went wrong, without the remote's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// kas refused the application token (401).
    Unauthorized,
    /// The cluster, kas or the agent refused (403), e.g. a service not allowed.
    Forbidden,
    NotFound,
    /// The remote answered with a redirect, which is never followed.
    Redirect,
    /// The agent is not connected (503 from kas).
    Unavailable,
    /// Any other error status from the cluster or service.
    Status,
    /// The call took longer than its timeout.
    Timeout,
    /// kas could not be reached, or the connection broke.
    Transport,
    /// The answer was not the JSON expected.
    Decode,
    /// A bad argument (URL, header).
    Invalid,
}

/// An error of a call: a kind and, when the remote answered, its status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub status: Option<u16>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "Kubernetes error: {s}"),
            None => write!(f, "Kubernetes error: {:?}", self.kind),
        }
    }
}

impl Error {
    fn kind(kind: ErrorKind) -> Self {
        Error { kind, status: None }
    }

    fn from_status(status: StatusCode) -> Self {
        let kind = match status.as_u16() {
            300..=399 => ErrorKind::Redirect,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            503 => ErrorKind::Unavailable,
            _ => ErrorKind::Status,
        };
        Error {
            kind,
            status: Some(status.as_u16()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An error of a [`Transport`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// A response body a [`Transport`] hands back.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How a [`KasClient`] reaches kas's application API: over HTTP ([`KasClient::new`]),
/// or in process for kas's own background work ([`KasClient::with_transport`]). The
/// rules (signed tokens, timeouts, no redirects, error codes only, the integration
/// log) are the client's, whatever the transport.
pub trait Transport: Send + Sync + 'static {
    /// Sends `req` (its URI is a path and query) and returns the response head with
    /// its body still streaming.
    fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<ResponseBody>, BoxError>>;
}

/// The HTTP transport: `base` is kas's API listener.
struct HttpTransport {
    http: HttpsClient,
    base: Arc<str>,
}

impl Transport for HttpTransport {
    fn send(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<ResponseBody>, BoxError>> {
        let uri = format!("{}{}", self.base, req.uri());
        let http = self.http.clone();
        Box::pin(async move {
            *req.uri_mut() = uri.parse()?;
            let resp = http.request(req).await?;
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        })
    }
}

#[derive(Serialize)]
struct Claims {
    aud: &'static str,
    iss: &'static str,
    iat: u64,
    exp: u64,
}

/// Signs application tokens with the shared secret (cached while comfortably valid).
struct Signer {
    key: jsonwebtoken::EncodingKey,
    current: Mutex<Option<(String, u64)>>,
}

impl Signer {
    fn token(&self) -> Result<String> {
        let now = unix_secs();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, exp)) = cur.as_ref() {
            if *exp > now + TOKEN_LIFETIME.as_secs() / 2 {
                return Ok(t.clone());
            }
        }
        let claims = Claims {
            aud: AUDIENCE,
            iss: "application",
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
        };
        let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.key)
            .map_err(|_| Error::kind(ErrorKind::Invalid))?;
        *cur = Some((t.clone(), claims.exp));
        Ok(t)
    }
}

/// The client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct KasClient {
    transport: Arc<dyn Transport>,
    signer: Arc<Signer>,
    timeout: Duration,
}

/// Settings of a [`KasClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// kas's API listener, e.g. `https://kas.example.com` or `http://127.0.0.1:8153`.
    pub url: String,
    /// PEM CA to trust for an https `url` (otherwise the system's web PKI roots are
    /// not loaded: pass the CA that signs kas).
    pub ca_pem: Option<Vec<u8>>,
    /// Timeout of each call up to the response head (and of whole bodies read by the
    /// convenience methods).
    pub timeout: Duration,
}

impl KasClient {
    /// A client signing its tokens with `secret` (the file kas's `application.secret_file` holds).
    pub fn new(opts: ClientOptions, secret: &[u8]) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &opts.ca_pem {
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                let c = c.map_err(|_| Error::kind(ErrorKind::Invalid))?;
                roots.add(c).map_err(|_| Error::kind(ErrorKind::Invalid))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| Error::kind(ErrorKind::Invalid))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(opts.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // hyper's client never follows redirects: "max redirects: 0" by construction.
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let transport = HttpTransport {
            http,
            base: Arc::from(opts.url.trim_end_matches('/')),
        };
        Ok(Self::with_transport(
            Arc::new(transport),
            secret,
            opts.timeout,
        ))
    }

    /// A client over `transport`, signing its tokens with `secret`; `timeout` as in
    /// [`ClientOptions`].
    pub fn with_transport(transport: Arc<dyn Transport>, secret: &[u8], timeout: Duration) -> Self {
        KasClient {
            transport,
            signer: Arc::new(Signer {
                key: jsonwebtoken::EncodingKey::from_secret(secret),
                current: Mutex::new(None),
            }),
            timeout,
        }
    }

    /// Every agent kas knows, with its connection state.
    pub async fn agents(&self) -> Result<Vec<AgentState>> {
        let body = self
            .call(
                0,
                "kas",
                Method::GET,
                &format!("{PREFIX}/agents"),
                &[],
                Bytes::new(),
            )
            .await?
            .bytes(self.timeout)
            .await?;
        serde_json::from_slice(&body).map_err(|_| Error::kind(ErrorKind::Decode))
    }

    /// The cluster and services of one agent.
    pub fn agent(&self, agent_id: u64) -> AgentClient {
        AgentClient {
            kas: self.clone(),
            agent_id,
            headers: Vec::new(),
        }
    }

    async fn call(
        &self,
        agent_id: u64,
        target: &str,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Streamed> {
        let started = Instant::now();
        let log_path = path.split('?').next().unwrap_or_default().to_string();
        let result = self.call_inner(method.clone(), path, headers, body).await;
        let (status, kind) = match &result {
            Ok(s) => (Some(s.status), None),
            Err(e) => (e.status, Some(format!("{:?}", e.kind))),
        };
        tracing::info!(
            target: "k8s_integration",
            agent_id, target, method = %method, path = %log_path,
            status = status.unwrap_or(0), duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            error_kind = kind.as_deref(), "cluster call"
        );
        result
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Streamed> {
        let mut b = Request::builder().method(method).uri(path).header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", self.signer.token()?),
        );
        for (k, v) in headers {
            b = b.header(k.as_str(), v.as_str());
        }
        // Kubernetes takes JSON bodies and refuses untyped ones (415).
        let typed = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if !body.is_empty() && !typed {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = b
            .body(Full::new(body))
            .map_err(|_| Error::kind(ErrorKind::Invalid))?;
        let resp = tokio::time::timeout(self.timeout, self.transport.send(req))
            .await
            .map_err(|_| Error::kind(ErrorKind::Timeout))?
            .map_err(|_| Error::kind(ErrorKind::Transport))?;
        let status = resp.status();
        if !status.is_success() {
            // The body may say anything the remote wants; it is dropped unread.
            return Err(Error::from_status(status));
        }
        Ok(Streamed {
            status: status.as_u16(),
            body: resp.into_body(),
        })
    }
}

/// A successful response whose body is still streaming.
pub struct Streamed {
    pub status: u16,
    body: ResponseBody,
}

impl Streamed {
    /// The whole body, within `timeout`.
    pub async fn bytes(self, timeout: Duration) -> Result<Bytes> {
        tokio::time::timeout(timeout, self.body.collect())
            .await
            .map_err(|_| Error::kind(ErrorKind::Timeout))?
            .map(|c| c.to_bytes())
            .map_err(|_| Error::kind(ErrorKind::Transport))
    }

    /// The body as chunks as they arrive (no overall timeout: watches and streams may
    /// run as long as the caller reads them).
    pub fn chunks(self) -> futures::stream::BoxStream<'static, Result<Bytes>> {
        let s = futures::stream::unfold(Some(self.body), |b| async move {
            let mut body = b?;
            loop {
                match body.frame().await {
                    None => return None,
                    Some(Err(_)) => return Some((Err(Error::kind(ErrorKind::Transport)), None)),
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            return Some((Ok(data), Some(body)));
                        }
                    }
                }
            }
        });
        Box::pin(s)
    }
}

/// One agent's cluster API and services.
#[derive(Clone)]
pub struct AgentClient {
    kas: KasClient,
    agent_id: u64,
    headers: Vec<(String, String)>,
}

impl AgentClient {
    /// Calls the cluster as `user` (with `groups`) instead of as the agent.
    pub fn impersonate(mut self, user: &str, groups: &[&str]) -> Self {
        self.headers.retain(|(k, _)| !k.starts_with("Impersonate-"));
        self.headers.push(("Impersonate-User".into(), user.into()));
        for g in groups {
            self.headers.push(("Impersonate-Group".into(), (*g).into()));
        }
        self
    }

    /// The core API group (`/api/v1`).
    pub fn core(&self) -> ApiGroup {
        self.api("/api/v1".into())
    }

    /// `/apis/apps/v1`.
    pub fn apps_v1(&self) -> ApiGroup {
        self.group("apps", "v1")
    }

    /// `/apis/rbac.authorization.k8s.io/v1`.
    pub fn rbac_v1(&self) -> ApiGroup {
        self.group("rbac.authorization.k8s.io", "v1")
    }

    /// Any API group by name and version.
    pub fn group(&self, group: &str, version: &str) -> ApiGroup {
        self.api(format!("/apis/{group}/{version}"))
    }

    fn api(&self, root: String) -> ApiGroup {
        ApiGroup {
            agent: self.clone(),
            root,
        }
    }

    /// An in-cluster HTTP service (it must be in the agent's `service_access`).
    pub fn service(&self, scheme: &str, host: &str, port: u16) -> ServiceClient {
        ServiceClient {
            agent: self.clone(),
            root: format!("/services/{scheme}/{host}/{port}"),
            target: format!("service:{scheme}://{host}:{port}"),
        }
    }

    async fn call(
        &self,
        target: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Streamed> {
        let full = format!("{PREFIX}/agents/{}{path}", self.agent_id);
        self.kas
            .call(self.agent_id, target, method, &full, &self.headers, body)
            .await
    }
}

/// One API group of one agent's cluster.
#[derive(Clone)]
pub struct ApiGroup {
    agent: AgentClient,
    root: String,
}

impl ApiGroup {
    fn path(&self, rel: &str) -> String {
        format!("/kubernetes{}/{}", self.root, rel.trim_start_matches('/'))
    }

    /// GET `<group root>/<rel>` as JSON (e.g. `namespaces/default/pods`).
    pub async fn get_json(&self, rel: &str) -> Result<serde_json::Value> {
        let body = self
            .agent
            .call("kubernetes", Method::GET, &self.path(rel), Bytes::new())
            .await?
            .bytes(self.agent.kas.timeout)
            .await?;
        serde_json::from_slice(&body).map_err(|_| Error::kind(ErrorKind::Decode))
    }

    /// Lists `resource`, in `namespace` or cluster-wide.
    pub async fn list(&self, resource: &str, namespace: Option<&str>) -> Result<serde_json::Value> {
        match namespace {
            Some(ns) => self.get_json(&format!("namespaces/{ns}/{resource}")).await,
            None => self.get_json(resource).await,
        }
    }

    /// Any request, body streamed back (watches, logs).
    pub async fn send(&self, method: Method, rel: &str, body: Bytes) -> Result<Streamed> {
        self.agent
            .call("kubernetes", method, &self.path(rel), body)
            .await
    }
}

/// One in-cluster service of one agent.
#[derive(Clone)]
pub struct ServiceClient {
    agent: AgentClient,
    root: String,
    target: String,
}

impl ServiceClient {
    /// GET `path` (with its query), body streamed back.
    pub async fn get(&self, path_and_query: &str) -> Result<Streamed> {
        self.send(Method::GET, path_and_query, Bytes::new()).await
    }

    /// Any request to the service.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Streamed> {
        let p = format!("{}/{}", self.root, path_and_query.trim_start_matches('/'));
        self.agent.call(&self.target, method, &p, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_show_only_a_code() {
        let e = Error::from_status(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.to_string(), "Kubernetes error: 500");
        assert_eq!(e.kind, ErrorKind::Status);
        assert_eq!(
            Error::from_status(StatusCode::FOUND).kind,
            ErrorKind::Redirect
        );
        assert_eq!(
            Error::from_status(StatusCode::FORBIDDEN).kind,
            ErrorKind::Forbidden
        );
        assert_eq!(
            Error::kind(ErrorKind::Timeout).to_string(),
            "Kubernetes error: Timeout"
        );
    }
}
