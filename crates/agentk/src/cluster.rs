//! The agent's own access to its cluster's API, configured by `kube`'s [`Config`]: the
//! pod's ServiceAccount in a cluster (its token re-read as it rotates, its CA re-read as
//! it rotates), or a kubeconfig outside one, with everything `kube` supports there:
//! bearer tokens and token files, client certificates, exec credential plugins (their
//! tokens refreshed before they expire), CA data, `tls-server-name` and (discouraged)
//! `insecure-skip-tls-verify`.
//!
//! It does not use `kube`'s client: requests to the API are forwarded byte for byte,
//! upgrades included, over HTTP/1.1 with `kube`'s TLS connector and authentication
//! layer. Each tunnel keeps its own connection to the API between its exchanges
//! ([`KeptConnection`]): a tunnel serves one exchange at a time, as an HTTP/1.1
//! connection does, so no shared pool has to be consulted per request. Requests to
//! in-cluster services go through a pooled client ([`ClusterClient`]).

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kas_telemetry::quiet::{first_of, First};
use kube::client::middleware::AuthLayer;
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Config;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

/// Request body type towards the cluster.
pub type UpstreamBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A request body that is empty (and says so, so no `Transfer-Encoding` is sent).
pub fn empty_body() -> UpstreamBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// How long connecting to the API server may take when the configuration does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection to the API server idle for this long (up to twice as long, for kept
/// connections) is closed: tunnels outlive bursts, and the API server may never close
/// an idle connection itself. The pooled clients close theirs after as long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a kept connection may take to become ready for the next request after the
/// previous response was read to its end (its task may not have caught up yet).
const READY_WAIT: Duration = Duration::from_secs(1);

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

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

/// A pooled HTTP/1.1 client for in-cluster services (HTTP/1.1 so upgrades work). It
/// trusts the cluster's CA and never presents the agent's credentials.
#[derive(Clone)]
pub struct ClusterClient {
    http: Client<HttpsConnector, UpstreamBody>,
}

impl ClusterClient {
    /// Sends `req` (absolute URI).
    pub async fn request(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        Ok(self.http.request(req).await?)
    }
}

/// What adds the agent's credentials to a request: `kube`'s authentication layer
/// around a service that hands the request back (inside a `Response`, which one arm
/// of the layer insists its inner service returns).
type Authorize = <AuthLayer as Layer<HandBack>>::Service;
type Authorized = Response<Request<UpstreamBody>>;
type HandBack = tower::util::ServiceFn<
    fn(Request<UpstreamBody>) -> std::future::Ready<Result<Authorized, BoxError>>,
>;

fn hand_back(req: Request<UpstreamBody>) -> std::future::Ready<Result<Authorized, BoxError>> {
    std::future::ready(Ok(Response::new(req)))
}

/// Opens connections to the cluster's API and sends requests on the connection a
/// tunnel keeps, with the agent's credentials.
pub struct ClusterConnector {
    connector: HttpsConnector,
    server: Uri,
    /// The `Host` header of every request, worked out once.
    host: http::HeaderValue,
    credentials: Credentials,
    idle_timeout: Duration,
}

/// How requests to the API server are authenticated.
enum Credentials {
    /// Not at all (a kubeconfig without a user).
    None,
    /// With one `Authorization` header that never changes (a token or a user name and
    /// password in the configuration), worked out once.
    Fixed(http::HeaderValue),
    /// By `kube`'s layer for each request (token files re-read as they rotate, exec
    /// plugins' tokens refreshed before they expire).
    Refreshed(Authorize),
}

impl Credentials {
    fn new(layer: Option<AuthLayer>) -> Result<Self, ClusterConfigError> {
        let Some(layer) = layer else {
            return Ok(Credentials::None);
        };
        let authorize = layer.layer(tower::service_fn(hand_back as _));
        let tower05::util::Either::Left(fixed) = &authorize else {
            return Ok(Credentials::Refreshed(authorize));
        };
        // The fixed arm adds a header it holds: ask it once for the header.
        let probe =
            ServiceExt::<Request<UpstreamBody>>::oneshot(fixed.clone(), Request::new(empty_body()));
        match futures::FutureExt::now_or_never(probe) {
            Some(Ok(resp)) => resp
                .into_body()
                .headers()
                .get(http::header::AUTHORIZATION)
                .cloned()
                .map(Credentials::Fixed)
                .ok_or_else(|| {
                    ClusterConfigError::Client("the credentials add no Authorization header".into())
                }),
            _ => Ok(Credentials::Refreshed(authorize)),
        }
    }
}

/// The connection to the cluster's API one tunnel keeps between its exchanges (none
/// until its first request, or after one that ended it). Its task closes it once it
/// has seen no exchange for [`IDLE_TIMEOUT`].
#[derive(Default)]
pub struct KeptConnection(Option<(SendRequest<UpstreamBody>, Arc<Usage>)>);

/// What the task of a kept connection reads to tell whether it is idle.
struct Usage {
    /// An exchange is using the connection (its response may be streaming for long).
    busy: AtomicBool,
    /// Exchanges that ended.
    ended: AtomicU64,
}

impl KeptConnection {
    /// The exchange that used the connection has ended (its response was read to the
    /// end, or abandoned).
    pub fn exchange_ended(&mut self) {
        if let Some((_, usage)) = &self.0 {
            usage.ended.fetch_add(1, Ordering::Relaxed);
            usage.busy.store(false, Ordering::Relaxed);
        }
    }

    /// The kept connection, if it can carry the next request.
    async fn take_ready(&mut self) -> Option<(SendRequest<UpstreamBody>, Arc<Usage>)> {
        let (mut sender, usage) = self.0.take()?;
        if sender.is_closed() {
            return None;
        }
        if !sender.is_ready() {
            match tokio::time::timeout(READY_WAIT, sender.ready()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
        usage.busy.store(true, Ordering::Relaxed);
        Some((sender, usage))
    }

    fn keep(&mut self, sender: SendRequest<UpstreamBody>, usage: Arc<Usage>) {
        self.0 = Some((sender, usage));
    }
}

impl ClusterConnector {
    /// Sends `req` (origin-form URI: path and query) on `kept`, or on a new connection
    /// kept from then on. Its `Host` and `Authorization` are the agent's.
    pub async fn request(
        &self,
        kept: &mut KeptConnection,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        match &self.credentials {
            Credentials::None => {}
            Credentials::Fixed(value) => {
                req.headers_mut()
                    .insert(http::header::AUTHORIZATION, value.clone());
            }
            Credentials::Refreshed(a) => {
                // Boxed: the layered service's future defeats callers' `Send` inference.
                let authorized: BoxFuture<'static, Result<Authorized, BoxError>> =
                    Box::pin(a.clone().oneshot(req));
                req = authorized.await?.into_body();
            }
        }
        req.headers_mut()
            .insert(http::header::HOST, self.host.clone());
        if let Some((mut sender, usage)) = kept.take_ready().await {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    kept.keep(sender, usage);
                    return Ok(resp);
                }
                // The server closed the connection before the request went out (it
                // ended an idle connection): the request goes on a new one.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let usage = Arc::new(Usage {
            busy: AtomicBool::new(true),
            ended: AtomicU64::new(0),
        });
        let mut sender = self.connect(usage.clone()).await?;
        let resp = sender.send_request(req).await?;
        kept.keep(sender, usage);
        Ok(resp)
    }

    /// A new HTTP/1.1 connection to the API server, driven by its own task. The task
    /// ends when the connection closes, when its sender is dropped while it is idle, or
    /// when a whole `idle_timeout` went by without an exchange using it.
    async fn connect(&self, usage: Arc<Usage>) -> Result<SendRequest<UpstreamBody>, BoxError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.server.clone()).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await?;
        let idle_timeout = self.idle_timeout;
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn.with_upgrades());
            let mut seen = usage.ended.load(Ordering::Relaxed);
            loop {
                // The timer is polled only when it fires, not on each of the
                // connection's wakes (several per request).
                let idle = std::pin::pin!(tokio::time::sleep(idle_timeout));
                match first_of(conn.as_mut(), idle).await {
                    First::Busy(ended) => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "cluster API connection ended");
                        }
                        return;
                    }
                    First::Quiet(()) => {
                        let now = usage.ended.load(Ordering::Relaxed);
                        if now == seen && !usage.busy.load(Ordering::Relaxed) {
                            tracing::debug!("closing an idle cluster API connection");
                            return;
                        }
                        seen = now;
                    }
                }
            }
        });
        Ok(sender)
    }
}

/// The `Host` header for requests to `uri`, as an HTTP client would set it: the host,
/// with the port unless it is the scheme's default.
fn host_header(uri: &Uri) -> Option<http::HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    match uri.port_u16() {
        Some(p) if Some(p) != default_port => {
            http::HeaderValue::from_str(&format!("{host}:{p}")).ok()
        }
        _ => http::HeaderValue::from_str(host).ok(),
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

    /// Connections to the cluster's API, with the agent's credentials.
    pub fn connector(&self) -> Result<ClusterConnector, ClusterConfigError> {
        let auth = self
            .config
            .auth_layer()
            .map_err(|e| ClusterConfigError::Client(e.to_string()))?;
        let server = &self.config.cluster_url;
        let host = host_header(server).ok_or_else(|| {
            ClusterConfigError::Client(format!("the server URL `{server}` names no host"))
        })?;
        Ok(ClusterConnector {
            connector: Self::https(&self.config)?,
            server: server.clone(),
            host,
            credentials: Credentials::new(auth)?,
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    /// A client for in-cluster services: it trusts the cluster's CA but never presents
    /// the agent's credentials (services must not receive them).
    pub fn service_client(&self) -> Result<ClusterClient, ClusterConfigError> {
        let mut config = self.config.clone();
        config.auth_info = Default::default();
        Ok(ClusterClient {
            http: Self::http(&config)?,
        })
    }

    fn http(config: &Config) -> Result<Client<HttpsConnector, UpstreamBody>, ClusterConfigError> {
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(256)
            .build(Self::https(config)?))
    }

    /// TCP with TLS as `config` says (plain TCP for an `http://` URL).
    fn https(config: &Config) -> Result<HttpsConnector, ClusterConfigError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout.unwrap_or(CONNECT_TIMEOUT)));
        config
            .rustls_https_connector_with_connector(http)
            .map_err(|e| ClusterConfigError::Client(e.to_string()))
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

    #[test]
    fn host_headers_name_the_port_unless_it_is_the_default() {
        let h = |u: &str| {
            host_header(&u.parse().expect("uri")).map(|v| v.to_str().expect("ascii").to_string())
        };
        assert_eq!(h("https://k:6443/").as_deref(), Some("k:6443"));
        assert_eq!(h("https://k:443").as_deref(), Some("k"));
        assert_eq!(h("https://k").as_deref(), Some("k"));
        assert_eq!(h("http://10.0.0.1:80/x").as_deref(), Some("10.0.0.1"));
        assert_eq!(h("http://10.0.0.1:8080").as_deref(), Some("10.0.0.1:8080"));
        assert_eq!(h("https://[::1]:6443").as_deref(), Some("[::1]:6443"));
    }

    /// A raw HTTP/1.1 server for the kept connections' tests.
    struct TestServer {
        addr: std::net::SocketAddr,
        /// Request heads, in the order they came.
        heads: Arc<std::sync::Mutex<Vec<String>>>,
        /// Connections accepted.
        conns: Arc<std::sync::atomic::AtomicUsize>,
        /// One message per connection the client closed.
        closed: tokio::sync::mpsc::UnboundedReceiver<()>,
        /// Lets `/slow` responses end.
        release: Arc<tokio::sync::Notify>,
    }

    impl TestServer {
        /// Answers every request with 200 `ok` (`/slow`: the first chunk of a chunked
        /// body, the end once released). After `per_connection` responses it closes the
        /// connection without notice, as a server ending idle connections does.
        async fn start(per_connection: usize) -> TestServer {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
            let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let release = Arc::new(tokio::sync::Notify::new());
            let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
            let (h, c, r) = (heads.clone(), conns.clone(), release.clone());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    let (h, r, closed_tx) = (h.clone(), r.clone(), closed_tx.clone());
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        for _ in 0..per_connection {
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                let mut chunk = [0u8; 1024];
                                match s.read(&mut chunk).await {
                                    Ok(0) | Err(_) => {
                                        let _ = closed_tx.send(());
                                        return;
                                    }
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            let head = String::from_utf8_lossy(&buf).into_owned();
                            buf.clear();
                            let slow = head.starts_with("GET /slow ");
                            h.lock().expect("lock").push(head);
                            let written = if slow {
                                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n";
                                let sent = s.write_all(start).await;
                                r.notified().await;
                                match sent {
                                    Ok(()) => s.write_all(b"0\r\n\r\n").await,
                                    e => e,
                                }
                            } else {
                                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                    .await
                            };
                            if written.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            TestServer {
                addr,
                heads,
                conns,
                closed,
                release,
            }
        }

        fn connections(&self) -> usize {
            self.conns.load(Ordering::SeqCst)
        }

        async fn connector(&self) -> ClusterConnector {
            let kubeconfig = KUBECONFIG.replace("127.0.0.1:6443", &self.addr.to_string());
            load(&kubeconfig, None)
                .await
                .expect("parse")
                .connector()
                .expect("connector")
        }
    }

    fn get(path: &'static str) -> Request<UpstreamBody> {
        let mut r = Request::new(empty_body());
        *r.uri_mut() = Uri::from_static(path);
        r
    }

    async fn body(resp: Response<Incoming>) -> Bytes {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn a_kept_connection_carries_the_next_request_until_the_server_closes_it() {
        let server = TestServer::start(2).await;
        let cluster = server.connector().await;
        let mut kept = KeptConnection::default();
        for _ in 0..3 {
            let resp = cluster
                .request(&mut kept, get("/version"))
                .await
                .expect("response");
            assert_eq!(resp.status(), 200);
            assert_eq!(&body(resp).await[..], b"ok");
            kept.exchange_ended();
        }
        // Two requests on the first connection; the third on a new one after the
        // server closed the first.
        assert_eq!(server.connections(), 2);
        cluster
            .request(&mut kept, get("/version"))
            .await
            .expect("response");
        assert_eq!(server.connections(), 2, "the second connection is kept");
        let mut other = KeptConnection::default();
        cluster
            .request(&mut other, get("/version"))
            .await
            .expect("response");
        assert_eq!(
            server.connections(),
            3,
            "another tunnel has its own connection"
        );
        let heads = server.heads.lock().expect("lock").clone();
        assert_eq!(heads.len(), 5);
        for h in heads {
            let h = h.to_ascii_lowercase();
            assert!(h.starts_with("get /version http/1.1\r\n"), "{h}");
            assert!(h.contains("authorization: bearer abc\r\n"), "{h}");
            assert!(h.contains(&format!("host: {}\r\n", server.addr)), "{h}");
        }
    }

    #[tokio::test]
    async fn a_kept_connection_is_closed_once_idle_but_not_while_a_response_streams() {
        let mut server = TestServer::start(100).await;
        let mut cluster = server.connector().await;
        cluster.idle_timeout = Duration::from_millis(50);
        let mut kept = KeptConnection::default();

        // A response still streaming after several idle timeouts keeps its connection.
        let resp = cluster
            .request(&mut kept, get("/slow"))
            .await
            .expect("response");
        tokio::time::sleep(cluster.idle_timeout * 6).await;
        server.release.notify_one();
        assert_eq!(&body(resp).await[..], b"ok");
        kept.exchange_ended();
        assert!(server.closed.try_recv().is_err(), "closed while streaming");

        // Once idle, the connection is closed, and the next request opens another.
        tokio::time::timeout(Duration::from_secs(10), server.closed.recv())
            .await
            .expect("the idle connection is closed");
        assert_eq!(server.connections(), 1);
        let resp = cluster
            .request(&mut kept, get("/version"))
            .await
            .expect("response");
        assert_eq!(&body(resp).await[..], b"ok");
        assert_eq!(server.connections(), 2);
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
